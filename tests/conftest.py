"""Shared pytest fixtures: paths to the shared data and tiny synthetic BIDS datasets.

Everything here is cheap (tiny images made with numpy); fixtures for heavy data live next to the
tests that need them. Others may append fixtures at the end of this file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")

from synth7t.reference import setup_templateflow  # noqa: E402

setup_templateflow()

#: ``/work/shared/data`` as seen from this repository (tests/ -> repo -> /work).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BIDS_3T = SHARED_DATA / "bids_3t"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared test data folder (skips when it is not mounted)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bids_3t(shared_data) -> Path:
    """The small real 3T BIDS dataset (sub-01 whole-head T1w; sub-02 T1w/T2w/FLAIR brains)."""
    return shared_data / "bids_3t"


# --------------------------------------------------------------------------- the real run
APP_TIMEOUT = 3600


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 and mtime of every file below ``root`` (to prove a tree was not touched)."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (
                hashlib.sha256(p.read_bytes()).hexdigest() + f":{st.st_mtime_ns}")
    return out


def run_app(args, cwd, *, env: dict | None = None):
    """Run the installed ``synth7t`` command; the result carries ``seconds``.

    ``env`` adds to (or overrides) this process's environment.
    """
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).parent / "synth7t"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "bids_app.run"]
    env = dict(os.environ, NIPYPE_NO_ET="1", TEMPLATEFLOW_AUTOUPDATE="0", **(env or {}))
    t0 = time.monotonic()
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=APP_TIMEOUT)
    proc.seconds = time.monotonic() - t0
    return proc


@pytest.fixture(scope="session")
def bids_3t_run(tmp_path_factory, bids_3t):
    """``synth7t ../shared/data/bids_3t <out> participant -w <work>``, once per session.

    The documented command with default options (MultiProc). tests/test_e2e.py checks it and
    runs it again on the same work dir; tests/test_brain_extraction.py, test_real_outputs.py and
    test_image.py read its outputs.
    """
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("bids_3t_run")
    out, work = root / "out", root / "work"
    args = [os.path.relpath(bids_3t, REPO), out, "participant", "-w", work]
    before = tree_digest(bids_3t)
    proc = run_app(args, REPO)
    return SimpleNamespace(out=out, work=work, args=args, proc=proc, bids=bids_3t, before=before)


# --------------------------------------------------------------------------- parallel runs
#: ``make test`` runs two pytest-xdist workers (``-n 2 --dist loadgroup --no-loadscope-reorder``)
#: with the scheduler below: each group runs whole on one worker, so a session or module fixture
#: (an App run, the container image) is made once, and the groups are handed out in this order,
#: longest first, so that the two workers finish together. Measured: 64 -> 49 min for .ci/run,
#: not half, as most App runs already keep both cores busy (README, "Tests"; 41 min since the
#: runs that do not test the network use the baseline models).
HEAVY_GROUPS = ("bids_3t", "test_slurm", "test_robustness", "test_brain_extraction",
                "test_group", "test_preprocess")
#: The ``bids_3t`` group: every test that reads the documented run on ../shared/data/bids_3t
#: (``bids_3t_run``), including the image tests, whose BIDS App check compares with that run.
BIDS_3T_TESTS = ("tests/test_e2e.py::", "tests/test_real_outputs.py::", "tests/test_image.py::",
                 "tests/test_brain_extraction.py::test_sub01_")


def group_of(nodeid: str) -> str:
    """The group of a test id: ``bids_3t`` or its module's name."""
    nodeid = nodeid.split("@", 1)[0]
    if nodeid.startswith(BIDS_3T_TESTS):
        return "bids_3t"
    return Path(nodeid.split("::", 1)[0]).stem


