"""Synthesis quality on Colin27 anatomy never used in training (prints tables; no assertions).

For each of the 12 (contrast, source field) pairs, paired images are simulated from the Colin27
head (Debian package ``mricron-data``: ``ch2.nii.gz`` + ``ch2bet.nii.gz``), segmented with the
simulator's T1w anatomy source (:func:`synth7t.anatomy.from_t1w`, Atropos CSF/GM/WM), with
protocol parameters, effective voxel, SNR and deformation drawn from the simulator's
randomisation ranges (seeded). Scored against the simulated 7T target with the challenge metrics
of :mod:`synth7t.metrics` (nRMSE, SSIM over axial slices, PSNR):

* ``copy``: the source image itself (copy-input);
* ``baseline``: the registry's non-deep ``baseline``;
* ``model``: the registry's ``default`` (the shipped model, or ``--model-dir``);
* ``cand``: optionally a checkpoint given with ``--weights`` (e.g. during training).

Target (every one of the 12 pairs): model nRMSE <= 0.8 x the better reference's (copy or
baseline), and model (1 - SSIM) <= 0.7 x the better reference's (1 - SSIM), i.e. the model
removes at least 20 % of the intensity error and 30 % of the structural error that the better
of copy-input and the baseline leaves.

``--robustness`` adds three tables that predict how the model does on data it was not tuned to
(target: model better than copy-input on nRMSE and SSIM for all 12 pairs):

* ``outside``: the same Colin27 pairs rendered with every source-side protocol parameter,
  the WM SNR and the effective voxel size drawn from a band lying 20 % (of the training range's
  width) beyond the training ranges (``physics.json`` ``training_widening``): SNR below, voxels
  larger, protocol parameters on a seeded random side;
  ``--outside-band edge`` reads "20 % beyond" relative to each range's edge instead (SNR
  x 0.8, voxels and protocol parameters x 0.8 or 1.2): milder for the SNR, whose width-based
  band reaches down to the 1e-3 floor at 0.1 T, and much harsher for the narrow inversion and
  echo-time ranges (e.g. 3 T MPRAGE TI 882-918 ms -> 706-882 or 918-1102 ms), i.e. a protocol
  up to about a fifth (TI) or 45 % (TE) from the nominal one;
* ``texture``: a different texture/partial-volume model: the BrainWeb crisp label map (the
  Colin27 head as hard labels, no partial volume) with a synthetic random texture instead of
  the image-derived one;
* ``mprage``: the other MPRAGE signal model FIELD_PHYSICS.md allows: every 1.5-5 T T1w source
  rendered with Deichmann's full expression (``physics.json`` ``mprage_train``; 3 T grey/white
  0.75 instead of 0.57), the 7 T target unchanged; the other nine pairs are rendered as in the
  main table (fresh draws) and only repeat it.

By default ``--slabs`` full-plane (364 x 436) axial slabs of ``--depth`` slices are simulated (a
volume costs minutes per pair on 2 cores): their first slices are spread evenly over the central
25-75 % of the brain's z-range (the simulator's undeformed brain mask; with 2 slabs they start at
25 % and 75 %), and the rest of the brain is not scored. ``--full`` scores whole volumes.

Usage::

    NIPYPE_NO_ET=1 python benchmarks/bench_quality.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synth7t" / "mricron"


def find_colin27(colin_dir: Path | None) -> tuple[Path, Path]:
    """``ch2.nii.gz`` and ``ch2bet.nii.gz``; fetched with ``apt-get download`` when absent."""
    for d in [colin_dir, MRICRON_TEMPLATES, CACHE / "usr/share/mricron/templates"]:
        if d and (Path(d) / "ch2.nii.gz").is_file() and (Path(d) / "ch2bet.nii.gz").is_file():
            return Path(d) / "ch2.nii.gz", Path(d) / "ch2bet.nii.gz"
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "mricron-data"], cwd=CACHE, check=True,
                   capture_output=True)
    deb = sorted(CACHE.glob("mricron-data*.deb"))[-1]
    subprocess.run(["dpkg", "-x", str(deb), str(CACHE)], check=True)
    d = CACHE / "usr/share/mricron/templates"
    return d / "ch2.nii.gz", d / "ch2bet.nii.gz"


def colin27_simulator(ch2: Path, ch2bet: Path, seed: int, cache: Path | None = None):
    """Simulator on Colin27 segmented by :func:`synth7t.anatomy.from_t1w`.

    The segmentation (N4 + Atropos + affine registration, minutes on a busy machine) is cached
    as a plain ``.npz`` (no pickle) in ``cache`` keyed by the seed.
    """
    import nibabel as nib

    from synth7t import anatomy
    from synth7t.simulate import Simulator

    cached = cache / f"colin27_anatomy_seed{seed}.npz" if cache else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as z:
            tissues = [str(t) for t in z["tissues"]]
            anat = anatomy.Anatomy({t: z[f"frac_{t}"] for t in tissues}, z["texture"],
                                   z["affine"], name=str(z["name"]))
        return Simulator(anat)
    bet = nib.load(str(ch2bet))
    with tempfile.TemporaryDirectory() as tmp:
        mask_path = Path(tmp) / "ch2_mask.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(bet.dataobj) > 0).astype(np.uint8), bet.affine),
                 str(mask_path))
        anat = anatomy.from_t1w(ch2, mask=mask_path, seed=seed)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cached, tissues=np.array(list(anat.fractions)), texture=anat.texture,
                            affine=anat.affine, name=np.array(anat.name),
                            **{f"frac_{t}": v for t, v in anat.fractions.items()})
    return Simulator(anat)


def _split(multi: dict, contrast: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source, target, mask of one contrast from ``sample_all_contrasts`` (either layout)."""
    if contrast in multi:
        d = multi[contrast]
        return d["source"], d["target"], np.asarray(d["mask"], bool)
    return multi["source"][contrast], multi["target"][contrast], np.asarray(multi["mask"], bool)


