"""synth7t on a real SLURM scheduler (scripts/start_slurm.sh starts one on localhost; CI does).

* The helpers of :mod:`bids_app.slurm` on a tiny Nipype graph under ``SLURMGraph``: waiting,
  cancelling dependants of a failed node, naming it.
* The BIDS App on ``../shared/data/bids_3t`` sub-02 (T1w and FLAIR) with ``--use-plugin`` SLURM and
  SLURMGraph:
  the scheduler ran the nodes (the controller's job list, polled during the run, holds one job
  per submitted node, every one COMPLETED; each node's Nipype result was made inside the SLURM
  job it names in ``SLURM_JOB_ID``), and every derivative equals that of a MultiProc run with the
  same options (images and sidecars, ITK transforms within a tolerance; the tissue-table
  baseline models and no uncertainty maps keep the three runs short: the scheduler is under
  test here, the U-Net under MultiProc in tests/test_e2e.py); a node that crashes inside its
  SLURM job makes the App exit 1 naming it, and the crash is proven to have happened in a SLURM
  job (not in a silent MultiProc fallback); a wrong SHA-256 is refused before any job is
  submitted (exit 65).

Skipped only when ``sinfo`` is absent. ``sinfo`` present but no idle node is a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import baseline_model_dir, run_app

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


class JobWatcher(threading.Thread):
    """Polls the controller (``squeue -t all``, every ``every`` s) for the jobs whose batch script
    lies under ``work``; ``jobs`` maps job id to its last seen record (state, script).

    Polling during the run matters: this SLURM keeps no accounting (no ``sacct``) and forgets a
    finished job after MinJobAge (300 s), so a long run's first jobs are gone by its end.
    """

    def __init__(self, work: Path, every: float = 1.0):
        super().__init__(daemon=True)
        self.work, self.every = work, every
        self.jobs: dict[str, dict] = {}
        self.halt = threading.Event()

    def poll(self) -> None:
        from bids_app.slurm import slurm_jobs

        try:
            for j in slurm_jobs(self.work):
                self.jobs[j["id"]] = j
        except (OSError, subprocess.CalledProcessError):
            pass

    def run(self):
        while not self.halt.is_set():
            self.poll()
            self.halt.wait(self.every)

    def finish(self) -> dict[str, dict]:
        self.halt.set()
        self.join()
        self.poll()
        return self.jobs


def _run_app(out: Path, work: Path, plugin: str | None, *extra: str):
    """The App on sub-02 (``LOGNAME`` set: the SLURM plugins name the jobs' user with it).

    With a plugin, the SLURM jobs seen during the run are attached as ``proc.jobs``.
    """
    args = [BIDS, out, "participant", "--participant-label", "02", "-w", work, "--nprocs", "2",
            "--random-seed", "0", "--notrack", *extra]
    if plugin:
        args += ["--use-plugin", plugin]
    from bids_app.slurm import slurm_jobs

    # a reused work dir: the controller still lists an earlier run's jobs for up to MinJobAge
    earlier = {j["id"] for j in slurm_jobs(work)} if work.is_dir() else set()
    watcher = JobWatcher(work)
    watcher.start()
    try:
        proc = run_app(args, REPO, env={"LOGNAME": os.environ.get("LOGNAME") or "root"})
    finally:
        jobs = watcher.finish()
    proc.jobs = {i: j for i, j in jobs.items() if i not in earlier}
    return proc


def _node_runs(work: Path, since: float) -> list[dict]:
    """Every Nipype node of ``work`` that ran after ``since`` (POSIX s): its path, whether it is
    ``run_without_submitting`` (the SLURM plugin runs those in the App's own process) and the
    ``SLURM_JOB_ID`` of the environment it ran in (``None``: not inside a SLURM job)."""
    from nipype.utils.filemanip import loadpkl

    runs = []
    for res_file in sorted(work.rglob("result_*.pklz")):
        if res_file.stat().st_mtime < since or "batch" in res_file.parts:
            continue
        result = loadpkl(res_file)
        rts = result.runtime if isinstance(result.runtime, list) else [result.runtime]
        job_ids = {(getattr(rt, "environ", None) or {}).get("SLURM_JOB_ID") for rt in rts}
        node_file = res_file.parent / "_node.pklz"
        local = bool(getattr(loadpkl(node_file), "run_without_submitting", False)) \
            if node_file.is_file() else False
        runs.append({"node": res_file.parent.relative_to(work).as_posix(), "local": local,
                     "jobs": job_ids})
    return runs


def assert_ran_on_slurm(run: dict, plugin: str) -> None:
    """The nodes of ``run`` ran as SLURM jobs, not in a MultiProc fallback."""
    jobs, runs = run["proc"].jobs, _node_runs(run["work"], run["started"])
    assert jobs, f"{plugin}: the controller never listed a job of {run['work']}"
    states = {j["state"] for j in jobs.values()}
    assert states == {"COMPLETED"}, f"{plugin}: job states {states}"
    submitted = [r for r in runs if not r["local"] or plugin == "SLURMGraph"]
    assert submitted, f"{plugin}: no node ran"
    outside = [r["node"] for r in submitted if None in r["jobs"]]
    assert not outside, f"{plugin}: {len(outside)} node(s) did not run in a SLURM job: {outside}"
    unknown = [(r["node"], r["jobs"]) for r in submitted if not r["jobs"] <= set(jobs)]
    assert not unknown, f"{plugin}: nodes ran in jobs the controller did not list: {unknown}"
    ids = [next(iter(r["jobs"])) for r in submitted if len(r["jobs"]) == 1]
    assert len(set(ids)) == len(ids), f"{plugin}: several nodes in one job"
    for must in ("/n4", "synthesize_t1w", "synthesize_flair", "flair_to_t1w"):
        assert any(must in r["node"] for r in submitted), f"{plugin}: no {must} node ran on SLURM"
    # SLURM wrote each job's output file next to the batch scripts under the work dir
    outputs = {m[1] for f in run["work"].rglob("batch/*")
               if (m := re.search(r"slurm-(\d+)\.out$", f.name))}
    scripts = list(run["work"].rglob("batch/batchscript_*.sh"))
    assert len(scripts) >= len(submitted), (len(scripts), len(submitted))
    if plugin == "SLURM":
        assert set(ids) <= outputs, f"jobs without a slurm-<id>.out: {sorted(set(ids) - outputs)}"


#: Options of every App run here. The scheduler, not the network, is under test: the tissue-table
#: baseline (``--model-dir``, :func:`conftest.baseline_model_dir`) synthesises in seconds where
#: the U-Net takes a minute per contrast, and the U-Net's outputs under MultiProc are checked by
#: tests/test_e2e.py. One ITK/torch thread per node, as in the plugins' ``--cpus-per-task=1``.
#: Two of sub-02's three contrasts: the T1w anchor and a second branch (FLAIR: rigid registration
#: to the T1w, its own N4 and synthesis) give the graph every kind of node at two thirds of the
#: CI time.
CONTRASTS = ("T1w", "FLAIR")
APP_OPTIONS = ("--no-uncertainty", "--omp-nthreads", "1", "--contrasts", *CONTRASTS)


@pytest.fixture(scope="module")
def baseline_models(tmp_path_factory) -> Path:
    """A --model-dir whose ``default`` for T1w and FLAIR at 3 T is the baseline."""
    return baseline_model_dir(tmp_path_factory.mktemp("models"), contrasts=CONTRASTS)


@pytest.fixture(scope="module")
def app_runs(tmp_path_factory, baseline_models):
    """The App on sub-02 under MultiProc (the reference) and each SLURM plugin, with the same
    options (module scope: each runs once)."""
    if not _app_available():
        pytest.skip("the synth7t BIDS App (bids_app.run) is not installed yet")
    root = tmp_path_factory.mktemp("slurm_app")
    runs = {}
    for name, spec in {"MultiProc": None, **PLUGINS}.items():
        plugin = _write_plugin(root / f"{name}.yml", spec) if spec else None
        out, work = root / f"out_{name}", root / f"work_{name}"
        t0 = time.time()
        proc = _run_app(out, work, str(plugin) if plugin else None, *APP_OPTIONS,
                        "--model-dir", str(baseline_models))
        runs[name] = dict(out=out, work=work, plugin=plugin, proc=proc, started=t0,
                          seconds=time.time() - t0)
        print(f"{name}: exit {proc.returncode} in {runs[name]['seconds']:.0f} s")
    return runs


def _assert_ok(name: str, r: dict) -> None:
    assert r["proc"].returncode == 0, (
        f"{name} run failed:\n{r['proc'].stdout[-3000:]}\n{r['proc'].stderr[-3000:]}")


@needs_app
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_app_nodes_ran_as_slurm_jobs(app_runs, plugin):
    run = app_runs[plugin]
    _assert_ok(plugin, run)
    assert_ran_on_slurm(run, plugin)


#: Sidecar keys that legitimately differ between two runs of the same data (the command line
#: names the plugin file; times).
VOLATILE_KEYS = re.compile(r"^(CommandLine|.*(Time|Date).*)$")
#: ITK transform parameters may differ in the last bits between processes.
XFM_TOL = dict(rtol=1e-6, atol=1e-6)


def _sidecar(path: Path) -> dict:
    def clean(node):
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if not VOLATILE_KEYS.match(k)}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node
    return clean(json.loads(path.read_text()))


def _itk_txt(path: Path) -> dict[str, object]:
    """``{key: value}`` of an ITK text transform, numbers as float arrays."""
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if not sep or key.startswith("#"):
            continue
        try:
            out[key.strip()] = np.array([float(v) for v in value.split()])
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def _h5_items(path: Path) -> dict[str, object]:
    import h5py

    items = {}
    with h5py.File(path, "r") as fh:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                if isinstance(data, np.ndarray) and data.dtype.kind not in "fiu":
                    data = data.tolist()  # strings (e.g. ITK's TransformType): by value
                items[name] = data
        fh.visititems(visit)
    return items


def compare_derivatives(a: Path, b: Path, label: str, name: str) -> list[str]:
    """Every derivative file of sub-<label> in ``a`` and ``b``; returns the files compared."""
    import nibabel as nib

    da, db = a / f"sub-{label}", b / f"sub-{label}"
    fa = sorted(p.relative_to(a).as_posix() for p in da.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in db.rglob("*") if p.is_file())
    assert fa == fb, f"{name}: different files:\nonly MultiProc {sorted(set(fa) - set(fb))}\n" \
        f"only {name} {sorted(set(fb) - set(fa))}"
    assert (a / f"sub-{label}.html").is_file() and (b / f"sub-{label}.html").is_file()
    for rel in fa:
        pa, pb = a / rel, b / rel
        if rel.endswith((".nii.gz", ".nii")):
            ia, ib = nib.load(pa), nib.load(pb)
            assert ia.shape == ib.shape and ia.get_data_dtype() == ib.get_data_dtype(), rel
            assert np.allclose(ia.affine, ib.affine, atol=1e-6), rel
            xa = ia.get_fdata(dtype=np.float32)
            xb = ib.get_fdata(dtype=np.float32)
            diff = float(np.max(np.abs(xa - xb)))
            assert diff <= 1e-5 * max(1.0, float(np.abs(xa).max())), \
                f"{rel}: max |MultiProc - {name}| = {diff}"
        elif rel.endswith(".json"):
            assert _sidecar(pa) == _sidecar(pb), f"{rel}: sidecars differ"
        elif rel.endswith("_xfm.txt"):
            ta, tb = _itk_txt(pa), _itk_txt(pb)
            assert ta.keys() == tb.keys(), rel
            for k in ta:
                if isinstance(ta[k], np.ndarray):
                    assert ta[k].shape == tb[k].shape and np.allclose(ta[k], tb[k], **XFM_TOL), \
                        f"{rel} {k}: {ta[k]} vs {tb[k]}"
                else:
                    assert ta[k] == tb[k], (rel, k)
        elif rel.endswith(".h5"):
            ha, hb = _h5_items(pa), _h5_items(pb)
            assert ha.keys() == hb.keys(), rel
            for k in ha:
                if isinstance(ha[k], np.ndarray):
                    assert ha[k].shape == hb[k].shape and np.allclose(ha[k], hb[k], **XFM_TOL), \
                        f"{rel} {k}"
                else:
                    assert ha[k] == hb[k], (rel, k)
        else:  # report figures: present in both (compared by name above), not empty
            assert pa.stat().st_size > 0 and pb.stat().st_size > 0, rel
    return fa


@needs_app
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_app_same_derivatives_as_multiproc(app_runs, plugin):
    """Every derivative of sub-02: images (<= 1e-5 of their range), sidecars (equal but for the
    command line and times), ITK transforms (.txt and .h5, 1e-6)."""
    ref, run = app_runs["MultiProc"], app_runs[plugin]
    for name, r in (("MultiProc", ref), (plugin, run)):
        _assert_ok(name, r)
    files = compare_derivatives(ref["out"], run["out"], "02", plugin)
    kinds = {k: [f for f in files if f.endswith(k)] for k in (".nii.gz", ".json", ".txt", ".h5")}
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
    # a synthetic image per contrast, in the reference space and in the native one
    assert len([f for f in kinds[".nii.gz"] if "desc-synth7T" in f]) == 2 * len(CONTRASTS)


@needs_app
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_app_failing_node_under_slurm_exits_nonzero_naming_it(app_runs, plugin, tmp_path):
    """The T1w synthesis node crashes inside its SLURM job (parameters that pass the SHA-256
    check but lack the tissue tables): the App exits 1 and names the node."""
    run = app_runs[plugin]
    bad = baseline_model_dir(tmp_path, contrasts=CONTRASTS,
                     bad={"T1w": b'{"note": "no tissue tables"}\n'})
    # reuse the plugin's work dir: preprocessing is cached, only synthesis runs (and T1w fails)
    proc = _run_app(tmp_path / "out", run["work"], str(run["plugin"]), *APP_OPTIONS,
                    "--model-dir", str(bad))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    errors = "\n".join(line for line in text.splitlines() if "error" in line.lower())
    assert "synthesize_t1w" in errors, text[-3000:]
    assert "synthesize_flair" not in errors, errors
    # ... and it crashed inside a SLURM job (a silent MultiProc fallback submits nothing): the
    # controller listed a job for the node, and that job's own output (written by SLURM) holds
    # the node's failure. SLURMGraph jobs exit non-zero (FAILED); the SLURM plugin's job script
    # stores the exception in the result file for the App and exits 0.
    t1w_jobs = {i: j for i, j in proc.jobs.items() if "synthesize_t1w" in j["command"]}
    assert t1w_jobs, (f"no SLURM job ran synthesize_t1w ({len(proc.jobs)} jobs seen: "
                      f"{sorted(j['command'].rsplit('/', 1)[-1] for j in proc.jobs.values())})")
    states = {j["state"] for j in t1w_jobs.values()}
    assert states <= ({"FAILED"} if plugin == "SLURMGraph" else {"FAILED", "COMPLETED"}), states
    logs = "".join(_job_output(i, j) for i, j in t1w_jobs.items())
    # a traceback, or Nipype's own line for a node that failed inside this job (the SLURM
    # plugin's job script sometimes stores the exception without printing it)
    assert re.search(r'Traceback|[A-Za-z]+Error|\[Node\] Error on "[^"]*synthesize_t1w"', logs), \
        f"the synthesize_t1w job's SLURM output shows no failure:\n{logs[-2000:]}"
    assert [j for j in proc.jobs.values() if "synthesize_flair" in j["command"]
            and j["state"] == "COMPLETED"], "synthesize_flair did not run as a SLURM job"
    # no SLURM job of this run is left in the queue
    from bids_app.slurm import slurm_jobs

    assert not [j for j in slurm_jobs(run["work"]) if j["state"] in ("PENDING", "RUNNING")]


def _job_output(job_id: str, job: dict) -> str:
    """What SLURM wrote for a job: ``slurm-<id>.out`` (SLURM plugin) or ``<script>.o/.e``
    (SLURMGraph), next to its batch script."""
    script = Path(job["command"])
    text = ""
    for f in (script.parent / f"slurm-{job_id}.out", Path(f"{script}.o"), Path(f"{script}.e")):
        if f.is_file():
            text += f.read_text(errors="replace")
    return text


@needs_app
def test_app_wrong_sha256_refused_before_any_job(tmp_path):
    """A registry entry whose SHA-256 does not match is refused at graph-build time (exit 65):
    no job is submitted at all."""
    bad = baseline_model_dir(tmp_path, sha256="0" * 64)
    spec = _write_plugin(tmp_path / "slurmgraph.yml", PLUGINS["SLURMGraph"])
    work = tmp_path / "work"
    proc = _run_app(tmp_path / "out", work, str(spec), "--model-dir", str(bad))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 65, text[-3000:]
    assert "SHA-256" in text, text[-3000:]
    from bids_app.slurm import slurm_jobs

    assert slurm_jobs(work) == []
