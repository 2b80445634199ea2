"""The ``baseline`` model: non-deep per-tissue intensity mapping to 7T.

Method
------
1. Inside the brain mask, the source intensities are clustered into three classes with a
   deterministic 1-D k-means on a fine histogram (initialised at the 20/50/80 % quantiles).
2. The clusters, sorted by intensity, are named CSF/GM/WM using the order of the *expected*
   source signals of that (contrast, field bin) (e.g. T1w: CSF < GM < WM; T2w: WM < GM < CSF).
3. The median of each class is mapped onto the normalised 7T intensity of that tissue with a
   piecewise-linear function through ``(0, 0)`` and the three ``(source median, 7T target)``
   knots; above the brightest knot intensities are scaled in proportion. Within-tissue texture
   (and partial volume between tissues) thus follows the source image.
4. Output is clipped to [0, 1] and exactly 0 outside the mask.

The parameters (7T tissue targets and expected source orders, with their derivation) live in a
JSON file, which is this model's "weights" artifact and is SHA-256-checked like any other.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .fields import CONTRASTS, SUPPORTED_BINS

TISSUES: tuple[str, ...] = ("CSF", "GM", "WM")
PARAMS_SCHEMA = "synth7t-baseline/1"


def _lloyd(mids: np.ndarray, counts: np.ndarray, centres: np.ndarray, n_iter: int,
           tol: float) -> np.ndarray:
    for _ in range(n_iter):
        labels = np.argmin(np.abs(mids[:, None] - centres[None, :]), axis=1)
        new = centres.copy()
        for c in range(len(centres)):
            w = counts[labels == c]
            if w.sum() > 0:
                new[c] = np.average(mids[labels == c], weights=w)
        if np.allclose(new, centres, atol=tol):
            return new
        centres = new
    return centres


def kmeans_1d(values: np.ndarray, k: int = 3, *, n_bins: int = 1024,
              n_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1-D k-means on a histogram of ``values``.

    Parameters
    ----------
    values
        1-D sample (any length; a histogram keeps it O(n) and memory-light).
    k
        Number of classes.
    n_bins
        Histogram bins between the minimum and maximum of ``values``.
    n_iter
        Maximum Lloyd iterations.

    Returns
    -------
    centres : (k,) sorted ascending
    medians : (k,) median of each class (same order)
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.full(k, lo), np.full(k, lo)
    counts, edges = np.histogram(values, bins=n_bins, range=(lo, hi))
    mids = 0.5 * (edges[:-1] + edges[1:])
    cdf = np.cumsum(counts) / counts.sum()
    # Lloyd's algorithm has local minima (a large class split in two); run it from a few
    # deterministic starts (quantiles and evenly spaced levels) and keep the lowest inertia.
    starts = [np.interp(np.linspace(0.2, 0.8, k), cdf, mids),
              np.interp(np.linspace(0.05, 0.95, k), cdf, mids),
              lo + (hi - lo) * (np.arange(k) + 0.5) / k]
    best, best_inertia = None, np.inf
    for centres in starts:
        centres = _lloyd(mids, counts, centres.astype(np.float64), n_iter, 1e-9 * (hi - lo))
        labels = np.argmin(np.abs(mids[:, None] - centres[None, :]), axis=1)
        inertia = float(np.sum(counts * (mids - centres[labels]) ** 2))
        if inertia < best_inertia - 1e-12:
            best, best_inertia = centres, inertia
    centres = best
    order = np.argsort(centres)
    centres = centres[order]
    labels = np.argmin(np.abs(mids[:, None] - centres[None, :]), axis=1)
    medians = np.empty(k)
    for c in range(k):
        w = counts * (labels == c)
        if w.sum() == 0:
            medians[c] = centres[c]
            continue
        cw = np.cumsum(w) / w.sum()
        medians[c] = mids[np.searchsorted(cw, 0.5)]
    return centres, medians


def tissue_map(volume: np.ndarray, mask: np.ndarray, contrast: str, field_bin: float,
               params: dict) -> np.ndarray:
    """Apply the baseline to one volume.

    Parameters
    ----------
    volume
        Source image, float32 in [0, 1].
    mask
        Boolean brain mask (same shape).
    contrast, field_bin
        Source contrast (BIDS suffix) and field bin.
    params
        Parsed parameters JSON (see :func:`table_params`).

    Returns
    -------
    np.ndarray
        float32 in [0, 1], exactly 0 outside ``mask``.
    """
    out = np.zeros(volume.shape, dtype=np.float32)
    vals = volume[mask]
    vals = vals[vals > 0]  # exact zeros inside a mask are padding, not tissue
    if vals.size < 10:
        return out
    _, medians = kmeans_1d(vals, 3, n_bins=int(params.get("histogram_bins", 1024)),
                           n_iter=int(params.get("kmeans_iterations", 100)))
    src = params["source_signal"][contrast][f"{float(field_bin):g}"]
    tgt = params["targets_7t"][contrast]
    # Sorted clusters take the tissues in the order of their expected source signal.
    order = sorted(TISSUES, key=lambda t: src[t])
    xs = np.concatenate([[0.0], medians])
    ys = np.array([0.0] + [tgt[t] for t in order])
    if np.any(np.diff(xs) <= 0):  # degenerate (near-constant) image: keep strictly increasing knots
        xs = np.maximum.accumulate(xs + np.arange(4) * 1e-6)
    v = volume[mask].astype(np.float64)
    mapped = np.interp(v, xs, ys)
    top = v > xs[-1]
    mapped[top] = ys[-1] * v[top] / xs[-1]
    out[mask] = np.clip(mapped, 0.0, 1.0).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Parameter derivation from the FIELD_PHYSICS tables (used until the simulator ships).

#: (T1, T2 or T2*) in ms per field for (CSF, GM, WM); FIELD_PHYSICS.md tables.
_T1 = {0.1: (4300, 361, 242), 1.5: (4300, 998, 681), 3.0: (4300, 1295, 887),
       5.0: (4300, 1570, 1078), 7.0: (4300, 1781, 1226)}
_T2 = {0.1: (2000, 95, 85), 1.5: (2000, 87, 80), 3.0: (2000, 76, 71), 5.0: (1800, 62, 59),
       7.0: (1600, 47, 47)}
_T2S = {0.1: (1000, 89, 63), 1.5: (1000, 73, 52), 3.0: (1000, 59, 43), 5.0: (1000, 44, 33),
        7.0: (1000, 33, 25)}
_PD = (1.0, 0.80, 0.70)
#: Representative protocols (FIELD_PHYSICS.md); TE of IR sequences where the table gives none.
_PROTOCOLS = {
    0.1: {"T1w": ("gre", 20, 6, 35), "T2w": ("se", 3000, 100), "FLAIR": ("ir", 6000, 2000, 100)},
    1.5: {"T1w": ("ir", 2000, 1000, 3), "T2w": ("se", 4000, 100), "FLAIR": ("ir", 9000, 2500, 120)},
    3.0: {"T1w": ("ir", 2300, 900, 3), "T2w": ("se", 3200, 100), "FLAIR": ("ir", 9000, 2500, 90)},
    5.0: {"T1w": ("ir", 2500, 1000, 3), "T2w": ("se", 3200, 100), "FLAIR": ("ir", 9000, 2500, 90)},
    7.0: {"T1w": ("ir", 2500, 1050, 3), "T2w": ("se", 3000, 90), "FLAIR": ("ir", 9000, 2500, 90)},
}
#: Median of the brightest tissue after per-volume normalisation (99.8th percentile -> 1).
_BRIGHTEST_MEDIAN = 0.80


def _signals(field: float, contrast: str) -> dict[str, float]:
    p = _PROTOCOLS[field][contrast]
    out = {}
    for i, t in enumerate(TISSUES):
        t1, t2, t2s, pd = _T1[field][i], _T2[field][i], _T2S[field][i], _PD[i]
        if p[0] == "gre":
            a = math.radians(p[3])
            e1 = math.exp(-p[1] / t1)
            s = pd * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1) * math.exp(-p[2] / t2s)
        elif p[0] == "se":
            s = pd * (1 - math.exp(-p[1] / t1)) * math.exp(-p[2] / t2)
        else:
            s = pd * abs(1 - 2 * math.exp(-p[2] / t1) + math.exp(-p[1] / t1)) * math.exp(-p[3] / t2)
        out[t] = s
    top = max(out.values())
    return {t: round(v / top, 4) for t, v in out.items()}


def table_params() -> dict:
    """Baseline parameters derived from the FIELD_PHYSICS.md tables and signal equations."""
    return {
        "schema": PARAMS_SCHEMA,
        "tissues": list(TISSUES),
        "targets_7t": {c: {t: round(_BRIGHTEST_MEDIAN * v, 4) for t, v in _signals(7.0, c).items()}
                       for c in CONTRASTS},
        "source_signal": {c: {f"{b:g}": _signals(b, c) for b in SUPPORTED_BINS} for c in CONTRASTS},
        "histogram_bins": 1024,
        "kmeans_iterations": 100,
        "derivation": (
            "FIELD_PHYSICS.md tables: T1/T2/T2* of CSF/GM/WM per field, PD CSF 1.0 GM 0.80 WM 0.70, "
            "representative protocols per field; signal equations: spin echo PD(1-e^-TR/T1)e^-TE/T2, "
            "inversion recovery/MPRAGE PD|1-2e^-TI/T1+e^-TR/T1|e^-TE/T2, spoiled GRE (0.1 T T1w). "
            "source_signal: relative tissue signals at each source field (only their order is used). "
            f"targets_7t: 7 T relative signals scaled so the brightest tissue has median "
            f"{_BRIGHTEST_MEDIAN} after per-volume normalisation (99.8th percentile -> 1)."
        ),
    }


def write_params(params: dict, path: str | Path) -> Path:
    """Write baseline parameters as stable, sorted JSON (so its SHA-256 is reproducible)."""
    path = Path(path)
    path.write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    return path
