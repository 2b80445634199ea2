"""The MRIxFields2026 Task 1 container contract (``../shared/design/MRIXFIELDS.md``).

Inside the container ``/input`` is read-only and holds ``manifest.json`` plus
``{MOD}/{SRC}_to_7T/src/P_{MOD}_{SRC}_{ID}.nii.gz``; every sample's prediction must be written to
``/output/<sample.output>`` (``{MOD}/{SRC}_to_7T/pred/P_{MOD}_7T_{ID}.nii.gz``): full volume,
float32, values in [0, 1], finite, with the input's affine and header, and nothing else.

This module holds the logic; :mod:`synth7t.commands.mrixfields` is the command line.

* :func:`load_manifest` validates the *whole* manifest before any work: JSON and keys, paths that
  leave the input / output roots, unsupported modality or field, missing inputs. Problems raise
  :class:`ManifestError` with one line per problem, each naming the sample, and an exit code
  (65 bad data, 66 missing input).
* :func:`run` predicts every sample with the registry's model for (contrast, field bin). Inputs are
  already skull-stripped on the 0.5 mm grid: no preprocessing, mask = input > 0; when all three
  modalities of a case are present the other two are passed as ``others``. Each output is written
  into a temporary folder outside the output root and then moved in, so the output tree never
  holds a partial or extra file. A sample that fails is reported by name and the run goes on.
* :func:`check_submission` validates an output folder against the manifest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np

#: MRIxFields modality -> synth7t contrast (BIDS suffix).
MODALITIES: dict[str, str] = {"T1W": "T1w", "T2W": "T2w", "T2FLAIR": "FLAIR"}
#: MRIxFields source-field label -> synth7t field bin (tesla).
SOURCE_FIELDS: dict[str, float] = {"0.1T": 0.1, "1.5T": 1.5, "3T": 3.0, "5T": 5.0}
TARGET_FIELD = "7T"
TASK = "task1"
EX_OK, EX_FAILED, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_CANTCREAT = 0, 1, 64, 65, 66, 73
SAMPLE_KEYS = ("task", "case_id", "modality", "source_field", "target_field", "pair", "input",
               "output")
TOP_KEYS = ("challenge", "phase", "task", "input_root", "output_root", "volume_shape", "samples")
_CASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ManifestError(Exception):
    """The manifest cannot be used; ``problems`` are one-line messages, ``code`` the exit code."""

    def __init__(self, problems: list[str], code: int):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.code = code


@dataclass
class Sample:
    index: int
    case_id: str
    modality: str
    source_field: str
    target_field: str
    pair: str
    input: str
    output: str
    input_path: Path
    output_path: Path

    @property
    def contrast(self) -> str:
        return MODALITIES[self.modality]

    @property
    def field_bin(self) -> float:
        return SOURCE_FIELDS[self.source_field]

    @property
    def name(self) -> str:
        return f"sample {self.index} ({self.modality} {self.pair} case {self.case_id})"


@dataclass
class Manifest:
    path: Path
    input_dir: Path
    output_dir: Path
    volume_shape: tuple[int, int, int]
    samples: list[Sample]
    raw: dict = field(repr=False, default_factory=dict)


# --------------------------------------------------------------------------------------------
# manifest validation
# --------------------------------------------------------------------------------------------
def _within(root: Path, rel: str, manifest_root: str | None, what: str) -> tuple[Path | None, str | None]:
    """Resolve a manifest path below ``root``; return ``(path, None)`` or ``(None, problem)``."""
    if not isinstance(rel, str) or not rel.strip():
        return None, f"{what} path is empty or not a string"
    pp = PurePosixPath(rel)
    if ".." in pp.parts:
        return None, f"{what} path {rel!r} contains '..'"
    if pp.is_absolute():
        # Allowed only below the real root or below the manifest's own root (e.g. /input/...).
        for base in (str(root), manifest_root):
            if base and PurePosixPath(base).is_absolute():
                try:
                    pp = pp.relative_to(PurePosixPath(base))
                    break
                except ValueError:
                    continue
        else:
            return None, f"{what} path {rel!r} is outside the {what} root {root}"
    resolved_root = root.resolve()
    target = (resolved_root / Path(*pp.parts)) if pp.parts else resolved_root
    # Symlinks must not lead out of the root either.
    try:
        real = target.resolve()
        real.relative_to(resolved_root)
    except ValueError:
        return None, f"{what} path {rel!r} resolves outside the {what} root {root}"
    if real == resolved_root:
        return None, f"{what} path {rel!r} names the {what} root itself"
    return target, None


def load_manifest(manifest_path: str | Path, input_dir: str | Path, output_dir: str | Path, *,
                  require_inputs: bool = True) -> Manifest:
    """Read and validate a Task 1 manifest.

    Every problem found is collected (one line each, naming the sample); then
    :class:`ManifestError` is raised with exit code 66 when the only problems are missing input
    files (or the manifest itself is missing), else 65.
    """
    manifest_path = Path(manifest_path)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not manifest_path.is_file():
        raise ManifestError([f"manifest {manifest_path} does not exist"], EX_NOINPUT)
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([f"manifest {manifest_path}: cannot read ({exc})"], EX_NOINPUT) from None
    except ValueError as exc:
        raise ManifestError([f"manifest {manifest_path}: malformed JSON ({exc})"], EX_DATAERR) from None
    where = f"manifest {manifest_path}"
    if not isinstance(raw, dict):
        raise ManifestError([f"{where}: top level is not a JSON object"], EX_DATAERR)
    problems: list[str] = []
    missing_only: list[str] = []
    absent = [k for k in TOP_KEYS if k not in raw]
    if absent:
        problems.append(f"{where}: missing key(s) {', '.join(absent)}")
    if "task" in raw and raw["task"] != TASK:
        problems.append(f"{where}: task is {raw['task']!r}, this container serves {TASK!r}")
    shape = raw.get("volume_shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        problems.append(f"{where}: volume_shape must be three positive integers, got {shape!r}")
        shape = None
    samples_raw = raw.get("samples")
    if not isinstance(samples_raw, list) or not samples_raw:
        problems.append(f"{where}: samples must be a non-empty list")
        samples_raw = []
    in_root = raw.get("input_root") if isinstance(raw.get("input_root"), str) else None
    out_root = raw.get("output_root") if isinstance(raw.get("output_root"), str) else None
    samples: list[Sample] = []
    seen_out: dict[str, int] = {}
    for i, s in enumerate(samples_raw):
        if not isinstance(s, dict):
            problems.append(f"{where}: sample {i} is not a JSON object")
            continue
        label = (f"sample {i} ({s.get('modality', '?')} {s.get('pair', '?')} "
                 f"case {s.get('case_id', '?')})")
        bad = [k for k in SAMPLE_KEYS if k not in s]
        if bad:
            problems.append(f"{label}: missing key(s) {', '.join(bad)}")
            continue
        nonstr = [k for k in SAMPLE_KEYS if not isinstance(s[k], str)]
        if nonstr:
            problems.append(f"{label}: key(s) {', '.join(nonstr)} must be strings")
            continue
        errs = []
        if s["task"] != TASK:
            errs.append(f"task {s['task']!r} is not {TASK!r}")
        if s["modality"] not in MODALITIES:
            errs.append(f"unsupported modality {s['modality']!r} (expected "
                        f"{', '.join(MODALITIES)})")
        if s["source_field"] not in SOURCE_FIELDS:
            errs.append(f"unsupported source field {s['source_field']!r} (expected "
                        f"{', '.join(SOURCE_FIELDS)})")
        if s["target_field"] != TARGET_FIELD:
            errs.append(f"unsupported target field {s['target_field']!r} (Task 1 targets "
                        f"{TARGET_FIELD})")
        if s["pair"] != f"{s['source_field']}_to_{s['target_field']}":
            errs.append(f"pair {s['pair']!r} does not match source/target field")
        if not _CASE_RE.match(s["case_id"]):
            errs.append(f"case_id {s['case_id']!r} is not a plain identifier")
        in_path, p1 = _within(input_dir, s["input"], in_root, "input")
        out_path, p2 = _within(output_dir, s["output"], out_root, "output")
        errs += [p for p in (p1, p2) if p]
        if out_path is not None:
            if not s["output"].endswith(".nii.gz"):
                errs.append(f"output {s['output']!r} is not a .nii.gz path")
            key = str(out_path)
            if key in seen_out:
                errs.append(f"output {s['output']!r} is also the output of sample {seen_out[key]}")
            seen_out.setdefault(key, i)
        if errs:
            problems += [f"{label}: {e}" for e in errs]
            continue
        if require_inputs and not in_path.is_file():
            missing_only.append(f"{label}: input {s['input']} does not exist "
                                f"(looked for {in_path})")
        samples.append(Sample(i, s["case_id"], s["modality"], s["source_field"],
                              s["target_field"], s["pair"], s["input"], s["output"],
                              in_path, out_path))
    if problems or missing_only:
        raise ManifestError(problems + missing_only, EX_DATAERR if problems else EX_NOINPUT)
    return Manifest(manifest_path, input_dir, output_dir, tuple(shape), samples, raw)


# --------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------
def _load_input(sample: Sample, shape: tuple[int, int, int]) -> tuple[nib.Nifti1Image, np.ndarray]:
    try:
        img = nib.load(str(sample.input_path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises many kinds on corrupt files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"cannot read input {sample.input}: {reason}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != tuple(shape):
        raise ValueError(f"input {sample.input} has shape {data.shape}, the manifest's "
                         f"volume_shape is {tuple(shape)}")
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return img, data


def output_image(pred: np.ndarray, src_img: nib.Nifti1Image, src_data: np.ndarray) -> nib.Nifti1Image:
    """The prediction as float32 [0, 1], finite, 0 where the input is 0, with the input's header."""
    out = np.nan_to_num(np.asarray(pred, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(out, 0.0, 1.0, out=out)
    out[src_data == 0] = 0.0
    hdr = src_img.header.copy()
    hdr.set_data_dtype(np.float32)
    img = nib.Nifti1Image(out, src_img.affine, hdr)
    img.header.set_slope_inter(np.nan, np.nan)  # float32 data: no scaling
    # nibabel keeps the copied sform/qform codes; make sure nothing was rewritten
    img.set_sform(src_img.get_sform(), code=int(src_img.header["sform_code"]))
    img.set_qform(src_img.get_qform(), code=int(src_img.header["qform_code"]))
    return img


def _move_in(tmp_file: Path, final: Path) -> None:
    """Move a finished file into the output tree without ever exposing a partial file there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp_file, final)  # atomic when the temp folder is on the same filesystem
        return
    except OSError:
        pass
    # Another filesystem: copy to a hidden name next to the target, fsync, then rename (atomic).
    hidden = final.parent / f".{final.name}.incoming"
    try:
        shutil.copyfile(tmp_file, hidden)
        with open(hidden, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(hidden, final)
    finally:
        if hidden.exists():
            hidden.unlink()
        tmp_file.unlink(missing_ok=True)


def default_tmp_dir(output_dir: Path) -> Path:
    base = Path(os.environ.get("SYNTH7T_TMPDIR") or tempfile.gettempdir())
    return base


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


@dataclass
class RunResult:
    written: list[str]
    failed: list[str]  # one line per failed sample
    seconds: float
    #: per sample: output, load / predict / write / total seconds
    timings: list[dict] = field(default_factory=list)
    #: seconds spent loading and verifying the models before the first sample
    setup_seconds: float = 0.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _order(samples: list[Sample]) -> list[Sample]:
    """Group the samples of one case and source field so their inputs are loaded together."""
    return sorted(samples, key=lambda s: (SOURCE_FIELDS[s.source_field], s.case_id,
                                          list(MODALITIES).index(s.modality)))


def run(manifest: Manifest, *, model_dir: str | Path | None = None, model_name: str = "default",
        device: str = "cpu", threads: int | None = None, batch_size: int = 4,
        tta: bool | None = None, tmp_dir: str | Path | None = None,
        uncertainty_dir: str | Path | None = None, log=_log) -> RunResult:
    """Predict every sample of a validated manifest; see the module docstring.

    ``uncertainty_dir`` (outside the output folder: the contract allows no extra files there)
    receives each sample's uncertainty map under the sample's output name, for models with an
    uncertainty head (:mod:`synth7t.uncertainty`).
    """
    from synth7t.networks import DEFAULT_TTA
    from synth7t.inference import load_synthesizer
    from synth7t.registry import Registry

    t_start = time.time()
    tmp_base = Path(tmp_dir) if tmp_dir else default_tmp_dir(manifest.output_dir)
    if _is_within(tmp_base, manifest.output_dir):
        raise ManifestError([f"temporary folder {tmp_base} lies inside the output folder "
                             f"{manifest.output_dir}; set SYNTH7T_TMPDIR/--tmp-dir elsewhere"],
                            EX_USAGE)
    tmp_base.mkdir(parents=True, exist_ok=True)
    tta = DEFAULT_TTA if tta is None else bool(tta)
    if uncertainty_dir is not None:
        uncertainty_dir = Path(uncertainty_dir)
        if _is_within(uncertainty_dir, manifest.output_dir) or \
                _is_within(manifest.output_dir, uncertainty_dir):
            raise ManifestError([f"uncertainty folder {uncertainty_dir} overlaps the output folder "
                                 f"{manifest.output_dir}; the contract allows no extra files "
                                 "there"], EX_USAGE)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    registry = Registry.load(model_dir)
    # Resolve and verify (SHA-256) every model before any sample is touched.
    synths: dict = {}
    for key in sorted({(s.contrast, s.field_bin) for s in manifest.samples}):
        synths[key] = load_synthesizer(registry.get(key[0], key[1], name=model_name),
                                       device=device)
    by_case: dict[tuple[str, str], dict[str, Sample]] = {}
    for s in manifest.samples:
        by_case.setdefault((s.source_field, s.case_id), {})[s.modality] = s
    setup_seconds = time.time() - t_start
    cache: dict[str, tuple] = {}  # input path -> (img, data) for the current case
    written, failed, timings = [], [], []
    ordered = _order(manifest.samples)
    work = Path(tempfile.mkdtemp(prefix="synth7t-mrixfields-", dir=tmp_base))
    # Compressing and writing a 0.5 mm volume takes ~8-10 s: it runs in one background thread
    # (zlib releases the GIL) while the next sample is predicted; at most one write is pending.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth7t-writer")
    pending: list[tuple] = []

    def write(out_img, tmp_file: Path, final: Path) -> float:
        t = time.time()
        nib.save(out_img, str(tmp_file))
        _move_in(tmp_file, final)
        return time.time() - t

    def finish(n: int, s: Sample, tim: dict, t0: float, status: str) -> None:
        dt = time.time() - t0
        tim["total"] = dt
        timings.append(tim)
        elapsed = time.time() - t_start
        left = elapsed / n * (len(ordered) - n)
        log(f"[{n}/{len(ordered)}] {s.modality} {s.pair} {s.case_id}: {status} "
            f"({dt:.1f} s; elapsed {elapsed / 60:.1f} min, ~{left / 60:.1f} min left)")

    def drain(keep: int) -> None:
        while len(pending) > keep:
            fut, n, s, tim, t0 = pending.pop(0)
            try:
                tim["write"] = fut.result()
                written.append(s.output)
                status = "ok"
            except Exception as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                failed.append(f"{s.name}: cannot write {s.output}: {reason}")
                status = f"FAILED: {reason}"
            finish(n, s, tim, t0, status)

    try:
        for n, s in enumerate(ordered, 1):
            t0 = time.time()
            tim = {"output": s.output, "load": 0.0, "predict": 0.0, "write": 0.0}
            group = by_case[(s.source_field, s.case_id)]
            # keep only this case's volumes in memory
            for k in [k for k in cache if k not in {str(g.input_path) for g in group.values()}]:
                del cache[k]
            try:
                if str(s.input_path) not in cache:
                    cache[str(s.input_path)] = _load_input(s, manifest.volume_shape)
                img, data = cache[str(s.input_path)]
                others = None
                if len(group) == len(MODALITIES):
                    others = {}
                    for mod, g in group.items():
                        if mod == s.modality:
                            continue
                        if str(g.input_path) not in cache:
                            try:
                                cache[str(g.input_path)] = _load_input(g, manifest.volume_shape)
                            except ValueError:
                                cache[str(g.input_path)] = None
                        if cache[str(g.input_path)] is not None:
                            others[g.contrast] = np.clip(cache[str(g.input_path)][1], 0.0, 1.0)
                key = (s.contrast, s.field_bin)
                vol = np.clip(data, 0.0, 1.0)
                t1 = time.time()
                tim["load"] = t1 - t0
                want_unc = uncertainty_dir is not None and synths[key].has_uncertainty
                extra = {"return_uncertainty": True} if want_unc else {}
                pred = synths[key].predict(vol, vol > 0, others=others or None,
                                           batch_size=batch_size, tta=tta, threads=threads,
                                           **extra)
                if want_unc:
                    from .uncertainty import add_saturation

                    pred, unc = pred
                    # the challenge data are [0, 1] already; anything above was clipped off
                    add_saturation(unc, np.maximum(np.asarray(data, np.float32) - 1.0, 0.0),
                                   vol > 0)
                    unc_img = output_image(unc, img, data)
                    write(unc_img, work / f"{n:04d}-unc.nii.gz",
                          uncertainty_dir / Path(s.output))
                    del unc, unc_img
                tim["predict"] = time.time() - t1
                if tuple(np.shape(pred)) != tuple(manifest.volume_shape):
                    raise ValueError(f"model returned shape {np.shape(pred)}")
                out_img = output_image(pred, img, data)
                del pred
                drain(0)  # the previous write must be done before queueing the next one
                fut = pool.submit(write, out_img, work / f"{n:04d}.nii.gz", s.output_path)
                pending.append((fut, n, s, tim, t0))
            except Exception as exc:  # one bad sample must not stop the others
                reason = " ".join(str(exc).split()) or type(exc).__name__
                failed.append(f"{s.name}: {reason}")
                drain(0)
                finish(n, s, tim, t0, f"FAILED: {reason}")
        drain(0)
    finally:
        pool.shutdown(wait=True)
        shutil.rmtree(work, ignore_errors=True)
    return RunResult(written, failed, time.time() - t_start, timings, setup_seconds)


# --------------------------------------------------------------------------------------------
# a local test-phase input from a dataset split (for validation before submitting)
# --------------------------------------------------------------------------------------------
_DATA_RE = re.compile(r"^P_(?P<mod>T1W|T2W|T2FLAIR)_(?P<field>[0-9.]+T)_(?P<id>\d+)\.nii\.gz$")


def prepare_input(split_dir: str | Path, input_dir: str | Path, *,
                  sources: tuple[str, ...] | None = None) -> Path:
    """Lay out a Task 1 input tree + ``manifest.json`` from a dataset split.

    ``split_dir`` is a challenge split as distributed
    (``{split}/{MOD}/{field}/P_{MOD}_{field}_{ID}.nii.gz``, e.g. ``Validating_prospective``).
    Every paired source volume (0.1/1.5/3/5 T) becomes a sample; files are hard-linked when
    possible, else copied. Returns the manifest path. Predictions of such a run can be scored with
    ``synth7t-eval OUTPUT_DIR split_dir`` (the 7T volumes of the split are the ground truth).
    """
    split_dir, input_dir = Path(split_dir), Path(input_dir)
    samples, shape = [], None
    for mod in MODALITIES:
        for src in sources or tuple(SOURCE_FIELDS):
            folder = split_dir / mod / src
            for f in sorted(folder.glob("P_*.nii.gz")) if folder.is_dir() else []:
                m = _DATA_RE.match(f.name)
                if not m or m["mod"] != mod or m["field"] != src:
                    continue
                pair = f"{src}_to_{TARGET_FIELD}"
                rel_in = f"{mod}/{pair}/src/{f.name}"
                dst = input_dir / rel_in
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    try:
                        os.link(f, dst)
                    except OSError:
                        shutil.copyfile(f, dst)
                if shape is None:
                    shape = [int(v) for v in nib.load(str(f)).shape[:3]]
                samples.append({"task": TASK, "case_id": m["id"], "modality": mod,
                                "source_field": src, "target_field": TARGET_FIELD,
                                "pair": pair, "input": rel_in,
                                "output": f"{mod}/{pair}/pred/P_{mod}_{TARGET_FIELD}_{m['id']}.nii.gz"})
    if not samples:
        raise ManifestError([f"{split_dir}: no P_{{MOD}}_{{field}}_{{ID}}.nii.gz source volumes "
                             f"under {{MOD}}/{{field}}/"], EX_NOINPUT)
    manifest = {"challenge": "MRIxFields2026", "phase": "test", "task": TASK,
                "input_root": "/input", "output_root": "/output", "volume_shape": shape,
                "samples": samples}
    path = input_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# submission check
# --------------------------------------------------------------------------------------------
def _all_files(root: Path):
    for p in sorted(root.rglob("*")):
        if p.is_file() or p.is_symlink():
            yield p


def check_submission(manifest: Manifest, output_dir: str | Path | None = None, *,
                     check_affine: bool = True) -> list[str]:
    """Problems of an output folder against ``manifest`` (empty list = valid).

    Checks: every manifest output present, nothing extra (of any kind), ``.nii.gz`` names,
    readable, shape == ``volume_shape``, on-disk dtype float32, finite, values in [0, 1], and (when
    the input is available) the input's affine.
    """
    out = Path(output_dir) if output_dir is not None else manifest.output_dir
    problems: list[str] = []
    if not out.is_dir():
        return [f"{out}: output folder does not exist"]
    expected = {}
    for s in manifest.samples:
        rel = s.output_path.resolve().relative_to(manifest.output_dir.resolve())
        expected[(out / rel).resolve()] = s
    for p in _all_files(out):
        if p.resolve() not in expected:
            problems.append(f"extra file {p.relative_to(out)}")
    for path, s in expected.items():
        rel = path.relative_to(out.resolve())
        if not path.is_file():
            problems.append(f"{s.name}: missing {rel}")
            continue
        try:
            img = nib.load(str(path))
            dtype = img.get_data_dtype()
            data = np.asarray(img.dataobj)
        except Exception as exc:
            problems.append(f"{s.name}: {rel} is not a readable NIfTI ({' '.join(str(exc).split())})")
            continue
        if not str(path).endswith(".nii.gz"):
            problems.append(f"{s.name}: {rel} is not .nii.gz")
        if tuple(data.shape) != tuple(manifest.volume_shape):
            problems.append(f"{s.name}: {rel} has shape {tuple(data.shape)}, expected "
                            f"{tuple(manifest.volume_shape)}")
        if dtype != np.float32:
            problems.append(f"{s.name}: {rel} is stored as {dtype}, expected float32")
        slope, inter = img.header.get_slope_inter()
        if slope not in (None, 1.0) or inter not in (None, 0.0):
            problems.append(f"{s.name}: {rel} has intensity scaling (scl_slope {slope}, "
                            f"scl_inter {inter})")
        data = np.asarray(img.get_fdata(dtype=np.float32))
        finite = np.isfinite(data)
        if not finite.all():
            problems.append(f"{s.name}: {rel} has {int((~finite).sum())} NaN/Inf voxels")
        if finite.any():
            lo, hi = float(data[finite].min()), float(data[finite].max())
            if lo < 0.0 or hi > 1.0:
                problems.append(f"{s.name}: {rel} has values outside [0, 1] ({lo:g}..{hi:g})")
        if check_affine and s.input_path.is_file():
            try:
                src = nib.load(str(s.input_path))
                if not np.allclose(src.affine, img.affine, atol=1e-6):
                    problems.append(f"{s.name}: {rel} does not have the input's affine")
            except Exception:
                pass
    return problems
