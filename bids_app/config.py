"""The run configuration, written as TOML into ``<output_dir>/logs/`` (one file per run)."""
from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path

from synth7t import __version__
from synth7t.io import atomic_write_text

from .derivatives import container_info, software_versions


def _clean(obj):
    """TOML has no null: drop ``None``; paths and other objects become strings."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj if v is not None]
    if isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj
    return str(obj)


def build_config(opts, *, run_uuid: str, argv: list[str], plugin: dict,
                 templateflow_home: str | None = None) -> dict:
    """Everything needed to understand (and repeat) a run."""
    return _clean({
        "environment": {
            "synth7t_version": __version__,
            "python": sys.executable,
            "cpu_count": os.cpu_count(),
            "container": container_info(),
            "versions": software_versions(),
            "NIPYPE_NO_ET": os.environ.get("NIPYPE_NO_ET"),
            "TEMPLATEFLOW_HOME": templateflow_home,
        },
        "execution": {
            "run_uuid": run_uuid,
            "start_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cmdline": argv,
            "bids_dir": opts.bids_dir,
            "output_dir": opts.output_dir,
            "work_dir": opts.work_dir,
            "log_dir": Path(opts.output_dir) / "logs",
            "analysis_level": opts.analysis_level,
            "participant_label": opts.participant_label,
            "session_label": opts.session_label,
            "bids_filters": opts.bids_filters,
            "skip_bids_validation": opts.skip_bids_validation,
            "stop_on_first_crash": opts.stop_on_first_crash,
            "notrack": opts.notrack,
            "verbose_count": opts.verbose_count,
        },
        "nipype": {
            "plugin": plugin.get("plugin"),
            "plugin_args": {k: v for k, v in (plugin.get("plugin_args") or {}).items()
                            if k != "status_callback"},
            "nprocs": opts.nprocs,
            "omp_nthreads": opts.omp_nthreads,
            "memory_gb": opts.memory_gb,
            "crashfile_format": "txt",
            "poll_sleep_duration": 0.05,
        },
        "workflow": {
            "contrasts": opts.contrasts,
            "field_strength": opts.field_strength,
            "skull_strip": opts.skull_strip,
            "brain_extraction": getattr(opts, "brain_extraction", "deep"),
            "device": opts.device,
            "model_dir": opts.model_dir,
            "output_dtype": opts.output_dtype,
        },
        "seeds": {"master": opts.random_seed},
    })


def write_config(config: dict, log_dir: Path, run_uuid: str) -> Path:
    """Write ``config-<UTC time>_<uuid>.toml`` atomically; return its path."""
    import tomli_w

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(log_dir) / f"config-{stamp}_{run_uuid}.toml"
    atomic_write_text(tomli_w.dumps(config), path)
    return path
