#!/usr/bin/env python
"""Build the demo BIDS dataset for ``make demo`` from data that ships with installed packages.

One participant, ``sub-demo``, scanned at 1.5 T (T1w, T2w, FLAIR), simulated by
``synth7t.simulate`` from the ICBM152 2009a tissue maps inside the ``nilearn`` wheel and
resampled to 1 mm, the voxel size of a routine clinical protocol. Nothing is downloaded.

Usage: python scripts/make_demo.py OUT_BIDS_DIR [--field 1.5] [--seed 7]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from synth7t.io import atomic_write_json, atomic_write_nifti, atomic_write_text
from synth7t.reference import REF_AFFINE, REF_SHAPE
from synth7t.simulate import Simulator

#: Voxel size of the demo scans; 1 mm keeps the demo small and is what 1.5 T routine MPRAGE gives.
DEMO_ZOOM = 1.0


def _to_native(data: np.ndarray) -> nib.Nifti1Image:
    """Resample a reference-grid volume to a 1 mm RAS grid covering the same box."""
    ref = nib.Nifti1Image(data.astype(np.float32), REF_AFFINE)
    shape = tuple(int(round(s * 0.5 / DEMO_ZOOM)) for s in REF_SHAPE)
    corner = REF_AFFINE @ np.array([REF_SHAPE[0] - 1, 0, 0, 1])  # the RAS-most-left corner
    affine = np.diag([DEMO_ZOOM, DEMO_ZOOM, DEMO_ZOOM, 1.0])
    affine[:3, 3] = corner[:3]
    out = resample_from_to(ref, (shape, affine), order=1)
    # Store as a scanner would: unsigned 16-bit integers.
    arr = np.clip(out.get_fdata(), 0, None)
    arr = np.round(arr / max(arr.max(), 1e-6) * 4000).astype(np.uint16)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--field", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=7)
    opts = parser.parse_args(argv)
    out: Path = opts.out
    if (out / "dataset_description.json").exists():
        print(f"demo dataset already present: {out}")
        return 0
    anat = out / "sub-demo" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    print(f"simulating a {opts.field:g} T participant from the ICBM152 tissue maps (nilearn)...")
    sim = Simulator.from_icbm152()
    pairs = sim.sample_all_contrasts(field=opts.field, seed=opts.seed)
    protocol = {
        "T1w": {"RepetitionTime": 2.0, "InversionTime": 1.0, "FlipAngle": 8},
        "T2w": {"RepetitionTime": 4.0, "EchoTime": 0.1},
        "FLAIR": {"RepetitionTime": 9.0, "InversionTime": 2.5, "EchoTime": 0.12},
    }
    for contrast, meta in protocol.items():
        img = _to_native(pairs[contrast]["source"])
        stem = anat / f"sub-demo_{contrast}"
        atomic_write_nifti(img, stem.with_suffix(".nii.gz"))
        atomic_write_json({"MagneticFieldStrength": opts.field,
                           "Manufacturer": "synth7t simulator (demo)", **meta},
                          stem.with_suffix(".json"))
    atomic_write_json({"Name": "synth7t demo (simulated from ICBM152 2009a)",
                       "BIDSVersion": "1.9.0", "DatasetType": "raw",
                       "License": "CC0", "Authors": ["synth7t developers"]},
                      out / "dataset_description.json")
    atomic_write_text("participant_id\nsub-demo\n", out / "participants.tsv")
    atomic_write_text("Simulated demo dataset made by scripts/make_demo.py "
                      "(synth7t field-physics simulator, ICBM152 2009a anatomy).\n",
                      out / "README")
    print(f"demo BIDS dataset written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
