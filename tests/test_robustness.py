"""Reliability under bad input, faults and reruns: the reliability table, one test per case.

Each parametrised case (its id is the case name, grouped by the table row it belongs to) checks
the protection where it lives (``synth7t.io``, ``synth7t.fields``, ``synth7t.registry``) and
then through the whole BIDS App (``synth7t bids_dir out_dir participant``, run as a subprocess
on tiny synthetic BIDS datasets made from the shipped 2 mm template):

=====================  ==========================================================================
table row              cases
=====================  ==========================================================================
header                 oblique-affine, LPS-axis-order, PIL-axis-order, qform-sform-disagree,
                       qform-code-0 -> conformed, correct, warning in the log and the report
numeric                scl-slope-inter, int16-data, uint8-data, negative-values -> correct
anisotropic            anisotropic-FLAIR-1x1x5 -> correct in the 0.5 mm grid
nan-inf                nan-inf-voxels -> replaced, counted, warned; result finite
bad-file               4D-image, empty-image, not-nifti, truncated-gz -> exit 65 naming the file
                       and the reason; other participants still processed
field                  field-missing, field-non-numeric, field-far-from-bins (11.7),
                       field-flag-out-of-range -> exit 65 with the --field-strength hint
usage                  label-path-chars, filter-file-not-json -> exit 64
output                 output-not-writable (73), disk-full (clear error, no half-written file)
sigkill                sigkill-rerun -> rerun reuses finished nodes, outputs equal
concurrent             concurrent-runs -> both complete, dataset_description.json valid
determinism            same-seed-identical -> byte-identical synthetic images
model                  model-sha-mismatch, model-pickle -> refused, never executed
input-unmodified       input-dataset-unmodified -> every input tree hashed before/after every run
=====================  ==========================================================================

The good header/numeric cases and the bad files are participants of one "mixed" dataset that
is run once (one App run serves all of them and proves that the others are still processed);
each failing case is also run alone to check its exit code. Runs that only differ in the output
folder reuse a copy of a finished work directory so that only the sinks run again.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field as dc_field
from functools import cached_property
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from conftest import baseline_model_dir
from synth7t.reference import REF_AFFINE, REF_SHAPE, TEMPLATEFLOW_HOME

REPO = Path(__file__).resolve().parents[1]
#: Wall-clock limit of one App run (the tiny datasets take well under a minute each).
APP_TIMEOUT = int(os.environ.get("SYNTH7T_TEST_TIMEOUT", "1800"))
EX_USAGE, EX_DATAERR, EX_CANTCREAT = 64, 65, 73
#: Read by benchmarks/bench_reliability.py after the session: the input guard and every output
#: problem found (half-written, left-over temp or clobbered files).
LAST_GUARD: "InputGuard | None" = None
OUTPUT_PROBLEMS: list[str] = []


# ==================================================================== input tree guard
def tree_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file (and ``'<dir>'`` for every folder) under root."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out[f"{rel.as_posix()}/"] = "<dir>"
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[(rel / name).as_posix()] = f"-> {os.readlink(p)}"
            else:
                out[(rel / name).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def digest_diff(before: dict, after: dict) -> list[str]:
    changed = [k for k in before if k in after and before[k] != after[k]]
    return ([f"modified: {k}" for k in changed]
            + [f"removed: {k}" for k in before if k not in after]
            + [f"added: {k}" for k in after if k not in before])


class InputGuard:
    """Hashes every input dataset when it is made and around every App run."""

    def __init__(self) -> None:
        self.created: dict[Path, dict] = {}
        self.runs: list[tuple[str, Path, list[str]]] = []

    def register(self, root: Path) -> Path:
        self.created[root] = tree_digest(root)
        return root

    def record(self, label: str, root: Path, before: dict, after: dict) -> None:
        self.runs.append((label, root, digest_diff(before, after)))

    def problems(self) -> list[str]:
        out = [f"run {label} on {root.name}: {d}" for label, root, diffs in self.runs
               for d in diffs]
        for root, digest in self.created.items():
            out += [f"{root.name}: {d}" for d in digest_diff(digest, tree_digest(root))]
        return out


# ==================================================================== synthetic images
def _template(res: int) -> nib.Nifti1Image:
    return nib.load(TEMPLATEFLOW_HOME / "tpl-MRIxFields" / f"tpl-MRIxFields_res-{res}_T1w.nii.gz")


def base_image(res: int = 2, *, shift=(4.0, -6.0, 3.0)) -> tuple[np.ndarray, np.ndarray]:
    """The shipped template as a 'subject': RAS, cropped to the brain, shifted; (data, affine).

    Values are integers 0..1020 (template uint8 x 4), float32.
    """
    img = nib.as_closest_canonical(_template(res))
    data = np.asanyarray(img.dataobj).astype(np.float32) * 4
    nz = np.argwhere(data > 0)
    lo = np.maximum(nz.min(0) - 3, 0)
    hi = np.minimum(nz.max(0) + 4, data.shape)
    data = np.ascontiguousarray(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    affine = img.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3] + np.asarray(shift)
    return data, affine


def flair_like(t1: np.ndarray) -> np.ndarray:
    """A FLAIR-looking contrast (CSF dark, GM > WM) from the T1w phantom."""
    out = np.zeros_like(t1)
    brain = t1 > 0
    v = t1[brain] / t1.max()
    out[brain] = np.where(v < 0.35, 0.15 * v, 1.1 - 0.7 * v) * 800
    return out.astype(np.float32)


def t2_like(t1: np.ndarray) -> np.ndarray:
    """A T2w-looking contrast (CSF bright, GM > WM) from the T1w phantom."""
    out = np.zeros_like(t1)
    brain = t1 > 0
    v = t1[brain] / t1.max()
    out[brain] = (1.15 - v) * 900
    return out.astype(np.float32)


def header_for(data: np.ndarray, affine: np.ndarray, dtype, *, qform=None, qcode=1,
               sform=None, scode=1, slope=1.0, inter=0.0) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(dtype)
    hdr.set_zooms(tuple(np.sqrt((affine[:3, :3] ** 2).sum(0)))
                  + ((1.0,) if data.ndim == 4 else ()))
    hdr.set_qform(affine if qform is None else qform, code=qcode)
    hdr.set_sform(affine if sform is None else sform, code=scode)
    if qcode == 0:
        hdr["qform_code"] = 0
    if scode == 0:
        hdr["sform_code"] = 0
    hdr["scl_slope"], hdr["scl_inter"] = slope, inter
    hdr.set_xyzt_units("mm", "sec")
    return hdr


def write_raw_nifti(path: Path, hdr: nib.Nifti1Header, raw: np.ndarray) -> Path:
    """Write header and raw array exactly as given (nibabel would 'fix' scaling and codes)."""
    hdr = hdr.copy()
    hdr["vox_offset"] = 352
    blob = hdr.binaryblock + b"\x00" * 4 + np.asarray(raw, dtype=hdr.get_data_dtype()).tobytes("F")
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".gz"):
        with gzip.GzipFile(path, "wb", mtime=0) as fh:
            fh.write(blob)
    else:
        path.write_bytes(blob)
    return path


@dataclass
class Case:
    """One synthetic input: the file to write and what a correct conform() must return."""

    raw: np.ndarray  # array as stored
    hdr: nib.Nifti1Header
    truth: np.ndarray | None = None  # real-valued data in ``truth_affine``'s voxel order
    truth_affine: np.ndarray | None = None
    warn: str | None = None  # regex a warning must match
    bad: str | None = None  # regex the one-line error reason must match (bad files)
    field: object = 3  # MagneticFieldStrength in the sidecar ("<missing>" drops the key)
    contrast: str = "T1w"
    extra: dict = dc_field(default_factory=dict)  # more contrasts of the participant
    writer: Callable[[Path], None] | None = None  # for files that are not NIfTI at all


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def clean_case(data, affine, dtype=np.int16) -> Case:
    return Case(raw=data.astype(dtype), hdr=header_for(data, affine, dtype), truth=data,
                truth_affine=affine)


def reoriented_case(data, affine, codes: str) -> Case:
    img = nib.Nifti1Image(data, affine).as_reoriented(
        ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes))))
    d, a = np.asarray(img.dataobj), img.affine
    return Case(raw=d.astype(np.int16), hdr=header_for(d, a, np.int16), truth=d, truth_affine=a,
                warn=rf"reoriented from {codes} to RAS")


def make_cases() -> dict[str, Case]:
    data, aff = base_image()
    rng = np.random.default_rng(0)
    cases: dict[str, Case] = {"clean": clean_case(data, aff)}

    obl = _rot(0, 12) @ _rot(2, 8) @ aff
    cases["oblique-affine"] = Case(raw=data.astype(np.int16), hdr=header_for(data, obl, np.int16),
                                   truth=data, truth_affine=obl, warn=r"oblique")
    cases["LPS-axis-order"] = reoriented_case(data, aff, "LPS")
    cases["PIL-axis-order"] = reoriented_case(data, aff, "PIL")
    wrong_q = aff.copy()
    wrong_q[:3, 3] += (25.0, -10.0, 5.0)
    cases["qform-sform-disagree"] = Case(
        raw=data.astype(np.int16), hdr=header_for(data, aff, np.int16, qform=wrong_q),
        truth=data, truth_affine=aff, warn=r"qform and sform disagree")
    cases["qform-code-0"] = Case(
        raw=data.astype(np.int16), hdr=header_for(data, aff, np.int16, qcode=0, scode=2),
        truth=data, truth_affine=aff, warn=r"qform_code is 0")

    raw = np.round((data - 10.0) / 2.0).astype(np.int16)
    raw[data == 0] = -5  # background stays 0 after scaling
    cases["scl-slope-inter"] = Case(
        raw=raw, hdr=header_for(data, aff, np.int16, slope=2.0, inter=10.0),
        truth=raw.astype(np.float32) * 2 + 10, truth_affine=aff, warn=r"scl_slope=2")
    cases["int16-data"] = clean_case(data, aff, np.int16)
    u8 = np.round(data / data.max() * 255).astype(np.uint8)
    cases["uint8-data"] = Case(raw=u8, hdr=header_for(data, aff, np.uint8),
                               truth=u8.astype(np.float32), truth_affine=aff)
    neg = (data + rng.normal(0, 12, data.shape)).astype(np.float32)
    cases["negative-values"] = Case(raw=neg, hdr=header_for(data, aff, np.float32), truth=neg,
                                    truth_affine=aff)

    nan = data.copy()
    brain = np.argwhere(data > 0)
    picks = brain[rng.choice(len(brain), 13, replace=False)]
    for k, (i, j, kk) in enumerate(picks):
        nan[i, j, kk] = np.nan if k < 7 else (np.inf if k < 11 else -np.inf)
    nan[0, 0, 0] = np.nan  # and one in the background: 14 in all
    truth = np.where(np.isfinite(nan), nan, 0).astype(np.float32)
    cases["nan-inf-voxels"] = Case(raw=nan, hdr=header_for(data, aff, np.float32), truth=truth,
                                   truth_affine=aff, warn=r"\b14 NaN/Inf voxel")

    # anisotropic 2D FLAIR 1 x 1 x 5 mm (from the 1 mm template), with a normal T1w beside it
    d1, a1 = base_image(1)
    nz5 = d1.shape[2] // 5
    fl = flair_like(d1)[:, :, : nz5 * 5].reshape(d1.shape[0], d1.shape[1], nz5, 5).mean(3)
    a5 = a1 @ np.diag([1.0, 1.0, 5.0, 1.0])
    a5[:3, 3] += a1[:3, 2] * 2.0  # a thick slice's centre is the middle of its 5 thin ones
    fl = np.round(fl)
    c = Case(raw=fl.astype(np.int16), hdr=header_for(fl, a5, np.int16),
             truth=fl, truth_affine=a5, contrast="FLAIR")
    c.extra = {"T1w": clean_case(data, aff)}
    cases["anisotropic-FLAIR-1x1x5"] = c

    cases["defects"] = defects_case(data, aff, cases["anisotropic-FLAIR-1x1x5"], rng)

    # bad files
    four = np.stack([data] * 3, axis=-1)
    cases["4D-image"] = Case(raw=four.astype(np.int16), hdr=header_for(four, aff, np.int16),
                             bad=r"4D|volumes")
    zero = np.zeros_like(data)
    cases["empty-image"] = Case(raw=zero.astype(np.int16), hdr=header_for(zero, aff, np.int16),
                                bad=r"zero|empty")

    def not_nifti(path: Path) -> None:
        with gzip.open(path, "wb") as fh:
            fh.write(b'{"this": "is a JSON document, not a NIfTI image"}\n' * 20)

    cases["not-nifti"] = Case(raw=data, hdr=None, writer=not_nifti, bad=r"not a NIfTI")

    def truncated(path: Path) -> None:
        write_raw_nifti(path, header_for(data, aff, np.int16), data.astype(np.int16))
        blob = path.read_bytes()
        path.write_bytes(blob[: int(len(blob) * 0.6)])

    cases["truncated-gz"] = Case(raw=data, hdr=None, writer=truncated, bad=r"truncated|corrupt")

    # field strength problems (good images)
    for name, value in (("field-missing", "<missing>"), ("field-non-numeric", "three tesla"),
                        ("field-far-from-bins", 11.7)):
        c = clean_case(data, aff)
        c.field = value
        c.bad = r"--field-strength"
        cases[name] = c
    return cases


def defects_case(data, aff, aniso: Case, rng) -> Case:
    """One participant carrying every good-but-defective header/numeric case at once.

    App runs cost minutes on the 0.5 mm grid, so the App-level half of the header, numeric,
    anisotropic and NaN rows runs once, on this participant (each defect is also checked alone,
    on its own file, at the conform level):

    * T1w: float32 stored with scl_slope 2 / scl_inter 10, negative values, 14 NaN/Inf voxels,
      LPS voxel order, oblique affine, qform and sform disagreeing;
    * T2w: int16, PIL voxel order, qform_code 0;
    * FLAIR: uint8, 1 x 1 x 5 mm.
    """
    real = (data + rng.normal(0, 12, data.shape)).astype(np.float32)
    brain = np.argwhere(data > 0)
    picks = brain[rng.choice(len(brain), 14, replace=False)]
    stored = (real - 10) / 2
    for k, (i, j, kk) in enumerate(picks):
        stored[i, j, kk] = np.nan if k < 8 else (np.inf if k < 12 else -np.inf)
    truth = np.where(np.isfinite(stored), stored * 2 + 10, 0).astype(np.float32)
    lps = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(("L", "P", "S")))
    img = nib.Nifti1Image(stored, aff).as_reoriented(lps)
    truth = np.asarray(nib.Nifti1Image(truth, aff).as_reoriented(lps).dataobj)
    obl = _rot(0, -10) @ _rot(1, 6) @ img.affine
    wrong_q = obl.copy()
    wrong_q[:3, 3] += (-20.0, 15.0, 0.0)
    t1 = Case(raw=np.asarray(img.dataobj), truth=truth, truth_affine=obl,
              hdr=header_for(truth, obl, np.float32, qform=wrong_q, slope=2.0, inter=10.0),
              warn="oblique|reoriented from LPS to RAS|qform and sform disagree|scl_slope=2|"
                   r"\b14 NaN/Inf voxel|negative voxel")

    pil = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(("P", "I", "L")))
    t2 = nib.Nifti1Image(np.round(t2_like(data)), aff).as_reoriented(pil)
    t2d = np.asarray(t2.dataobj)
    t2c = Case(raw=t2d.astype(np.int16), truth=t2d, truth_affine=t2.affine, contrast="T2w",
               hdr=header_for(t2d, t2.affine, np.int16, qcode=0, scode=2),
               warn="reoriented from PIL to RAS|qform_code is 0")
    fl = aniso.truth / aniso.truth.max() * 255
    fl = np.round(fl)
    flc = Case(raw=fl.astype(np.uint8), truth=fl, truth_affine=aniso.truth_affine,
               hdr=header_for(fl, aniso.truth_affine, np.uint8), contrast="FLAIR")
    t1.extra = {"T2w": t2c, "FLAIR": flc}
    return t1


#: Where each good-but-defective case sits in the "defects" participant, and the warning
#: (regex) that must reach the log and the report for it.
IN_DEFECTS = {
    "oblique-affine": ("T1w", r"oblique"),
    "LPS-axis-order": ("T1w", r"reoriented from LPS to RAS"),
    "qform-sform-disagree": ("T1w", r"qform and sform disagree"),
    "scl-slope-inter": ("T1w", r"scl_slope=2"),
    "negative-values": ("T1w", None),
    "nan-inf-voxels": ("T1w", r"\b14 NaN/Inf voxel"),
    "PIL-axis-order": ("T2w", r"reoriented from PIL to RAS"),
    "qform-code-0": ("T2w", r"qform_code is 0"),
    "int16-data": ("T2w", None),
    "uint8-data": ("FLAIR", None),
    "anisotropic-FLAIR-1x1x5": ("FLAIR", None),
}


def label_of(case: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", case)


def write_case(bids: Path, label: str, case: Case) -> list[Path]:
    anat = bids / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    written = []
    for contrast, c in [(case.contrast, case)] + list(case.extra.items()):
        nii = anat / f"sub-{label}_{contrast}.nii.gz"
        if c.writer is not None:
            c.writer(nii)
        else:
            write_raw_nifti(nii, c.hdr, c.raw)
        sidecar = {"Manufacturer": "synth7t-tests"}
        if case.field != "<missing>":
            sidecar["MagneticFieldStrength"] = case.field
        (anat / f"sub-{label}_{contrast}.json").write_text(json.dumps(sidecar, indent=1))
        written.append(nii)
    return written


def write_dataset(bids: Path, cases: dict[str, Case]) -> Path:
    bids.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "synth7t robustness fixture", "BIDSVersion": "1.9.0", "DatasetType": "raw",
         "Authors": ["synth7t tests"]}, indent=1))
    (bids / "README").write_text("Synthetic inputs for synth7t's reliability tests.\n")
    labels = [label_of(k) for k in cases]
    (bids / "participants.tsv").write_text("participant_id\n" + "".join(
        f"sub-{lab}\n" for lab in labels))
    for name, case in cases.items():
        write_case(bids, label_of(name), case)
    return bids


# ==================================================================== checks on conform()
def assert_same_world(out: nib.Nifti1Image, truth: np.ndarray, truth_affine: np.ndarray) -> None:
    """``out`` is RAS and holds ``truth`` at the same world positions (no resampling)."""
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S"), nib.aff2axcodes(out.affine)
    m = np.linalg.inv(out.affine) @ truth_affine
    assert np.allclose(m, np.round(m), atol=1e-3), f"not a pure reorientation:\n{m}"
    m = np.round(m).astype(int)
    ijk = np.indices(truth.shape).reshape(3, -1)
    dst = m[:3, :3] @ ijk + m[:3, 3:4]
    odata = np.asanyarray(out.dataobj)
    assert odata.shape == tuple(np.abs(m[:3, :3]) @ np.array(truth.shape)), odata.shape
    got = odata[tuple(dst)]
    np.testing.assert_allclose(got, truth.reshape(-1), rtol=1e-6, atol=1e-4)
    assert np.allclose(out.header.get_qform(), out.header.get_sform(), atol=1e-4)


def check_conform(case: Case, path: Path) -> list[str]:
    from synth7t.io import conform, load_image

    img = load_image(path)
    out, warnings = conform(img, name=path.name)
    data = np.asanyarray(out.dataobj)
    assert out.get_data_dtype() == np.float32 and np.isfinite(data).all()
    assert_same_world(out, case.truth, case.truth_affine)
    if case.warn:
        assert any(re.search(case.warn, w) for w in warnings), warnings
        assert all(path.name in w for w in warnings), warnings
    return warnings


# ==================================================================== running the App
@dataclass
class AppRun:
    label: str
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    out_dir: Path
    work_dir: Path | None
    seconds: float

    @property
    def text(self) -> str:
        """Console output and every log file the App wrote under ``out_dir/logs``."""
        logs = ""
        if (self.out_dir / "logs").is_dir():
            for f in sorted((self.out_dir / "logs").rglob("*")):
                if f.is_file() and f.suffix in (".log", ".txt", ".json", ".tsv", ""):
                    logs += f.read_text(errors="replace")
        return self.stdout + self.stderr + logs

    def describe(self) -> str:
        tail = "\n".join((self.stdout + self.stderr).strip().splitlines()[-25:])
        return f"`{' '.join(self.args)}` -> {self.returncode} in {self.seconds:.0f} s\n{tail}"


def app_cmd() -> list[str]:
    return [sys.executable, "-c",
            "import sys; from bids_app.run import main; sys.exit(main())"]


def app_env() -> dict:
    env = dict(os.environ, NIPYPE_NO_ET="1", TEMPLATEFLOW_AUTOUPDATE="0", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def std_args(work: Path | None, *extra: str) -> list[str]:
    # --omp-nthreads left at its default (2 here): reproducibility must not need one thread.
    # --no-uncertainty halves the synthesis time of every run: this table is about input,
    # output and reruns; the uncertainty map's determinism is tested in test_uncertainty.py and
    # the default run (maps on) in test_e2e.py. Runs that reach synthesis add Ctx.args's
    # --model-dir.
    args = ["--skip-bids-validation", "--nprocs", "2", "--random-seed", "7", "--no-uncertainty"]
    if work is not None:
        args += ["-w", str(work)]
    return args + list(extra)


def require_app() -> None:
    try:
        import bids_app.run  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the BIDS App is not importable yet (bids_app.run: {exc})")


class Ctx:
    """Session state: datasets (made once, hashed) and the App runs shared by several cases."""

    def __init__(self, root: Path, guard: InputGuard) -> None:
        self.root, self.guard = root, guard
        self.cases = make_cases()
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- datasets
    @cached_property
    def files(self) -> Path:
        """Each case written alone, for the conform-level checks."""
        d = self.root / "inputs" / "files"
        for name, case in self.cases.items():
            write_case(d, label_of(name), case)
        return self.guard.register(d)

    def case_file(self, name: str) -> Path:
        case = self.cases[name]
        return self.files / f"sub-{label_of(name)}" / "anat" / \
            f"sub-{label_of(name)}_{case.contrast}.nii.gz"

    @cached_property
    def ds_ref(self) -> Path:
        """Two clean participants (sub-01, sub-02) for the rerun/concurrency/model rows."""
        data, aff = base_image()
        d2, a2 = base_image(shift=(-3.0, 5.0, -2.0))
        return self.guard.register(write_dataset(
            self.root / "inputs" / "ref", {"01": clean_case(data, aff),
                                           "02": clean_case(d2, a2)}))

    @cached_property
    def ds_mixed(self) -> Path:
        """sub-defects (every good-but-defective case at once) and one participant per bad file."""
        names = ["defects"] + [n for n, c in self.cases.items() if c.bad and
                               not n.startswith("field-")]
        return self.guard.register(write_dataset(self.root / "inputs" / "mixed",
                                                 {n: self.cases[n] for n in names}))

    @cached_property
    def ds_fields(self) -> Path:
        """One participant per field-strength problem."""
        return self.guard.register(write_dataset(
            self.root / "inputs" / "fields",
            {n: c for n, c in self.cases.items() if n.startswith("field-")}))

    # ---------------------------------------------------------------- runs
    @cached_property
    def models(self) -> Path:
        """The tissue-table baseline as ``default`` for every contrast at 3 T.

        This table is about reading input, faults and reruns, not the network: the baseline
        synthesises in seconds where the U-Net takes about a minute per contrast under CI load.
        The U-Net's own determinism is checked bitwise elsewhere (tests/test_image.py: the
        Task 1 predictions of the host and the image; tests/test_registry.py).
        """
        return baseline_model_dir(self.root / "baseline", contrasts=("T1w", "T2w", "FLAIR"))

    def args(self, work: Path | None, *extra: str) -> list[str]:
        """:func:`std_args` with the baseline models, for the runs that reach synthesis."""
        return std_args(work, "--model-dir", str(self.models), *extra)

    def run(self, label: str, bids: Path, out: Path, args: list[str], *,
            timeout: int = APP_TIMEOUT) -> AppRun:
        require_app()
        before = tree_digest(bids)
        t0 = time.monotonic()
        proc = subprocess.run(app_cmd() + [str(bids), str(out), "participant"] + args,
                              capture_output=True, text=True, env=app_env(), timeout=timeout,
                              cwd=self.root)
        seconds = time.monotonic() - t0
        self.guard.record(label, bids, before, tree_digest(bids))
        self.timings[label] = seconds
        work = Path(args[args.index("-w") + 1]) if "-w" in args else None
        return AppRun(label, ["synth7t", str(bids), str(out), "participant"] + args,
                      proc.returncode, proc.stdout, proc.stderr, out, work, seconds)

    @cached_property
    def ref_run(self) -> AppRun:
        """sub-01 of ds_ref, uninterrupted (the reference for reruns and determinism)."""
        r = self.run("ref", self.ds_ref, self.root / "out_ref",
                     self.args(self.root / "work_ref", "--participant-label", "01"))
        assert r.returncode == 0, r.describe()
        return r

    @cached_property
    def mixed_run(self) -> AppRun:
        """Every participant of ds_mixed in one run: the bad ones refused, sub-defects done."""
        return self.run("mixed", self.ds_mixed, self.root / "out_mixed",
                        self.args(self.root / "work_mixed"))

    @cached_property
    def conc_runs(self) -> list[AppRun]:
        """sub-01 and sub-02 of ds_ref as two simultaneous runs into one output folder."""
        require_app()
        out = self.root / "out_conc"
        before = tree_digest(self.ds_ref)
        procs, cmds, t0 = [], [], time.monotonic()
        for label in ("01", "02"):
            args = self.args(self.root / f"work_conc{label}", "--participant-label", label)
            cmds.append(["synth7t", str(self.ds_ref), str(out), "participant"] + args)
            procs.append(subprocess.Popen(
                app_cmd() + cmds[-1][1:], env=app_env(), cwd=self.root, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        runs = []
        for label, cmd, p in zip(("01", "02"), cmds, procs):
            so, se = p.communicate(timeout=APP_TIMEOUT)
            runs.append(AppRun(f"concurrent-{label}", cmd, p.returncode, so, se, out,
                               self.root / f"work_conc{label}", time.monotonic() - t0))
        self.guard.record("concurrent", self.ds_ref, before, tree_digest(self.ds_ref))
        self.timings["concurrent"] = time.monotonic() - t0
        return runs

    def copy_work(self, src: Path, name: str) -> Path:
        dst = self.root / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, symlinks=True)
        return dst


@pytest.fixture(scope="session")
def input_guard():
    global LAST_GUARD
    guard = LAST_GUARD = InputGuard()
    yield guard
    problems = guard.problems()
    assert not problems, "input datasets were modified:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def ctx(tmp_path_factory, input_guard) -> Ctx:
    return Ctx(tmp_path_factory.mktemp("robustness"), input_guard)


# ==================================================================== output checks
def synth_outputs(out: Path, label: str, contrast: str = "T1w") -> dict[str, Path]:
    anat = out / f"sub-{label}" / "anat"
    found = {
        "ref": sorted(anat.glob(f"sub-{label}*_space-MRIxFields*_desc-synth7T_{contrast}.nii.gz")),
        "native": sorted(p for p in anat.glob(f"sub-{label}*_desc-synth7T_{contrast}.nii.gz")
                         if "_space-" not in p.name),
    }
    assert found["ref"], f"no reference-space synthetic {contrast} for sub-{label} in {anat}: " \
        f"{sorted(p.name for p in anat.glob('*'))}" if anat.is_dir() else f"{anat} missing"
    assert found["native"], f"no native synthetic {contrast} for sub-{label}"
    return {k: v[0] for k, v in found.items()}


def template_mask_1mm() -> np.ndarray:
    return np.asanyarray(nib.load(TEMPLATEFLOW_HOME / "tpl-MRIxFields" /
                                  "tpl-MRIxFields_res-1_desc-brain_mask.nii.gz").dataobj) > 0


def check_ref_result(path: Path, *, min_dice: float = 0.8) -> np.ndarray:
    """A synthetic image on the 0.5 mm reference grid: finite, [0, 1], over the template brain."""
    img = nib.load(path)
    assert img.shape == REF_SHAPE, img.shape
    assert np.allclose(img.affine, REF_AFFINE, atol=1e-4), img.affine
    data = img.get_fdata(dtype=np.float32)
    assert np.isfinite(data).all()
    assert data.min() >= 0 and data.max() <= 1.0 + 1e-4 and data.max() > 0.2
    # 0.5 mm voxel 2i is 1 mm voxel i (same LAS box), so compare with the 1 mm template mask
    got = data[::2, ::2, ::2] > 0
    ref = template_mask_1mm()
    dice = 2 * (got & ref).sum() / (got.sum() + ref.sum())
    assert dice >= min_dice, f"{path.name}: brain Dice with the template mask {dice:.3f}"
    return data


def _output_check(fn):
    """Record output problems for the benchmark summary, then re-raise."""
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            OUTPUT_PROBLEMS.append(f"{fn.__name__}: {str(exc).splitlines()[0][:200]}")
            raise
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_output_check
def check_no_partial_outputs(out: Path) -> None:
    """Every file under its final name is complete; no temp file is left behind."""
    if not out.exists():
        return
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")
                 and p.is_file() and p.name not in (".bidsignore",)]
    assert not leftovers, f"temp files left: {leftovers}"
    for p in out.rglob("*.nii*"):
        nib.load(p).get_fdata()  # raises on a truncated file
    for p in out.rglob("*.json"):
        json.loads(p.read_text())


@_output_check
def assert_outputs_equal(a: Path, b: Path, label: str) -> None:
    """Images of sub-<label> byte-identical; sidecars equal except time stamps."""
    da, db = a / f"sub-{label}", b / f"sub-{label}"
    fa = sorted(p.relative_to(da) for p in da.rglob("*") if p.is_file() and "figures" not in p.parts)
    fb = sorted(p.relative_to(db) for p in db.rglob("*") if p.is_file() and "figures" not in p.parts)
    assert fa == fb, f"different file sets:\n{fa}\n{fb}"
    for rel in fa:
        pa, pb = da / rel, db / rel
        if rel.name.endswith((".nii.gz", ".nii")):
            ia, ib = nib.load(pa), nib.load(pb)
            assert np.array_equal(ia.affine, ib.affine), rel
            assert np.array_equal(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)), rel
        elif rel.suffix == ".json":
            ja, jb = json.loads(pa.read_text()), json.loads(pb.read_text())
            for j in (ja, jb):
                for k in [k for k in j if re.search(r"time|date", k, re.I)]:
                    j.pop(k)
            assert ja == jb, rel
        elif rel.suffix == ".h5":
            pass  # ITK HDF5 stores creation times; the images they produce are compared above


# ==================================================================== the rows
def _row_header(name: str):
    def check(ctx: Ctx) -> None:
        case = ctx.cases[name]
        check_conform(case, ctx.case_file(name))
        # the App, on the participant that carries this defect among others
        contrast, warn = IN_DEFECTS[name]
        fname = f"sub-defects_{contrast}.nii.gz"
        site = ctx.cases["defects"]
        site = site if contrast == site.contrast else site.extra[contrast]
        check_conform(site, ctx.ds_mixed / "sub-defects" / "anat" / fname)
        run = ctx.mixed_run
        out = synth_outputs(run.out_dir, "defects", contrast)
        check_ref_result(out["ref"])
        native = nib.load(out["native"])
        assert np.isfinite(native.get_fdata()).all()
        if warn:
            lines = [ln for ln in run.text.splitlines() if re.search(warn, ln)]
            assert any(fname in ln for ln in lines), \
                f"no /{warn}/ warning naming {fname} in the log\n" + run.describe()
            report = run.out_dir / "sub-defects.html"
            assert report.is_file(), "no report sub-defects.html"
            assert re.search(warn, report.read_text()), f"/{warn}/ not in {report.name}"
    return check


def _row_bad_file(name: str):
    def check(ctx: Ctx) -> None:
        from synth7t.io import ImageError, load_image

        case = ctx.cases[name]
        path = ctx.case_file(name)
        with pytest.raises(ImageError) as err:
            load_image(path)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and re.search(case.bad, msg), msg
        # alone: exit 65 naming the file and the reason
        label = label_of(name)
        alone = ctx.run(f"{name}-alone", ctx.ds_mixed, ctx.root / f"out_{label}",
                        std_args(ctx.root / f"work_{label}", "--participant-label", label))
        assert alone.returncode == EX_DATAERR, alone.describe()
        assert f"sub-{label}_{case.contrast}.nii.gz" in alone.stderr + alone.stdout
        assert re.search(case.bad, alone.stderr + alone.stdout), alone.describe()
        # with everybody else: exit 65, and the good participants were still processed
        mixed = ctx.mixed_run
        assert mixed.returncode == EX_DATAERR, mixed.describe()
        assert f"sub-{label}_{case.contrast}.nii.gz" in mixed.text, mixed.describe()
        for contrast in ("T1w", "T2w", "FLAIR"):
            synth_outputs(mixed.out_dir, "defects", contrast)
        assert not (mixed.out_dir / f"sub-{label}" / "anat").is_dir() or not list(
            (mixed.out_dir / f"sub-{label}" / "anat").glob("*synth7T*")), "bad input produced output"
        check_no_partial_outputs(mixed.out_dir)
    return check


def _row_field(name: str):
    def check(ctx: Ctx) -> None:
        from synth7t.fields import FieldStrengthError, route_field

        case = ctx.cases[name]
        value = None if case.field == "<missing>" else case.field
        with pytest.raises(FieldStrengthError) as err:
            route_field(value, where="sub-x_T1w.nii.gz")
        assert "--field-strength" in str(err.value), str(err.value)
        label = label_of(name)
        run = ctx.run(f"{name}-alone", ctx.ds_fields, ctx.root / f"out_{label}",
                      std_args(ctx.root / f"work_{label}", "--participant-label", label))
        assert run.returncode == EX_DATAERR, run.describe()
        assert "--field-strength" in run.stderr + run.stdout, run.describe()
        assert f"sub-{label}" in run.stderr + run.stdout, run.describe()
    return check


def row_field_flag(ctx: Ctx) -> None:
    from synth7t.fields import FieldStrengthError, route_field

    for bad in (11.7, 0.01, 9.4):
        with pytest.raises(FieldStrengthError):
            route_field(3.0, override=bad, where="x")
    for bad in ("11.7", "0.01"):
        run = ctx.run(f"flag-{bad}", ctx.ds_ref, ctx.root / f"out_flag{bad}",
                      std_args(ctx.root / f"work_flag{bad}", "--participant-label", "01",
                               "--field-strength", bad))
        assert run.returncode == EX_DATAERR, run.describe()
        assert re.search(r"0\.05.?-.?7\.5|plausible", run.stderr + run.stdout), run.describe()
        assert not list((ctx.root / f"out_flag{bad}").rglob("*synth7T*"))


def row_label_path(ctx: Ctx) -> None:
    for label in ("../x", "sub-../../etc", "01/../02"):
        run = ctx.run("label-path", ctx.ds_ref, ctx.root / "out_label",
                      std_args(None, "--participant-label", label))
        assert run.returncode == EX_USAGE, run.describe()
        assert "participant" in run.stderr.lower() and label.split("/")[0] in run.stderr, \
            run.describe()
        assert "Traceback" not in run.stderr, run.describe()
    assert not (ctx.root / "x").exists() and not (ctx.root / "out_label" / "sub-..").exists()


def row_filter_not_json(ctx: Ctx) -> None:
    bad = ctx.root / "filters.json"
    bad.write_text("t1w: {datatype: anat}\n")  # YAML, not JSON
    run = ctx.run("filter-not-json", ctx.ds_ref, ctx.root / "out_filter",
                  std_args(None, "--participant-label", "01", "--bids-filter-file", str(bad)))
    assert run.returncode == EX_USAGE, run.describe()
    assert "filters.json" in run.stderr and "JSON" in run.stderr.upper(), run.describe()
    assert "Traceback" not in run.stderr, run.describe()


def _mount_tmpfs(path: Path, opts: str) -> str | None:
    """Mount a tmpfs at ``path``; ``None`` when mounted, else why it could not be."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("mount"):
        return "no mount command"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "synth7t-test", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return f"mount -t tmpfs -o {opts} failed (rc {res.returncode}): " + \
            (res.stderr.strip() or res.stdout.strip())
    return None


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def row_not_writable(ctx: Ctx) -> None:
    targets = []
    blocker = ctx.root / "a-file"
    blocker.write_text("not a folder\n")
    targets.append(("under a file", blocker / "out"))
    ro = ctx.root / "ro"
    missing = None  # why the read-only case could not be built (reported as a skip)
    failed_mount = _mount_tmpfs(ro, "ro,size=1m")
    if failed_mount is None:
        targets.append(("read-only file system", ro / "out"))
    elif os.geteuid() != 0:
        # root ignores permission bits, so this stand-in only works for other users
        ro.mkdir(exist_ok=True)
        ro.chmod(0o555)
        targets.append(("no write permission", ro / "out"))
    else:
        missing = failed_mount
    try:
        for why, out in targets:
            run = ctx.run(f"not-writable ({why})", ctx.ds_ref, out,
                          ctx.args(ctx.root / "work_ro", "--participant-label", "01"))
            assert run.returncode == EX_CANTCREAT, f"{why}: " + run.describe()
            assert str(out) in run.stderr or out.name in run.stderr, run.describe()
            assert "Traceback" not in run.stderr, run.describe()
    finally:
        if failed_mount is None:
            _umount(ro)
    if missing:
        pytest.skip(f"output-not-writable: only the 'under a file' case ran (passed); the "
                    f"read-only file system case could not be built: {missing}")


