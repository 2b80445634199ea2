"""The sourced TSE/FLAIR correction and the training widening of the physics table."""
import numpy as np
import pytest

from synth7t.physics import Physics
from synth7t.simulate import Simulator

FIELDS = (0.1, 1.5, 3.0, 5.0, 7.0)


@pytest.mark.parametrize("field", FIELDS)
def test_flair_grey_matter_brighter_than_white_matter(field):
    """Published FLAIR (clinical fields and 7 T) shows GM brighter than WM, CSF nulled."""
    sig = Physics.load().tissue_signals("FLAIR", field)
    ratio = sig["GM"] / sig["WM"]
    # 3 T FLAIR GM/WM is about 1.1-1.3 in vivo; 7 T 3D FLAIR has the smallest margin
    assert 1.03 < ratio < 1.7, ratio
    assert sig["CSF"] < 0.2 * sig["WM"]


@pytest.mark.parametrize("field", FIELDS)
def test_t2w_order(field):
    sig = Physics.load().tissue_signals("T2w", field)
    assert sig["CSF"] > sig["GM"] > sig["WM"]
    assert 1.1 < sig["GM"] / sig["WM"] < 1.8


def test_correction_only_touches_spin_echo_sequences():
    phys = Physics.load()
    for field in FIELDS:
        proto = phys.protocol("T1w", field)
        assert phys.tse_factor("WM", proto) == 1.0
    flair7 = phys.protocol("FLAIR", 7.0)
    assert phys.tse_factor("CSF", flair7) == 1.0
    assert phys.tse_factor("WM", flair7) < phys.tse_factor("GM", flair7) < 1.0


def test_every_tse_protocol_names_its_readout():
    phys = Physics.load()
    for c in ("T2w", "FLAIR"):
        for f in FIELDS:
            assert phys.protocol(c, f)["readout"] in ("2D_TSE", "3D_TSE")


def test_flair_ordering_in_rendered_images():
    """The rendered 7 T FLAIR target of ICBM152 has brighter GM than WM (tissue medians)."""
    sim = Simulator.from_icbm152()
    roi = (slice(100, 260), slice(120, 320), slice(180, 186))
    out = sim.sample("FLAIR", 3.0, seed=5, roi=roi, deform=False)
    fr = sim.anatomy.resample(roi)
    for role in ("source", "target"):
        img = out[role]
        gm = np.median(img[fr["GM"] > 0.9])
        wm = np.median(img[fr["WM"] > 0.9])
        assert gm > 1.02 * wm, (role, gm, wm)


def test_widened_ranges_contain_the_table_and_scale():
    phys = Physics.load()
    wide, wider = phys.widened(), phys.widened(1.2)
    for c in ("T1w", "T2w", "FLAIR"):
        for f in ("0.1", "1.5", "3", "5"):
            base = phys.table["protocols"][c][f]["TE_ms"]["range"]
            w = wide.table["protocols"][c][f]["TE_ms"]["range"]
            ww = wider.table["protocols"][c][f]["TE_ms"]["range"]
            assert ww[0] < w[0] <= base[0] and base[1] <= w[1] < ww[1]
    assert phys.widened(0.0).table["snr_wm"] == phys.table["snr_wm"]
    # the 7 T target is never widened
    assert wide.table["protocols"]["FLAIR"]["7"] == phys.table["protocols"]["FLAIR"]["7"]


def test_the_lowest_bin_trains_down_to_the_snr_of_the_lowest_field_it_receives():
    """0.1 T's training SNR reaches what B0^1.65 gives a 0.064 T scanner (routed to that bin);
    the other bins keep the generic widening."""
    from synth7t.fields import route_field

    phys = Physics.load()
    wide, lo_f = phys.widened().table["snr_wm"], phys.table["training_widening"]["snr"]["value"][0]
    floor = phys.table["snr_wm"]["0.1"]["training_floor"]["value"]
    assert floor == pytest.approx((0.064 / 0.1) ** 1.65, abs=0.01)
    assert route_field(0.064).bin == 0.1
    assert wide["0.1"]["range"][0] == pytest.approx(8 * lo_f * floor)
    for f in ("1.5", "3", "5"):
        assert wide[f]["range"][0] == pytest.approx(phys.table["snr_wm"][f]["range"][0] * lo_f)


def test_jitter_is_seeded_and_bounded():
    phys = Physics.load()
    a = phys.jittered(np.random.default_rng(1)).relaxation("WM", 3.0)
    b = phys.jittered(np.random.default_rng(1)).relaxation("WM", 3.0)
    c = phys.relaxation("WM", 3.0)
    assert a == b and a != c
    assert abs(a.T1 / c.T1 - 1) <= 0.06 + 1e-9


def test_csf_is_not_jittered_so_the_7t_flair_null_holds():
    """A subject's CSF relaxation is not jittered: the fixed 7 T FLAIR keeps nulling it."""
    phys = Physics.load()
    for seed in range(5):
        j = phys.jittered(np.random.default_rng(seed))
        assert j.relaxation("CSF", 7.0) == phys.relaxation("CSF", 7.0)
        assert j.relaxation("GM", 7.0) != phys.relaxation("GM", 7.0)
