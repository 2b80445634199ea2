"""The ``synth7t`` BIDS App: ``synth7t bids_dir output_dir {participant,group} [options]``.

The command line lives in :mod:`bids_app.parser`, the graph stage in :mod:`bids_app.workflow`,
the per-participant record in :mod:`bids_app.records` (+ :mod:`bids_app.qc`), the group level in
:mod:`bids_app.group`. This module strings the participant-level stages together, one small
function each:

1. :func:`check_dataset`: the dataset and the participant labels (66/16/18);
2. :func:`validate_inputs`: bids-validator-deno on the selected participants only; a
   participant whose files have errors is refused (16 for it), dataset-level errors stop (16);
3. :func:`prepare_outputs`: output, work and log folders (73/64), the plugin settings;
4. :func:`collect_work`: pybids query, field routing, every image opened, models picked and
   verified (per participant: 65/66/18; the others still run);
5. :func:`write_dataset_files`: dataset_description.json, .bidsignore, the TOML run config;
6. ``_run_graph``: one Nipype graph for all participants (crashes per participant: 1);
7. :func:`write_participant_records`: per participant the run record (with QC) and the report;
8. :func:`finish`: the exit code (worst outcome wins, see
   :data:`bids_app.exitcodes.WORST_FIRST`) and a summary line counting each outcome.
"""
from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

import datetime as _dt  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from .console import error as _error  # noqa: E402
from .console import fmt_time as _fmt_time  # noqa: E402,F401 - kept for callers
from .console import remove_file_logs, setup_logging, setup_nipype_logging  # noqa: E402
from .exitcodes import (  # noqa: E402
    EX_BIDS_INVALID,
    EX_CANTCREAT,
    EX_NOINPUT,
    OUTCOME_NAMES,
    Synth7tExit,
    worst_exit_code,
)
from .workflow import Progress, plugin_settings, run_graph, select_models  # noqa: E402,F401

LOGGER = logging.getLogger("synth7t")

# Module-level names the tests replace (``monkeypatch.setattr(run, "_run_graph", ...)``).
_run_graph = run_graph
_select_models = select_models
_plugin_settings = plugin_settings


@dataclass
class RunState:
    """What the participant-level stages pass on to each other."""

    argv: list[str]
    opts: object
    run_uuid: str = field(default_factory=lambda: f"{time.strftime('%Y%m%d-%H%M%S')}_"
                                                    f"{uuid.uuid4()}")
    t_start: float = field(default_factory=time.time)
    start_iso: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc)
                           .isoformat(timespec="seconds"))
    log_dir: Path | None = None
    log_file: Path | None = None
    plugin: dict = field(default_factory=dict)
    items: list = field(default_factory=list)
    models: dict = field(default_factory=dict)
    #: ``{participant: [(exit code, one-line message), ...]}`` for refused participants/inputs
    errors: dict = field(default_factory=dict)
    crashed: dict = field(default_factory=dict)
    progress: object = None


# --------------------------------------------------------------------------- helpers
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


def _add_errors(errors: dict, new: dict) -> None:
    for subject, errs in new.items():
        errors.setdefault(subject, []).extend(errs)


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
        remove_file_logs()


def _main(argv: list[str]) -> int:
    from .parser import parse_args

    opts = parse_args(argv)
    setup_logging(opts.verbose_count)
    if opts.analysis_level == "group":
        from .group import run_group

        return run_group(opts, argv)
    return run_participant_level(RunState(argv=argv, opts=opts))


def run_participant_level(st: RunState) -> int:
    """The participant level, stage by stage (see the module docstring)."""
    setup_nipype_logging(st.opts.verbose_count)
    from synth7t.reference import setup_templateflow

    tf_home = setup_templateflow()
    participants = check_dataset(st.opts)
    refused = validate_inputs(st.opts, participants)
    prepare_outputs(st)
    _add_errors(st.errors, refused)
    collect_work(st, [p for p in participants if p not in refused])
    for subject, errs in sorted(st.errors.items()):
        for _code, msg in errs:
            _error(msg if msg.startswith(f"sub-{subject}") else f"sub-{subject}: {msg}")
    config_file = write_dataset_files(st, tf_home)
    provenance, run_common = describe_run(st, config_file)
    if st.items:
        st.progress, st.crashed, run_error = _run_graph(
            st.items, st.models, st.opts, st.plugin, provenance, st.log_dir, st.t_start)
        if run_error:
            _error(run_error)
    else:
        LOGGER.info("nothing to run")
    write_participant_records(st, run_common)
    return finish(st)