def row_disk_full(ctx: Ctx) -> None:
    from synth7t.io import atomic_write_json, atomic_write_nifti

    ref = ctx.ref_run
    full = ctx.root / "full"
    failed_mount = _mount_tmpfs(full, "size=3m")
    if failed_mount is not None:
        pytest.fail(f"disk-full row needs root to mount a small tmpfs: {failed_mount}")
    try:
        # the writer itself: ENOSPC leaves neither the final file nor a temp file
        big = nib.Nifti1Image(np.random.default_rng(0).random((96, 96, 96), dtype=np.float32),
                              np.eye(4))
        with pytest.raises(OSError) as err:
            atomic_write_nifti(big, full / "big.nii")
        assert err.value.errno == errno.ENOSPC
        atomic_write_json({"ok": 1}, full / "small.json")
        assert sorted(p.name for p in full.iterdir()) == ["small.json"]
        (full / "small.json").unlink()
        # the App: sinks fail on the full disk -> a clear error, nothing half-written
        work = ctx.copy_work(ref.work_dir, "work_full")
        run = ctx.run("disk-full", ctx.ds_ref, full / "out",
                      ctx.args(work, "--participant-label", "01"))
        assert run.returncode != 0, run.describe()
        # one message names both the cause and the output it failed to write (a bare "space"
        # would match any *_space-MRIxFields_* file name): the sinks copy into a staging folder
        # (<out>/.synth7t-staging/<id>/sub-01/anat/, then rename) and re-raise the copy's
        # OSError naming the final <out>/sub-01/anat/... file. The crash-file folder
        # (<out>/logs/sub-01) that the App names on the same line is a path on the full disk
        # but not the output, so it does not count.
        cause = re.compile(r"No space left on device|ENOSPC|\[Errno 28\]", re.I)
        lines = [ln for ln in (run.stderr + run.stdout).splitlines() if cause.search(ln)]
        assert lines, "no 'No space left on device' / ENOSPC message\n" + run.describe()
        output = re.compile(re.escape(str(full)) + r"/\S*sub-01/anat/sub-01_\w")
        assert any(output.search(ln) for ln in lines), \
            f"the ENOSPC message does not name the output it failed on (under {full}):\n" + \
            "\n".join(lines[:5])
        check_no_partial_outputs(full / "out")
    finally:
        _umount(full)


