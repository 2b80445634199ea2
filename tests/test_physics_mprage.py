"""MPRAGE with its readout train (Deichmann's full expression, ``synth7t.physics.mprage``)."""
from __future__ import annotations

import math

import pytest

from synth7t.physics import Physics, mprage

#: T1-weighted protocols of large 3 T studies (TR, TI ms; FA deg): UK Biobank (Miller et al.,
#: Nat Neurosci 2016;19:1523), ADNI-3, HCP (Glasser et al., NeuroImage 2013;80:105), ABCD
#: (Casey et al., Dev Cogn Neurosci 2018;32:43).
STUDIES_3T = {"UK Biobank": (2000, 880, 8), "ADNI-3": (2300, 900, 9), "HCP": (2400, 1000, 8),
              "ABCD": (2500, 1060, 8)}


#: ADNI-3's 3 T MPRAGE readout: 176 sagittal partitions per inversion, 7.1 ms apart, linear order.
ADNI_TRAIN = {"pulses": 176, "echo_spacing_ms": 7.1, "centre": 0.5}


def _bloch(T1: float, *, TR: float, TI: float, FA: float, train: dict, cycles: int = 40) -> float:
    """Mz at the k-space centre, stepped pulse by pulse through ``cycles`` inversions."""
    n, tau = int(train["pulses"]), train["echo_spacing_ms"]
    k0 = int(round(train["centre"] * n))
    ta, a = TI - k0 * tau, math.radians(FA)
    td = TR - ta - n * tau

    def relax(m: float, t: float) -> float:
        return 1 - (1 - m) * math.exp(-t / T1)

    m, centre = 1.0, None
    for _ in range(cycles):
        m = relax(-m, ta)
        for k in range(n):
            if k == k0:
                centre = m
            m = relax(m * math.cos(a), tau)
        m = relax(m, td)
    return centre


@pytest.mark.parametrize("T1", [700.0, 1300.0, 4300.0])
def test_closed_form_is_the_steady_state_of_the_pulse_sequence(T1):
    train, kw = ADNI_TRAIN, dict(TR=2300.0, TI=900.0, FA=9.0)
    closed = mprage(1.0, T1, 1e9, TE=0.0, train=train, **kw) / math.sin(math.radians(9.0))
    assert closed == pytest.approx(abs(_bloch(T1, train=train, **kw)), rel=1e-6)


def _nighres_prior(shared_data, block: str) -> dict[str, float]:
    """Per-structure intensity centres of one ``Intensity Prior`` block of the nighres atlas."""
    lines = (shared_data / "nighres_priors" / "brain-atlas-quant-3.0.9.txt").read_text().splitlines()
    i = lines.index(f"Intensity Prior:\t{block}")
    out = {}
    for line in lines[i + 1:]:
        parts = line.split()
        if len(parts) < 2:
            break
        out[parts[0]] = float(parts[1])
    return out


def _t1w_ratios(phys: Physics, protocol: dict) -> dict[str, float]:
    s = phys.tissue_signals("T1w", 3.0, protocol,
                            tissues=("WM", "GM", "caudate", "putamen", "thalamus", "CSF"))
    return {t: v / s["WM"] for t, v in s.items()}


def test_the_first_order_default_gives_the_measured_3t_mprage_contrasts(shared_data):
    """FIELD_PHYSICS.md points at the nighres priors to check simulated contrasts: the nominal
    3 T MPRAGE (first-order form, the shipped table) is within 0.05 of the measured grey matter
    and deep nuclei relative to white matter; the full expression with an ADNI-like readout
    train is not (0.75 for 0.57), which is why it is not the table's default."""
    prior = _nighres_prior(shared_data, "Mprage3T")
    wm = prior["Cerebrum-WML"]
    measured = {"GM": prior["Cerebrum-GML"] / wm, "caudate": prior["CaudateL"] / wm,
                "putamen": prior["PutamenL"] / wm, "thalamus": prior["ThalamusL"] / wm}
    phys = Physics.load()
    nominal = phys.protocol("T1w", 3.0)
    assert "train" not in nominal
    first = _t1w_ratios(phys, nominal)
    for t, m in measured.items():
        assert abs(first[t] - m) <= 0.05, (t, first[t], m)
    full = _t1w_ratios(phys, dict(nominal, train=ADNI_TRAIN))
    assert full["GM"] - measured["GM"] > 0.1


