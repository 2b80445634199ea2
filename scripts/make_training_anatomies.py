"""Segment the real training heads once into simulator anatomies (``.npz`` per head).

The shipped default model trains on ICBM152 (nilearn wheel) plus the real 3 T heads of
``../shared/data/bids_3t`` (sub-01 whole head, skull-stripped here with synth7t's own
brain extraction; sub-02 already brain-extracted, with a chronic stroke lesion), each segmented by
the simulator's ``t1w:`` path (:func:`synth7t.anatomy.from_t1w`: N4, Atropos, affine to ICBM152).
Colin27/BrainWeb are never used (validation anatomy).

    python scripts/make_training_anatomies.py OUT_DIR [--bids ../shared/data/bids_3t]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--bids", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data" / "bids_3t")
    ap.add_argument("--subjects", nargs="+", default=["01", "02"])
    args = ap.parse_args(argv)

    from synth7t.anatomy import from_t1w, save_anatomy
    from synth7t.io import conform, load_image
    from synth7t.preprocess import n4_correct, skull_strip

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for sub in args.subjects:
        dst = args.out_dir / f"sub-{sub}.npz"
        if dst.exists():
            print(f"{dst} exists", flush=True)
            continue
        t0 = time.perf_counter()
        src = args.bids / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
        img, _ = conform(load_image(src), name=str(src))
        with tempfile.TemporaryDirectory() as tmp:
            n4 = n4_correct(img)
            brain, mask = skull_strip(n4)
            bpath, mpath = Path(tmp) / "brain.nii.gz", Path(tmp) / "mask.nii.gz"
            nib.save(brain, bpath)
            nib.save(mask, mpath)
            anat = from_t1w(bpath, mask=mpath, n4=False, seed=0)
        anat.name = f"t1w:bids_3t/sub-{sub}"
        save_anatomy(anat, dst)
        print(f"{dst}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