def _finished_nodes(work: Path) -> list[Path]:
    return list(work.rglob("result_*.pklz")) if work.exists() else []


def row_sigkill(ctx: Ctx) -> None:
    require_app()
    ref = ctx.ref_run
    work, out = ctx.root / "work_kill", ctx.root / "out_kill"
    args = app_cmd() + [str(ctx.ds_ref), str(out), "participant"] + ctx.args(
        work, "--participant-label", "01")
    before = tree_digest(ctx.ds_ref)
    proc = subprocess.Popen(args, env=app_env(), cwd=ctx.root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < APP_TIMEOUT:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed")
            if len(_finished_nodes(work)) >= 3:
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the App and its Nipype workers
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ctx.guard.record("sigkill", ctx.ds_ref, before, tree_digest(ctx.ds_ref))
    done = {p: p.stat().st_mtime_ns for p in _finished_nodes(work)}
    assert done, "no node had finished"
    assert not list(out.rglob("*synth7T*.nii.gz")), "killed too late: outputs already written"
    rerun = ctx.run("sigkill-rerun", ctx.ds_ref, out, ctx.args(work, "--participant-label", "01"))
    assert rerun.returncode == 0, rerun.describe()
    reused = [p for p, t in done.items() if p.exists() and p.stat().st_mtime_ns == t]
    assert len(reused) == len(done), \
        f"{len(done) - len(reused)} of {len(done)} finished nodes were run again"
    assert_outputs_equal(ref.out_dir, out, "01")
    check_no_partial_outputs(out)


def row_concurrent(ctx: Ctx) -> None:
    ref = ctx.ref_run
    runs = ctx.conc_runs
    out = runs[0].out_dir
    for r in runs:
        assert r.returncode == 0, r.describe()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc.get("DatasetType") == "derivative" and desc.get("GeneratedBy"), desc
    assert desc.get("BIDSVersion") and desc.get("Name"), desc
    for label in ("01", "02"):
        check_ref_result(synth_outputs(out, label)["ref"])
        assert (out / f"sub-{label}.html").is_file()
    assert_outputs_equal(ref.out_dir, out, "01")  # not clobbered by sub-02's run
    check_no_partial_outputs(out)


def row_same_seed(ctx: Ctx) -> None:
    """Run sub-01 twice with the same inputs, options and seed (the reference run and, in
    another work dir, the concurrent run): the synthetic images are byte-identical."""
    ref = ctx.ref_run
    again = ctx.conc_runs[0]
    assert again.returncode == 0, again.describe()
    a = sorted((ref.out_dir / "sub-01").rglob("*synth7T*.nii.gz"))
    b = sorted((again.out_dir / "sub-01").rglob("*synth7T*.nii.gz"))
    assert a and [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), f"{pa.name} differs between two runs"


class _Evil:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model_dir(root: Path, *, kind: str) -> tuple[Path, Path]:
    d = root / f"models_{kind}"
    d.mkdir(parents=True, exist_ok=True)
    marker = root / f"EXECUTED_{kind}"
    if kind == "sha":
        header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        blob = struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.0)
        (d / "m.safetensors").write_bytes(blob)
        sha = "0" * 64
    else:
        _Evil.marker = str(marker)
        blob = pickle.dumps(_Evil(), protocol=4)
        (d / "m.safetensors").write_bytes(blob)
        sha = hashlib.sha256(blob).hexdigest()  # the checksum matches: the format must stop it
    (d / "card.json").write_text(json.dumps({"Name": "default", "Metrics": {}}))
    (d / "registry.json").write_text(json.dumps({"schema": "synth7t-registry/1", "models": [
        {"name": "default", "kind": "unet", "contrast": "T1w", "field_bin": 3.0, "version": "9.9",
         "file": "m.safetensors", "sha256": sha, "card": "card.json"}]}, indent=1))
    return d, marker


