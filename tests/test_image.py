"""The container image, built and run as the challenge platform and an HPC user run it (podman).

One build per session (``scripts/build_image.sh`` with no arguments, exactly as documented; it
bootstraps the base with mmdebstrap when no registry answers), then every check reuses the image:

* MRIxFields Task 1 as the platform runs it: ``--network none``, ``--read-only`` root with a tmpfs
  ``/tmp``, ``/input`` read-only (manifest of 2 samples: different modality and field),
  ``/output`` writable, as the image's non-root user. Exactly the manifest's files appear,
  ``--check`` passes inside the image, and the predictions equal, bit for bit, those of the same
  ``synth7t-mrixfields`` command run on the host from the same checkout.
* The BIDS App (``--entrypoint synth7t``) on ``../shared/data/bids_3t`` sub-02 mounted read-only:
  exit 0 and the host run's derivative file list; a missing field strength exits 65.
* A copy of the build context with one byte of a weight file changed fails the build at the
  SHA-256 check (before the install: the cached layers make this a few seconds).
* Hygiene: CPU torch, no compiler, no pip/apt caches, no tests/work folders, size <= 2.2 GB.

Skipped when podman is not installed (``.ci/run`` installs podman, runc, mmdebstrap and uidmap).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, make_bids, tree_digest

pytestmark = [pytest.mark.image, pytest.mark.slow]

MAX_IMAGE_BYTES = 2.2e9
BUILD_TIMEOUT = 3600
RUN_TIMEOUT = 3600
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
IMAGE_UID = 1000
TEMPLATES = REPO / "synth7t" / "data" / "templateflow" / "tpl-MRIxFields"


def _engine() -> list[str]:
    if shutil.which("podman") is None:
        pytest.skip("podman not installed (.ci/run installs podman runc mmdebstrap uidmap)")
    return ["podman"] + (["--runtime", "runc"] if shutil.which("runc") else [])


def say(request, msg: str) -> None:
    """Print into the test log even while output is captured (``make test`` runs without -s).

    To stderr: a pytest-xdist worker's stdout never reaches the log, its stderr does.
    """
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(msg, file=sys.stderr, flush=True)


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.fixture(scope="session")
def image(request):
    """``scripts/build_image.sh`` (no arguments): the CPU image synth7t:<version>, once."""
    engine = _engine()
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "scripts/build_image.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT)
    seconds = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"scripts/build_image.sh failed (exit {proc.returncode}) after {seconds:.0f} s:"
                    f"\n{_tail(log, 80)}")
    tag = re.search(r"^build_image: built (\S+) in", log, re.M).group(1)
    base = re.search(r"^build_image: \S+ build -t \S+ from \S+ on (\S+)$", log, re.M).group(1)
    size = int(subprocess.run(engine + ["image", "inspect", "--format", "{{.Size}}", tag],
                              capture_output=True, text=True, check=True).stdout.strip())
    say(request, f"\nimage {tag}: built in {seconds:.0f} s on base {base}; "
          f"size {size / 1e9:.2f} GB ({size} bytes, podman image inspect)")
    return SimpleNamespace(tag=tag, base=base, size=size, seconds=seconds, log=log,
                           engine=engine)


def run_image(image, args, *, entrypoint=None, user=None, network_none=True, timeout=RUN_TIMEOUT):
    """``podman run --rm [--network none] --read-only --tmpfs /tmp ... IMAGE args``."""
    cmd = image.engine + ["run", "--rm", "--read-only", "--tmpfs", "/tmp", *ULIMITS]
    if network_none:
        cmd += ["--network", "none"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    if user is not None:
        cmd += ["--user", str(user)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd + _split_args(args, image.tag), capture_output=True, text=True,
                          timeout=timeout)
    proc.seconds = time.monotonic() - t0
    return proc


def _split_args(args, tag):
    """``args`` holds engine options, then ``"IMAGE"``, then the command's arguments."""
    args = [str(a) for a in args]
    i = args.index("IMAGE")
    return args[:i] + [tag] + args[i + 1:]


