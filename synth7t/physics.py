"""Field physics: relaxation times at any B0 and the magnitude signal equations.

All numbers come from one table, ``synth7t/data/physics.json``, where every value carries a
``source``; see ``../shared/design/FIELD_PHYSICS.md`` for the specification. Times are in ms,
flip angles in degrees, fields in tesla.

Examples
--------
>>> phys = Physics.load()
>>> round(phys.relaxation("WM", 3.0).T1)
887
>>> sig = phys.tissue_signals("T1w", 1.5)       # nominal 1.5 T MPRAGE
>>> sig["WM"] > sig["GM"] > sig["CSF"]
True
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from synth7t.fields import CONTRASTS

PHYSICS_JSON = Path(__file__).parent / "data" / "physics.json"
#: Fields with protocols in the table (sources plus the 7 T target).
PROTOCOL_FIELDS: tuple[float, ...] = (0.1, 1.5, 3.0, 5.0, 7.0)
TARGET_FIELD = 7.0
#: Numeric parameters of a protocol (:meth:`Physics.protocol`), in ms and degrees.
PROTOCOL_KEYS = ("TR", "TE", "TI", "FA")


@dataclass(frozen=True)
class Relaxation:
    """Relaxation parameters of one tissue at one field (times in ms)."""

    PD: float
    T1: float
    T2: float
    T2star: float


def field_key(field: float) -> str:
    """Key of a protocol field in the table (``1.5 -> "1.5"``, ``3.0 -> "3"``).

    Raises
    ------
    ValueError
        If ``field`` is not one of :data:`PROTOCOL_FIELDS` (within 1e-6 T).
    """
    for f in PROTOCOL_FIELDS:
        if abs(float(field) - f) < 1e-6:
            return f"{f:g}"
    raise ValueError(f"no protocol for {field:g} T; choose one of "
                     f"{', '.join(f'{f:g}' for f in PROTOCOL_FIELDS)}")


# --- signal equations (magnitude, arbitrary units) -------------------------------------------

def spin_echo(PD: float, T1: float, T2: float, *, TR: float, TE: float) -> float:
    """Spin echo / (T)SE: ``PD (1 - e^(-TR/T1)) e^(-TE/T2)``."""
    return PD * (1.0 - math.exp(-TR / T1)) * math.exp(-TE / T2)


def inversion_recovery(PD: float, T1: float, T2: float, *, TR: float, TI: float,
                       TE: float) -> float:
    """Inversion recovery / FLAIR: ``PD |1 - 2 e^(-TI/T1) + e^(-TR/T1)| e^(-TE/T2)``."""
    return PD * abs(1.0 - 2.0 * math.exp(-TI / T1) + math.exp(-TR / T1)) * math.exp(-TE / T2)


def spoiled_gre(PD: float, T1: float, T2star: float, *, TR: float, TE: float,
                FA: float) -> float:
    """Spoiled gradient echo (Ernst): ``PD sin a (1 - E1) / (1 - cos a E1) e^(-TE/T2*)``."""
    a = math.radians(FA)
    e1 = math.exp(-TR / T1)
    return PD * math.sin(a) * (1.0 - e1) / (1.0 - math.cos(a) * e1) * math.exp(-TE / T2star)


def mprage(PD: float, T1: float, T2star: float, *, TR: float, TI: float, TE: float,
           FA: float, train: dict[str, float] | None = None) -> float:
    """MPRAGE signal; ``TR`` is the inversion repetition time, ``TI`` inversion to k-space centre.

    Without ``train``, the first-order form FIELD_PHYSICS.md allows, ``PD |1 - 2 e^(-TI/T1) +
    e^(-TR/T1)| sin(a) e^(-TE/T2*)``: the shipped table's. With the table's relaxation times
    its nominal 3 T protocol gives the measured MPRAGE contrasts of the nighres priors (grey
    0.57 of white matter for 0.57 measured, caudate 0.73 for 0.74, putamen 0.80 for 0.84,
    thalamus 0.81 for 0.84; ``tests/test_physics_mprage.py``), where the full expression below
    gives 0.75 / 0.87 / 0.91 / 0.90; its CSF, though, moves with TI (nulled at TI 880-1060 with
    TR 2000-2500), which is why the table's MPRAGE TI/TR ranges are narrow.

    With ``train`` (``pulses`` per inversion, ``echo_spacing_ms``, ``centre``: the fraction of
    the train at which the k-space centre is read; ``physics.json`` ``mprage_train``, which
    training can draw for a share of its sources, ``training_widening.mprage_train_probability``,
    0 in the shipped table: see its source),
    Deichmann's full steady-state expression
    (Deichmann et al., NeuroImage 2000;12:112; the MP2RAGE derivation of Marques et al.,
    NeuroImage 2010;49:1271, for one inversion): inversion, free recovery for ``TA = TI - k0
    tau``, ``n`` pulses of flip angle ``a`` every ``tau`` (each pulse takes ``Mz`` to
    ``Mz cos(a) E1 + (1 - E1)``), free recovery for ``TD = TR - TA - n tau``, repeated to steady
    state; the signal is ``PD sin(a) |Mz(k0)| e^(-TE/T2*)``. The readout train keeps CSF
    dark at any TI (grey/white 0.75-0.76 and CSF 0.18-0.21 of white matter over the UK Biobank,
    ADNI-3, HCP and ABCD 3 T protocols, 176 pulses every 7.1 ms) but, with the table's T1s,
    flattens grey/white below what is measured. ``TA`` and ``TD`` are clipped at 0 for
    protocols too short for the train.
    """
    a = math.radians(FA)
    if not train:
        ir = abs(1.0 - 2.0 * math.exp(-TI / T1) + math.exp(-TR / T1))
        return PD * ir * math.sin(a) * math.exp(-TE / T2star)
    n, tau = int(train["pulses"]), float(train["echo_spacing_ms"])
    k0 = int(round(float(train["centre"]) * n))
    ta = max(TI - k0 * tau, 0.0)
    td = max(TR - ta - n * tau, 0.0)
    e1, ea, ed = math.exp(-tau / T1), math.exp(-ta / T1), math.exp(-td / T1)
    q = math.cos(a) * e1
    m_train = (1.0 - e1) / (1.0 - q)  # the train's own steady state
    # Mz before the inversion, M, is a fixed point of: invert, recover TA, n pulses, recover TD
    qn = q ** n
    c0 = 1.0 - ed + ed * (m_train + (1.0 - ea - m_train) * qn)
    c1 = -ed * ea * qn
    m_before = c0 / (1.0 - c1)
    m_after_ta = 1.0 - (1.0 + m_before) * ea
    mz = m_train + (m_after_ta - m_train) * q ** k0
    return PD * math.sin(a) * abs(mz) * math.exp(-TE / T2star)


SEQUENCES = {"spin_echo", "inversion_recovery", "spoiled_gre", "mprage"}

#: Table key (set by :meth:`Physics.widened`, or by hand) of the share of drawn source MPRAGE
#: protocols rendered with the full expression (``physics.json`` ``mprage_train``).
MPRAGE_TRAIN_KEY = "_mprage_train_probability"


def sequence_signal(sequence: str, rel: Relaxation, protocol: dict[str, float]) -> float:
    """Signal of a tissue with relaxation ``rel`` for a sequence and its parameters.

    ``protocol`` holds ``TR``, ``TE`` and, depending on the sequence, ``TI`` and ``FA``.
    """
    p = protocol
    if sequence == "spin_echo":
        return spin_echo(rel.PD, rel.T1, rel.T2, TR=p["TR"], TE=p["TE"])
    if sequence == "inversion_recovery":
        return inversion_recovery(rel.PD, rel.T1, rel.T2, TR=p["TR"], TI=p["TI"], TE=p["TE"])
    if sequence == "spoiled_gre":
        return spoiled_gre(rel.PD, rel.T1, rel.T2star, TR=p["TR"], TE=p["TE"], FA=p["FA"])
    if sequence == "mprage":
        return mprage(rel.PD, rel.T1, rel.T2star, TR=p["TR"], TI=p["TI"], TE=p["TE"], FA=p["FA"],
                      train=p.get("train"))
    raise ValueError(f"unknown sequence {sequence!r}; expected one of {sorted(SEQUENCES)}")


# --- the table ----------------------------------------------------------------------------------

class Physics:
    """The parameter table plus relaxation models and tissue signals.

    Parameters
    ----------
    table
        Parsed ``physics.json`` (see :meth:`load`).
    """

    def __init__(self, table: dict[str, Any]):
        self.table = table
        self.gamma = float(table["gamma_hz_per_t"]["value"])
        self.tissues: tuple[str, ...] = tuple(table["tissues"])
        self.brain_tissues: tuple[str, ...] = tuple(table["brain_tissues"])

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Physics":
        """Load a physics table (default: the shipped ``synth7t/data/physics.json``)."""
        if path is None:
            return _default_physics()
        with open(path, encoding="utf-8") as fh:
            return cls(json.load(fh))

    # relaxation ---------------------------------------------------------------------------------
    def _time(self, tissue: str, what: str, field: float) -> float:
        spec = self.table["tissues"][tissue][what]
        model = spec["model"]
        if model == "constant":
            return float(spec["value_ms"])
        if model == "power_law":  # Rooney 2007: T1 [s] = A (gamma B0 [Hz])^B
            return 1000.0 * spec["A_s"] * (self.gamma * field) ** spec["B"]
        if model == "power_law_ref":
            return float(spec["ref_ms"]) * (field / spec["ref_field"]) ** spec["exponent"]
        if model == "exponential":  # Pohmann 2016: T2* [s] = A e^(-k B0)
            return 1000.0 * spec["A_s"] * math.exp(-spec["k"] * field)
        if model == "table":  # linear in B0 between measured fields, flat outside
            return float(np.interp(field, spec["fields"], spec["values_ms"]))
        if model == "same_as":
            return self._time(spec["tissue"], what, field)
        if model == "between":  # deep nuclei: a fixed position between GM and WM
            w = float(np.interp(field, spec["fields"], spec["weights"]))
            t_from = self._time(spec["from"], what, field)
            return t_from - w * (t_from - self._time(spec["to"], what, field))
        raise ValueError(f"{tissue}.{what}: unknown model {model!r}")

    def relaxation(self, tissue: str, field: float) -> Relaxation:
        """PD and T1/T2/T2* (ms) of ``tissue`` at ``field`` tesla (any B0 > 0)."""
        if tissue not in self.table["tissues"]:
            raise KeyError(f"unknown tissue {tissue!r}; known: {', '.join(self.tissues)}")
        if field <= 0:
            raise ValueError(f"field must be > 0 T, got {field}")
        pd, t1, t2 = self.scales.get(tissue, (1.0, 1.0, 1.0))
        return Relaxation(PD=pd * float(self.table["tissues"][tissue]["PD"]["value"]),
                          T1=t1 * self._time(tissue, "T1", field),
                          T2=t2 * self._time(tissue, "T2", field),
                          T2star=t2 * self._time(tissue, "T2star", field))

    def tse_factor(self, tissue: str, protocol: dict[str, Any]) -> float:
        """Myelin-water and incidental-MT factor of a TSE/FLAIR signal (1 for GRE/MPRAGE).

        ``(1 - MWF) (1 - a_readout F)`` from the table's ``tse_signal_modifiers`` block: the
        short-T2 myelin water has decayed at TSE echo times, and the refocusing train saturates
        the macromolecular pool (larger in WM), which makes GM brighter than WM in FLAIR.
        """
        mod = self.table.get("tse_signal_modifiers")
        if not mod or protocol.get("sequence") not in ("spin_echo", "inversion_recovery"):
            return 1.0
        mwf = float(mod["myelin_water_fraction"].get(tissue, 0.0))
        pool = float(mod["pool_size_ratio_F"].get(tissue, 0.0))
        per_f = float(mod["attenuation_per_F"][protocol.get("readout", "2D_TSE")]["value"])
        return (1.0 - mwf) * max(0.0, 1.0 - per_f * pool)

    # per-subject variation and training ranges --------------------------------------------------
    @property
    def scales(self) -> dict[str, tuple[float, float, float]]:
        """Per-tissue (PD, T1, T2) multipliers of one simulated subject (empty: the table)."""
        return getattr(self, "_scales", {})

    def jittered(self, rng: np.random.Generator, amount: float | None = None) -> "Physics":
        """A copy whose tissues' PD, T1 and T2 are scaled by ``U(1 - a, 1 + a)`` (one subject).

        ``amount`` defaults to the table's ``training_widening.relaxation_jitter`` (PD gets half);
        tissues in its ``not_jittered`` list (CSF: see its source in ``physics.json``) keep
        their table values.
        """
        spec = self.table["training_widening"]["relaxation_jitter"]
        a = float(amount if amount is not None else spec["value"])
        fixed = set(spec.get("not_jittered", ()))
        out = Physics(self.table)
        out._scales = {}
        for t in self.tissues:
            # drawn for fixed tissues too: the other tissues' draws stay those of the same seed
            draw = (float(rng.uniform(1 - a / 2, 1 + a / 2)),
                    float(rng.uniform(1 - a, 1 + a)), float(rng.uniform(1 - a, 1 + a)))
            out._scales[t] = (1.0, 1.0, 1.0) if t in fixed else draw
        return out

    def widened(self, scale: float = 1.0) -> "Physics":
        """The table with the training ranges of ``training_widening`` applied.

        ``scale`` multiplies each widening's excess over 1 (``scale=1``: the training ranges;
        e.g. ``scale=1.2`` goes 20 % further, for robustness tests; ``0``: the table itself).
        With ``scale > 0`` a share of the drawn MPRAGE sources is also rendered with the full
        expression (``mprage_train_probability``, 0 in the shipped table; :data:`MPRAGE_TRAIN_KEY`).
        """
        import copy

        tab = copy.deepcopy(self.table)
        w = tab["training_widening"]

        def stretch(lo: float, hi: float, factor: float) -> list[float]:
            c, h = 0.5 * (lo + hi), 0.5 * (hi - lo) * (1 + scale * (factor - 1))
            return [max(c - h, 1e-3), c + h]

        if scale > 0 and "mprage_train_probability" in w:
            tab[MPRAGE_TRAIN_KEY] = float(w["mprage_train_probability"]["value"])
        lo_f, hi_f = w["snr"]["value"]
        vlo, vhi = w["voxel"]["value"]
        for kind, spec, key in source_ranges(tab):
            if kind == "protocol":
                inv = spec["sequence"] in ("mprage", "inversion_recovery") and key in ("TI_ms", "TR_ms")
                f = w["inversion_factor" if inv else "protocol_factor"]["value"]
                spec[key]["range"] = stretch(*spec[key]["range"], f)
            elif kind == "snr":
                lo, hi = spec[key]
                # a bin whose scanners reach below its nominal field trains lower still
                low = lo_f * spec.get("training_floor", {}).get("value", 1.0)
                spec[key] = [lo * (1 - scale * (1 - low)), hi * (1 + scale * (hi_f - 1))]
            elif kind == "voxel":
                spec[key] = [[max(0.5, a * (1 - scale * (1 - vlo))), b * (1 + scale * (vhi - 1))]
                             if b > 0.5 + 1e-6 else [a, b] for a, b in spec[key]]
            else:  # bias
                spec[key] = [a * (1 + scale * (w["bias"]["value"] - 1)) for a in spec[key]]
        return Physics(tab)

    # protocols ----------------------------------------------------------------------------------
    def protocol_spec(self, contrast: str, field: float) -> dict[str, Any]:
        """Raw protocol entry (nominal values and ranges) for a contrast and field."""
        _check_contrast(contrast)
        return self.table["protocols"][contrast][field_key(field)]

    def nominal_protocols(self) -> dict[str, dict[str, float]]:
        """Nominal source protocol of every (contrast, source field bin) pair, keyed
        ``"T1w@1.5"`` (:func:`synth7t.intensity.level_key`): what protocol conditioning
        (:attr:`synth7t.networks.UNetConfig.protocol_condition`) measures sources against."""
        from .fields import CONTRASTS, SUPPORTED_BINS
        from .intensity import level_key

        out = {}
        for contrast in CONTRASTS:
            for fb in SUPPORTED_BINS:
                out[level_key(contrast, fb)] = protocol_values(self.protocol(contrast, fb))
        return out

    def protocol(self, contrast: str, field: float,
                 rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Protocol parameters: nominal, or drawn uniformly in their ranges when ``rng`` is given.

        The 7 T target has no ranges and is always nominal. Returns ``{"sequence": str, "TR":
        ms, "TE": ms, ["TI": ms], ["FA": deg]}``.
        """
        spec = self.protocol_spec(contrast, field)
        out: dict[str, Any] = {"sequence": spec["sequence"]}
        if "readout" in spec:
            out["readout"] = spec["readout"]
        for key in ("TR_ms", "TE_ms", "TI_ms", "FA_deg"):
            if key not in spec:
                continue
            par = spec[key]
            if rng is not None and "range" in par:
                value = float(rng.uniform(*par["range"]))
            else:
                value = float(par["nominal"])
            out[key.split("_")[0]] = value
        # a drawn source MPRAGE takes the full expression with the table's source-form share
        # (set by widened() from physics.json, where it is 0 as shipped): the extra random draw
        # is only made when the share is > 0, so other tables' random streams stay as they were
        p_train = float(self.table.get(MPRAGE_TRAIN_KEY, 0.0))
        if (spec["sequence"] == "mprage" and rng is not None and field_key(field) != "7"
                and p_train > 0 and rng.random() < p_train):
            out["train"] = self.mprage_train()
        return out

    def mprage_train(self) -> dict[str, float]:
        """The readout train of Deichmann's MPRAGE expression (``physics.json``
        ``mprage_train``: ``pulses``, ``echo_spacing_ms``, ``centre``)."""
        sec = self.table["mprage_train"]
        return {k: float(sec[k]["value"]) for k in ("pulses", "echo_spacing_ms", "centre")}

    def effective_voxel(self, contrast: str, field: float,
                        rng: np.random.Generator | None = None) -> tuple[float, float, float]:
        """Effective voxel size (mm, per reference-grid axis); mid-range when ``rng`` is None."""
        _check_contrast(contrast)
        spec = self.table["resolution"][contrast][field_key(field)]
        ranges = np.asarray(spec["voxel_mm"], dtype=float)
        if rng is None:
            u = np.full(3, 0.5)
        elif spec.get("isotropic", False):
            u = np.full(3, rng.uniform())
        else:
            u = rng.uniform(size=3)
        vox = ranges[:, 0] + u * (ranges[:, 1] - ranges[:, 0])
        return tuple(float(v) for v in vox)  # type: ignore[return-value]

    def snr_range(self, field: float) -> tuple[float, float]:
        """WM SNR range at the effective voxel."""
        lo, hi = self.table["snr_wm"][field_key(field)]["range"]
        return float(lo), float(hi)

    def bias_spec(self, field: float) -> dict[str, Any]:
        """Bias amplitude range and bright-centre weight at ``field``."""
        return self.table["bias"][field_key(field)]

    # signals ------------------------------------------------------------------------------------
    def tissue_signal(self, tissue: str, contrast: str, field: float,
                      protocol: dict[str, Any] | None = None) -> float:
        """Noise-free signal of one tissue (nominal protocol unless one is given)."""
        protocol = protocol or self.protocol(contrast, field)
        return (sequence_signal(protocol["sequence"], self.relaxation(tissue, field), protocol)
                * self.tse_factor(tissue, protocol))

    def tissue_signals(self, contrast: str, field: float,
                       protocol: dict[str, Any] | None = None,
                       tissues: Iterable[str] | None = None) -> dict[str, float]:
        """Signal per tissue for a contrast, field and protocol (nominal by default)."""
        protocol = protocol or self.protocol(contrast, field)
        return {t: self.tissue_signal(t, contrast, field, protocol)
                for t in (self.tissues if tissues is None else tissues)}