def _row_model(kind: str):
    def check(ctx: Ctx) -> None:
        from synth7t.inference import load_synthesizer
        from synth7t.registry import ModelIntegrityError, Registry

        mdir, marker = _model_dir(ctx.root, kind=kind)
        entry = Registry.load(mdir).get("T1w", 3.0)
        with pytest.raises(ModelIntegrityError) as err:
            load_synthesizer(entry)
        assert "m.safetensors" in str(err.value) and "\n" not in str(err.value)
        assert not marker.exists(), "the pickle was executed"
        work = ctx.root / f"work_model_{kind}"
        run = ctx.run(f"model-{kind}", ctx.ds_ref, ctx.root / f"out_model_{kind}",
                      std_args(work, "--participant-label", "01", "--model-dir", str(mdir)))
        assert run.returncode != 0, run.describe()
        assert "m.safetensors" in run.stderr + run.stdout, run.describe()
        assert re.search(r"SHA-256|refused|pickle", run.stderr + run.stdout), run.describe()
        assert not marker.exists(), "the pickle was executed by the App"
        assert not list((ctx.root / f"out_model_{kind}").rglob("*synth7T*.nii.gz"))
    return check


def row_inputs_unmodified(ctx: Ctx) -> None:
    """No App run modified its input dataset, nor any dataset made for the table.

    Every run goes through ``Ctx.run`` (or the SIGKILL / concurrent runners), which hash the
    input tree before and after. In the whole table (or a selection) the other rows made those
    runs; run alone, this row makes the reference run itself, so it never passes without a
    guarded App run.
    """
    ctx.files, ctx.ds_ref, ctx.ds_mixed, ctx.ds_fields  # noqa: B018 - register every tree
    if not ctx.guard.runs:
        ctx.ref_run  # noqa: B018 - run alone: one real, guarded App run
    assert ctx.guard.runs, "no App run was guarded"
    assert ctx.guard.created, "no input dataset was registered"
    registered = {r.resolve() for r in ctx.guard.created}
    unguarded = [label for label, root, _ in ctx.guard.runs if root.resolve() not in registered]
    assert not unguarded, f"runs on datasets that were not hashed when made: {unguarded}"
    problems = ctx.guard.problems()
    assert not problems, "\n".join(problems)


