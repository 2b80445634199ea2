"""Does the uncertainty map track the real error? (prints tables; no assertions)

On held-out simulated pairs of the Colin27 head (never used in training; the same anatomy,
seeds and slab placement as ``bench_quality.py``: full-plane axial slabs spread over the central
25-75 % of the brain's z-range), for each of the 12 (contrast, source field) pairs, with the
shipped ``default`` model (or ``--model-dir``):

* Spearman correlation, voxelwise inside the brain mask, between the predicted uncertainty and
  the absolute error of the synthetic image against the simulated 7T target (target >= 0.4);
* calibration: brain voxels split into 10 deciles of predicted uncertainty; the mean absolute
  error must not decrease from one decile to the next (and the table prints both means: the
  map is meant as an expected absolute error);
* out of distribution: a synthetic chronic-lesion ball (radius 6 mm; T1w hypo-, T2w/FLAIR
  hyperintense, :func:`synth7t.uncertainty.insert_lesion`) inserted into the white matter of
  the source image and normalised as the App normalises the whole brain (the lesion enters the
  upper percentile with its share of the whole Colin27 brain, not of the slab: see
  ``insert_lesion(brain_voxels=...)``); mean uncertainty in the lesion over mean uncertainty in
  normal white matter (target >= 2). The lesion test renders the same slabs and draws without
  the random deformation, so that the anatomy's white-matter map lies where the image's white
  matter is (with the deformation, "white matter" included grey matter and CSF up to ~5 mm off,
  and the lesion was cut into them).

"offset share": the part of the mean absolute error that is each decile's mean signed error
(:func:`synth7t.uncertainty.offset_share`): where it is high, the voxels of a decile share one
level error (a tissue's 7T level off on this anatomy), which the map's order within the decile
cannot rank; a noise-like error has a share near 0. The per-tissue table says which tissue
carries it: each tissue's mean signed error, mean absolute error and mean uncertainty over the
voxels that are > 90 % that tissue, on the undeformed renders the lesion test uses (there the
anatomy's fraction maps lie where the image's tissue is).

``--draws N`` renders each slab N times (other protocol, SNR, voxel and deformation draws; the
first is the default render): a tissue's level error changes with the protocol drawn, so one
draw per slab is a small sample of the pair.

``--oracle`` (with ``--draws`` >= 2) asks whether a miss is the map's or the draw's: on the
undeformed renders, draw k is scored against an *anatomy-aware oracle*, the mean absolute error
of the same voxel over the other draws (:func:`leave_one_out`). It knows this anatomy's
voxel-by-voxel error pattern and the network's, which no map computed from one input has, but
not draw k's protocol. Where the oracle ranks and calibrates draw k's error, the error has a
structure the map misses; where the oracle also fails, the error moves with the protocol drawn
and one draw is a lottery for any map.

``--full`` scores Spearman and deciles over whole volumes instead of the slabs (about 10 min and
8 GB on two cores): which pairs pass moves with the slabs chosen, so it is the reading free of
that choice.

Usage::

    NIPYPE_NO_ET=1 python benchmarks/bench_uncertainty.py --threads 2 [--full] [--draws 6 --oracle]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import (CACHE, _level, _protocol, _split, colin27_simulator,  # noqa: E402
                           find_colin27)

#: in-plane 3x3 neighbourhood: slabs are only a few slices deep
INPLANE = np.ones((3, 3, 1), bool)
#: tissues of the per-tissue table (the anatomy's fraction maps)
TISSUES = ("GM", "WM", "CSF")


def leave_one_out(values: np.ndarray) -> np.ndarray:
    """Row k: the mean of the other rows (``values``: draws x voxels, at least 2 draws)."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape[0] < 2:
        raise ValueError("leave_one_out needs at least two draws")
    return ((v.sum(axis=0, keepdims=True) - v) / (v.shape[0] - 1)).astype(np.float32)


def oracle_scores(abs_errors: list[np.ndarray], maps: list[np.ndarray]) -> dict:
    """Per draw, Spearman and decile monotonicity of the map and of the leave-one-draw-out
    oracle against that draw's absolute error (arrays: the same voxels in every draw)."""
    from synth7t.uncertainty import decile_calibration, is_monotonic, largest_dip, spearman

    err = np.stack(abs_errors)
    oracle = leave_one_out(err)
    out: dict[str, list] = {"map_spearman": [], "map_monotonic": [], "oracle_spearman": [],
                            "oracle_monotonic": [], "oracle_dip_share": []}
    for k in range(err.shape[0]):
        e = err[k]
        out["map_spearman"].append(spearman(maps[k], e))
        out["map_monotonic"].append(is_monotonic(decile_calibration(maps[k], e)))
        cal = decile_calibration(oracle[k], e)
        out["oracle_spearman"].append(spearman(oracle[k], e))
        out["oracle_monotonic"].append(is_monotonic(cal))
        out["oracle_dip_share"].append(largest_dip(cal)[0] / max(float(e.mean()), 1e-12))
    return out