def _describe(proc) -> str:
    return f"exit {proc.returncode} after {getattr(proc, 'seconds', 0):.0f} s\n" + \
        _tail(proc.stdout + proc.stderr)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _open_dir(path: Path) -> Path:
    """A folder the image's non-root user can write to (as a platform's /output is)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def _host_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SYNTH7T_TMPDIR",
                        "SYNTH7T_MODEL_DIR", "SYNTH7T_MODEL_NAME")}
    env.update(NIPYPE_NO_ET="1", TEMPLATEFLOW_AUTOUPDATE="0", **extra)
    return env


# --------------------------------------------------------------------------- Task 1
SAMPLES = (("T1W", "0.1T", "0021"), ("T2FLAIR", "3T", "0022"))


def make_task1_input(root: Path) -> tuple[Path, dict]:
    """A test-phase input tree: the shipped 1 mm template brain as two samples (T1W at 0.1 T,
    an inverted-contrast "FLAIR" at 3 T), skull-stripped, float32 in [0, 1], background 0."""
    t1 = nib.load(TEMPLATES / "tpl-MRIxFields_res-1_T1w.nii.gz")
    mask = np.asarray(nib.load(TEMPLATES / "tpl-MRIxFields_res-1_desc-brain_mask.nii.gz")
                      .dataobj) > 0
    data = np.asarray(t1.dataobj, dtype=np.float32)
    data = np.where(mask, data / data[mask].max(), 0).astype(np.float32)
    volumes = {"T1W": data, "T2FLAIR": np.where(mask, 1.05 - data, 0).clip(0, 1).astype(np.float32)}
    samples = []
    for mod, src, cid in SAMPLES:
        pair = f"{src}_to_7T"
        rel_in = f"{mod}/{pair}/src/P_{mod}_{src}_{cid}.nii.gz"
        hdr = t1.header.copy()
        hdr.set_data_dtype(np.float32)
        img = nib.Nifti1Image(volumes[mod], t1.affine, hdr)
        (root / rel_in).parent.mkdir(parents=True, exist_ok=True)
        img.to_filename(str(root / rel_in))
        samples.append({"task": "task1", "case_id": cid, "modality": mod, "source_field": src,
                        "target_field": "7T", "pair": pair, "input": rel_in,
                        "output": f"{mod}/{pair}/pred/P_{mod}_7T_{cid}.nii.gz"})
    manifest = {"challenge": "MRIxFields2026", "phase": "test", "task": "task1",
                "input_root": "/input", "output_root": "/output",
                "volume_shape": list(data.shape), "samples": samples}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root, manifest


@pytest.fixture(scope="module")
def task1(image, tmp_path_factory, request):
    """The platform's run of the image, its --check, and the same command on the host."""
    root = tmp_path_factory.mktemp("image_task1")
    inp, manifest = make_task1_input(root / "input")
    before = tree_digest(inp)
    out = _open_dir(root / "output")
    env = ["-e", "INPUT_DIR=/input", "-e", "OUTPUT_DIR=/output",
           "-e", "MANIFEST=/input/manifest.json", "-e", "TASK_ID=task1"]
    run = run_image(image, ["-v", f"{inp}:/input:ro", "-v", f"{out}:/output", *env, "IMAGE"])
    check = run_image(image, ["-v", f"{inp}:/input:ro", "-v", f"{out}:/output:ro", "IMAGE",
                              "--check", "/output"])
    host_out = root / "host_output"
    exe = Path(sys.executable).parent / "synth7t-mrixfields"
    t0 = time.monotonic()
    host = subprocess.run([str(exe)], capture_output=True, text=True, cwd=root, timeout=RUN_TIMEOUT,
                          env=_host_env(INPUT_DIR=str(inp), OUTPUT_DIR=str(host_out),
                                        MANIFEST=str(inp / "manifest.json"), TASK_ID="task1"))
    host.seconds = time.monotonic() - t0
    say(request, f"\nTask 1 (2 samples of {manifest['volume_shape']}): image {run.seconds:.1f} s, "
          f"--check in the image {check.seconds:.1f} s, host {host.seconds:.1f} s")
    return SimpleNamespace(inp=inp, out=out, host_out=host_out, manifest=manifest, run=run,
                           check=check, host=host, before=before)


def test_task1_contract_in_the_image(task1):
    assert task1.run.returncode == 0, _describe(task1.run)
    expected = {s["output"] for s in task1.manifest["samples"]}
    assert _files(task1.out) == expected, "the output folder must hold exactly the manifest's files"
    assert not [p for p in task1.out.rglob(".*")], "hidden files in /output"
    assert tree_digest(task1.inp) == task1.before, "/input changed"
    for rel in expected:  # written by the image's non-root user
        assert (task1.out / rel).stat().st_uid == IMAGE_UID or os.geteuid() != 0, rel


