"""Intensity normalisation shared by the simulator, training, inference and the BIDS App.

The MRIxFields data are skull-stripped and normalised per volume to [0, 1] with background
exactly 0; every path in synth7t that feeds a model goes through :func:`normalise` so that
training and inference see the same scale. A network may declare input levels on top
(:func:`source_gain`): its source is then rescaled by the whole brain's mean, which the noise
hardly moves, instead of resting on the 99.8th percentile alone, which it raises.
"""
from __future__ import annotations

import numpy as np

#: Percentile (inside the mask) mapped to 1.0; robust to a few hot voxels.
UPPER_PERCENTILE = 99.8


def normalise(data: np.ndarray, mask: np.ndarray | None = None, *,
              upper_percentile: float = UPPER_PERCENTILE, excess: bool = False):
    """Scale ``data`` to [0, 1] as float32, with 0 outside ``mask``.

    Parameters
    ----------
    data
        Image array (any dtype). Negative values are clipped to 0.
    mask
        Boolean brain mask; defaults to ``data > 0``.
    upper_percentile
        Percentile of the in-mask intensities that maps to 1.0.
    excess
        Also return what the clip at 1 removed (``max(scaled - 1, 0)``, float32, 0 outside the
        mask): intensity no network fed by this function ever sees (e.g. a FLAIR lesion at twice
        the white matter), which :func:`synth7t.uncertainty.add_saturation` adds to the map.

    Returns
    -------
    numpy.ndarray or (numpy.ndarray, numpy.ndarray)
        The scaled image (and the excess, with ``excess=True``).
    """
    arr = np.asarray(data, dtype=np.float32)
    if mask is None:
        mask = np.isfinite(arr) & (arr > 0)
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(arr.shape, dtype=np.float32)
    if not mask.any():
        return (out, out.copy()) if excess else out
    # Only the brain's voxels are cleaned and scaled (one copy of them, edited in place): on a
    # 0.5 mm volume ~2x faster than cleaning the whole array first, and the same numbers.
    vals = np.nan_to_num(arr[mask], copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(vals, 0.0, None, out=vals)
    hi = float(np.percentile(vals, upper_percentile))
    if hi <= 0:
        hi = float(vals.max()) or 1.0
    vals /= np.float32(hi)
    over = None
    if excess:
        over = np.zeros(arr.shape, dtype=np.float32)
        over[mask] = np.maximum(vals - np.float32(1.0), np.float32(0.0))
    out[mask] = np.clip(vals, 0.0, 1.0, out=vals)
    return (out, over) if excess else out


# ---------------------------------------------------------------------------------------------
# Model-side input scaling

#: Brain means (:func:`brain_level`) of the training simulator's sources (ICBM152, 8 draws per
#: pair, their standard deviation 0.003-0.03): where a network with input scaling sees each
#: pair's mean, so that on average it meets the scale the unscaled networks knew.
BRAIN_MEAN_LEVELS = {
    "T1w@0.1": 0.75, "T1w@1.5": 0.75, "T1w@3": 0.65, "T1w@5": 0.64,
    "T2w@0.1": 0.49, "T2w@1.5": 0.40, "T2w@3": 0.36, "T2w@5": 0.29,
    "FLAIR@0.1": 0.73, "FLAIR@1.5": 0.77, "FLAIR@3": 0.81, "FLAIR@5": 0.81,
}

#: Input scalings a network can declare (``UNetConfig.input_scaling``).
INPUT_SCALINGS = ("none", "brain-mean")


def brain_level(values: np.ndarray) -> float:
    """Mean of the brain's intensities (``values``: the brain's voxels, any scale).

    The 99.8th percentile that :func:`normalise` maps to 1 rises with the noise (the Rician
    tail over the brightest tissue): rendered at WM SNR 3-5, 0.1 T T1w arrives with its white
    matter at 0.77 instead of 0.88. The mean moves little with noise (only the Rician bias of
    the darkest tissue) and, unlike any percentile, not at all with blur, which conserves
    signal: so the simulator's volume proxy (which has no spatial blur) estimates it within a
    few percent of the rendered volume's, where an upper quartile or an Otsu class median
    missed by 10-35 % on FLAIR and T2w.
    """
    vals = np.asarray(values, dtype=np.float32).ravel()
    vals = vals[np.isfinite(vals) & (vals > 0)]
    return float(vals.mean(dtype=np.float64)) if vals.size else 0.0


def level_key(contrast: str, field_bin: float) -> str:
    """Key of :data:`BRAIN_MEAN_LEVELS` (and of ``UNetConfig.input_levels``): ``"T1w@1.5"``."""
    return f"{contrast}@{float(field_bin):g}"


def source_gain(levels: dict[str, float] | None, contrast: str, field_bin: float,
                level: float | None, image: np.ndarray | None = None,
                mask: np.ndarray | None = None) -> float:
    """Factor a network with input levels ``levels`` (``UNetConfig.input_levels``; empty or
    ``None``: no scaling) applies to its [0, 1] source of ``contrast`` at ``field_bin``.

    ``level`` is the whole brain's :func:`brain_level` when the source is part of a volume (a
    simulated slab); ``None`` measures it on ``image`` inside ``mask`` (only then is the brain
    indexed: a training patch or a slab with a known level costs nothing). Bounded to
    [0.5, 2]: an empty or mostly-background mask is left near its own scale, not blown up.
    """
    if not levels:
        return 1.0
    nominal = levels[level_key(contrast, field_bin)]
    level = _measured_level(level, image, mask)
    if level is None:
        return 1.0
    return float(np.clip(nominal / level, 0.5, 2.0))


#: Bound of :func:`level_offset` (a factor e = 2.7 either way: beyond any real brain).
LEVEL_OFFSET_BOUND = 1.0


def level_offset(levels: dict[str, float] | None, contrast: str, field_bin: float,
                 level: float | None, image: np.ndarray | None = None,
                 mask: np.ndarray | None = None) -> float:
    """The conditioning value of a network with level conditioning (``UNetConfig.
    level_condition``): ``log(level / nominal)`` of the whole brain's :func:`brain_level`,
    bounded to +-:data:`LEVEL_OFFSET_BOUND`; 0 without levels, for a pair ``levels`` does not
    name (a network conditioned at some fields only) or without a measurable level.

    Unlike :func:`source_gain`, the input keeps its 99.8th-percentile scale: the network is told
    how far the brain's mean sits from the training average and learns what that means, which
    differs by cause (noise raises the percentile and lowers the mean at every tissue; a brain
    with more CSF lowers the T1w mean but not the white matter the percentile rests on).
    ``level`` and ``image``/``mask`` as in :func:`source_gain`.
    """
    nominal = (levels or {}).get(level_key(contrast, field_bin))
    if not nominal:
        return 0.0
    level = _measured_level(level, image, mask)
    if level is None or nominal <= 0:
        return 0.0
    return float(np.clip(np.log(level / nominal), -LEVEL_OFFSET_BOUND, LEVEL_OFFSET_BOUND))


def _measured_level(level: float | None, image: np.ndarray | None,
                    mask: np.ndarray | None) -> float | None:
    """``level``, or the brain level of ``image`` inside ``mask``; ``None`` if not positive."""
    if level is None and image is not None:
        level = brain_level(image[mask] if mask is not None else image)
    if level is None or not np.isfinite(level) or level <= 0:
        return None
    return float(level)
