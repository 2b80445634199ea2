"""Exit codes of the ``synth7t`` command (see ARCHITECTURE.md and docs/DEVELOPING.md).

Every error the BIDS App can diagnose before (or after) running the Nipype graph is raised as a
:class:`Synth7tExit` carrying one of these codes and a one-line message for the user.
"""
from __future__ import annotations

EX_OK = 0  #: all participants finished
EX_NODE_CRASHED = 1  #: at least one Nipype node crashed (crash files in out_dir/logs/sub-*/)
EX_BIDS_INVALID = 16  #: bids-validator-deno reported errors (dataset-level, or a participant's files)
EX_BAD_ANALYSIS_LEVEL = 17  #: analysis level other than ``participant`` or ``group``
EX_NO_MATCH = 18  #: participant/session labels or BIDS filters matched nothing
EX_USAGE = 64  #: bad command line (malformed label, filter file not JSON, ...)
EX_DATAERR = 65  #: bad data: missing/unsupported field strength, unreadable image
EX_NOINPUT = 66  #: a required input (dataset, image, model) is missing
EX_CANTCREAT = 73  #: the output (or work) directory cannot be created or written

NAMES = {
    EX_OK: "ok",
    EX_NODE_CRASHED: "node crashed",
    EX_BIDS_INVALID: "BIDS validation failed",
    EX_BAD_ANALYSIS_LEVEL: "bad analysis level",
    EX_NO_MATCH: "filters matched nothing",
    EX_USAGE: "usage error",
    EX_DATAERR: "bad data",
    EX_NOINPUT: "required input missing",
    EX_CANTCREAT: "cannot create output",
}


#: Per-participant outcomes from worst to least bad. A run that processes several participants
#: exits with the worst code any of them got (a crash beats a validation refusal beats bad data
#: ...); 0 only when every participant finished. The other codes (17, 64, 73) stop the whole run
#: before any participant is processed, so they never compete.
WORST_FIRST = (EX_NODE_CRASHED, EX_BIDS_INVALID, EX_DATAERR, EX_NOINPUT, EX_NO_MATCH)

#: Short names of the per-participant outcomes (summary line, ``group_qc.tsv`` reasons).
OUTCOME_NAMES = {
    EX_NODE_CRASHED: "crashed",
    EX_BIDS_INVALID: "invalid (BIDS validation)",
    EX_DATAERR: "bad data",
    EX_NOINPUT: "input missing",
    EX_NO_MATCH: "no match",
}


def worst_exit_code(codes) -> int:
    """The exit code of a run whose participants ended with ``codes`` (0 = ok)."""
    codes = {int(c) for c in codes if c}
    for code in WORST_FIRST:
        if code in codes:
            return code
    return min(codes) if codes else EX_OK


class Synth7tExit(Exception):
    """An error with a user-facing message and the process exit code to use."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = int(code)
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message
