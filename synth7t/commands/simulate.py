"""``synth7t-simulate``: write paired lower-field / 7T images simulated from tissue models.

Examples
--------
Two simulated subjects, all contrasts and fields, MRIxFields layout (full 0.5 mm volumes)::

    synth7t-simulate --n-subjects 2 --seed 0 -o sim_mrix

A BIDS dataset (one session per field) from your own skull-stripped T1w, axial slab only::

    synth7t-simulate --anatomy t1w:sub-01_T1w_brain.nii.gz --format bids \\
        --fields 1.5 3 --contrasts T1w FLAIR --roi ,,150:200 -o sim_bids

Layouts
-------
* ``mrixfields``: ``{split}/{MOD}/{field}/P_{MOD}_{field}_{ID4}.nii.gz`` with ``MOD`` in
  ``T1W, T2W, T2FLAIR`` and ``field`` in ``0.1T, 1.5T, 3T, 5T, 7T``; ``simulation.json`` at the
  root records every parameter per subject.
* ``bids``: ``sub-<ID>/ses-<field>/anat/sub-<ID>_ses-<field>_{T1w,T2w,FLAIR}.nii.gz`` plus a JSON
  sidecar with ``MagneticFieldStrength`` and the simulated protocol (session labels ``0p1T``,
  ``1p5T``, ``3T``, ``5T``, ``7T``), ``dataset_description.json`` and ``participants.tsv``.

Images are float32 in [0, 1] on the reference grid (affine ``REF_AFFINE``); with ``--roi`` only
that box is written and the affine is shifted to the box. Every file is written atomically.
Subject ``i`` (0-based) uses simulator seed ``SeedSequence([seed, i])``; its 7 T target is the
same for every source field. Exit codes: 0 ok, 64 usage, 65 bad anatomy input, 66 missing input,
73 cannot create output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from synth7t import __version__
from synth7t.fields import CONTRASTS, SUPPORTED_BINS, bin_label
from synth7t.mrixfields import MODALITIES
from synth7t.reference import REF_AFFINE, REF_SHAPE

CONTRAST_TO_MOD = {v: k for k, v in MODALITIES.items()}
TARGET_FIELD = 7.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synth7t-simulate", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--anatomy", default="icbm152",
                   help="icbm152 (default) | labels:PATH (crisp label map, BrainWeb labels; "
                        "tests only) | t1w:PATH (T1w image, skull-stripped or with "
                        "--anatomy-mask)")
    p.add_argument("--anatomy-mask", type=Path, help="brain mask for a t1w: anatomy")
    p.add_argument("--contrasts", nargs="+", default=list(CONTRASTS), choices=CONTRASTS)
    p.add_argument("--fields", nargs="+", type=float, default=list(SUPPORTED_BINS),
                   help="source fields in tesla (default: 0.1 1.5 3 5)")
    p.add_argument("--n-subjects", type=int, default=1)
    p.add_argument("--first-id", type=int, default=1, help="ID of the first subject")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("mrixfields", "bids"), default="mrixfields")
    p.add_argument("--split", default="Training_prospective",
                   help="MRIxFields split folder (default: Training_prospective)")
    p.add_argument("--roi", help="write only a box of the reference grid: 'x0:x1,y0:y1,z0:z1', "
                                 "empty parts mean the whole axis (e.g. ',,170:194')")
    p.add_argument("--no-deform", action="store_true", help="no random deformation")
    p.add_argument("--source-bias", action="store_true", help="bias field on the sources")
    p.add_argument("--target-bias", action="store_true", help="bias field on the 7T targets")
    p.add_argument("--physics", type=Path, help="alternative physics.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--version", action="version", version=f"synth7t-simulate {__version__}")
    return p


def parse_roi(text: str | None) -> tuple[slice, slice, slice] | None:
    """``'x0:x1,y0:y1,z0:z1'`` (parts may be empty) -> three slices; ``None`` -> ``None``."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"--roi needs three comma-separated ranges, got {text!r}")
    out = []
    for part, n in zip(parts, REF_SHAPE):
        part = part.strip()
        if not part:
            out.append(slice(0, n))
            continue
        a, sep, b = part.partition(":")
        if not sep:
            raise ValueError(f"--roi range {part!r} must look like start:stop")
        start, stop = int(a) if a else 0, int(b) if b else n
        if not 0 <= start < stop <= n:
            raise ValueError(f"--roi range {part!r} is outside 0:{n} or empty")
        out.append(slice(start, stop))
    return tuple(out)  # type: ignore[return-value]


