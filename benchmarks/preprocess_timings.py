#!/usr/bin/env python
"""Wall and CPU time of each synth7t.preprocess step on one T1w image.

Usage::

    NIPYPE_NO_ET=1 python benchmarks/preprocess_timings.py \
        ../shared/data/bids_3t/sub-01/anat/sub-01_T1w.nii.gz [--threads 1] [--nonlinear]

Prints one row per step (wall s, process CPU s, 1-min load average at the end of the step) and
the alignment numbers used by tests/test_preprocess.py. CPU time is the better measure on a
shared machine: wall time grows with the load average.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from synth7t import preprocess as P
from synth7t.io import conform, load_image


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("t1w", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nonlinear", action="store_true")
    args = ap.parse_args(argv)
    rows: list[tuple[str, float, float, float]] = []

    def timed(name, fn, *a, **kw):
        t0, c0 = time.time(), _cpu()
        out = fn(*a, **kw)
        rows.append((name, time.time() - t0, _cpu() - c0, os.getloadavg()[0]))
        return out

    with tempfile.TemporaryDirectory() as tmp:
        img, _ = timed("load_image+conform", lambda: conform(load_image(args.t1w)))
        n4 = timed("n4_correct", P.n4_correct, img, threads=args.threads)
        stripped = timed("detect_skull_stripped", P.detect_skull_stripped, n4)
        brain, mask = timed("skull_strip", P.skull_strip, n4, threads=args.threads, seed=0)
        xfm = timed("register_to_reference", P.register_to_reference, brain, mask,
                    out_prefix=f"{tmp}/x_", threads=args.threads, seed=0,
                    nonlinear=args.nonlinear)
        ref = timed("to_reference", P.to_reference, brain, [xfm["forward"]])
        timed("to_native", P.to_native, ref, brain, [xfm["inverse"]])

    print(f"{'step':24s} {'wall s':>8s} {'cpu s':>8s} {'load':>6s}")
    for name, wall, cpu, load in rows:
        print(f"{name:24s} {wall:8.1f} {cpu:8.1f} {load:6.1f}")
    litres = mask.get_fdata().sum() * abs(np.linalg.det(mask.affine[:3, :3])) / 1e6
    t1 = nib.load(P.template_path(1)).get_fdata(dtype=np.float32)
    tmask = nib.load(P.template_path(1, desc="brain", suffix="mask")).get_fdata() > 0
    sub = ref.get_fdata(dtype=np.float32)[::2, ::2, ::2]  # 0.5 mm grid -> 1 mm template grid
    ncc = np.corrcoef(sub[tmask], t1[tmask])[0, 1]
    print(f"skull-stripped input: {stripped}; brain mask {litres:.2f} L; "
          f"NCC with template in its brain mask {ncc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
