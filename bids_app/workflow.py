"""Graph stage of the participant level: models, plugin, the Nipype graph and what it left.

One function per step, each usable on its own: :func:`plugin_settings` (``--use-plugin``,
``--nprocs``), :func:`select_models` (pick and verify every model before anything runs),
:func:`run_graph` (build and run one graph for all participant/sessions, collect crashes),
:func:`expected_outputs` / :func:`participant_complete` / :func:`executed_nodes` (what a
participant's run left).
"""
from __future__ import annotations

import gc
import logging
import os
import re
import time
from pathlib import Path

from .console import error as _error
from .exitcodes import EX_DATAERR, EX_NOINPUT, EX_USAGE, Synth7tExit

LOGGER = logging.getLogger("synth7t")
#: Graph plugins only submit jobs: no status callback, no crash reporting by wf.run().
_GRAPH_PLUGINS = ("SLURMGraph", "SGEGraph", "PBSGraph", "LSFGraph", "CondorDAGMan", "DAGMan")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plugin_settings(opts) -> dict:
    """``{"plugin": name, "plugin_args": {...}}`` from --use-plugin or the defaults."""
    if opts.use_plugin:
        import yaml

        try:
            data = yaml.safe_load(Path(opts.use_plugin).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise Synth7tExit(EX_USAGE, f"--use-plugin {opts.use_plugin}: not a readable YAML "
                              f"file ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("plugin"), str):
            raise Synth7tExit(EX_USAGE, f"--use-plugin {opts.use_plugin}: expected "
                              "'plugin: <Nipype plugin name>' and optional 'plugin_args: {...}'")
        plugin = {"plugin": data["plugin"], "plugin_args": dict(data.get("plugin_args") or {})}
    else:
        plugin = {"plugin": "MultiProc", "plugin_args": {"raise_insufficient": False}}
    args = plugin["plugin_args"]
    if plugin["plugin"] in ("MultiProc", "LegacyMultiProc"):
        if opts.nprocs is None:
            opts.nprocs = int(args.get("n_procs", cpu_count()))
        args["n_procs"] = opts.nprocs
        if opts.memory_gb is not None:
            args["memory_gb"] = opts.memory_gb
        args.setdefault("raise_insufficient", False)
    elif opts.nprocs is None:
        opts.nprocs = cpu_count()
    if opts.omp_nthreads is None:
        opts.omp_nthreads = min(opts.nprocs, 8)
    if plugin["plugin"] in ("MultiProc", "LegacyMultiProc") and opts.omp_nthreads > opts.nprocs:
        LOGGER.warning("--omp-nthreads %d exceeds --nprocs %d; using %d", opts.omp_nthreads,
                       opts.nprocs, opts.nprocs)
        opts.omp_nthreads = opts.nprocs
    return plugin


def crash_summary(crashfile: Path) -> str:
    """The exception line of a Nipype text crash file."""
    try:
        lines = [ln.strip() for ln in crashfile.read_text(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return "(crash file unreadable)"
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line
    return lines[-1] if lines else "(empty crash file)"


class Progress:
    """Nipype ``status_callback``: per-participant and per-node progress on the console."""

    _QUIET = ("IdentityInterface", "Merge", "Function", "DerivativesDataSink", "SidecarMetadata")

    def __init__(self, wf_labels: dict[str, str], totals: dict[str, int], verbose: int):
        self.wf_labels = wf_labels  # subject workflow name -> "sub-01[_ses-x]"
        self.totals = totals
        self.verbose = verbose
        self.done: dict[str, int] = {k: 0 for k in totals}
        self.started: dict[str, float] = {}
        self.failed: dict[str, list[str]] = {}
        self.executed: dict[str, list[str]] = {}
        self.announced: set[str] = set()

    def label_of(self, fullname: str) -> str | None:
        for part in fullname.split("."):
            if part in self.wf_labels:
                return self.wf_labels[part]
        return None

    def __call__(self, node, status: str) -> None:
        name = node.fullname
        label = self.label_of(name) or "?"
        short = re.sub(r"^.*?sub_[A-Za-z0-9]+(_ses_[A-Za-z0-9]+)?_wf\.", "", name)
        if label not in self.announced:
            self.announced.add(label)
            LOGGER.info("%s: started (%d nodes)", label, self.totals.get(label, 0))
        if status == "start":
            self.started[name] = time.monotonic()
            self.executed.setdefault(label, []).append(short)
            return
        kind = type(node.interface).__name__
        if status == "exception":
            self.failed.setdefault(label, []).append(short)
            LOGGER.error("%s: node %s crashed", label, short)
            return
        if status != "end":
            return
        self.done[label] = self.done.get(label, 0) + 1
        total = self.totals.get(label, 0)
        t0 = self.started.pop(name, None)
        how = f"{time.monotonic() - t0:.1f} s" if t0 is not None else "cached"
        if self.verbose or kind not in self._QUIET:
            LOGGER.info("%s: [%*d/%d] %s (%s)", label, len(str(total)), self.done[label], total,
                        short, how)
        if total and self.done[label] == total:
            LOGGER.info("%s: all %d nodes finished", label, total)


def select_models(items, opts):
    """Pick the model of every input at build time and verify its file (SHA-256, format)."""
    from workflows.synthesis import ModelNotFoundError, select_model

    models: dict = {}
    errors: dict = {}
    if not any(not img.routing.passthrough for it in items for img in it.images.values()):
        return {(it.subject, it.session): {c: select_model(None, c, img.routing)
                                           for c, img in it.images.items()} for it in items}, {}
    from synth7t.registry import ModelIntegrityError, Registry, RegistryError, read_verified

    try:
        registry = Registry.load(opts.model_dir)
    except RegistryError as exc:
        missing = opts.model_dir is not None and not (Path(opts.model_dir) / "registry.json") \
            .is_file()
        raise Synth7tExit(EX_NOINPUT if missing else EX_DATAERR, str(exc)) from None
    verified: dict = {}
    for it in items:
        chosen = {}
        for c, img in it.images.items():
            try:
                choice = select_model(registry, c, img.routing)
            except ModelNotFoundError as exc:
                errors.setdefault((it.subject, it.session), []).append(
                    (EX_NOINPUT, f"{img.relpath}: {exc}"))
                continue
            if not choice.passthrough:
                entry = registry.get(c, img.routing.bin, name=choice.name)
                if entry.key not in verified:
                    try:
                        read_verified(entry)
                        verified[entry.key] = None
                    except ModelIntegrityError as exc:
                        verified[entry.key] = str(exc)
                if verified[entry.key]:
                    errors.setdefault((it.subject, it.session), []).append(
                        (EX_DATAERR, f"model for {c} at {img.routing.bin:g} T refused: "
                                     f"{verified[entry.key]}"))
                    continue
            chosen[c] = choice
        models[(it.subject, it.session)] = chosen
    return models, errors


def run_graph(items, models, opts, plugin, provenance, log_dir: Path, t_start: float):
    """Build and run the Nipype graph; return (progress, crashed nodes per subject, error)."""
    from nipype import config as ncfg

    from synth7t.preprocess import THREADS_ENV
    from workflows.base import init_synth7t_wf, subject_wf_name, workflow_name
    from workflows.interfaces import ANTS_NTHREADS

    # Nipype workers (and SLURM jobs) inherit this. ITK reads it once per process, so a worker
    # whose first ITK use is a resampling node must not be left multithreaded for a later
    # registration (not reproducible); the ANTs nodes themselves ask for ANTS_NTHREADS too.
    os.environ[THREADS_ENV] = str(ANTS_NTHREADS)
    ncfg.update_config({
        "execution": {
            "crashfile_format": "txt",
            "crashdump_dir": str(log_dir),
            "poll_sleep_duration": 0.05,
            "stop_on_first_crash": opts.stop_on_first_crash,
            "remove_unnecessary_outputs": False,
            "get_linked_libs": False,
            "check_version": False,
        },
        "monitoring": {"enabled": False},
    })
    t0 = time.monotonic()
    brain_extraction = getattr(opts, "brain_extraction", "deep")
    if brain_extraction == "deep" and opts.skull_strip != "skip":
        from synth7t.brain_extraction import EngineIntegrityError, verify_engine

        try:  # tampered or missing engine weights: refuse before any work
            verify_engine()
        except EngineIntegrityError as exc:
            raise Synth7tExit(EX_DATAERR, f"brain extraction refused: {exc}") from None
    wf = init_synth7t_wf(
        sessions=items, models=models, output_dir=opts.output_dir,
        skull_strip=opts.skull_strip, brain_extraction=brain_extraction,
        model_dir=opts.model_dir, device=opts.device,
        storage_dtype=opts.output_dtype, omp_nthreads=opts.omp_nthreads,
        seed=opts.random_seed, provenance=provenance,
        uncertainty=getattr(opts, "uncertainty", True), tta=getattr(opts, "tta", None),
        shrinkage=getattr(opts, "shrinkage", True),
        name=workflow_name())
    wf.base_dir = str(opts.work_dir)
    wf_labels = {}
    totals = {}
    for it in items:
        wname = subject_wf_name(it.subject, it.session)
        wf_labels[wname] = it.name
        sub_wf = wf.get_node(wname)
        crash_dir = str(log_dir / f"sub-{it.subject}")
        n = 0
        for node in sub_wf._get_all_nodes():
            node.config = {"execution": {"crashdump_dir": crash_dir}}
            if type(node.interface).__name__ != "IdentityInterface":
                n += 1
        totals[it.name] = n
    LOGGER.info("graph built in %.1f s: %s (work dir %s, plugin %s, %d procs, %d threads/node)",
                time.monotonic() - t0, ", ".join(it.name for it in items), opts.work_dir,
                plugin["plugin"], opts.nprocs, opts.omp_nthreads)

    progress = Progress(wf_labels, totals, opts.verbose_count)
    plugin_args = dict(plugin["plugin_args"])
    if plugin["plugin"] not in _GRAPH_PLUGINS:
        plugin_args["status_callback"] = progress
    run_error = None
    run_exc = None
    if plugin["plugin"] in ("MultiProc", "LegacyMultiProc") and any(
            m.provenance.get("Kind") == "unet" for per in models.values() for m in per.values()):
        # MultiProc forks its workers from this process: a network's nodes then find torch
        # imported instead of each importing it (~1.4 s a worker, in a node that holds every
        # slot); graph building itself no longer needs it
        import torch  # noqa: F401
    # MultiProc runs a full gc.collect() on every poll (every 50 ms) while a slot is free; over
    # the heap the CLI, pybids and the graph leave behind, that kept this process at ~80 % of a
    # core beside the nodes (sub-01: N4 27 s instead of 18 s). Frozen objects are never
    # scanned; what the run itself allocates is still collected.
    gc.freeze()
    try:
        wf.run(plugin=plugin["plugin"], plugin_args=plugin_args)
    except Exception as exc:  # noqa: BLE001 - Nipype raises RuntimeError after node crashes
        run_exc = exc
        LOGGER.debug("wf.run raised %r", exc)
    finally:
        gc.unfreeze()
    crashed: dict[str, list[str]] = {}
    if plugin["plugin"] == "SLURMGraph":
        # SLURMGraph only submits: wait for the jobs, then collect crash files and jobs that
        # SLURM itself ended (out of memory/time leave no crash file).
        try:
            from .slurm import collect_crashes, wait_for_slurm_jobs

            wait_for_slurm_jobs(opts.work_dir)
            for line in collect_crashes(opts.work_dir, crashdump_dir=log_dir):
                m = re.search(r"sub_([A-Za-z0-9]+)(?:_ses_[A-Za-z0-9]+)?_wf", line)
                subjects = [m[1]] if m else sorted({it.subject for it in items})
                for subject in subjects:
                    crashed.setdefault(subject, []).append(line)
        except Exception as exc:  # noqa: BLE001
            run_error = f"cannot follow the SLURM jobs: {type(exc).__name__}: {exc}"

    # crash files written during this run, per participant
    for it in items if plugin["plugin"] != "SLURMGraph" else []:
        folder = log_dir / f"sub-{it.subject}"
        for f in sorted(folder.glob("crash-*.txt")) if folder.is_dir() else []:
            if f.stat().st_mtime >= t_start - 1:
                line = f"{f.name}: {crash_summary(f)}"
                if line not in crashed.get(it.subject, []):
                    crashed.setdefault(it.subject, []).append(line)
    nipype_summary = re.search(r"did not execute cleanly|raised\. Re-raising first",
                               str(run_exc or ""))
    if run_exc is not None and (not nipype_summary or not (crashed or progress.failed)):
        # not Nipype's "some nodes crashed" summary: Nipype itself failed (e.g. no space left
        # on the device to write a crash file)
        run_error = f"the workflow stopped: {type(run_exc).__name__}: {run_exc}"
    for label, nodes in progress.failed.items():
        subject = label.split("_")[0][4:]
        if subject and not crashed.get(subject):
            crashed.setdefault(subject, []).extend(f"node {n} crashed" for n in nodes)
    if run_error:
        for it in items:
            if not participant_complete(it, opts.output_dir):
                crashed.setdefault(it.subject, []).append(run_error)
    for subject, lines in crashed.items():
        for line in lines:
            if line != run_error:  # printed once by the caller
                _error(f"sub-{subject}: {line} (crash files in {log_dir / f'sub-{subject}'})")
    return progress, crashed, run_error


def expected_outputs(item) -> dict[str, dict[str, str]]:
    """Derivative paths (relative to the output folder) per contrast, for run info/report."""
    from synth7t.reference import REF_SPACE

    from workflows.outputs import deriv_relpath, xfm_entities
    from workflows.reportlets import MOSAICS, template_brain_mask

    anchor = item.contrasts[0]
    a_rel = item.images[anchor].relpath
    out = {}
    for c in item.contrasts:
        rel = item.images[c].relpath
        d = {
            "preproc": deriv_relpath(rel, desc="preproc"),
            "mask": (deriv_relpath(rel, desc="brain", suffix="mask") if c == anchor else
                     deriv_relpath(rel, space=c, desc="brain", suffix="mask")),
            "ref_preproc": deriv_relpath(rel, space=REF_SPACE, desc="preproc"),
            "ref_mask": deriv_relpath(a_rel, space=REF_SPACE, desc="brain", suffix="mask"),
            "synth": deriv_relpath(rel, space=REF_SPACE, desc="synth7T"),
            "synth_native": deriv_relpath(rel, desc="synth7T"),
            "xfm": deriv_relpath(a_rel, **xfm_entities(anchor, REF_SPACE, ".h5")),
            "xfm_inverse": deriv_relpath(a_rel, **xfm_entities(REF_SPACE, anchor, ".h5")),
            # reportlets drawn by the graph (workflows.reportlets); the report links them
            "report_brain": deriv_relpath(rel, datatype="figures", desc="brain",
                                          extension=".png"),
        }
        for _, name in MOSAICS:
            d[f"report_{name}"] = deriv_relpath(rel, datatype="figures", desc=f"synth7T{name}",
                                                extension=".png")
        if template_brain_mask():
            d["report_reg"] = deriv_relpath(rel, datatype="figures", space=REF_SPACE, desc="reg",
                                            extension=".png")
        if c != anchor:
            d["xfm_to_anchor"] = deriv_relpath(rel, **xfm_entities(c, anchor, ".txt"))
            d["xfm_from_anchor"] = deriv_relpath(rel, **xfm_entities(anchor, c, ".txt"))
        out[c] = d
    return out


def participant_complete(item, output_dir: Path) -> bool:
    try:
        return all((Path(output_dir) / p).is_file()
                   for d in expected_outputs(item).values() for p in d.values())
    except Exception:  # noqa: BLE001
        return False


def executed_nodes(work_dir: Path, item, since: float) -> list[str]:
    """Nodes of ``item`` whose result file was (re)written by this run (i.e. not cached)."""
    from workflows.base import subject_wf_name, workflow_name

    root = Path(work_dir) / workflow_name() / subject_wf_name(item.subject, item.session)
    out = []
    for f in sorted(root.rglob("result_*.pklz")) if root.is_dir() else []:
        try:
            if f.stat().st_mtime >= since:
                out.append(f.parent.relative_to(root).as_posix())
        except OSError:
            continue
    return out
