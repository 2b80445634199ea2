"""Intensity normalisation shared by the simulator, training, inference and the BIDS App.

The MRIxFields data are skull-stripped and normalised per volume to [0, 1] with background
exactly 0; every path in synth7t that feeds a model goes through :func:`normalise` so that
training and inference see the same scale.
"""
from __future__ import annotations

import numpy as np

#: Percentile (inside the mask) mapped to 1.0; robust to a few hot voxels.
UPPER_PERCENTILE = 99.8


def normalise(data: np.ndarray, mask: np.ndarray | None = None, *,
              upper_percentile: float = UPPER_PERCENTILE) -> np.ndarray:
    """Scale ``data`` to [0, 1] as float32, with 0 outside ``mask``.

    Parameters
    ----------
    data
        Image array (any dtype). Negative values are clipped to 0.
    mask
        Boolean brain mask; defaults to ``data > 0``.
    upper_percentile
        Percentile of the in-mask intensities that maps to 1.0.
    """
    arr = np.asarray(data, dtype=np.float32)
    if mask is None:
        mask = np.isfinite(arr) & (arr > 0)
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(arr.shape, dtype=np.float32)
    if not mask.any():
        return out
    # Only the brain's voxels are cleaned and scaled (one copy of them, edited in place): on a
    # 0.5 mm volume ~2x faster than cleaning the whole array first, and the same numbers.
    vals = np.nan_to_num(arr[mask], copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(vals, 0.0, None, out=vals)
    hi = float(np.percentile(vals, upper_percentile))
    if hi <= 0:
        hi = float(vals.max()) or 1.0
    vals /= np.float32(hi)
    out[mask] = np.clip(vals, 0.0, 1.0, out=vals)
    return out
