"""Waiting for Nipype's SLURMGraph jobs and collecting node failures.

Nipype's ``SLURMGraph`` plugin only *submits*: ``wf.run()`` returns ~0.1 s after ``sbatch`` has
queued one job per node (chained with ``--dependency=afterok``) and never reports a failure. The
run loop therefore calls, after ``wf.run()``::

    from bids_app.slurm import wait_for_slurm_jobs, collect_crashes
    states = wait_for_slurm_jobs(work_dir)          # blocks until our jobs left the queue
    crashes = collect_crashes(work_dir, crashdump_dir=log_dir)
    if crashes: print each line, exit 1

A job is "ours" when its batch script lies under ``work_dir`` (SLURMGraph writes
``<work_dir>/<workflow>/batch/batchscript_*.sh``). When a node fails, its dependants stay
``PENDING (DependencyNeverSatisfied)`` forever; they are cancelled and reported. The ``SLURM``
plugin (not Graph) polls by itself and ``wf.run()`` raises on failures as with MultiProc; these
helpers are harmless there too.

Needs ``squeue``/``scancel`` on ``PATH`` (the submitting host). No Nipype import.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

#: squeue states after which a job will not run any more.
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
FAILED = FINISHED - {"COMPLETED"}
STATE_FILE = "slurm_jobs.json"
_CRASH_RE = re.compile(
    r"^crash-\d{8}-\d{6}-(?P<login>[^-]+)-(?P<node>.+)-"
    r"(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.(pklz|txt)$")


def _squeue() -> list[dict]:
    """Every job the controller still knows (running, pending and recently finished)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r|%j|%o"],
                         capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        parts = line.split("|", 4)
        if len(parts) == 5:
            jobs.append(dict(zip(("id", "state", "reason", "name", "command"), parts)))
    return jobs


def slurm_jobs(work_dir: str | Path) -> list[dict]:
    """Jobs whose batch script lies under ``work_dir``."""
    root = str(Path(work_dir).resolve())
    return [j for j in _squeue()
            if j["command"].startswith(root + "/") or j["command"] == root]


def _node_of_script(script: str) -> str:
    """``.../batchscript_pyscript_<date>_<time>_<hierarchy>_<node>.sh`` -> ``<hierarchy>_<node>``."""
    name = Path(script).name
    m = re.match(r"^batchscript_pyscript_\d{8}_\d{6}_(?P<node>.+)\.sh$", name)
    return m["node"] if m else name


def wait_for_slurm_jobs(work_dir: str | Path, *, poll: float = 1.0,
                        timeout: float | None = None) -> dict[str, dict]:
    """Block until no job of ``work_dir`` is pending or running; return their final states.

    Dependants of a failed job (``DependencyNeverSatisfied``) are cancelled. The result maps job
    id to ``{"node", "state", "reason", "script"}`` and is also written to
    ``<work_dir>/slurm_jobs.json`` for :func:`collect_crashes`.

    Raises
    ------
    TimeoutError
        ``timeout`` seconds passed with jobs still queued (they are left alone).
    FileNotFoundError
        ``squeue`` is not installed.
    """
    start = time.monotonic()
    seen: dict[str, dict] = {}
    while True:
        active = 0
        for j in slurm_jobs(work_dir):
            rec = seen.setdefault(j["id"], {"node": _node_of_script(j["command"]),
                                            "script": j["command"]})
            rec["state"], rec["reason"] = j["state"], j["reason"]
            if j["state"] == "PENDING" and j["reason"] == "DependencyNeverSatisfied":
                subprocess.run(["scancel", j["id"]], capture_output=True)
                rec["state"], rec["reason"] = "CANCELLED", "a job it depends on failed"
            elif j["state"] not in FINISHED:
                active += 1
        if not active:
            break
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"{active} SLURM job(s) of {work_dir} still queued after "
                               f"{timeout:g} s")
        time.sleep(poll)
    try:
        (Path(work_dir) / STATE_FILE).write_text(json.dumps(seen, indent=1, sort_keys=True))
    except OSError:
        pass
    return seen


def _crash_files(folder: Path):
    if folder.is_dir():
        yield from sorted(folder.rglob("crash-*.pklz"))
        yield from sorted(folder.rglob("crash-*.txt"))


def collect_crashes(work_dir: str | Path, *, crashdump_dir: str | Path | None = None) -> list[str]:
    """One line per failed node: Nipype crash files plus SLURM jobs that ended badly.

    Looks at ``crash-*.pklz|txt`` under ``work_dir`` and ``crashdump_dir`` (where the App puts
    them, e.g. ``<output_dir>/logs``), ``crashdump_*.pklz`` in the batch folders (a node whose
    pickle could not even be loaded), and the job states saved by :func:`wait_for_slurm_jobs`
    (a job killed by SLURM, e.g. out of memory or time, leaves no crash file).
    """
    work_dir = Path(work_dir)
    lines: list[str] = []
    crashed_nodes: set[str] = set()
    seen_files: set[Path] = set()
    for folder in [work_dir] + ([Path(crashdump_dir)] if crashdump_dir else []):
        for f in _crash_files(folder):
            if f.resolve() in seen_files:
                continue
            seen_files.add(f.resolve())
            m = _CRASH_RE.match(f.name)
            node = m["node"] if m else f.stem
            crashed_nodes.add(node)
            lines.append(f"node {node} crashed (see {f})")
    for f in sorted(work_dir.rglob("crashdump_*.pklz")):
        lines.append(f"node of {f.name} could not be run (see {f})")
    state_file = work_dir / STATE_FILE
    if state_file.is_file():
        try:
            jobs = json.loads(state_file.read_text())
        except ValueError:
            jobs = {}
        for jid, rec in sorted(jobs.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
            if rec.get("state") not in FAILED:
                continue
            node = rec.get("node", "?")
            if any(node.endswith(n) or n.endswith(node) for n in crashed_nodes):
                continue  # already reported through its crash file
            err = Path(rec.get("script", "") + ".e")
            where = f" (stderr: {err})" if err.is_file() else ""
            lines.append(f"node {node}: SLURM job {jid} {rec['state']} "
                         f"({rec.get('reason', '')}){where}")
    return lines