def source_ranges(table: dict[str, Any]):
    """Every randomised range of the source fields in a physics table (never the 7 T target).

    Yields ``(kind, spec, key)`` with ``spec[key]`` the range: kind ``"protocol"`` (``key`` is
    the parameter, e.g. ``"TE_ms"``, and ``spec[key]["range"]`` the range), ``"snr"``,
    ``"voxel"`` or ``"bias"``. Walking order is fixed (table order), so seeded edits of the
    ranges are reproducible.
    """
    for contrast, per_field in table["protocols"].items():
        if contrast.startswith("_"):
            continue
        for fkey, spec in per_field.items():
            if fkey == "7":
                continue
            for key in ("TR_ms", "TE_ms", "TI_ms", "FA_deg"):
                if isinstance(spec.get(key), dict) and "range" in spec[key]:
                    yield "protocol", spec, key
    for section, kind, key in (("snr_wm", "snr", "range"), ("resolution", "voxel", "voxel_mm"),
                               ("bias", "bias", "amplitude")):
        for name, entry in table[section].items():
            if name.startswith("_") or name == "7":
                continue
            if section == "resolution":  # per contrast, then per field
                for fkey, spec in entry.items():
                    if fkey != "7":
                        yield kind, spec, key
            else:
                yield kind, entry, key


def _check_contrast(contrast: str) -> None:
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {', '.join(CONTRASTS)}")


@lru_cache(maxsize=1)
def _default_physics() -> Physics:
    with open(PHYSICS_JSON, encoding="utf-8") as fh:
        return Physics(json.load(fh))


def protocol_values(protocol: dict[str, Any] | None) -> dict[str, float]:
    """The numeric parameters (:data:`PROTOCOL_KEYS`) of a protocol as
    :meth:`Physics.protocol` gives it (the sequence name and readout left out)."""
    return {k: float(protocol[k]) for k in PROTOCOL_KEYS if k in (protocol or {})}