def _level(multi: dict, contrast: str) -> float | None:
    """The whole source brain's mean (models with input scaling need it: a slab
    is only part of the brain the App would measure it on)."""
    return multi.get(contrast, {}).get("source_level")


def _protocol(multi: dict, contrast: str) -> dict | None:
    """The source protocol of ``contrast`` in a ``sample_all_contrasts`` render, as the App
    reads it from a BIDS sidecar (models with protocol conditioning)."""
    from synth7t.sources import source_protocol

    return source_protocol(multi.get(contrast, {}).get("params"))


def outside_physics(seed: int, frac: float = 0.2, rule: str = "width"):
    """The physics table with source draws from a band ``frac`` beyond the training ranges:
    ``frac`` of the range's width (``rule="width"``) or of its edge value (``"edge"``)."""
    import copy

    from synth7t.physics import MPRAGE_TRAIN_KEY, Physics, source_ranges

    train = Physics.load().widened()
    tab = copy.deepcopy(train.table)
    tab.pop(MPRAGE_TRAIN_KEY, None)  # the source form has a table of its own (full_mprage_physics)
    rng = np.random.default_rng(seed)

    def band(lo: float, hi: float, side: int) -> list[float]:
        if rule == "edge":
            return [hi, hi * (1 + frac)] if side > 0 else [max(lo * (1 - frac), 1e-3), lo]
        w = max(hi - lo, 0.05 * max(abs(hi), 1e-6))
        return [hi, hi + frac * w] if side > 0 else [max(lo - frac * w, 1e-3), lo]

    for kind, spec, key in source_ranges(tab):
        if kind == "protocol":
            spec[key]["range"] = band(*spec[key]["range"], 1 if rng.random() < 0.5 else -1)
        elif kind == "snr":
            spec[key] = band(*spec[key], -1)
        elif kind == "voxel":
            spec[key] = [band(a, b, 1) if b > 0.5 + 1e-6 else [a, b] for a, b in spec[key]]
    return Physics(tab)


def full_mprage_physics():
    """The physics table with every drawn MPRAGE source rendered with Deichmann's full
    expression (the 7 T target keeps the table's first-order form)."""
    import copy

    from synth7t.physics import MPRAGE_TRAIN_KEY, Physics

    tab = copy.deepcopy(Physics.load().table)
    tab[MPRAGE_TRAIN_KEY] = 1.0
    return Physics(tab)


