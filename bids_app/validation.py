"""Validate the input dataset with ``bids-validator-deno`` (offline, read-only), per participant.

The validator sees only what the run will use: the dataset-level files (everything at the top of
``bids_dir`` that is not a ``sub-*`` folder) and the selected participants' folders. When only
some participants are selected, it runs on a *view* of the dataset: a temporary folder (outside
``bids_dir``, removed afterwards) holding symbolic links to those entries and, when the dataset
has one, a ``participants.tsv`` reduced to the selected rows (else the validator would report the
other participants as missing). The input dataset is never written.

Each error is then attributed by its location:

* ``/sub-<label>/...`` -> that participant is refused (exit 16 for it) with one line naming the
  file and the validator's words; the other participants still run;
* anything else (``dataset_description.json``, ``participants.tsv``, a stray top-level file, an
  error without a location) -> the whole run stops with exit 16, as before.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .exitcodes import EX_BIDS_INVALID, Synth7tExit

#: How many issues the error message lists before summarising.
MAX_LISTED = 10
#: Errors of one participant listed in its one-line refusal before summarising.
MAX_PER_PARTICIPANT = 3


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_participants`."""

    #: ``{participant label: ["<file>: <CODE>: <validator message>", ...]}``
    refused: dict[str, list[str]] = field(default_factory=dict)
    #: warning codes (for the log)
    warnings: list[str] = field(default_factory=list)
    #: what the validator saw: ``"dataset"`` or ``"view of N participant(s)"``
    scope: str = "dataset"
    seconds: float = 0.0


def validator_command() -> list[str]:
    """Command prefix that runs bids-validator-deno.

    The console script is looked for next to ``sys.executable`` (the active venv), then on
    ``PATH``; failing both, the ``bids_validator_deno`` package is run through this Python.
    """
    here = Path(sys.executable).parent / "bids-validator-deno"
    if here.is_file():
        return [str(here)]
    found = shutil.which("bids-validator-deno")
    if found:
        return [found]
    try:
        import bids_validator_deno  # noqa: F401
    except ImportError:
        raise Synth7tExit(
            EX_BIDS_INVALID,
            "bids-validator-deno is not installed (pip install bids-validator-deno); "
            "install it or pass --skip-bids-validation",
        ) from None
    return [sys.executable, "-c",
            "import sys; from bids_validator_deno import cli; sys.argv[0] = 'bids-validator'; "
            "sys.exit(cli())"]


def _first_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _format_issue(issue: dict, code_messages: dict | None = None) -> str:
    code = issue.get("code", "?")
    sub = f" ({issue['subCode']})" if issue.get("subCode") else ""
    loc = issue.get("location") or ""
    msg = _first_line(issue.get("issueMessage")) or _first_line(
        (code_messages or {}).get(code))
    detail = f": {msg}" if msg else ""
    return f"{code}{sub} {loc}{detail}".strip()


def run_validator(root: Path, *, timeout: float = 600) -> tuple[list[dict], dict]:
    """Run the validator on ``root``; return (issues, codeMessages). Exit 16 if it cannot run."""
    cmd = [*validator_command(), "--format", "json", str(root)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=str(Path(root).parent))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Synth7tExit(EX_BIDS_INVALID,
                          f"bids-validator-deno could not run ({exc}); pass "
                          "--skip-bids-validation to skip validation") from None
    try:
        report = json.loads(proc.stdout)
        issues = list(report["issues"]["issues"])
        messages = dict(report["issues"].get("codeMessages") or {})
    except (json.JSONDecodeError, KeyError, TypeError):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise Synth7tExit(
            EX_BIDS_INVALID,
            f"bids-validator-deno failed (exit {proc.returncode}) on {root}: "
            + " | ".join(tail) + "; pass --skip-bids-validation to skip validation",
        ) from None
    return issues, messages