def test_task1_check_passes_in_the_image(task1):
    assert task1.check.returncode == 0, _describe(task1.check)
    assert "OK:" in task1.check.stdout


def test_task1_predictions_equal_the_host_run(task1):
    """Bitwise: same torch wheel (2.13.0+cpu), same CPU, same thread count (the machine's)."""
    assert task1.host.returncode == 0, _describe(task1.host)
    assert _files(task1.host_out) == _files(task1.out)
    for s in task1.manifest["samples"]:
        a, b = nib.load(task1.out / s["output"]), nib.load(task1.host_out / s["output"])
        assert a.header.binaryblock == b.header.binaryblock, s["output"]
        da, db = np.asarray(a.dataobj), np.asarray(b.dataobj)
        assert da.dtype == db.dtype == np.float32
        diff = float(np.abs(da.astype(np.float64) - db).max())
        assert np.array_equal(da, db), f"{s['output']}: max |image - host| = {diff:g}"


def test_image_runs_as_non_root_user(image):
    proc = run_image(image, ["IMAGE", "-u"], entrypoint="id")
    assert proc.returncode == 0, _describe(proc)
    assert proc.stdout.strip() == str(IMAGE_UID)


# --------------------------------------------------------------------------- BIDS App
@pytest.fixture(scope="module")
def bids_app(image, bids_3t, bids_3t_run, tmp_path_factory, request):
    """sub-02 through ``--entrypoint synth7t``, input read-only; the host run is the session's
    documented run of the whole dataset (conftest.bids_3t_run, default options)."""
    root = tmp_path_factory.mktemp("image_bids")
    out, work = _open_dir(root / "out"), _open_dir(root / "work")
    before = tree_digest(bids_3t)
    proc = run_image(image, ["-v", f"{bids_3t}:/data:ro", "-v", f"{out}:/out",
                             "-v", f"{work}:/work", "IMAGE", "/data", "/out", "participant",
                             "--participant-label", "02", "-w", "/work"], entrypoint="synth7t")
    say(request, f"\nBIDS App sub-02 in the image: exit {proc.returncode} in {proc.seconds:.0f} s")
    return SimpleNamespace(out=out, proc=proc, host=bids_3t_run, bids=bids_3t, before=before,
                           after=tree_digest(bids_3t))


def _subject_files(root: Path, label: str) -> set[str]:
    return {f for f in _files(root) if f.split("/")[0].startswith(f"sub-{label}")}


def test_bids_app_in_the_image(bids_app, request):
    assert bids_app.proc.returncode == 0, _describe(bids_app.proc)
    assert bids_app.after == bids_app.before, "the read-only input changed"
    assert bids_app.host.proc.returncode == 0, _describe(bids_app.host.proc)
    mine, host = _subject_files(bids_app.out, "02"), _subject_files(bids_app.host.out, "02")
    assert mine and mine == host, (sorted(mine ^ host))
    top = {f for f in _files(bids_app.out) if "/" not in f and not f.startswith("sub-")}
    host_top = {f for f in _files(bids_app.host.out) if "/" not in f and not f.startswith("sub-")}
    # (the host run covered every participant, and later tests may add to its folder)
    assert top and top <= host_top, sorted(top - host_top)
    assert not list(bids_app.out.rglob("crash-*"))
    # Not asserted, reported: how far the image's synthetic images are from the host's.
    for f in sorted(mine):
        if "desc-synth7T" in f and f.endswith(".nii.gz"):
            a = np.asarray(nib.load(bids_app.out / f).dataobj, dtype=np.float64)
            b = np.asarray(nib.load(bids_app.host.out / f).dataobj, dtype=np.float64)
            say(request, f"{f}: max |image - host| = {np.abs(a - b).max():.3g}" if a.shape == b.shape
                  else f"{f}: shapes differ {a.shape} {b.shape}")