def score(sim, rois, reg, *, seed: int, methods: list[str], tta: bool | None, threads: int,
          cand=None, log_prefix: str = "", protocol: bool = True) -> dict:
    """nRMSE/SSIM/PSNR per pair and method on ``rois`` of ``sim``'s renders (``protocol``:
    networks with protocol conditioning are told each render's protocol, as the App tells them
    a sidecar's; ``False``: "not known", as for the challenge data)."""
    from synth7t import metrics
    from synth7t.fields import CONTRASTS, SUPPORTED_BINS, bin_label
    from synth7t.inference import load_synthesizer

    results: dict[str, dict[str, dict[str, float]]] = {}
    for fb in SUPPORTED_BINS:
        per_roi = [sim.sample_all_contrasts(field=fb, seed=seed + 1000 * k + int(fb * 10),
                                            roi=roi) for k, roi in enumerate(rois)]
        for c in CONTRASTS:
            syns = {"model": load_synthesizer(reg.get(c, fb, "default"))}
            if "baseline" in methods:
                syns["baseline"] = load_synthesizer(reg.get(c, fb, "baseline"))
            if cand is not None:
                from synth7t.inference import UNetSynthesizer

                syns["cand"] = UNetSynthesizer(cand, contrast=c, field_bin=fb)
            preds: dict[str, list[np.ndarray]] = {m: [] for m in methods}
            gts = []
            for multi in per_roi:
                src, tgt, mask = _split(multi, c)
                gts.append(tgt)
                for m in methods:
                    if m == "copy":
                        preds[m].append(src)
                    elif m == "baseline":
                        preds[m].append(syns[m].predict(src, mask))
                    else:
                        preds[m].append(syns[m].predict(src, mask, tta=tta, threads=threads,
                                                        input_level=_level(multi, c),
                                                        protocol=_protocol(multi, c)
                                                        if protocol else None))
            gt = np.concatenate(gts, axis=2)
            key = f"{c}@{bin_label(fb)}"
            results[key] = {}
            for m in methods:
                pr = np.concatenate(preds[m], axis=2)
                results[key][m] = {"nrmse": metrics.nrmse(pr, gt), "ssim": metrics.ssim(pr, gt),
                                   "psnr": metrics.psnr(pr, gt)}
            print(f"  {log_prefix}{key}: " + "  ".join(
                f"{m} {results[key][m]['nrmse']:.3f}/{results[key][m]['ssim']:.3f}"
                for m in methods), file=sys.stderr, flush=True)
    return results