def pytest_collection_modifyitems(config, items):
    rank = {g: i for i, g in enumerate(HEAVY_GROUPS)}
    stray = [it.nodeid for it in items
             if "bids_3t_run" in it.fixturenames and group_of(it.nodeid) != "bids_3t"]
    if stray:  # it would make the 10-minute run again on the other worker
        raise pytest.UsageError(f"tests using bids_3t_run outside conftest.BIDS_3T_TESTS: {stray}")
    # stable: each module's tests keep their order, and a module's tests of one group stay
    # together (its module fixtures are not made twice in a serial run either)
    items.sort(key=lambda it: rank.get(group_of(it.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with :func:`group_of` as the groups (pytest-xdist's own
    ``xdist_group`` marks do not reach its scheduler under pytest 9)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


# --------------------------------------------------------------------------- tiny datasets
def tiny_image(shape=(20, 24, 20), *, seed: int = 0, zooms=(2.0, 2.0, 2.0),
               stripped: bool = False) -> nib.Nifti1Image:
    """A small head-like float32 volume: a bright ellipsoid in a noisy background."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    r = np.sqrt(sum(((g - c) / (0.4 * s)) ** 2 for g, c, s in zip(grid, centre, shape)))
    data = np.where(r < 1, 100 + 20 * rng.standard_normal(shape), 5 * rng.random(shape))
    data = np.clip(data, 0, None).astype(np.float32)
    if stripped:
        data[r >= 0.8] = 0
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -np.array(zooms) * centre
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    return img


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def make_bids(root: Path, spec: dict, *, top_sidecars: dict | None = None,
              name: str = "tiny") -> Path:
    """Write a tiny BIDS dataset.

    Parameters
    ----------
    root
        Dataset folder (created).
    spec
        ``{"01": {"T1w": 3, "T2w": None}, "02": {"ses-a": {"T1w": 1.5}}}``: per participant
        (optionally per session) the contrasts to write and their ``MagneticFieldStrength``
        (``None``: no key in the sidecar; ``"inherit"``: no sidecar at all). A contrast may also
        map to a dict of sidecar keys, or a list of such values for several runs.
    top_sidecars
        Top-level sidecars, e.g. ``{"T1w": {"MagneticFieldStrength": 3}}`` (inheritance).
    """
    root = Path(root)
    write_json(root / "dataset_description.json",
               {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "raw",
                "Authors": ["synth7t tests", "second author"]})
    (root / "README").write_text("Tiny synthetic dataset for synth7t tests.\n")
    for suffix, meta in (top_sidecars or {}).items():
        write_json(root / f"{suffix}.json", meta)
    seed = 0
    for label, content in spec.items():
        sessions = {k: v for k, v in content.items() if k.startswith("ses-")}
        if not sessions:
            sessions = {None: content}
        for ses, contrasts in sessions.items():
            folder = root / f"sub-{label}" / (ses or "") / "anat"
            folder.mkdir(parents=True, exist_ok=True)
            prefix = f"sub-{label}" + (f"_{ses}" if ses else "")
            for contrast, value in contrasts.items():
                runs = value if isinstance(value, list) else [value]
                for i, v in enumerate(runs, start=1):
                    run = f"_run-{i}" if len(runs) > 1 else ""
                    seed += 1
                    stem = folder / f"{prefix}{run}_{contrast}"
                    tiny_image(seed=seed).to_filename(f"{stem}.nii.gz")
                    if v == "inherit":
                        continue
                    meta = dict(v) if isinstance(v, dict) else (
                        {} if v is None else {"MagneticFieldStrength": v})
                    write_json(Path(f"{stem}.json"), meta)
    return root


@pytest.fixture
def tiny_bids(tmp_path):
    """Factory: ``tiny_bids(spec, **kw)`` -> path of a fresh tiny BIDS dataset."""
    counter = {"n": 0}

    def _make(spec: dict, **kwargs) -> Path:
        counter["n"] += 1
        return make_bids(tmp_path / f"bids{counter['n']}", spec, **kwargs)

    return _make


@pytest.fixture
def bids_two_subjects(tiny_bids) -> Path:
    """sub-01: T1w+T2w at 3 T; sub-02: T1w+FLAIR at 1.5 T."""
    return tiny_bids({"01": {"T1w": 3, "T2w": 3}, "02": {"T1w": 1.5, "FLAIR": 1.5}})


# --------------------------------------------------------------------------- headless browser
def check_report_in_chromium(path: Path, tmp_path: Path) -> list:
    """Open an HTML report in headless Chromium and assert it rendered cleanly.

    Every ``<img>`` must have loaded (non-zero natural width) and the console must hold no
    SEVERE entry. A full-page screenshot is saved as ``tmp_path/<report>.png`` (the CI artifact)
    with the image list beside it. Skips when selenium or chromedriver is missing (the browser
    tests are then reported as skipped, never as passed).

    Returns
    -------
    list
        ``[src, complete, naturalWidth]`` per image.
    """
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not Path(driver_path).exists():
        pytest.skip("chromedriver not installed (apt-get install chromium chromium-driver)")
    opts = Options()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(Path(path).absolute().as_uri())
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.src, i.complete, i.naturalWidth])")
        assert sizes, f"{path}: the report has no images"
        broken = [s for s in sizes if not s[1] or s[2] <= 0]
        assert not broken, broken
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(int(height), 16000))
        shot = tmp_path / f"{Path(path).stem}.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10000
        print(f"screenshot: {shot}")
        (tmp_path / f"{Path(path).stem}_images.json").write_text(json.dumps(sizes))
        return sizes
    finally:
        driver.quit()


# --------------------------------------------------------------------------- model folders
def baseline_model_dir(root: Path, *, contrasts=("T1w",), fields=(3.0,),
                       bad: dict[str, bytes] | None = None, sha256: str | None = None) -> Path:
    """A ``--model-dir`` whose ``default`` model for each of ``contrasts`` at each of ``fields``
    (field bins, T) is the baseline.

    For App runs that test something other than the network (schedulers, faults, bad input):
    the tissue-table baseline synthesises a volume in seconds, the U-Net in about a minute under
    CI load. ``bad`` replaces a contrast's baseline parameters (the registry's SHA-256 then
    matches the new file unless ``sha256`` is given, which then applies to every entry).
    """
    import hashlib
    import shutil

    from synth7t.registry import Registry

    folder = root / "models"
    folder.mkdir(parents=True)
    shipped, entries = Registry.load(), []
    for contrast in contrasts:
        for field in fields:
            e = shipped.get(contrast, field, name="baseline")
            data = (bad or {}).get(contrast, e.file.read_bytes())
            name, card = f"params_{contrast}_{field:g}T.json", f"card_{contrast}_{field:g}T.json"
            (folder / name).write_bytes(data)
            shutil.copy(e.card, folder / card)
            entries.append({"name": "default", "kind": "baseline", "contrast": e.contrast,
                            "field_bin": e.field_bin, "version": e.version + "-test",
                            "file": name, "sha256": sha256 or hashlib.sha256(data).hexdigest(),
                            "card": card})
    (folder / "registry.json").write_text(json.dumps({"schema": "synth7t-registry/1",
                                                      "models": entries}))
    return folder
