#!/usr/bin/env python
"""Run the reliability table (tests/test_robustness.py) and print one line per case.

    NIPYPE_NO_ET=1 python benchmarks/bench_reliability.py [-k EXPR] [--basetemp DIR]

Each case is either a *bad input* (oblique or contradictory header, odd dtype, NaN voxels, 4D /
empty / non-NIfTI / truncated file, bad field strength, bad participant label or filter file,
tampered or pickled model file) or a *fault or rerun* (output folder not writable, disk full,
SIGKILL in the middle of a run and rerun, two concurrent runs, a same-seed rerun). A case is
*handled* when the App did what the table says (right result, or the right exit code and
message). The closing line counts the two kinds separately, then the input files that any run
modified (every input tree is hashed before and after every run) and the outputs lost
(half-written, left-over temp or clobbered files):

    N bad inputs tried, N handled; M fault and rerun cases tried, M handled;
    0 inputs modified, 0 outputs lost

Exit status: 0 when every case was handled, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bids_app/workflows may not be in an older editable install
META_ROWS = {"input-dataset-unmodified"}  # a check over all the others, not a bad input
#: Table rows (tests/test_robustness.py ROWS groups) whose cases are bad inputs; the rest are
#: faults during a run (unwritable output, full disk, SIGKILL) and reruns (concurrent, same seed).
BAD_INPUT_GROUPS = {"header", "numeric", "anisotropic", "nan-inf", "bad-file", "field", "usage",
                    "model"}
FAULT_GROUPS = {"output", "sigkill", "concurrent", "determinism"}


class Collector:
    """pytest plugin: outcome, duration and first failure line of every case."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}
        self.module = None

    def pytest_runtest_logreport(self, report):  # noqa: D401 - pytest hook
        if "[" not in report.nodeid:
            return
        name = report.nodeid.split("[", 1)[1].rstrip("]")
        rec = self.results.setdefault(name, {"outcome": "passed", "seconds": 0.0, "why": ""})
        rec["seconds"] += report.duration
        if report.failed or (report.skipped and report.when != "teardown"):
            if rec["outcome"] == "passed":
                rec["outcome"] = "failed" if report.when == "call" else (
                    "skipped" if report.skipped else f"error ({report.when})")
                text = str(report.longrepr) if report.longrepr else ""
                lines = [ln.strip() for ln in text.splitlines()
                         if ln.strip().startswith("E ")] or text.splitlines()[-1:]
                rec["why"] = lines[0][2:].strip()[:160] if lines and lines[0].startswith("E ") \
                    else (lines[0][:160] if lines else "")

    def pytest_sessionfinish(self, session):
        self.module = sys.modules.get("test_robustness") or sys.modules.get(
            "tests.test_robustness")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset of cases)")
    parser.add_argument("--basetemp", default=None, help="pytest --basetemp (kept afterwards)")
    opts = parser.parse_args(argv)
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
    import pytest

    args = [str(REPO / "tests" / "test_robustness.py"), "-q", "-p", "no:cacheprovider",
            "--no-header", "-rN"]
    if opts.k:
        args += ["-k", opts.k]
    if opts.basetemp:
        args += ["--basetemp", opts.basetemp]
    collector = Collector()
    t0 = time.monotonic()
    pytest.main(args, plugins=[collector])
    elapsed = time.monotonic() - t0

    mod = collector.module
    rows = {r.name: r.group for r in getattr(mod, "ROWS", [])}
    print()
    print(f"{'case':28s} {'table row':17s} {'outcome':10s} {'s':>6s}  note")
    print("-" * 100)
    for name, rec in collector.results.items():
        print(f"{name:28s} {rows.get(name, '?'):17s} {rec['outcome']:10s} "
              f"{rec['seconds']:6.1f}  {rec['why']}")
    guard = getattr(mod, "LAST_GUARD", None)
    modified = guard.problems() if guard is not None else []
    lost = list(getattr(mod, "OUTPUT_PROBLEMS", []))
    for line in modified:
        print(f"INPUT MODIFIED: {line}")
    for line in lost:
        print(f"OUTPUT LOST: {line}")
    tried = [n for n in collector.results if n not in META_ROWS]
    handled = [n for n in tried if collector.results[n]["outcome"] == "passed"]
    if guard is not None:
        print(f"App runs: {len(guard.runs)}; total {elapsed:.0f} s")
    kinds = {"bad inputs": BAD_INPUT_GROUPS, "fault and rerun cases": FAULT_GROUPS}
    other = [n for n in tried if not any(rows.get(n) in g for g in kinds.values())]
    parts = []
    for what, groups in kinds.items():
        mine = [n for n in tried if rows.get(n) in groups]
        parts.append(f"{len(mine)} {what} tried, {len([n for n in mine if n in handled])} handled")
    if other:
        parts.append(f"{len(other)} other cases ({', '.join(other)}) tried, "
                     f"{len([n for n in other if n in handled])} handled")
    print("; ".join(parts) + f"; {len(modified)} inputs modified, {len(lost)} outputs lost")
    return 0 if tried and len(handled) == len(tried) and not modified and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