def test_the_readout_train_keeps_csf_dark_across_study_protocols():
    """What the full expression is for: over UK Biobank, ADNI-3, HCP and ABCD the contrast
    hardly moves, as their images do, where the first-order form nulls CSF at some of them."""
    phys = Physics.load()
    base = phys.protocol("T1w", 3.0)
    full, first = [], []
    for tr, ti, fa in STUDIES_3T.values():
        prot = dict(base, TR=tr, TI=ti, FA=fa)
        full.append(_t1w_ratios(phys, dict(prot, train=ADNI_TRAIN)))
        first.append(_t1w_ratios(phys, prot))
    gm = [r["GM"] for r in full]
    assert max(gm) - min(gm) < 0.03 and all(0.15 < r["CSF"] < 0.25 for r in full), full
    assert min(r["CSF"] for r in first) < 0.05


def test_training_draws_both_mprage_forms_for_sources_only():
    """A widened (training) table with the option at 0.5 renders about half its MPRAGE sources
    with the readout train; the table itself, the 7 T target and other sequences never; and the
    table's own random stream is what it was without the option (validation renders do not
    move); the shipped table's option is 0, so its training streams do not move either."""
    import copy

    import numpy as np

    from synth7t.physics import MPRAGE_TRAIN_KEY

    phys = Physics.load()
    assert phys.mprage_train() == ADNI_TRAIN
    assert MPRAGE_TRAIN_KEY not in phys.table
    tab = copy.deepcopy(phys.table)  # the shipped table has it off (physics.json says why)
    p = tab["training_widening"]["mprage_train_probability"]["value"] = 0.5
    wide = Physics(tab).widened()
    rng = np.random.default_rng(0)
    drawn = [wide.protocol("T1w", 3.0, rng) for _ in range(400)]
    share = np.mean(["train" in d for d in drawn])
    assert abs(share - p) < 0.08
    assert all(d["train"] == ADNI_TRAIN for d in drawn if "train" in d)
    for table, field, contrast in ((wide, 7.0, "T1w"), (wide, 3.0, "T2w"), (phys, 3.0, "T1w")):
        assert "train" not in table.protocol(contrast, field, np.random.default_rng(1))
    bare = copy.deepcopy(phys.table)
    del bare["mprage_train"]
    del bare["training_widening"]["mprage_train_probability"]
    for table, other in ((phys, Physics(bare)), (phys.widened(), Physics(bare).widened())):
        a, b = np.random.default_rng(5), np.random.default_rng(5)
        for c, f in (("T1w", 3.0), ("T2w", 1.5), ("T1w", 5.0)):
            assert table.protocol(c, f, a) == other.protocol(c, f, b)
    forced = copy.deepcopy(phys.table)
    forced[MPRAGE_TRAIN_KEY] = 1.0
    full = Physics(forced).protocol("T1w", 3.0, np.random.default_rng(2))
    assert full["train"] == ADNI_TRAIN
    ratio = _t1w_ratios(phys, full)["GM"]
    assert abs(ratio - _t1w_ratios(phys, dict(full, train=None))["GM"]) > 0.1


def test_a_protocol_too_short_for_its_train_stays_finite():
    s = mprage(1.0, 1000.0, 50.0, TR=1200.0, TI=400.0, TE=3.0, FA=9.0, train=ADNI_TRAIN)
    assert math.isfinite(s) and 0 <= s <= 1
