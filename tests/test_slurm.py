"""synth7t on a real SLURM scheduler (scripts/start_slurm.sh starts one on localhost; CI does).

* The helpers of :mod:`bids_app.slurm` on a tiny Nipype graph under ``SLURMGraph``: waiting,
  cancelling dependants of a failed node, naming it.
* The BIDS App on ``../shared/data/bids_3t`` sub-02 with ``--use-plugin`` SLURM and SLURMGraph
  gives the same synthetic images as MultiProc; a node that crashes inside its SLURM job makes
  the App exit 1 naming it (baseline parameters that pass the SHA-256 check but cannot be used);
  a wrong SHA-256 is refused before any job is submitted (exit 65).

Skipped only when ``sinfo`` is absent. ``sinfo`` present but no idle node is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_app

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sinfo") is None,
                       reason="no SLURM client (sinfo); start one with scripts/start_slurm.sh"),
]

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BIDS = DATA / "bids_3t"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def slurm_up():
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    states = out.stdout.split()
    assert out.returncode == 0 and any(s.rstrip("*") in ("idle", "mixed", "allocated")
                                       for s in states), (
        f"sinfo is installed but no usable node (rc {out.returncode}, states {states}, "
        f"{out.stderr.strip()}); run scripts/start_slurm.sh")


@pytest.fixture
def env(monkeypatch):
    # Nipype's SLURM plugin reads $LOGNAME (KeyError without it); batch jobs inherit the env.
    monkeypatch.setenv("LOGNAME", os.environ.get("LOGNAME") or "root")
    monkeypatch.setenv("NIPYPE_NO_ET", "1")
    return dict(os.environ)


# ----------------------------------------------------------------------------------------------
# bids_app.slurm on a tiny graph
# ----------------------------------------------------------------------------------------------
def _add_one(x):
    return x + 1


def _explode(x):
    raise RuntimeError(f"deliberate failure on {x}")


def _tiny_workflow(base_dir: Path, *, fail: bool):
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    wf = pe.Workflow(name="tiny", base_dir=str(base_dir))
    wf.config["execution"].update({"crashdump_dir": str(base_dir / "crash"),
                                   "poll_sleep_duration": 0.2, "crashfile_format": "txt"})
    a = pe.Node(Function(input_names=["x"], output_names=["y"], function=_add_one), name="step_a")
    a.inputs.x = 1
    b = pe.Node(Function(input_names=["x"], output_names=["y"],
                         function=_explode if fail else _add_one), name="step_b")
    c = pe.Node(Function(input_names=["x"], output_names=["y"], function=_add_one), name="step_c")
    wf.connect([(a, b, [("y", "x")]), (b, c, [("y", "x")])])
    return wf


def test_slurmgraph_helpers_wait_and_name_the_failed_node(tmp_path, env):
    from bids_app.slurm import collect_crashes, wait_for_slurm_jobs

    work = tmp_path / "work"
    wf = _tiny_workflow(work, fail=True)
    t0 = time.time()
    wf.run(plugin="SLURMGraph", plugin_args={"dont_resubmit_completed_jobs": False})
    states = wait_for_slurm_jobs(work, poll=0.5, timeout=300)
    assert len(states) == 3, states
    by_node = {rec["node"]: rec for rec in states.values()}
    failed = [r for r in by_node.values() if r["state"] == "FAILED"]
    assert len(failed) == 1 and failed[0]["node"].endswith("step_b")
    cancelled = [r for r in by_node.values() if r["state"] == "CANCELLED"]
    assert len(cancelled) == 1 and cancelled[0]["node"].endswith("step_c")
    lines = collect_crashes(work, crashdump_dir=work / "crash")
    text = "\n".join(lines)
    assert "step_b crashed" in text, text
    assert "step_c" in text and "depends on failed" in text, text
    assert "step_a" not in text
    assert time.time() - t0 < 300


def test_slurmgraph_helpers_clean_run(tmp_path, env):
    from bids_app.slurm import collect_crashes, wait_for_slurm_jobs

    work = tmp_path / "work"
    # Nipype 1.11 quirk: SLURMGraph without plugin_args raises AttributeError
    # (_dont_resubmit_completed_jobs is only set when plugin_args are given)
    _tiny_workflow(work, fail=False).run(plugin="SLURMGraph",
                                         plugin_args={"dont_resubmit_completed_jobs": False})
    states = wait_for_slurm_jobs(work, poll=0.5, timeout=300)
    assert [r["state"] for r in states.values()] == ["COMPLETED"] * 3
    assert collect_crashes(work, crashdump_dir=work / "crash") == []
    # the SLURM plugin (not Graph) polls by itself; the helpers see no job of ours left
    work2 = tmp_path / "work2"
    res = _tiny_workflow(work2, fail=False).run(plugin="SLURM",
                                                plugin_args={"sbatch_args": "--cpus-per-task=1"})
    out = {n.name: n.result.outputs.y for n in res.nodes()}
    assert out == {"step_a": 2, "step_b": 3, "step_c": 4}
    assert all(r["state"] == "COMPLETED" for r in wait_for_slurm_jobs(work2, timeout=60).values())


# ----------------------------------------------------------------------------------------------
# the BIDS App under SLURM
# ----------------------------------------------------------------------------------------------
def _app_available() -> bool:
    try:
        import bids_app.run  # noqa: F401
    except Exception:
        return False
    return shutil.which("synth7t", path=str(Path(sys.executable).parent)) is not None


needs_app = pytest.mark.skipif(not _app_available(),
                               reason="the synth7t BIDS App (bids_app.run) is not installed yet")

PLUGINS = {
    "SLURM": {"plugin": "SLURM", "plugin_args": {"sbatch_args": "--cpus-per-task=1"}},
    # dont_resubmit_completed_jobs must stay False: Nipype 1.11 judges a node "completed" when an
    # older result exists even if its inputs changed (Node.hash_exists -> is_cached's "updated"),
    # so a re-run with another model would copy the stale result. (It must be given at all:
    # SLURMGraph without plugin_args raises AttributeError.)
    "SLURMGraph": {"plugin": "SLURMGraph",
                   "plugin_args": {"sbatch_args": "--cpus-per-task=1",
                                   "dont_resubmit_completed_jobs": False}},
}


def _write_plugin(path: Path, spec: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def _run_app(out: Path, work: Path, plugin: str | None, *extra: str):
    """The App on sub-02 (``LOGNAME`` set: the SLURM plugins name the jobs' user with it)."""
    args = [BIDS, out, "participant", "--participant-label", "02", "-w", work, "--nprocs", "2",
            "--random-seed", "0", "--notrack", *extra]
    if plugin:
        args += ["--use-plugin", plugin]
    return run_app(args, REPO, env={"LOGNAME": os.environ.get("LOGNAME") or "root"})


def _synthetic(out: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    files = sorted(out.rglob("*desc-synth7T*.nii.gz"))
    return {str(f.relative_to(out)): np.asarray(nib.load(str(f)).dataobj, dtype=np.float32)
            for f in files}


def _reference_omp_nthreads(out: Path) -> int:
    """The --omp-nthreads the MultiProc reference run used (torch threads decide the last bits)."""
    infos = sorted((out / "logs" / "sub-02").glob("run-*.json"), key=lambda p: p.stat().st_mtime)
    assert infos, f"no run info of sub-02 under {out / 'logs'}"
    return int(json.loads(infos[0].read_text())["options"]["omp_nthreads"])


@pytest.fixture(scope="module")
def app_runs(tmp_path_factory, bids_3t_run):
    """The App on sub-02 under each SLURM plugin (module scope: each runs once).

    The MultiProc reference is the session's run of the documented command on bids_3t
    (conftest.bids_3t_run, default options, MultiProc), so it is not run a second time here.
    """
    if not _app_available():
        pytest.skip("the synth7t BIDS App (bids_app.run) is not installed yet")
    root = tmp_path_factory.mktemp("slurm_app")
    runs = {"MultiProc": dict(out=bids_3t_run.out, work=bids_3t_run.work, plugin=None,
                              proc=bids_3t_run.proc, seconds=bids_3t_run.proc.seconds)}
    omp = str(_reference_omp_nthreads(bids_3t_run.out)) if bids_3t_run.proc.returncode == 0 else "1"
    for name, spec in PLUGINS.items():
        plugin = _write_plugin(root / f"{name}.yml", spec)
        out, work = root / f"out_{name}", root / f"work_{name}"
        t0 = time.time()
        proc = _run_app(out, work, str(plugin), "--omp-nthreads", omp)
        runs[name] = dict(out=out, work=work, plugin=plugin, proc=proc,
                          seconds=time.time() - t0)
        print(f"{name}: exit {proc.returncode} in {runs[name]['seconds']:.0f} s")
    return runs


@needs_app
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_app_same_derivatives_as_multiproc(app_runs, plugin):
    ref, run = app_runs["MultiProc"], app_runs[plugin]
    for name, r in (("MultiProc", ref), (plugin, run)):
        assert r["proc"].returncode == 0, (
            f"{name} run failed:\n{r['proc'].stdout[-3000:]}\n{r['proc'].stderr[-3000:]}")
    a = {k: v for k, v in _synthetic(ref["out"]).items() if k.startswith("sub-02")}
    b = _synthetic(run["out"])
    assert a, "MultiProc run wrote no *desc-synth7T* image"
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        diff = float(np.max(np.abs(a[key] - b[key])))
        assert diff <= 1e-5, f"{key}: max |MultiProc - {plugin}| = {diff}"


def _model_dir(root: Path, *, contrast: str, params: bytes | None = None,
               sha256: str | None = None) -> Path:
    """A --model-dir whose ``default`` model for ``contrast`` at 3 T is the baseline.

    ``params`` replaces the baseline parameters (the registry's SHA-256 then matches the new
    file unless ``sha256`` is given).
    """
    import hashlib

    from synth7t.registry import Registry

    folder = root / f"models_{contrast}"
    folder.mkdir()
    e = Registry.load().get(contrast, 3.0, name="baseline")
    data = params if params is not None else e.file.read_bytes()
    (folder / "params.json").write_bytes(data)
    shutil.copy(e.card, folder / "card.json")
    entry = {"name": "default", "kind": "baseline", "contrast": e.contrast,
             "field_bin": e.field_bin, "version": e.version + "-test", "file": "params.json",
             "sha256": sha256 or hashlib.sha256(data).hexdigest(), "card": "card.json"}
    (folder / "registry.json").write_text(json.dumps({"schema": "synth7t-registry/1",
                                                      "models": [entry]}))
    return folder


@needs_app
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_app_failing_node_under_slurm_exits_nonzero_naming_it(app_runs, plugin, tmp_path):
    """The T1w synthesis node crashes inside its SLURM job (parameters that pass the SHA-256
    check but lack the tissue tables): the App exits 1 and names the node."""
    run = app_runs[plugin]
    bad = _model_dir(tmp_path, contrast="T1w", params=b'{"note": "no tissue tables"}\n')
    # reuse the plugin's work dir: preprocessing is cached, only synthesis runs (and T1w fails)
    proc = _run_app(tmp_path / "out", run["work"], str(run["plugin"]),
                    "--model-dir", str(bad))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    errors = "\n".join(line for line in text.splitlines() if "error" in line.lower())
    assert "synthesize_t1w" in errors, text[-3000:]
    assert "synthesize_t2w" not in errors and "synthesize_flair" not in errors, errors
    # no SLURM job of this run is left in the queue
    from bids_app.slurm import slurm_jobs

    assert not [j for j in slurm_jobs(run["work"]) if j["state"] in ("PENDING", "RUNNING")]


@needs_app
def test_app_wrong_sha256_refused_before_any_job(tmp_path):
    """A registry entry whose SHA-256 does not match is refused at graph-build time (exit 65):
    no job is submitted at all."""
    bad = _model_dir(tmp_path, contrast="T1w", sha256="0" * 64)
    spec = _write_plugin(tmp_path / "slurmgraph.yml", PLUGINS["SLURMGraph"])
    work = tmp_path / "work"
    proc = _run_app(tmp_path / "out", work, str(spec), "--model-dir", str(bad))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 65, text[-3000:]
    assert "SHA-256" in text, text[-3000:]
    from bids_app.slurm import slurm_jobs

    assert slurm_jobs(work) == []
