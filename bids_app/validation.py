"""Validate the input dataset with ``bids-validator-deno`` (offline, read-only)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from .exitcodes import EX_BIDS_INVALID, Synth7tExit

#: How many issues the error message lists before summarising.
MAX_LISTED = 10


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


def _format_issue(issue: dict) -> str:
    code = issue.get("code", "?")
    sub = f" ({issue['subCode']})" if issue.get("subCode") else ""
    loc = issue.get("location") or ""
    msg = (issue.get("issueMessage") or "").strip().splitlines()
    detail = f": {msg[0]}" if msg else ""
    return f"{code}{sub} {loc}{detail}".strip()


def validate_dataset(bids_dir: Path, participant_label: list[str] | None = None,
                     *, timeout: float = 600) -> list[str]:
    """Run the validator; raise :class:`Synth7tExit` (16) when it reports errors.

    Errors located in other participants' folders are ignored when ``participant_label`` is
    given (as fMRIPrep does), so one broken participant does not block the others.

    Returns
    -------
    list of str
        Warning codes (for the log).
    """
    cmd = [*validator_command(), "--format", "json", str(bids_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=str(Path(bids_dir).parent))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Synth7tExit(EX_BIDS_INVALID,
                          f"bids-validator-deno could not run ({exc}); pass "
                          "--skip-bids-validation to skip validation") from None
    try:
        report = json.loads(proc.stdout)
        issues = report["issues"]["issues"]
    except (json.JSONDecodeError, KeyError, TypeError):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise Synth7tExit(
            EX_BIDS_INVALID,
            f"bids-validator-deno failed (exit {proc.returncode}) on {bids_dir}: "
            + " | ".join(tail) + "; pass --skip-bids-validation to skip validation",
        ) from None

    errors = [i for i in issues if i.get("severity") == "error"]
    if participant_label:
        keep = tuple(f"/sub-{label}/" for label in participant_label)

        def _relevant(issue):
            loc = issue.get("location") or ""
            return not loc.startswith("/sub-") or loc.startswith(keep)

        errors = [i for i in errors if _relevant(i)]
    if errors:
        lines = [_format_issue(i) for i in errors[:MAX_LISTED]]
        more = f" (and {len(errors) - MAX_LISTED} more)" if len(errors) > MAX_LISTED else ""
        raise Synth7tExit(
            EX_BIDS_INVALID,
            f"BIDS validation of {bids_dir} failed with {len(errors)} error(s){more}:\n  "
            + "\n  ".join(lines)
            + "\nFix the dataset or pass --skip-bids-validation.",
        )
    return sorted({i.get("code", "?") for i in issues if i.get("severity") == "warning"})
