"""``synth7t-eval``: challenge metrics between a prediction folder and a ground-truth folder.

Naming understood (both folders are searched recursively for ``*.nii.gz`` / ``*.nii``):

* MRIxFields: ``{R|P}_{MOD}_{FIELD}_{ID}.nii.gz``. Predictions live under
  ``{MOD}/{SRC}_to_7T/pred/`` (the container's output tree), which gives the source field.
  Ground truth is any 7T file with the same modality and ID: ``{MOD}/{SRC}_to_7T/gt/`` (the
  scorer's layout, matched per pair) or ``{MOD}/7T/`` (the dataset's layout).
* BIDS: ``sub-<l>[_ses-<l>][_acq-<l>][_run-<l>]..._{T1w|T2w|FLAIR}.nii.gz``; entities such as
  ``space-`` and ``desc-`` of derivatives are ignored for matching; the source field is the
  sidecar's ``SourceFieldBin`` (then ``SourceMagneticFieldStrength``) or ``unknown``.

Writes ``per_case.csv``, ``summary.csv`` and ``metrics.json`` into ``--out-dir`` and prints a
table. Exit 0 when every matched pair was scored, 1 when some failed, 66 when nothing matched,
64 on usage errors.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from synth7t import __version__
from synth7t import metrics as M

MRIX_RE = re.compile(r"^(?P<kind>[PR])_(?P<mod>T1W|T2W|T2FLAIR)_(?P<field>[0-9.]+T)_(?P<id>\d+)"
                     r"\.nii(\.gz)?$")
PAIR_RE = re.compile(r"^(?P<src>[0-9.]+T)_to_(?P<tgt>[0-9.]+T)$")
BIDS_SUFFIX_RE = re.compile(r"_(?P<suffix>T1w|T2w|FLAIR)\.nii(\.gz)?$")
BIDS_KEY_ENTITIES = ("sub", "ses", "acq", "ce", "rec", "run")
BIDS_TO_MRIX = {"T1w": "T1W", "T2w": "T2W", "FLAIR": "T2FLAIR"}
METRIC_COLS = ("nrmse", "ssim", "psnr", "lpips", "dice_csf", "dice_gm", "dice_wm", "dice_mean")
LOWER_IS_BETTER = {"nrmse", "lpips"}


def _nifti_files(root: Path):
    for p in sorted(root.rglob("*")):
        if p.is_file() and (p.name.endswith(".nii.gz") or p.name.endswith(".nii")):
            yield p


def _pair_of(path: Path, root: Path) -> str | None:
    for part in path.relative_to(root).parts[:-1]:
        if PAIR_RE.match(part):
            return part
    return None


def _bids_entities(name: str) -> dict[str, str]:
    ents = {}
    for tok in re.sub(r"\.nii(\.gz)?$", "", name).split("_"):
        if "-" in tok:
            k, v = tok.split("-", 1)
            ents[k] = v
    return ents


def _sidecar_field(path: Path) -> str | None:
    side = Path(re.sub(r"\.nii(\.gz)?$", ".json", str(path)))
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    for key in ("SourceFieldBin", "SourceMagneticFieldStrength"):
        if meta.get(key) is not None:
            try:
                return f"{float(meta[key]):g}T"
            except (TypeError, ValueError):
                return str(meta[key])
    return None


def describe(path: Path, root: Path) -> dict | None:
    """Parse a file name: ``{naming, modality, case, field, pair, source}`` or ``None``."""
    m = MRIX_RE.match(path.name)
    if m:
        pair = _pair_of(path, root)
        src = PAIR_RE.match(pair).group("src") if pair else None
        # IDs are compared as 4-digit numbers ('21' == '0021'), as the organisers' scorer does
        return {"naming": "mrixfields", "modality": m["mod"], "case": f"{int(m['id']):04d}",
                "field": m["field"], "pair": pair, "source": src or "unknown"}
    m = BIDS_SUFFIX_RE.search(path.name)
    if m and path.name.startswith("sub-"):
        ents = _bids_entities(path.name)
        case = "_".join(f"{k}-{ents[k]}" for k in BIDS_KEY_ENTITIES if k in ents)
        return {"naming": "bids", "modality": BIDS_TO_MRIX[m["suffix"]], "case": case,
                "field": None, "pair": None, "source": _sidecar_field(path) or "unknown"}
    return None


def match(pred_dir: Path, gt_dir: Path):
    """Return ``(pairs, unmatched_predictions, missing_predictions, ignored)``."""
    gt_index: dict[tuple, Path] = {}
    ignored = []
    for g in _nifti_files(gt_dir):
        d = describe(g, gt_dir)
        if d is None:
            ignored.append(str(g))
            continue
        if d["naming"] == "mrixfields" and d["field"] != "7T":
            continue  # source-field images sitting next to the ground truth
        gt_index[(d["modality"], d["case"], d["pair"])] = g
    pairs, unmatched, used = [], [], set()
    for p in _nifti_files(pred_dir):
        d = describe(p, pred_dir)
        if d is None:
            ignored.append(str(p))
            continue
        key = None
        for k in ((d["modality"], d["case"], d["pair"]), (d["modality"], d["case"], None)):
            if k in gt_index:
                key = k
                break
        if key is None:
            unmatched.append(str(p))
            continue
        used.add(key)
        pairs.append((p, gt_index[key], d))
    missing = [str(v) for k, v in sorted(gt_index.items(), key=lambda kv: str(kv[1]))
               if k not in used]
    return pairs, unmatched, missing, ignored


def _stats(rows: list[dict], col: str) -> tuple[float | None, float | None]:
    vals = [r[col] for r in rows if r.get(col) is not None and math.isfinite(r[col])]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["modality"], r["source_field"]), []).append(r)
        groups.setdefault((r["modality"], "all"), []).append(r)
        groups.setdefault(("all", r["source_field"]), []).append(r)
    groups[("all", "all")] = rows
    out = []
    order = {"T1W": 0, "T2W": 1, "T2FLAIR": 2, "all": 9}

    def fkey(f):
        try:
            return float(f.rstrip("T"))
        except ValueError:
            return 99.0

    for (mod, src) in sorted(groups, key=lambda k: (order.get(k[0], 5), fkey(k[1]), k[1])):
        rs = groups[(mod, src)]
        row = {"modality": mod, "source_field": src, "n": len(rs)}
        for c in METRIC_COLS:
            mean, std = _stats(rs, c)
            row[f"{c}_mean"], row[f"{c}_std"] = mean, std
        out.append(row)
    return out


def _fmt(v, width=8):
    if v is None:
        return f"{'n/a':>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.4f}" if math.isfinite(v) else f"{str(v):>{width}}"
    return f"{str(v):>{width}}"


def _csv_value(v):
    return "" if v is None else v


def write_outputs(out_dir: Path, rows, summary, meta) -> tuple[Path, Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    per_case = out_dir / "per_case.csv"
    cols = ["modality", "source_field", "case", "pred", "gt", *METRIC_COLS, "error"]
    with open(per_case, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in cols})
    summ = out_dir / "summary.csv"
    scols = ["modality", "source_field", "n"] + [f"{c}_{s}" for c in METRIC_COLS
                                                  for s in ("mean", "std")]
    with open(summ, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=scols)
        w.writeheader()
        for r in summary:
            w.writerow({k: _csv_value(r.get(k)) for k in scols})
    js = out_dir / "metrics.json"

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    js.write_text(json.dumps(clean({**meta, "per_case": rows, "summary": summary}), indent=2))
    return per_case, summ, js


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synth7t-eval",
        description="MRIxFields2026 metrics (nRMSE, SSIM, PSNR, LPIPS if its weights are on "
                    "disk, tissue-Dice proxy) between predictions and 7T ground truth.")
    p.add_argument("pred_dir", type=Path, help="predictions ({MOD}/{SRC}_to_7T/pred/... or BIDS)")
    p.add_argument("gt_dir", type=Path, help="7T ground truth (MRIxFields or BIDS naming)")
    p.add_argument("-o", "--out-dir", type=Path, default=Path("synth7t-eval"),
                   help="where per_case.csv, summary.csv and metrics.json go "
                        "(default: ./synth7t-eval)")
    p.add_argument("--lpips-weights", type=Path, default=None,
                   help=f"folder holding {M.ALEXNET_FILE} and the LPIPS v0.1 {M.LPIPS_LIN_FILE}; "
                        "never downloaded (default: $SYNTH7T_LPIPS_WEIGHTS or the lpips/torch "
                        "caches)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS even if weights exist")
    p.add_argument("--tissue-method", choices=("kmeans", "atropos", "none"), default="kmeans",
                   help="tissue segmentation for the Dice proxy (default kmeans; none = skip)")
    p.add_argument("--device", default="cpu", help="torch device for LPIPS (default cpu)")
    p.add_argument("--version", action="version", version=f"synth7t-eval {__version__}")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 64 if exc.code not in (0, None) else 0
    for d, what in ((args.pred_dir, "prediction"), (args.gt_dir, "ground-truth")):
        if not d.is_dir():
            print(f"synth7t-eval: {what} folder {d} does not exist", file=sys.stderr)
            return 66
    lpips_model = None
    lpips_status = M.LPIPS_ABSENT
    if args.no_lpips:
        lpips_status = "not computed: --no-lpips"
    else:
        if args.lpips_weights is not None and M.find_lpips_weights(args.lpips_weights) is None:
            print(f"synth7t-eval: --lpips-weights {args.lpips_weights} does not hold "
                  f"{M.ALEXNET_FILE} and {M.LPIPS_LIN_FILE}; LPIPS {M.LPIPS_ABSENT}",
                  file=sys.stderr)
        lpips_model = M.LPIPS.from_local(args.lpips_weights, device=args.device)
        if lpips_model is not None:
            lpips_status = f"computed with {lpips_model.files[0]} + {lpips_model.files[1]}"
    print(f"LPIPS: {lpips_status}")

    pairs, unmatched, missing, ignored = match(args.pred_dir, args.gt_dir)
    for u in unmatched:
        print(f"warning: no ground truth for prediction {u}", file=sys.stderr)
    for m in missing:
        print(f"warning: no prediction for ground truth {m}", file=sys.stderr)
    if not pairs:
        print(f"synth7t-eval: no prediction in {args.pred_dir} matches a ground truth in "
              f"{args.gt_dir}", file=sys.stderr)
        return 66

    rows, failed = [], 0
    t0 = time.time()
    header = f"{'modality':<8} {'source':<7} {'case':<10}" + "".join(
        f"{c:>9}" for c in METRIC_COLS)
    print(header)
    for i, (p, g, d) in enumerate(pairs, 1):
        row = {"modality": d["modality"], "source_field": d["source"], "case": d["case"],
               "pred": str(p), "gt": str(g)}
        try:
            res = M.evaluate_pair(p, g, lpips_model=lpips_model,
                                  contrast=M.MRIX_TO_BIDS[d["modality"]],
                                  tissue=args.tissue_method != "none",
                                  tissue_method=args.tissue_method
                                  if args.tissue_method != "none" else "kmeans")
            row.update({k: res[k] for k in METRIC_COLS})
            row["error"] = None
        except Exception as exc:  # one bad file must not stop the evaluation
            failed += 1
            row.update({k: None for k in METRIC_COLS})
            row["error"] = " ".join(str(exc).split()) or type(exc).__name__
        rows.append(row)
        line = f"{row['modality']:<8} {row['source_field']:<7} {row['case']:<10}" + "".join(
            " " + _fmt(row[c]) for c in METRIC_COLS)
        if row["error"]:
            line += f"  ERROR {row['error']}"
        eta = (time.time() - t0) / i * (len(pairs) - i)
        print(f"{line}   [{i}/{len(pairs)}, ~{eta:.0f}s left]", flush=True)

    ok_rows = [r for r in rows if not r["error"]]
    summary = summarise(ok_rows)
    print("\nSummary (mean over cases; nRMSE/LPIPS lower is better, others higher):")
    print(f"{'modality':<8} {'source':<7} {'n':>4}" + "".join(f"{c:>9}" for c in METRIC_COLS))
    for s in summary:
        print(f"{s['modality']:<8} {s['source_field']:<7} {s['n']:>4}" + "".join(
            " " + _fmt(s[f'{c}_mean']) for c in METRIC_COLS))
    meta = {
        "tool": f"synth7t-eval {__version__}",
        "pred_dir": str(args.pred_dir), "gt_dir": str(args.gt_dir),
        "definitions": {
            "nrmse": "||pred-gt||_2/||gt||_2, whole volume, float64",
            "ssim": "mean over axial slices (axis 2) of skimage structural_similarity, "
                    "data_range=gt.max()-gt.min() of the whole GT volume, constant-GT slices "
                    "skipped",
            "psnr": M.PSNR_DEFINITION,
            "lpips": "AlexNet v0.1, per axial slice on x*2-1 repeated to 3 channels, all-zero "
                     "GT slices skipped",
            "tissue_dice": M.TISSUE_PROXY_NOTE + f" (method: {args.tissue_method})",
        },
        "lpips_status": lpips_status,
        "tissue_dice_is_proxy": True,
        "n_pairs": len(pairs), "n_failed": failed,
        "unmatched_predictions": unmatched, "missing_predictions": missing,
        "ignored_files": ignored,
    }
    paths = write_outputs(args.out_dir, rows, summary, meta)
    print("Wrote " + ", ".join(str(p) for p in paths))
    if failed:
        print(f"synth7t-eval: {failed} of {len(pairs)} pairs could not be scored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
