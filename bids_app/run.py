"""The ``synth7t`` BIDS App: ``synth7t bids_dir output_dir participant [options]``.

Order of work: parse the command line (64/17) -> check the dataset and participant labels
(66/16/18) -> validate with bids-validator-deno (16) -> create the output and work folders (73)
-> query pybids, route field strengths, open every image, pick and verify the models (per
participant: 65/66; the others still run) -> write dataset_description.json, .bidsignore and the
TOML run config -> build and run one Nipype graph for all participants -> per participant: run
info, HTML report -> exit code (1 if a node crashed, else the first data error, else 0).
"""
from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

import datetime as _dt  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from .exitcodes import (  # noqa: E402
    EX_BIDS_INVALID,
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NO_MATCH,
    EX_NODE_CRASHED,
    EX_NOINPUT,
    EX_OK,
    EX_USAGE,
    Synth7tExit,
)

LOGGER = logging.getLogger("synth7t")
#: Graph plugins only submit jobs: no status callback, no crash reporting by wf.run().
_GRAPH_PLUGINS = ("SLURMGraph", "SGEGraph", "PBSGraph", "LSFGraph", "CondorDAGMan", "DAGMan")


# --------------------------------------------------------------------------- logging
class _Formatter(logging.Formatter):
    def format(self, record):
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return f"{stamp} | {level}{record.getMessage()}"


