"""How images are stored: scaled integers on the 0.5 mm reference grid, float32 elsewhere.

A 364x436x364 float32 ``.nii.gz`` is ~180 MB and ~8 s to write; the same volume as uint16 with
``scl_slope`` is ~37 MB and ~2 s. Synthetic images live in [0, 1] with exactly 0 outside the
brain, so a slope-only encoding (no intercept) keeps 0 exact and never overshoots 1 after
loading.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nb
import numpy as np

#: sform/qform code of images on the MRIxFields grid (MNI152 coordinates).
MNI_CODE = 4
SCANNER_CODE = 1
ALIGNED_CODE = 2
_INT_MAX = {"uint16": 65535, "int16": 32767}


def _slope_for(vmax: float, dtype: str) -> np.float32:
    """Largest float32 slope s with ``imax * s <= vmax`` in float32 and float64 arithmetic."""
    imax = _INT_MAX[dtype]
    slope = np.float32(vmax / imax)
    while slope > 0 and (np.float32(imax) * slope > np.float32(vmax) or imax * float(slope) > vmax):
        slope = np.nextafter(slope, np.float32(0), dtype=np.float32)
    return slope


def encode(data: np.ndarray, dtype: str = "uint16") -> tuple[np.ndarray, float]:
    """Return ``(raw, slope)`` such that ``raw * slope`` approximates ``data`` (non-negative).

    ``raw * slope`` never exceeds ``max(data)``; zeros stay exactly zero.
    """
    data = np.asarray(data)
    if data.ndim == 0:
        raw, slope = encode(data.reshape(1), dtype)
        return raw.reshape(()), slope
    if data.size == 0:
        return np.zeros(data.shape, dtype=dtype), 1.0
    # slabs of ~4 M voxels: a 0.5 mm volume never has a volume-sized float temporary (each
    # one is 230 MB, and this runs beside other nodes), and each slab stays in cache
    step = max(1, (1 << 22) // max(1, data[0].size))
    slabs = [slice(i, i + step) for i in range(0, data.shape[0], step)]

    def clean(block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, dtype=np.float32)
        return np.where(np.isfinite(block) & (block > 0), block, np.float32(0))

    vmax = max(float(clean(data[s]).max()) for s in slabs)
    if vmax <= 0:
        return np.zeros(data.shape, dtype=dtype), 1.0
    slope = _slope_for(vmax, dtype)
    raw = np.empty(data.shape, dtype=dtype)
    for s in slabs:
        raw[s] = np.clip(np.rint(clean(data[s]) / np.float32(slope)), 0, _INT_MAX[dtype])
    return raw, float(slope)


def save_image(data: np.ndarray, affine: np.ndarray, path: str | Path, *, dtype: str = "float32",
               code: int = SCANNER_CODE, header: nb.Nifti1Header | None = None) -> Path:
    """Save ``data`` as NIfTI atomically (temporary file + ``os.replace``).

    Parameters
    ----------
    dtype
        ``float32``, ``uint8`` (masks), or ``uint16``/``int16`` (scaled integers with
        ``scl_slope``; data must be non-negative).
    code
        qform/sform code (1 scanner, 4 MNI).
    """
    path = Path(path)
    hdr = header.copy() if header is not None else nb.Nifti1Header()
    if dtype in _INT_MAX:
        raw, slope = encode(data, dtype)
        hdr.set_data_dtype(dtype)
        img = nb.Nifti1Image(raw, affine, hdr)
        img.header.set_slope_inter(slope, 0.0)
    else:
        arr = np.asarray(data)
        if dtype == "uint8":
            arr = (arr > 0).astype(np.uint8)
        else:
            arr = np.nan_to_num(arr.astype(dtype), nan=0.0, posinf=0.0, neginf=0.0)
        hdr.set_data_dtype(dtype)
        img = nb.Nifti1Image(arr, affine, hdr)
        img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code)
    img.set_sform(affine, code)
    img.header.set_xyzt_units("mm")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        nb.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