# --------------------------------------------------------------------------- stages
def check_dataset(opts) -> list[str]:
    """The dataset exists and the labels match (66/18); returns the participants to run."""
    from .query import check_participants

    if not opts.bids_dir.is_dir():
        raise Synth7tExit(EX_NOINPUT, f"the BIDS dataset {opts.bids_dir} does not exist")
    participants = check_participants(opts.bids_dir, opts.participant_label)
    if not (opts.bids_dir / "dataset_description.json").is_file() and \
            opts.skip_bids_validation:
        raise Synth7tExit(EX_BIDS_INVALID, f"{opts.bids_dir} is not a BIDS dataset: "
                          "dataset_description.json is missing")
    return participants


def validate_inputs(opts, participants: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Validate the selected participants; return the refused ones ``{label: [(16, msg)]}``.

    Dataset-level errors raise :class:`Synth7tExit` (16) before anything is written.
    """
    if opts.skip_bids_validation:
        return {}
    from .query import list_participants
    from .validation import validate_participants

    res = validate_participants(opts.bids_dir, participants,
                                all_participants=list_participants(opts.bids_dir))
    LOGGER.info("BIDS validation (%s) in %.1f s: %d participant(s) passed%s%s",
                res.scope, res.seconds, len(participants) - len(res.refused),
                f", {len(res.refused)} refused" if res.refused else "",
                f" (warnings: {', '.join(res.warnings)})" if res.warnings else "")
    return {label: [(EX_BIDS_INVALID, m) for m in msgs] for label, msgs in res.refused.items()}


def prepare_outputs(st: RunState) -> None:
    """Output/work folders (never inside the input; 64/73), the log folder and file, plugin."""
    from .console import add_file_log
    from .derivatives import ensure_output_dir

    opts = st.opts
    ensure_output_dir(opts.output_dir, opts.bids_dir, opts.work_dir)
    st.log_dir = opts.output_dir / "logs"
    try:
        st.log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Synth7tExit(EX_CANTCREAT, f"cannot create {st.log_dir}: {exc.strerror or exc}") \
            from None
    st.log_file = add_file_log(st.log_dir, st.run_uuid)
    st.plugin = _plugin_settings(opts)
    LOGGER.debug("synth7t %s", " ".join(st.argv))


def collect_work(st: RunState, participants: list[str]) -> None:
    """Query the inputs of ``participants``, open every image, pick and verify the models."""
    from .query import check_images, collect_inputs, init_layout

    opts = st.opts
    if not participants:
        return
    try:
        layout = init_layout(opts.bids_dir, participants)
    except Exception as exc:  # noqa: BLE001 - pybids raises various errors on broken datasets
        raise Synth7tExit(EX_BIDS_INVALID, f"pybids cannot index {opts.bids_dir}: {exc}") \
            from None
    items, errors = collect_inputs(
        layout, participants, sessions=opts.session_label, contrasts=opts.contrasts,
        bids_filters=opts.bids_filters, field_strength=opts.field_strength)
    _add_errors(st.errors, errors)
    bad = check_images(items)
    _add_errors(st.errors, {name.split("_")[0][4:]: errs for name, errs in bad.items()})
    items = [it for it in items if it.name not in bad]
    models, model_errors = _select_models(items, opts)
    _add_errors(st.errors, {subject: errs for (subject, _s), errs in model_errors.items()})
    st.items = [it for it in items if (it.subject, it.session) not in model_errors]
    st.models = models


def write_dataset_files(st: RunState, tf_home) -> Path:
    """dataset_description.json, .bidsignore and the TOML run config (73 if they cannot)."""
    from .config import build_config, write_config
    from .derivatives import write_dataset_description

    opts = st.opts
    try:
        write_dataset_description(opts.output_dir, opts.bids_dir, templateflow_home=tf_home)
        return write_config(
            build_config(opts, run_uuid=st.run_uuid, argv=["synth7t", *st.argv],
                         plugin=st.plugin, templateflow_home=str(tf_home)),
            st.log_dir, st.run_uuid)
    except OSError as exc:
        raise Synth7tExit(EX_CANTCREAT, f"cannot write into {opts.output_dir}: "
                          f"{exc.strerror or exc}") from None


def describe_run(st: RunState, config_file: Path) -> tuple[dict, dict]:
    """(sidecar provenance, the run-level part of every participant's run record)."""
    from .derivatives import software_versions

    opts = st.opts
    provenance = {
        "ProcessingSoftwareVersions": software_versions(),
        "CommandLine": normalised_command(st.argv, opts),
        "RandomSeed": opts.random_seed,
    }
    run_common = {
        "bids_dir": str(opts.bids_dir), "output_dir": str(opts.output_dir),
        "work_dir": str(opts.work_dir), "command": ["synth7t", *st.argv],
        "options": {"random_seed": opts.random_seed, "nprocs": opts.nprocs,
                    "omp_nthreads": opts.omp_nthreads, "skull_strip": opts.skull_strip,
                    "brain_extraction": getattr(opts, "brain_extraction", "deep"),
                    "contrasts": " ".join(opts.contrasts), "device": opts.device,
                    "output_dtype": opts.output_dtype,
                    "field_strength": opts.field_strength, "plugin": st.plugin["plugin"]},
        "versions": provenance["ProcessingSoftwareVersions"],
        "reference": {"space": "MRIxFields"},
        "config_file": str(config_file), "log_file": str(st.log_file),
        "run_uuid": st.run_uuid, "start_time": st.start_iso,
    }
    return provenance, run_common


def write_participant_records(st: RunState, run_common: dict) -> None:
    """Per participant: run record (with QC values) under logs/sub-<label>/, HTML report."""
    from .group import write_thumbnails
    from .qc import add_qc
    from .records import build_run_info, write_run_record

    end_iso = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for subject in st_subjects(st):
        sub_items = [it for it in st.items if it.subject == subject]
        info = build_run_info(subject, sub_items, st.models, st.errors.get(subject, []),
                              st.crashed, st.opts, run_common, end_iso, st.t_start)
        t0 = time.monotonic()
        add_qc(st.opts.output_dir, info)
        if sub_items:
            LOGGER.info("sub-%s: QC values in %.1f s", subject, time.monotonic() - t0)
        write_run_record(st.log_dir, info)
        _report(st.opts.output_dir, subject, info)
        write_thumbnails(st.opts.output_dir, info)


def st_subjects(st: RunState) -> list[str]:
    return sorted({it.subject for it in st.items} | set(st.errors), key=str)


def outcomes(st: RunState) -> dict[str, int]:
    """``{participant: exit code}`` (0 ok; see :func:`bids_app.records.participant_exit_code`)."""
    from .records import participant_exit_code

    return {s: participant_exit_code(st.errors.get(s, []), st.crashed.get(s))
            for s in st_subjects(st)}


def finish(st: RunState) -> int:
    """Exit code (worst outcome) and the summary line counting every kind of outcome."""
    per = outcomes(st)
    code = worst_exit_code(per.values())
    counts = {}
    for c in per.values():
        counts[c] = counts.get(c, 0) + 1
    parts = [f"{counts.get(0, 0)} participant(s) ok"]
    parts += [f"{counts[c]} {OUTCOME_NAMES.get(c, f'exit {c}')}" for c in sorted(
        (c for c in counts if c), key=lambda c: _order(c))]
    LOGGER.info("finished in %s: %s; derivatives in %s (exit %d)",
                _fmt_time(time.time() - st.t_start), ", ".join(parts), st.opts.output_dir, code)
    return code


def _order(code: int) -> int:
    from .exitcodes import WORST_FIRST

    return WORST_FIRST.index(code) if code in WORST_FIRST else len(WORST_FIRST)


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
