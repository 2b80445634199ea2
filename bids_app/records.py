"""What a participant-level run leaves per participant: the run record and its QC values.

``logs/sub-<label>/run-<uuid>.json`` (one per run; the ``group`` level reads the newest) holds the
``run_info`` of :mod:`bids_app.report` plus ``exit_code`` (this participant's outcome, see
:data:`bids_app.exitcodes.WORST_FIRST`) and, per input, ``qc`` (:mod:`bids_app.qc`).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from synth7t.io import protocol_from_sidecar

from .exitcodes import EX_NODE_CRASHED, EX_OK, OUTCOME_NAMES, worst_exit_code
from .workflow import executed_nodes, expected_outputs

LOGGER = logging.getLogger("synth7t")


def participant_exit_code(errs: list[tuple[int, str]], crashed: list[str] | None) -> int:
    """One participant's outcome: 1 if a node crashed, else its worst refusal, else 0."""
    if crashed:
        return EX_NODE_CRASHED
    return worst_exit_code(code for code, _ in errs) if errs else EX_OK


def build_run_info(subject, sub_items, models, errs, crashed, opts, common, end_iso,
                   t_start) -> dict:
    """Run information of one participant (``logs/sub-<label>/run-<uuid>.json``, report)."""
    inputs = []
    warnings = []
    for it in sub_items:
        warnings += it.warnings
        expected = expected_outputs(it)
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
                # ms and degrees, every input (not only for a protocol-conditioned model): the
                # group table compares protocols across the study
                "protocol": protocol_from_sidecar(img.metadata),
                "model": choice.provenance if choice else None,
                "model_card": None,
                "warnings": list(conform_warnings),
                "error": (f"missing derivatives: {', '.join(missing)}"
                          if missing and crashed.get(subject) else None),
                "derivatives": der,
            })
    executed = []
    for it in sub_items:
        executed += executed_nodes(opts.work_dir, it, t_start)
    code = participant_exit_code(errs, crashed.get(subject))
    info = dict(common)
    info.update({
        "participant": subject,
        "sessions": sorted({it.session for it in sub_items if it.session}),
        "end_time": end_iso,
        "elapsed_seconds": round(time.time() - t_start, 1),
        "status": ("refused" if errs and not sub_items else
                   "crashed" if crashed.get(subject) else "ok" if not errs else "partial"),
        "exit_code": code,
        "outcome": OUTCOME_NAMES.get(code, "ok"),
        "warnings": warnings,
        "errors": [msg for _, msg in errs] + list(crashed.get(subject, [])),
        "inputs": inputs,
        "executed_nodes": executed,
    })
    return info


def write_run_record(log_dir: Path, info: dict) -> Path | None:
    """``logs/sub-<label>/run-<uuid>.json`` (atomic); None (and a warning) if it cannot."""
    from synth7t.io import atomic_write_json

    subject = info["participant"]
    path = Path(log_dir) / f"sub-{subject}" / f"run-{info.get('run_uuid', 'unknown')}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(info, path)
    except OSError as exc:
        LOGGER.warning("sub-%s: cannot write the run info: %s", subject, exc)
        return None
    return path