def test_bids_app_missing_field_strength_exits_65(image, tmp_path):
    bids = make_bids(tmp_path / "bids", {"01": {"T1w": None}})
    for p in [bids, *bids.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    out = _open_dir(tmp_path / "out")
    proc = run_image(image, ["-v", f"{bids}:/data:ro", "-v", f"{out}:/out", "IMAGE", "/data",
                             "/out", "participant", "-w", "/tmp/work"], entrypoint="synth7t")
    assert proc.returncode == 65, _describe(proc)
    assert "MagneticFieldStrength" in proc.stderr + proc.stdout


# --------------------------------------------------------------------------- build checks
def test_tampered_weights_fail_the_build(image, tmp_path, request):
    """A copy of the build context with one byte of a weight file changed does not build."""
    ctx = tmp_path / "context"
    ctx.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("Dockerfile", ".dockerignore", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, ctx / name)
    for name in ("scripts", "synth7t", "workflows", "bids_app"):
        shutil.copytree(REPO / name, ctx / name, ignore=ignore)
    models = ctx / "synth7t" / "models"
    entries = json.loads((models / "registry.json").read_text())["models"]
    weights = sorted({e["file"] for e in entries if e["kind"] == "unet"}) or \
        sorted({e["file"] for e in entries})
    target = models / weights[0]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    tag = "localhost/synth7t:tampered-test"
    subprocess.run(image.engine + ["rmi", "-f", tag], capture_output=True)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "scripts/build_image.sh", "--context", str(ctx), "--tag", tag,
                           "--base", image.base], cwd=REPO, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT)
    seconds = time.monotonic() - t0
    say(request, f"\ntampered build: exit {proc.returncode} after {seconds:.0f} s")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, _tail(log)
    assert re.search(rf"{re.escape(weights[0])}: SHA-256 mismatch", log), _tail(log)
    exists = subprocess.run(image.engine + ["image", "exists", tag])
    assert exists.returncode != 0, f"{tag} was built from a tampered weight file"


def test_image_hygiene(image, request):
    """CPU torch, no compiler, no pip/apt caches, no tests/work folders, size within budget."""
    script = r"""
set -u
for c in gcc cc c++ g++ clang make as ld; do command -v "$c" && echo "COMPILER $c"; done
# (the build's mount points stay behind as empty placeholders: only files with bytes count)
for d in /root/.cache /home/synth7t/.cache /var/cache/apt/archives /run/synth7t-pip; do
    [ -e "$d" ] && [ -n "$(find "$d" -type f -size +0 | head -n 1)" ] && echo "CACHE $d"
done
[ -n "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -x -e lock -e partial -e auxfiles)" ] \
    && echo "CACHE /var/lib/apt/lists"
ls -A /opt/synth7t | sed 's/^/TOP /'
python -c "import torch; print('TORCH', torch.__version__, torch.version.cuda)"
python -m pip list --format=freeze 2>/dev/null | sed 's/^/PKG /'
"""
    proc = run_image(image, ["IMAGE", "-c", script], entrypoint="sh", user=0)
    assert proc.returncode == 0, _describe(proc)
    lines = proc.stdout.splitlines()
    assert not [x for x in lines if x.startswith(("COMPILER", "CACHE"))], lines
    top = {x[4:] for x in lines if x.startswith("TOP ")}
    assert {"synth7t", "workflows", "bids_app", "scripts", "setup.cfg"} <= top, top
    leaked = top & {"tests", "benchmarks", "docs", ".git", ".venv", "demo", "work", ".ci"}
    assert not leaked, f".dockerignore let these into the image: {leaked}"
    torch_line = next(x for x in lines if x.startswith("TORCH "))
    assert torch_line.split()[1].endswith("+cpu") and torch_line.split()[2] == "None", torch_line
    pkgs = {x[4:].split("==")[0].lower(): x[4:] for x in lines if x.startswith("PKG ")}
    assert not [p for p in pkgs if p.startswith("nvidia-")], "CUDA libraries in the CPU image"
    # Versions against the host's venv (the bitwise comparison above depends on them).
    host = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"],
                          capture_output=True, text=True).stdout.splitlines()
    host = {x.split("==")[0].lower(): x for x in host if "==" in x}
    differ = sorted(f"{pkgs[k]} (host {host[k]})" for k in pkgs.keys() & host.keys()
                    if pkgs[k] != host[k] and k != "synth7t")
    say(request, f"\nimage {image.tag}: {image.size / 1e9:.2f} GB; {len(pkgs)} packages; "
          f"differing from the host venv: {', '.join(differ) or 'none'}")
    assert image.size <= MAX_IMAGE_BYTES, f"{image.size / 1e9:.2f} GB > 2.2 GB"
