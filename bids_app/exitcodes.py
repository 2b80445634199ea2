"""Exit codes of the ``synth7t`` command (see ARCHITECTURE.md and docs/DEVELOPING.md).

Every error the BIDS App can diagnose before (or after) running the Nipype graph is raised as a
:class:`Synth7tExit` carrying one of these codes and a one-line message for the user.
"""
from __future__ import annotations

EX_OK = 0  #: all participants finished
EX_NODE_CRASHED = 1  #: at least one Nipype node crashed (crash files in out_dir/logs/sub-*/)
EX_BIDS_INVALID = 16  #: bids-validator-deno reported errors
EX_BAD_ANALYSIS_LEVEL = 17  #: analysis level other than ``participant``
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


class Synth7tExit(Exception):
    """An error with a user-facing message and the process exit code to use."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = int(code)
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message