def roi_affine(roi: tuple[slice, slice, slice] | None) -> np.ndarray:
    """Reference affine shifted to the first voxel of ``roi``."""
    aff = REF_AFFINE.copy()
    if roi is not None:
        aff[:3, 3] = (REF_AFFINE @ np.array([roi[0].start, roi[1].start, roi[2].start, 1.0]))[:3]
    return aff


def subject_seed(seed: int, index: int) -> int:
    """Simulator seed of subject ``index`` (independent streams per subject)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def ses_label(field: float) -> str:
    """BIDS session label of a field: ``1.5 -> '1p5T'`` (labels must be alphanumeric)."""
    return bin_label(field).replace(".", "p")


def make_simulator(spec: str, *, mask: Path | None = None, physics: Path | None = None):
    """Build a :class:`~synth7t.simulate.Simulator` from an ``--anatomy`` value."""
    from synth7t.physics import Physics
    from synth7t.simulate import Simulator

    phys = Physics.load(physics) if physics else None
    kind, _, path = spec.partition(":")
    if kind == "icbm152" and not path:
        return Simulator.from_icbm152(phys)
    if kind in ("labels", "t1w") and path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: anatomy input not found")
        if kind == "labels":
            return Simulator.from_labels(path, phys)
        return Simulator.from_t1w(path, phys, mask=mask)
    raise ValueError(f"--anatomy {spec!r}: expected icbm152, labels:PATH or t1w:PATH")


def _image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.set_sform(affine, code="mni")
    img.set_qform(affine, code="mni")
    img.header.set_xyzt_units("mm", "sec")
    return img


def _bids_sidecar(params: dict[str, Any], field: float, subject_params: dict[str, Any]
                  ) -> dict[str, Any]:
    prot = params["protocol"]
    side: dict[str, Any] = {"MagneticFieldStrength": field}
    for key, bids_key in (("TR", "RepetitionTime"), ("TE", "EchoTime"),
                          ("TI", "InversionTime")):
        if key in prot:
            side[bids_key] = round(prot[key] / 1000.0, 6)
    if "FA" in prot:
        side["FlipAngle"] = round(prot["FA"], 3)
    side["SkullStripped"] = subject_params["skull_strip"]
    side["Simulation"] = {"GeneratedBy": f"synth7t-simulate {__version__}",
                          "Sequence": prot["sequence"], **subject_params, "Channel": params}
    return side


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 64 if exc.code not in (0, None) else 0
    try:
        roi = parse_roi(args.roi)
        fields = [float(f) for f in args.fields]
        bad = [f for f in fields if not any(abs(f - b) < 1e-6 for b in SUPPORTED_BINS)]
        if bad:
            raise ValueError(f"--fields {bad}: supported source fields are "
                             f"{', '.join(f'{b:g}' for b in SUPPORTED_BINS)}")
        if args.n_subjects < 1 or args.first_id < 0:
            raise ValueError("--n-subjects must be >= 1 and --first-id >= 0")
    except ValueError as exc:
        print(f"synth7t-simulate: {exc}", file=sys.stderr)
        return 64
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"synth7t-simulate: cannot create {args.out}: {exc}", file=sys.stderr)
        return 73
    try:
        sim = make_simulator(args.anatomy, mask=args.anatomy_mask, physics=args.physics)
    except FileNotFoundError as exc:
        print(f"synth7t-simulate: {exc}", file=sys.stderr)
        return 66
    except (ValueError, OSError) as exc:
        print(f"synth7t-simulate: {exc}", file=sys.stderr)
        return 65 if ":" in args.anatomy else 64

    try:
        write_dataset(sim, args.out, contrasts=tuple(args.contrasts), fields=fields,
                      n_subjects=args.n_subjects, first_id=args.first_id, seed=args.seed,
                      fmt=args.format, split=args.split, roi=roi, deform=not args.no_deform,
                      source_bias=args.source_bias, target_bias=args.target_bias,
                      progress=not args.no_progress, anatomy_spec=args.anatomy)
    except OSError as exc:
        print(f"synth7t-simulate: cannot write output: {exc}", file=sys.stderr)
        return 73
    return 0


def write_dataset(sim, out: Path, *, contrasts: tuple[str, ...], fields: list[float],
                  n_subjects: int, first_id: int = 1, seed: int = 0, fmt: str = "mrixfields",
                  split: str = "Training_prospective",
                  roi: tuple[slice, slice, slice] | None = None, deform: bool = True,
                  source_bias: bool = False, target_bias: bool = False, progress: bool = True,
                  anatomy_spec: str = "") -> list[Path]:
    """Simulate ``n_subjects`` and write them in the MRIxFields or BIDS layout.

    Returns
    -------
    list of pathlib.Path
        Every image written.
    """
    from tqdm import tqdm

    from synth7t.io import atomic_write_json, atomic_write_nifti, atomic_write_text

    affine = roi_affine(roi)
    width = max(2, len(str(first_id + n_subjects - 1)))
    written: list[Path] = []
    record: dict[str, Any] = {"GeneratedBy": f"synth7t-simulate {__version__}",
                              "anatomy": anatomy_spec or sim.anatomy.name, "seed": seed,
                              "format": fmt, "roi": None if roi is None else
                              [[s.start, s.stop] for s in roi], "subjects": {}}
    bar = tqdm(total=n_subjects * len(fields), disable=not progress, unit="pair-set",
               desc="synth7t-simulate")
    for i in range(n_subjects):
        ident = first_id + i
        sseed = subject_seed(seed, i)
        subj: dict[str, Any] = {"simulator_seed": sseed, "fields": {}}
        for k, field in enumerate(fields):
            res = sim.sample_all_contrasts(field=field, seed=sseed, roi=roi, deform=deform,
                                           contrasts=contrasts, source_bias=source_bias,
                                           target_bias=target_bias)
            shared = {key: v for key, v in res["params"].items() if key != "seed"}
            shared["simulator_seed"] = sseed
            roles = [("source", field)] + ([("target", TARGET_FIELD)] if k == 0 else [])
            for c in contrasts:
                for role, f in roles:
                    img = _image(res[c][role], affine)
                    params = res[c]["params"][role]
                    if fmt == "mrixfields":
                        mod = CONTRAST_TO_MOD[c]
                        path = (out / split / mod / bin_label(f) /
                                f"P_{mod}_{bin_label(f)}_{ident:04d}.nii.gz")
                    else:
                        sub, ses = f"sub-{ident:0{width}d}", f"ses-{ses_label(f)}"
                        path = out / sub / ses / "anat" / f"{sub}_{ses}_{c}.nii.gz"
                        info = shared if role == "source" else {
                            key: v for key, v in shared.items() if key != "field"}
                        atomic_write_json(_bids_sidecar(params, f, info),
                                          path.with_name(path.name.replace(".nii.gz", ".json")))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_nifti(img, path)
                    written.append(path)
            subj["fields"][bin_label(field)] = {
                "shared": shared, **{c: res[c]["params"] for c in contrasts}}
            bar.update(1)
        record["subjects"][f"{ident:04d}"] = subj
    bar.close()
    if fmt == "bids":
        atomic_write_json({"Name": "synth7t simulated multi-field dataset",
                           "BIDSVersion": "1.9.0", "DatasetType": "raw",
                           "GeneratedBy": [{"Name": "synth7t-simulate",
                                            "Version": __version__}]},
                          out / "dataset_description.json")
        rows = ["participant_id"] + [f"sub-{first_id + i:0{width}d}" for i in range(n_subjects)]
        atomic_write_text("\n".join(rows) + "\n", out / "participants.tsv")
        atomic_write_text("Simulated with synth7t-simulate; parameters in "
                          "code/simulation.json.\n", out / "README")
        atomic_write_json(record, out / "code" / "simulation.json")
    else:
        atomic_write_json(record, out / "simulation.json")
    return written


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