def draw_seed(seed: int, slab: int, field_bin: float, draw: int) -> int:
    """Render seed of one slab's ``draw`` (draw 0: the seed ``bench_quality.py`` uses)."""
    return seed + 1000 * slab + int(field_bin * 10) + 100_000 * draw


def lesion_ratio(synth, src: np.ndarray, mask: np.ndarray, wm: np.ndarray, contrast: str, *,
                 tta: bool | None, threads: int, brain_voxels: int | None = None,
                 input_level: float | None = None,
                 protocol: dict | None = None) -> tuple[float, float, float]:
    """(lesion mean uncertainty, normal-WM mean uncertainty, ratio) for one slab."""
    from scipy import ndimage as ndi

    from synth7t.uncertainty import add_saturation, insert_lesion

    core = ndi.binary_erosion(wm & mask, structure=INPLANE, iterations=6)
    if not core.any():
        return float("nan"), float("nan"), float("nan")
    # the deepest white-matter voxel of the slab's middle slice
    z = src.shape[2] // 2
    dist = ndi.distance_transform_edt(core[:, :, z])
    cx, cy = np.unravel_index(int(np.argmax(dist)), dist.shape)
    radius = 12.0  # voxels of 0.5 mm: 6 mm
    lesioned, lesion, excess = insert_lesion(src, wm & mask, centre=(int(cx), int(cy), z),
                                             radius=radius, contrast=contrast,
                                             brain_voxels=brain_voxels, excess=True)
    _, unc = synth.predict(lesioned, mask, tta=tta, threads=threads, return_uncertainty=True,
                           input_level=input_level, protocol=protocol)
    add_saturation(unc, excess, mask)  # as the App's synthesis node does
    far = ndi.binary_dilation(lesion, structure=INPLANE, iterations=16)
    normal = core & ~far
    les, nor = float(unc[lesion].mean()), float(unc[normal].mean())
    return les, nor, les / max(nor, 1e-12)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--colin-dir", type=Path)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--slabs", type=int, default=2)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--full", action="store_true",
                   help="Spearman and deciles over whole 364x436x364 volumes (the lesion test "
                        "stays on the slabs)")
    p.add_argument("--draws", type=int, default=1,
                   help="protocol/SNR/voxel/deformation draws per slab (the lesion test uses "
                        "the first): the tissues' level errors change with the draw")
    p.add_argument("--oracle", action="store_true",
                   help="also score each draw against the other draws' mean absolute error "
                        "per voxel (undeformed renders; needs --draws >= 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time flips (default: the shipped default)")
    p.add_argument("--json", type=Path)
    p.add_argument("--cache", type=Path, default=CACHE)
    args = p.parse_args(argv)
    if args.oracle and args.draws < 2:
        p.error("--oracle needs --draws >= 2")

    import torch

    from synth7t.fields import CONTRASTS, SUPPORTED_BINS, bin_label
    from synth7t.inference import DEFAULT_TTA
    from synth7t.reference import REF_SHAPE
    from synth7t.inference import load_synthesizer
    from synth7t.registry import Registry
    from synth7t.uncertainty import (add_saturation, decile_calibration, is_monotonic,
                                     largest_dip, offset_share, spearman)

    tta = DEFAULT_TTA if args.tta is None else args.tta
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ch2, ch2bet = find_colin27(args.colin_dir)
    sim = colin27_simulator(ch2, ch2bet, args.seed, args.cache)
    mask0 = sim.brain_mask()
    zs = np.flatnonzero(mask0.any(axis=(0, 1)))
    starts = np.linspace(zs[0] + 0.25 * (zs[-1] - zs[0]), zs[0] + 0.75 * (zs[-1] - zs[0]),
                         args.slabs).astype(int)
    rois = [(slice(0, REF_SHAPE[0]), slice(0, REF_SHAPE[1]), slice(int(z), int(z) + args.depth))
            for z in starts]
    reg = Registry.load(args.model_dir)
    rows, calib, tissue, oracle = {}, {}, {}, {}
    for fb in SUPPORTED_BINS:
        scored = [None] if args.full else rois
        # draw d > 0: another protocol, SNR, voxel and deformation draw of the same slabs
        per_roi = [sim.sample_all_contrasts(field=fb, seed=draw_seed(args.seed, k, fb, d),
                                            roi=roi)
                   for d in range(args.draws) for k, roi in enumerate(scored)]
        # The lesion test needs the white matter where the image has it: the renders above are
        # randomly deformed (up to ~5 mm here), so it uses undeformed renders of the same slabs
        # and draws, on which the anatomy's own WM map is exact.
        plain = [sim.sample_all_contrasts(field=fb, seed=draw_seed(args.seed, k, fb, d),
                                          roi=roi, deform=False)
                 for d in range(args.draws) for k, roi in enumerate(rois)]
        fracs = [sim.anatomy.resample(roi) for roi in rois] * args.draws
        wms = [f["WM"] > 0.9 for f in fracs]
        for c in CONTRASTS:
            synth = load_synthesizer(reg.get(c, fb, "default"))
            if not synth.has_uncertainty:
                print(f"{c}@{bin_label(fb)}: the model has no uncertainty head", file=sys.stderr)
                return 1
            us, es = [], []
            for multi in per_roi:
                src, tgt, mask = _split(multi, c)
                pred, unc = synth.predict(src, mask, tta=tta, threads=args.threads,
                                          return_uncertainty=True,
                                          input_level=_level(multi, c),
                                          protocol=_protocol(multi, c))
                add_saturation(unc, multi[c].get("source_excess"), mask)
                us.append(unc[mask])
                es.append((pred - tgt)[mask])
            lr = []
            by_tissue: dict[str, list] = {t: [] for t in TISSUES}
            flat_err, flat_map, flat_mask = [], [], []
            for i, (flat, wm, frac) in enumerate(zip(plain, wms, fracs)):
                fsrc, ftgt, fmask = _split(flat, c)
                fpred, func = synth.predict(fsrc, fmask, tta=tta, threads=args.threads,
                                            return_uncertainty=True, input_level=_level(flat, c),
                                            protocol=_protocol(flat, c))
                add_saturation(func, flat[c].get("source_excess"), fmask)
                ferr = fpred - ftgt
                if args.oracle:
                    flat_err.append(np.abs(ferr))
                    flat_map.append(func)
                    flat_mask.append(fmask)
                for t in TISSUES:
                    sel = fmask & (frac[t] > 0.9)
                    by_tissue[t].append((ferr[sel], func[sel]))
                if i >= len(rois):
                    continue  # the lesion test stays on the first draw
                lr.append(lesion_ratio(synth, fsrc, fmask, wm, c, tta=tta, threads=args.threads,
                                       brain_voxels=int(mask0.sum()),
                                       input_level=_level(flat, c),
                                       protocol=_protocol(flat, c)))
            u, signed = np.concatenate(us), np.concatenate(es)
            e = np.abs(signed)
            key = f"{c}@{bin_label(fb)}"
            cal = decile_calibration(u, e, signed_error=signed)
            les = float(np.nanmean([r[0] for r in lr]))
            nor = float(np.nanmean([r[1] for r in lr]))
            dip, dip_bin = largest_dip(cal)
            rows[key] = {"spearman": spearman(u, e), "monotonic": is_monotonic(cal),
                         "largest_dip": dip, "largest_dip_bin": dip_bin,
                         "mean_unc": float(u.mean()), "mae": float(e.mean()),
                         "offset_share": offset_share(cal),
                         "lesion_unc": les, "normal_wm_unc": nor, "lesion_ratio": les / nor}
            calib[key] = cal
            tissue[key] = {}
            for t, parts in by_tissue.items():
                err = np.concatenate([a for a, _ in parts])
                if err.size:
                    unc_t = np.concatenate([b for _, b in parts])
                    tissue[key][t] = {"signed_error": float(err.mean()),
                                      "mae": float(np.abs(err).mean()),
                                      "mean_unc": float(unc_t.mean()), "voxels": int(err.size)}
            if args.oracle:
                n = len(rois)
                # the voxels inside the brain in every draw, slabs side by side
                common = [np.logical_and.reduce(flat_mask[k::n]) for k in range(n)]
                per_draw = [range(d * n, (d + 1) * n) for d in range(args.draws)]
                oracle[key] = oracle_scores(
                    [np.concatenate([flat_err[i][common[i % n]] for i in idx]) for idx in per_draw],
                    [np.concatenate([flat_map[i][common[i % n]] for i in idx]) for idx in per_draw])
                del flat_err, flat_map
            print(f"  {key}: rho {rows[key]['spearman']:.3f} monotonic {rows[key]['monotonic']} "
                  f"lesion x{rows[key]['lesion_ratio']:.2f}", file=sys.stderr, flush=True)

    slabs = (f"{args.slabs} full-plane slabs x {args.depth} slices at z = "
             f"{', '.join(map(str, starts))} (central 25-75 % of the brain)"
             + (f", {args.draws} draws each" if args.draws > 1 else ""))
    where = (f"whole volumes (lesion test: {slabs})" if args.full else slabs)
    print(f"# Uncertainty vs real error on Colin27 (never used in training), {where}, "
          f"seed {args.seed}, TTA {'on' if tta else 'off'}; "
          f"{os.cpu_count()} CPUs ({platform.machine()}), {args.threads} torch threads; "
          f"{time.perf_counter() - t0:.0f} s")
    print("| pair | Spearman(unc, abs err) | deciles: MAE non-decreasing | mean unc | MAE | "
          "offset share | lesion unc / normal WM unc | targets met |")
    print("|---|---|---|---|---|---|---|---|")
    all_met = True
    for key, r in rows.items():
        met = r["spearman"] >= 0.4 and r["monotonic"] and r["lesion_ratio"] >= 2.0
        all_met &= met
        mono = "yes" if r["monotonic"] else (
            f"no (largest fall {r['largest_dip']:.4f} = {100 * r['largest_dip'] / r['mae']:.0f} % "
            f"of the MAE, into decile {r['largest_dip_bin']})")
        print(f"| {key} | {r['spearman']:.3f} | {mono} | "
              f"{r['mean_unc']:.4f} | {r['mae']:.4f} | {100 * r['offset_share']:.0f} % | "
              f"{r['lesion_ratio']:.2f} "
              f"({r['lesion_unc']:.4f} / {r['normal_wm_unc']:.4f}) | {'yes' if met else 'no'} |")
    print(f"\ntargets: Spearman >= 0.4, decile MAE non-decreasing, lesion >= 2x normal WM: "
          f"{'met on all 12 pairs' if all_met else 'NOT met on every pair'}")
    print("\n# Calibration (deciles of predicted uncertainty; mean predicted / mean absolute "
          "error / mean signed error, prediction - target)")
    print("| decile | " + " | ".join(rows) + " |")
    print("|---" * (1 + len(rows)) + "|")
    for i in range(10):
        cells = [f"{calib[k][i]['mean_uncertainty']:.4f}/{calib[k][i]['mean_abs_error']:.4f}/"
                 f"{calib[k][i]['mean_signed_error']:+.4f}"
                 if i < len(calib[k]) else "" for k in rows]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    print("\n# Per tissue (undeformed renders of the same slabs, voxels > 90 % of one tissue): "
          "mean signed error (prediction - target) / mean absolute error / mean uncertainty")
    print("| pair | " + " | ".join(TISSUES) + " |")
    print("|---" * (1 + len(TISSUES)) + "|")
    for key, per in tissue.items():
        cells = [f"{per[t]['signed_error']:+.4f} / {per[t]['mae']:.4f} / {per[t]['mean_unc']:.4f}"
                 if t in per else "" for t in TISSUES]
        print(f"| {key} | " + " | ".join(cells) + " |")
    if args.oracle:
        print(f"\n# Map against an anatomy-aware oracle (undeformed renders, {args.draws} draws; "
              "oracle for draw k: each voxel's mean absolute error over the other draws): "
              "Spearman min-max over draws, draws with non-decreasing decile MAE")
        print("| pair | map Spearman | map deciles | oracle Spearman | oracle deciles | "
              "oracle's largest fall (% of MAE) |")
        print("|---|---|---|---|---|---|")
        for key, o in oracle.items():
            print(f"| {key} | {min(o['map_spearman']):.3f}-{max(o['map_spearman']):.3f} | "
                  f"{sum(o['map_monotonic'])}/{args.draws} | "
                  f"{min(o['oracle_spearman']):.3f}-{max(o['oracle_spearman']):.3f} | "
                  f"{sum(o['oracle_monotonic'])}/{args.draws} | "
                  f"{100 * max(o['oracle_dip_share']):.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "calibration": calib, "tissue": tissue,
                                         "oracle": oracle, "tta": tta,
                                         "all_targets_met": all_met}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