def target_met(r: dict) -> tuple[bool, float, float]:
    """(met, nRMSE ratio, (1 - SSIM) ratio) of the model against the better reference."""
    best_n = min(r["copy"]["nrmse"], r["baseline"]["nrmse"])
    best_s = max(r["copy"]["ssim"], r["baseline"]["ssim"])
    n_ratio = r["model"]["nrmse"] / best_n
    s_ratio = (1.0 - r["model"]["ssim"]) / max(1.0 - best_s, 1e-9)
    return n_ratio <= 0.8 and s_ratio <= 0.7, n_ratio, s_ratio


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--colin-dir", type=Path)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--slabs", type=int, default=3)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--full", action="store_true", help="score whole 364x436x364 volumes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--weights", type=Path, help="extra candidate checkpoint (safetensors)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time flips (default: the shipped default)")
    p.add_argument("--robustness", action="store_true",
                   help="also the outside-the-training-ranges, texture/partial-volume and "
                       "MPRAGE-signal-model tables")
    p.add_argument("--no-protocol", action="store_true",
                   help="withhold each render's protocol from models with protocol "
                        "conditioning (inputs without a sidecar, e.g. the challenge data)")
    p.add_argument("--outside-band", choices=("width", "edge"), default="width",
                   help="'20 %% beyond the training ranges' as 20 %% of each range's width "
                   "(default) or of its edge value")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--cache", type=Path, default=CACHE, help="where the Colin27 segmentation "
                   "is cached (default %(default)s)")
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args(argv)

    import torch

    from synth7t.inference import DEFAULT_TTA
    from synth7t.reference import REF_SHAPE
    from synth7t.registry import Registry

    tta = DEFAULT_TTA if args.tta is None else args.tta
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ch2, ch2bet = find_colin27(args.colin_dir)
    sim = colin27_simulator(ch2, ch2bet, args.seed, None if args.no_cache else args.cache)
    t_anat = time.perf_counter() - t0
    if args.full:
        rois = [None]
    else:
        mask = sim.brain_mask()
        zs = np.flatnonzero(mask.any(axis=(0, 1)))
        starts = np.linspace(zs[0] + 0.25 * (zs[-1] - zs[0]), zs[0] + 0.75 * (zs[-1] - zs[0]),
                             args.slabs).astype(int)
        rois = [(slice(0, REF_SHAPE[0]), slice(0, REF_SHAPE[1]), slice(int(z), int(z) + args.depth))
                for z in starts]

    reg = Registry.load(args.model_dir)
    cand = None
    if args.weights:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from synth7t.networks import UNet25D, UNetConfig

        with safe_open(str(args.weights), framework="pt") as fh:
            cand = UNet25D(UNetConfig.from_json(fh.metadata()["config"]))
        cand.load_state_dict(load_file(str(args.weights)))

    methods = ["copy", "baseline", "model"] + (["cand"] if cand is not None else [])
    model_kind = reg.get("T1w", 3.0).kind
    results = score(sim, rois, reg, seed=args.seed, methods=methods, tta=tta,
                    protocol=not args.no_protocol,
                    threads=args.threads, cand=cand)

    where = "whole volumes" if args.full else (
        f"{args.slabs} full-plane axial slabs x {args.depth} slices starting at "
        + ", ".join(str(r[2].start) for r in rois)
        + " (spread over the central 25-75 % of the brain's z-range)")
    print(f"# Quality on Colin27 (never used in training), {where}, seed {args.seed}; "
          f"default model kind: {model_kind}; TTA {'on' if tta else 'off'}"
          f"{'; protocols withheld' if args.no_protocol else ''}; {os.cpu_count()} "
          f"CPUs ({platform.machine()}), {args.threads} torch threads; "
          f"{time.perf_counter() - t0:.0f} s (anatomy {t_anat:.0f} s)")
    head = " | ".join(f"{m} nRMSE | {m} SSIM | {m} PSNR" for m in methods)
    print(f"| pair | {head} | nRMSE / best ref | (1-SSIM) / best ref | target met |")
    print("|---" * (1 + 3 * len(methods) + 3) + "|")
    all_met = True
    for key, r in results.items():
        met, n_ratio, s_ratio = target_met(r)
        all_met &= met
        cells = " | ".join(f"{r[m]['nrmse']:.3f} | {r[m]['ssim']:.3f} | {r[m]['psnr']:.1f}"
                           for m in methods)
        print(f"| {key} | {cells} | {n_ratio:.2f} | {s_ratio:.2f} | {'yes' if met else 'no'} |")
    mean = {m: {k: float(np.mean([r[m][k] for r in results.values()]))
                for k in ("nrmse", "ssim", "psnr")} for m in methods}
    cells = " | ".join(f"{mean[m]['nrmse']:.3f} | {mean[m]['ssim']:.3f} | {mean[m]['psnr']:.1f}"
                       for m in methods)
    n_met = sum(target_met(r)[0] for r in results.values())
    print(f"| mean | {cells} | | | {n_met}/12 |")
    print("\ntarget: model nRMSE <= 0.8 x the better of copy/baseline, and model (1 - SSIM) <= "
          "0.7 x the better reference's (1 - SSIM), on every pair")

    robust = {}
    if args.robustness:
        from synth7t.simulate import Simulator

        data = Path(__file__).resolve().parents[2] / "shared" / "data"
        variants = {
            "outside": ("protocol, SNR and voxel size drawn 20 % beyond the training ranges"
                        + (" (20 % of each range's edge value)" if args.outside_band == "edge"
                           else " (20 % of each range's width)"),
                        Simulator(sim.anatomy, outside_physics(args.seed,
                                                               rule=args.outside_band))),
            "texture": ("BrainWeb crisp labels (no partial volume) with a random texture",
                        Simulator.from_labels(str(data / "brainweb_crisp_labels.nii.gz"))),
            "mprage": ("1.5-5 T T1w sources rendered with Deichmann's full MPRAGE expression "
                       "(7 T target unchanged; the other pairs repeat the main table)",
                       Simulator(sim.anatomy, full_mprage_physics())),
        }
        for name, (desc, vsim) in variants.items():
            res = score(vsim, rois, reg, seed=args.seed + 7, methods=["copy", "model"], tta=tta,
                        protocol=not args.no_protocol,
                        threads=args.threads, log_prefix=f"{name} ")
            robust[name] = res
            print(f"\n# Robustness ({name}): {desc}; Colin27, same slabs; model must beat "
                  "copy-input on nRMSE and SSIM")
            print("| pair | copy nRMSE | copy SSIM | model nRMSE | model SSIM | beats copy |")
            print("|---|---|---|---|---|---|")
            wins = 0
            for key, r in res.items():
                win = (r["model"]["nrmse"] < r["copy"]["nrmse"]
                       and r["model"]["ssim"] > r["copy"]["ssim"])
                wins += win
                print(f"| {key} | {r['copy']['nrmse']:.3f} | {r['copy']['ssim']:.3f} | "
                      f"{r['model']['nrmse']:.3f} | {r['model']['ssim']:.3f} | "
                      f"{'yes' if win else 'no'} |")
            print(f"| all | | | | | {wins}/12 |")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "mean": mean, "where": where,
                                         "seed": args.seed, "tta": tta,
                                         "all_targets_met": all_met, "robustness": robust,
                                         "outside_band": args.outside_band,
                                         "protocol_withheld": args.no_protocol},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
