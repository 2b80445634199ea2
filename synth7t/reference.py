"""The 7T reference space and the reference data that ship with the package.

The reference grid is the MRIxFields2026 grid: MNI coordinates, 0.5 mm isotropic,
364 x 436 x 364 voxels, i.e. the FSL MNI152 1 mm box (182 x 218 x 182 mm) at twice the
resolution, with the sform of FSL's ``MNI152_T1_0.5mm`` (LAS voxel order). Models trained on
MRIxFields data therefore apply with no resampling. The grid is a shape plus an affine and is
never stored as a volume.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: BIDS ``space-`` label of the reference space (a custom TemplateFlow template shipped here).
REF_SPACE = "MRIxFields"
#: Shape of the 0.5 mm reference grid.
REF_SHAPE: tuple[int, int, int] = (364, 436, 364)
#: Voxel size of the reference grid in mm.
REF_ZOOMS: tuple[float, float, float] = (0.5, 0.5, 0.5)
#: Affine of the reference grid (FSL MNI152 0.5 mm sform).
REF_AFFINE = np.array(
    [
        [-0.5, 0.0, 0.0, 90.0],
        [0.0, 0.5, 0.0, -126.0],
        [0.0, 0.0, 0.5, -72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)

DATA_DIR = Path(__file__).parent / "data"
#: TemplateFlow home shipped inside the package (1 mm / 2 mm images only).
TEMPLATEFLOW_HOME = DATA_DIR / "templateflow"


def ref_affine() -> np.ndarray:
    """Return a copy of the reference affine (so callers cannot mutate the constant)."""
    return REF_AFFINE.copy()


def setup_templateflow() -> Path:
    """Point TemplateFlow at the shipped templates and forbid downloads.

    A user-set ``TEMPLATEFLOW_HOME`` is respected. Must run before ``templateflow`` (or
    ``niworkflows``) is imported anywhere in the process.
    """
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(TEMPLATEFLOW_HOME))
    os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    return Path(os.environ["TEMPLATEFLOW_HOME"])