def _setup_logging(verbose: int) -> None:
    """Quiet by default: our progress lines and Nipype warnings; more with each ``-v``."""
    from nipype import config as ncfg
    from nipype import logging as nlogging

    LOGGER.setLevel(logging.DEBUG)
    LOGGER.propagate = False
    if not any(getattr(h, "_synth7t_console", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._synth7t_console = True
        handler.setFormatter(_Formatter())
        LOGGER.addHandler(handler)
    for h in LOGGER.handlers:
        if getattr(h, "_synth7t_console", False):
            h.stream = sys.stderr  # the current stderr (tests replace it)
            h.setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
    # Interface warnings (e.g. conform's header repairs) are summarised by the App after the
    # run; Nipype prints them itself from -v on.
    wf_level = "DEBUG" if verbose >= 3 else "INFO" if verbose >= 1 else "WARNING"
    other = ("DEBUG" if verbose >= 3 else "INFO" if verbose >= 2 else "WARNING" if verbose
             else "ERROR")
    ncfg.update_config({"logging": {"workflow_level": wf_level, "interface_level": other,
                                    "utils_level": other}})
    nlogging.update_logging(ncfg)


def _add_file_log(log_dir: Path, run_uuid: str) -> Path:
    path = log_dir / f"synth7t-{run_uuid}.log"
    handler = logging.FileHandler(path, delay=True)
    handler._synth7t_file = True
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOGGER.addHandler(handler)
    return path


def _error(message: str) -> None:
    prefix = "" if message.startswith(("synth7t: error:", "usage:")) else "synth7t: error: "
    print(prefix + message, file=sys.stderr, flush=True)
    record = LOGGER.makeRecord(LOGGER.name, logging.ERROR, __file__, 0, message, None, None)
    for h in LOGGER.handlers:
        if getattr(h, "_synth7t_file", False):
            h.handle(record)


# --------------------------------------------------------------------------- helpers
def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _plugin_settings(opts) -> dict:
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
            opts.nprocs = int(args.get("n_procs", _cpu_count()))
        args["n_procs"] = opts.nprocs
        if opts.memory_gb is not None:
            args["memory_gb"] = opts.memory_gb
        args.setdefault("raise_insufficient", False)
    elif opts.nprocs is None:
        opts.nprocs = _cpu_count()
    if opts.omp_nthreads is None:
        opts.omp_nthreads = min(opts.nprocs, 8)
    if plugin["plugin"] in ("MultiProc", "LegacyMultiProc") and opts.omp_nthreads > opts.nprocs:
        LOGGER.warning("--omp-nthreads %d exceeds --nprocs %d; using %d", opts.omp_nthreads,
                       opts.nprocs, opts.nprocs)
        opts.omp_nthreads = opts.nprocs
    return plugin


def normalised_command(argv: list[str], opts) -> str:
    """The command line for sidecars, with the dataset/output/work paths as placeholders.

    Sidecars then depend only on what shapes the results, never on where the run happened
    (the real paths are in the run config and ``DatasetLinks``).
    """
    places = {}
    for name, path in (("<bids_dir>", opts.bids_dir), ("<output_dir>", opts.output_dir),
                       ("<work_dir>", opts.work_dir)):
        places[str(Path(path))] = name
        places[str(Path(path).resolve())] = name

    def _sub(token: str) -> str:
        key, eq, val = token.partition("=")
        if eq and key.startswith("-"):
            return f"{key}={_sub(val)}"
        try:
            p = str(Path(token).expanduser().absolute())
        except (OSError, ValueError):
            return token
        return places.get(p, places.get(str(Path(p).resolve()), token)) if token else token

    return " ".join(["synth7t", *[_sub(t) for t in argv]])


def _crash_summary(crashfile: Path) -> str:
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


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``synth7t`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except Synth7tExit as exc:
        _error(exc.message)
        LOGGER.debug("exit %d: %s", exc.code, exc.message)
        return exc.code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    finally:
        for h in [h for h in LOGGER.handlers if getattr(h, "_synth7t_file", False)]:
            LOGGER.removeHandler(h)
            h.close()


def _main(argv: list[str]) -> int:
    from .parser import parse_args

    t_start = time.time()
    start_iso = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    opts = parse_args(argv)
    _setup_logging(opts.verbose_count)
    run_uuid = f"{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4()}"

    from synth7t.reference import setup_templateflow

    tf_home = setup_templateflow()

    from .derivatives import ensure_output_dir, software_versions, write_dataset_description
    from .query import check_images, check_participants, collect_inputs, init_layout

    bids_dir = opts.bids_dir
    if not bids_dir.is_dir():
        raise Synth7tExit(EX_NOINPUT, f"the BIDS dataset {bids_dir} does not exist")
    participants = check_participants(bids_dir, opts.participant_label)
    if opts.skip_bids_validation:
        if not (bids_dir / "dataset_description.json").is_file():
            raise Synth7tExit(EX_BIDS_INVALID, f"{bids_dir} is not a BIDS dataset: "
                              "dataset_description.json is missing")
    else:
        from .validation import validate_dataset

        t0 = time.monotonic()
        warn_codes = validate_dataset(bids_dir, opts.participant_label)
        LOGGER.info("BIDS validation passed in %.1f s%s", time.monotonic() - t0,
                    f" (warnings: {', '.join(warn_codes)})" if warn_codes else "")

    ensure_output_dir(opts.output_dir, bids_dir, opts.work_dir)
    log_dir = opts.output_dir / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Synth7tExit(EX_CANTCREAT, f"cannot create {log_dir}: {exc.strerror or exc}") \
            from None
    log_file = _add_file_log(log_dir, run_uuid)
    plugin = _plugin_settings(opts)
    LOGGER.debug("synth7t %s", " ".join(argv))

    # ---- inputs
    try:
        layout = init_layout(bids_dir, participants)
    except Exception as exc:  # noqa: BLE001 - pybids raises various errors on broken datasets
        raise Synth7tExit(EX_BIDS_INVALID, f"pybids cannot index {bids_dir}: {exc}") from None
    items, errors = collect_inputs(
        layout, participants, sessions=opts.session_label, contrasts=opts.contrasts,
        bids_filters=opts.bids_filters, field_strength=opts.field_strength)
    bad = check_images(items)
    for name, errs in bad.items():
        errors.setdefault(name.split("_")[0][4:], []).extend(errs)
    items = [it for it in items if it.name not in bad]

    models, model_errors = _select_models(items, opts)
    for (subject, session), errs in model_errors.items():
        errors.setdefault(subject, []).extend(errs)
    items = [it for it in items if (it.subject, it.session) not in model_errors]

    for subject, errs in sorted(errors.items()):
        for code, msg in errs:
            _error(f"sub-{subject}: {msg}")

    # ---- derivatives dataset
    try:
        write_dataset_description(opts.output_dir, bids_dir, templateflow_home=tf_home)
        from .config import build_config, write_config

        config_file = write_config(
            build_config(opts, run_uuid=run_uuid, argv=["synth7t", *argv], plugin=plugin,
                         templateflow_home=str(tf_home)), log_dir, run_uuid)
    except OSError as exc:
        raise Synth7tExit(EX_CANTCREAT, f"cannot write into {opts.output_dir}: "
                          f"{exc.strerror or exc}") from None

    provenance = {
        "ProcessingSoftwareVersions": software_versions(),
        "CommandLine": normalised_command(argv, opts),
        "RandomSeed": opts.random_seed,
    }
    run_common = {
        "bids_dir": str(bids_dir), "output_dir": str(opts.output_dir),
        "work_dir": str(opts.work_dir), "command": ["synth7t", *argv],
        "options": {"random_seed": opts.random_seed, "nprocs": opts.nprocs,
                    "omp_nthreads": opts.omp_nthreads, "skull_strip": opts.skull_strip,
                    "contrasts": " ".join(opts.contrasts), "device": opts.device,
                    "output_dtype": opts.output_dtype,
                    "field_strength": opts.field_strength, "plugin": plugin["plugin"]},
        "versions": provenance["ProcessingSoftwareVersions"],
        "reference": {"space": "MRIxFields"},
        "config_file": str(config_file), "log_file": str(log_file), "run_uuid": run_uuid,
        "start_time": start_iso,
    }

    crashed: dict[str, list[str]] = {}
    progress = None
    if items:
        progress, crashed, run_error = _run_graph(items, models, opts, plugin, provenance,
                                                  log_dir, t_start)
        if run_error:
            _error(run_error)
    else:
        LOGGER.info("nothing to run")

    # ---- per participant: run info, report
    end_iso = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    subjects = sorted({it.subject for it in items} | set(errors), key=str)
    for subject in subjects:
        sub_items = [it for it in items if it.subject == subject]
        info = _run_info(subject, sub_items, models, errors.get(subject, []),
                         crashed, progress, opts, run_common, end_iso, t_start)
        try:
            from synth7t.io import atomic_write_json

            (log_dir / f"sub-{subject}").mkdir(parents=True, exist_ok=True)
            atomic_write_json(info, log_dir / f"sub-{subject}" / f"run-{run_uuid}.json")
        except OSError as exc:
            LOGGER.warning("sub-%s: cannot write the run info: %s", subject, exc)
        _report(opts.output_dir, subject, info)

    # ---- exit code
    n_crashed = sum(1 for s in subjects if crashed.get(s))
    if n_crashed:
        code = EX_NODE_CRASHED
    elif errors:
        codes = [c for errs in errors.values() for c, _ in errs]
        code = next(c for c in (EX_DATAERR, EX_NOINPUT, EX_NO_MATCH) if c in codes) \
            if any(c in codes for c in (EX_DATAERR, EX_NOINPUT, EX_NO_MATCH)) else codes[0]
    else:
        code = EX_OK
    ok = [s for s in subjects if not crashed.get(s) and s not in errors]
    LOGGER.info("finished in %s: %d participant(s) ok%s%s; derivatives in %s (exit %d)",
                _fmt_time(time.time() - t_start), len(ok),
                f", {n_crashed} with crashed nodes" if n_crashed else "",
                f", {len(errors)} refused" if errors else "", opts.output_dir, code)
    return code


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _select_models(items, opts):
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


def _run_graph(items, models, opts, plugin, provenance, log_dir: Path, t_start: float):
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
    wf = init_synth7t_wf(
        sessions=items, models=models, output_dir=opts.output_dir,
        skull_strip=opts.skull_strip, model_dir=opts.model_dir, device=opts.device,
        storage_dtype=opts.output_dtype, omp_nthreads=opts.omp_nthreads,
        seed=opts.random_seed, provenance=provenance, name=workflow_name())
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
    try:
        wf.run(plugin=plugin["plugin"], plugin_args=plugin_args)
    except Exception as exc:  # noqa: BLE001 - Nipype raises RuntimeError after node crashes
        run_exc = exc
        LOGGER.debug("wf.run raised %r", exc)
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
                line = f"{f.name}: {_crash_summary(f)}"
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
            if not _participant_complete(it, opts.output_dir):
                crashed.setdefault(it.subject, []).append(run_error)
    for subject, lines in crashed.items():
        for line in lines:
            if line != run_error:  # printed once by the caller
                _error(f"sub-{subject}: {line} (crash files in {log_dir / f'sub-{subject}'})")
    return progress, crashed, run_error


def _expected_outputs(item) -> dict[str, dict[str, str]]:
    """Derivative paths (relative to the output folder) per contrast, for run info/report."""
    from synth7t.reference import REF_SPACE

    from workflows.outputs import deriv_relpath, xfm_entities

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
        }
        if c != anchor:
            d["xfm_to_anchor"] = deriv_relpath(rel, **xfm_entities(c, anchor, ".txt"))
            d["xfm_from_anchor"] = deriv_relpath(rel, **xfm_entities(anchor, c, ".txt"))
        out[c] = d
    return out


def _participant_complete(item, output_dir: Path) -> bool:
    try:
        return all((Path(output_dir) / p).is_file()
                   for d in _expected_outputs(item).values() for p in d.values())
    except Exception:  # noqa: BLE001
        return False


def _run_info(subject, sub_items, models, errs, crashed, progress, opts, common, end_iso,
              t_start) -> dict:
    """Run information of one participant (``logs/sub-<label>/run-<uuid>.json``, report)."""
    inputs = []
    warnings = []
    for it in sub_items:
        warnings += it.warnings
        expected = _expected_outputs(it)
        for c in it.contrasts:
            img = it.images[c]
            choice = (models.get((it.subject, it.session)) or {}).get(c)
            der = {k: v for k, v in expected[c].items() if (opts.output_dir / v).is_file()}
            conform_warnings = []
            sidecar = opts.output_dir / (expected[c]["preproc"].rsplit(".nii", 1)[0] + ".json")
            try:
                conform_warnings = json.loads(sidecar.read_text()).get("ConformWarnings", [])
            except (OSError, ValueError):
                pass
            for w in conform_warnings:
                LOGGER.warning("%s", w if str(w).startswith(img.path.name)
                               else f"{img.relpath}: {w}")
            missing = sorted(set(expected[c]) - set(der))
            inputs.append({
                "contrast": c, "session": it.session, "source": img.relpath,
                "field": img.routing.as_dict(),
                "model": choice.provenance if choice else None,
                "model_card": None,
                "warnings": list(conform_warnings),
                "error": (f"missing derivatives: {', '.join(missing)}"
                          if missing and crashed.get(subject) else None),
                "derivatives": der,
            })
    executed = []
    for it in sub_items:
        executed += _executed_nodes(opts.work_dir, it, t_start)
    info = dict(common)
    info.update({
        "participant": subject,
        "sessions": sorted({it.session for it in sub_items if it.session}),
        "end_time": end_iso,
        "elapsed_seconds": round(time.time() - t_start, 1),
        "status": ("refused" if errs and not sub_items else
                   "crashed" if crashed.get(subject) else "ok" if not errs else "partial"),
        "warnings": warnings,
        "errors": [msg for _, msg in errs] + list(crashed.get(subject, [])),
        "inputs": inputs,
        "executed_nodes": executed,
    })
    return info


def _executed_nodes(work_dir: Path, item, since: float) -> list[str]:
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


def _report(out_dir: Path, subject: str, info: dict) -> None:
    """Call ``bids_app.report.generate_report`` when that module exists (never fatal)."""
    try:
        from . import report
    except ImportError:
        return
    generate = getattr(report, "generate_report", None)
    if generate is None:
        return
    t0 = time.monotonic()
    try:
        path = generate(out_dir, subject, info)
        LOGGER.info("sub-%s: report %s (%.1f s)", subject, path, time.monotonic() - t0)
    except Exception as exc:  # noqa: BLE001 - a report must never cost the derivatives
        LOGGER.warning("sub-%s: the report could not be written: %s: %s", subject,
                       type(exc).__name__, exc)


if __name__ == "__main__":
    sys.exit(main())