@dataclass(frozen=True)
class Row:
    name: str
    group: str
    check: Callable[[Ctx], None]


ROWS = [
    *[Row(n, "header", _row_header(n)) for n in (
        "oblique-affine", "LPS-axis-order", "PIL-axis-order", "qform-sform-disagree",
        "qform-code-0")],
    *[Row(n, "numeric", _row_header(n)) for n in (
        "scl-slope-inter", "int16-data", "uint8-data", "negative-values")],
    Row("anisotropic-FLAIR-1x1x5", "anisotropic", _row_header("anisotropic-FLAIR-1x1x5")),
    Row("nan-inf-voxels", "nan-inf", _row_header("nan-inf-voxels")),
    *[Row(n, "bad-file", _row_bad_file(n)) for n in (
        "4D-image", "empty-image", "not-nifti", "truncated-gz")],
    *[Row(n, "field", _row_field(n)) for n in (
        "field-missing", "field-non-numeric", "field-far-from-bins")],
    Row("field-flag-out-of-range", "field", row_field_flag),
    Row("label-path-chars", "usage", row_label_path),
    Row("filter-file-not-json", "usage", row_filter_not_json),
    Row("output-not-writable", "output", row_not_writable),
    Row("disk-full", "output", row_disk_full),
    Row("sigkill-rerun", "sigkill", row_sigkill),
    Row("concurrent-runs", "concurrent", row_concurrent),
    Row("same-seed-identical", "determinism", row_same_seed),
    Row("model-sha-mismatch", "model", _row_model("sha")),
    Row("model-pickle", "model", _row_model("pickle")),
    Row("input-dataset-unmodified", "input-unmodified", row_inputs_unmodified),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_row(row: Row, ctx: Ctx) -> None:
    row.check(ctx)
