#!/usr/bin/env python
"""The MRIxFields2026 Task 1 workload through synth7t-mrixfields: seconds per volume and total.

The real test phase is 60 predictions (4 source fields x 5 cases x 3 modalities) of
364 x 436 x 364 float32 volumes; the target is <= 30 min on 2 CPU cores. This script builds a
fake challenge input of that geometry (inputs from ``synth7t.simulate`` when it is importable,
else smooth random "brains"), runs :func:`synth7t.mrixfields.run` exactly as the container does,
validates the output with :func:`synth7t.mrixfields.check_submission` and prints a table.

A reduced run (``--cases 1 --sources 0.1T``: 3 volumes) is extrapolated to the 60 volumes and
labelled as such. Input generation is not timed.

    python benchmarks/bench_task1.py                          # full: 60 volumes
    python benchmarks/bench_task1.py --cases 1 --sources 0.1T --threads 2   # 3 volumes, extrapolated
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")

from synth7t import mrixfields as MX  # noqa: E402
from synth7t.reference import REF_AFFINE, REF_SHAPE  # noqa: E402

FULL = 60
TARGET_MIN = 30.0
FIELDS = {"0.1T": 0.1, "1.5T": 1.5, "3T": 3.0, "5T": 5.0}


def _random_brain(seed: int) -> dict[str, np.ndarray]:
    """Three smooth random 'contrasts' inside an ellipsoid on the reference grid."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    shape = REF_SHAPE
    coarse = rng.random((3,) + tuple(s // 8 for s in shape)).astype(np.float32)
    idx = np.indices(shape, sparse=True)
    c = np.array(shape) / 2
    r = sum(((i - ci) / (ci * 0.8)) ** 2 for i, ci in zip(idx, c))
    mask = r < 1
    out = {}
    for k, name in enumerate(("T1W", "T2W", "T2FLAIR")):
        vol = ndi.zoom(coarse[k], 8, order=1)[: shape[0], : shape[1], : shape[2]]
        vol = np.pad(vol, [(0, s - v) for s, v in zip(shape, vol.shape)], mode="edge")
        vol = np.where(mask, 0.2 + 0.7 * vol, 0).astype(np.float32)
        out[name] = vol
    return out


def _simulated(sim, field: float, seed: int) -> dict[str, np.ndarray]:
    pair = sim.sample_all_contrasts(field=field, seed=seed)
    return {"T1W": pair["T1w"]["source"], "T2W": pair["T2w"]["source"],
            "T2FLAIR": pair["FLAIR"]["source"]}


def build_input(root: Path, sources: list[str], cases: int, generator: str) -> Path:
    inp = root / "input"
    sim = None
    if generator == "simulator":
        from synth7t.simulate import Simulator

        sim = Simulator.from_icbm152()
    samples = []
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    for si, src in enumerate(sources):
        for ci in range(cases):
            cid = f"{21 + ci:04d}"
            t0 = time.time()
            vols = (_simulated(sim, FIELDS[src], 1000 * si + ci) if sim is not None
                    else _random_brain(1000 * si + ci))
            for mod, vol in vols.items():
                rel = f"{mod}/{src}_to_7T/src/P_{mod}_{src}_{cid}.nii.gz"
                (inp / rel).parent.mkdir(parents=True, exist_ok=True)
                img = nib.Nifti1Image(vol.astype(np.float32), REF_AFFINE, hdr)
                img.set_qform(REF_AFFINE, code=4)
                img.set_sform(REF_AFFINE, code=4)
                img.to_filename(str(inp / rel))
                samples.append({"task": "task1", "case_id": cid, "modality": mod,
                                "source_field": src, "target_field": "7T",
                                "pair": f"{src}_to_7T", "input": rel,
                                "output": f"{mod}/{src}_to_7T/pred/P_{mod}_7T_{cid}.nii.gz"})
            print(f"  input {src} case {cid}: {generator} in {time.time() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    manifest = {"challenge": "MRIxFields2026", "phase": "test", "task": "task1",
                "input_root": "/input", "output_root": "/output",
                "volume_shape": list(REF_SHAPE), "samples": samples}
    (inp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return inp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5, help="cases per source field (challenge: 5)")
    ap.add_argument("--sources", nargs="+", default=list(FIELDS), choices=list(FIELDS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--inputs", choices=("auto", "simulator", "random"), default="auto",
                    help="how to make the inputs (auto: the simulator if importable)")
    ap.add_argument("--work", type=Path, default=None, help="keep inputs/outputs here")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    generator = args.inputs
    if generator == "auto":
        try:
            import synth7t.simulate  # noqa: F401
            generator = "simulator"
        except ImportError:
            generator = "random"
    root = args.work or Path(tempfile.mkdtemp(prefix="bench_task1_"))
    root.mkdir(parents=True, exist_ok=True)
    n = len(args.sources) * args.cases * 3
    inp = root / "input"
    old = inp / "manifest.json"
    if old.is_file() and len(json.loads(old.read_text())["samples"]) == n:
        print(f"Reusing the {n} input volumes in {inp}", file=sys.stderr)
    else:
        print(f"Building {n} input volumes of {REF_SHAPE} ({generator}) in {root}",
              file=sys.stderr)
        inp = build_input(root, args.sources, args.cases, generator)
    out = root / "output"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    manifest = MX.load_manifest(inp / "manifest.json", inp, out)
    from synth7t.registry import Registry

    entry = Registry.load(args.model_dir).get("T1w", 0.1)
    t0 = time.time()
    res = MX.run(manifest, model_dir=args.model_dir, threads=args.threads,
                 batch_size=args.batch_size, tta=args.tta, tmp_dir=root / "tmp")
    total = time.time() - t0
    problems = MX.check_submission(manifest, out)

    per = np.array([[t["load"], t["predict"], t["write"], t["total"]] for t in res.timings])
    mean = per.mean(axis=0) if len(per) else np.zeros(4)
    setup = res.setup_seconds
    # writes overlap the next prediction, so throughput is wall time per volume, not mean total
    per_volume = (total - setup) / max(1, len(res.timings))
    full_est = setup + per_volume * FULL
    print()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, torch threads {args.threads}")
    print(f"model: {entry.name} ({entry.kind} v{entry.version}), tta={args.tta}, "
          f"batch={args.batch_size}, inputs: {generator}")
    print(f"volumes run: {len(res.timings)} ({len(res.written)} written, {len(res.failed)} failed);"
          f" --check: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    print(f"{'per volume (s)':<18}{'load':>8}{'predict':>9}{'write':>8}{'total':>8}")
    print(f"{'mean':<18}" + "".join(f"{v:>8.1f}" if i != 1 else f"{v:>9.1f}"
                                   for i, v in enumerate(mean)))
    if len(per):
        print(f"{'max':<18}" + "".join(f"{v:>8.1f}" if i != 1 else f"{v:>9.1f}"
                                       for i, v in enumerate(per.max(axis=0))))
    print("(write runs in a background thread, overlapping the next prediction)")
    print(f"total for {len(res.timings)} volumes: {total / 60:.1f} min = model loading/"
          f"verification {setup:.1f} s + {per_volume:.1f} s wall per volume")
    label = "measured" if len(res.timings) == FULL else (
        f"EXTRAPOLATED from {len(res.timings)} volumes")
    verdict = "within" if full_est / 60 <= TARGET_MIN else "OVER"
    print(f"Task 1 (60 volumes), {label}: {full_est / 60:.1f} min -> {verdict} the "
          f"{TARGET_MIN:.0f} min target")
    for p in problems[:10]:
        print(f"  check: {p}")
    if args.json:
        args.json.write_text(json.dumps({
            "volumes": len(res.timings), "wall_seconds_per_volume": per_volume,
            "setup_seconds": setup, "mean_seconds": dict(zip(
                ("load", "predict", "write", "total"), map(float, mean))),
            "total_seconds": total, "task1_minutes_estimate": full_est / 60,
            "estimate_kind": label, "threads": args.threads, "model": entry.provenance(),
            "inputs": generator, "check_problems": problems}, indent=1))
    if args.work is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if not res.failed and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