def _filtered_participants_tsv(src: Path, dst: Path, keep: set[str]) -> bool:
    """Copy ``participants.tsv`` keeping the header and the rows of ``keep``; False if odd."""
    try:
        with open(src, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    if not rows or not rows[0] or rows[0][0] != "participant_id":
        return False  # let the validator judge the original
    body = [r for r in rows[1:] if r and r[0] in keep]
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        fh.write("\n".join("\t".join(r) for r in [rows[0], *body]) + "\n")
    return True


def make_view(bids_dir: Path, participants: list[str], into: Path) -> Path:
    """A folder of symbolic links: the dataset-level entries and the selected participants."""
    bids_dir = Path(bids_dir).resolve()
    view = Path(into) / bids_dir.name
    view.mkdir(parents=True)
    keep = {f"sub-{p}" for p in participants}
    for entry in bids_dir.iterdir():
        if entry.name.startswith("sub-") and entry.name not in keep:
            continue
        if entry.name == "participants.tsv" and entry.is_file() and \
                _filtered_participants_tsv(entry, view / entry.name, keep):
            continue
        os.symlink(entry, view / entry.name, target_is_directory=entry.is_dir())
    return view


def _owner(location: str) -> str | None:
    """The participant label an issue location belongs to (``/sub-01/anat/...`` -> ``01``)."""
    parts = location.strip("/").split("/")
    if len(parts) > 1 and parts[0].startswith("sub-"):
        return parts[0][4:]
    return None


def validate_participants(bids_dir: Path, participants: list[str], *,
                          all_participants: list[str] | None = None,
                          timeout: float = 600) -> ValidationResult:
    """Validate the selected participants; refuse those whose files have errors.

    Parameters
    ----------
    bids_dir
        The input dataset (only read).
    participants
        Labels to validate (without ``sub-``).
    all_participants
        Every label in the dataset; when ``participants`` is all of them the dataset itself is
        validated (no view).

    Raises
    ------
    Synth7tExit
        16 for errors outside any participant folder (or when the validator cannot run).
    """
    bids_dir = Path(bids_dir)
    t0 = time.monotonic()
    everyone = set(all_participants or []) <= set(participants)
    with tempfile.TemporaryDirectory(prefix="synth7t-validate-") as tmp:
        if everyone:
            root, scope = bids_dir, "dataset"
        else:
            root = make_view(bids_dir, participants, Path(tmp))
            scope = f"view of {len(participants)} participant(s)"
        issues, messages = run_validator(root, timeout=timeout)
    result = ValidationResult(scope=scope, seconds=time.monotonic() - t0)
    selected = set(participants)
    dataset_errors = []
    by_owner: dict[str, list[dict]] = {}
    for issue in issues:
        if issue.get("severity") != "error":
            continue
        loc = issue.get("location") or ""
        owner = _owner(loc)
        if owner is None:
            dataset_errors.append(issue)
        elif owner in selected:
            by_owner.setdefault(owner, []).append(issue)
    if dataset_errors:
        lines = [_format_issue(i, messages) for i in dataset_errors[:MAX_LISTED]]
        more = (f" (and {len(dataset_errors) - MAX_LISTED} more)"
                if len(dataset_errors) > MAX_LISTED else "")
        raise Synth7tExit(
            EX_BIDS_INVALID,
            f"BIDS validation of {bids_dir} failed with {len(dataset_errors)} dataset-level "
            f"error(s){more}:\n  " + "\n  ".join(lines)
            + "\nFix the dataset or pass --skip-bids-validation.",
        )
    for owner, errs in sorted(by_owner.items()):
        msgs = []
        for issue in errs[:MAX_PER_PARTICIPANT]:
            loc = (issue.get("location") or "").lstrip("/")
            code = issue.get("code", "?") + (f" ({issue['subCode']})" if issue.get("subCode")
                                             else "")
            text = _first_line(issue.get("issueMessage")) or _first_line(messages.get(
                issue.get("code")))
            msgs.append(f"{bids_dir / loc}: BIDS validation error {code}"
                        + (f": {text}" if text else ""))
        if len(errs) > MAX_PER_PARTICIPANT:
            msgs.append(f"sub-{owner}: {len(errs) - MAX_PER_PARTICIPANT} more BIDS validation "
                        "error(s)")
        result.refused[owner] = msgs
    result.warnings = sorted({i.get("code", "?") for i in issues
                              if i.get("severity") == "warning"})
    return result


def validate_dataset(bids_dir: Path, participant_label: list[str] | None = None,
                     *, timeout: float = 600) -> list[str]:
    """Strict form: raise :class:`Synth7tExit` (16) on any error of the selection.

    Errors in other participants' folders are ignored when ``participant_label`` is given (the
    validator does not even see those folders). Returns the warning codes.
    """
    from .query import list_participants

    everyone = list_participants(bids_dir)
    selected = list(participant_label or everyone)
    res = validate_participants(bids_dir, selected, all_participants=everyone, timeout=timeout)
    if res.refused:
        lines = [m for msgs in res.refused.values() for m in msgs]
        raise Synth7tExit(
            EX_BIDS_INVALID,
            f"BIDS validation of {bids_dir} failed with {len(lines)} error(s):\n  "
            + "\n  ".join(lines[:MAX_LISTED])
            + "\nFix the dataset or pass --skip-bids-validation.",
        )
    return res.warnings
