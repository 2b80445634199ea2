#!/usr/bin/env python
"""Wall time and peak memory of the BIDS App, per stage, for one participant.

Runs ``synth7t <bids> <out> participant --participant-label <label>`` in a fresh output and
work folder for each case (default: sub-01 of the shared 3T dataset, a whole-head T1w alone,
and sub-02, T1w+T2w+FLAIR already brain-extracted), samples the resident memory of the whole
process tree (the App and its Nipype workers) every 0.2 s from /proc, then reads every node's
start/end time from the Nipype result files and prints one table per case::

    python benchmarks/bench_pipeline.py [--bids DIR] [--nprocs 2] [--omp-nthreads 2]
        [--brain-extraction deep|template] [--no-uncertainty]

Stage wall time is the union of the intervals of its nodes (nodes of a stage may run in
parallel); "node sum" adds them up. Peak RSS of a stage is the largest process-tree RSS sampled
while one of its nodes ran. Targets (issue 9, quiet machine, 2 cores): brain extraction <= 15 s
per 1 mm head, T1w alone <= 110 s, T1w+T2w+FLAIR <= 150 s, peak RSS <= 4 GB; issue 11 allows
the uncertainty maps (on by default) 20 s more on T1w alone (130 s), so the T1w-alone verdict
is against 130 s by default and 110 s with ``--no-uncertainty``. Never asserts: it measures.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "bids_3t"
#: label, target without the uncertainty maps, target with them (issue 11 allows T1w alone 20 s
#: for the map; it sets no figure for three contrasts, so sub-02 keeps issue 9's)
CASES = {"T1w alone (sub-01, whole head)": ("01", 110.0, 130.0),
         "T1w+T2w+FLAIR (sub-02, brain-extracted)": ("02", 150.0, 150.0)}
RSS_TARGET_GB = 4.0
BET_TARGET_S = 15.0
STAGES = [  # (stage, predicate on the node path inside the participant workflow)
    ("conform", lambda n: n.endswith("/conform")),
    ("N4 bias correction", lambda n: n.endswith("/n4")),
    ("brain extraction / detect", lambda n: "skull_strip" in n or "detect_skull" in n),
    ("registration", lambda n: n.startswith("register_wf/")),
    ("to 0.5 mm reference grid", lambda n: "/prep_" in n or "/resample_" in n
                                or n.endswith("/ref_mask")),
    ("synthesis", lambda n: "/synthesize_" in n),
    ("back to native space", lambda n: "/to_native_" in n),
    ("reportlets (beside the above)", lambda n: n.startswith("reportlets_") and "/ds_" not in n),
    ("derivatives (sinks)", lambda n: True),
]


# --------------------------------------------------------------------------- memory sampling
def _children(pid: int) -> list[int]:
    kids = []
    try:  # the process may end between any two of these reads
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return kids
    for t in threads:
        try:
            kids += [int(c) for c in (t / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _tree_rss(pid: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        todo += _children(p)
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.time(), _tree_rss(self.pid)))
            time.sleep(self.every)

    def peak(self, t0: float = 0.0, t1: float = float("inf")) -> int:
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        return max(vals) if vals else 0


# --------------------------------------------------------------------------- node times
def node_times(work: Path, label: str) -> list[tuple[str, float, float]]:
    """(node path, start, end) in POSIX seconds for every node of sub-<label>."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    from nipype.utils.filemanip import loadpkl

    out = []
    for f in work.rglob("result_*.pklz"):
        parts = f.parent.relative_to(work).parts
        try:
            i = parts.index(f"sub_{label}_wf")
        except ValueError:
            continue
        try:
            rt = loadpkl(f).runtime
            t0 = dt.datetime.fromisoformat(rt.startTime).timestamp()
            t1 = dt.datetime.fromisoformat(rt.endTime).timestamp()
        except Exception:  # noqa: BLE001 - a node without runtime info is skipped
            continue
        out.append(("/".join(parts[i + 1:]), t0, t1))
    return out


def _union(intervals):
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def run_case(name: str, label: str, target: float, args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="synth7t-bench-"))
    out, work = root / "out", root / "work"
    exe = Path(sys.executable).parent / "synth7t"
    cmd = [str(exe) if exe.is_file() else sys.executable, *([] if exe.is_file() else
                                                             ["-m", "bids_app.run"]),
           str(args.bids), str(out), "participant", "--participant-label", label,
           "-w", str(work), "--nprocs", str(args.nprocs),
           "--omp-nthreads", str(args.omp_nthreads),
           "--brain-extraction", args.brain_extraction,
           *(["--no-uncertainty"] if args.no_uncertainty else [])]
    env = dict(os.environ, NIPYPE_NO_ET="1", TEMPLATEFLOW_AUTOUPDATE="0")
    t_start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    log, _ = proc.communicate()
    t_end = time.time()
    sampler.stop.set()
    sampler.join()
    nodes = node_times(work, label)
    rows = []
    assigned: set[str] = set()
    for stage, pred in STAGES:
        mine = [(a, b) for n, a, b in nodes if n not in assigned and pred(n)]
        assigned |= {n for n, a, b in nodes if pred(n)}
        if not mine:
            continue
        peak = max(sampler.peak(a, b) for a, b in mine)
        rows.append((stage, len(mine), _union(mine), sum(b - a for a, b in mine), peak))
    first = min((a for _, a, _ in nodes), default=t_start)
    last = max((b for _, _, b in nodes), default=t_end)
    rows.insert(0, ("startup: CLI, validation, pybids, graph", 0, first - t_start,
                    first - t_start, sampler.peak(t_start, first)))
    rows.append(("run info + HTML report", 0, t_end - last, t_end - last,
                 sampler.peak(last, t_end)))
    slowest = sorted(((b - a, n) for n, a, b in nodes), reverse=True)[:args.top]
    result = {"name": name, "label": label, "target": target, "rc": proc.returncode,
              "wall": t_end - t_start, "graph": last - first, "peak": sampler.peak(),
              "rows": rows, "log": log, "root": root, "slowest": slowest}
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def print_case(res: dict) -> None:
    gb = 1024 ** 3
    status = "exit 0" if res["rc"] == 0 else f"FAILED, exit {res['rc']}"
    print(f"\n### {res['name']}  ({status})\n")
    print("| stage | nodes | wall (s) | node sum (s) | peak RSS (GB) |")
    print("|---|---:|---:|---:|---:|")
    for stage, n, wall, tot, peak in res["rows"]:
        print(f"| {stage} | {n or ''} | {wall:.1f} | {tot:.1f} | {peak / gb:.2f} |")
    if res["rc"] != 0:  # a failed run is not a measurement: no verdict against the targets
        ok_t = ok_m = f"FAILED (exit {res['rc']}), no verdict"
    else:
        ok_t = "ok" if res["wall"] <= res["target"] else "OVER"
        ok_m = "ok" if res["peak"] / gb <= RSS_TARGET_GB else "OVER"
    print(f"| **total** | | **{res['wall']:.1f}** (target {res['target']:.0f}: {ok_t}) | "
          f"graph {res['graph']:.1f} | **{res['peak'] / gb:.2f}** "
          f"(target {RSS_TARGET_GB:g}: {ok_m}) |")
    bet = [wall for stage, _, wall, _, _ in res["rows"] if stage.startswith("brain extraction")]
    if bet and res["rc"] == 0:
        print(f"\nbrain extraction {bet[0]:.1f} s (target {BET_TARGET_S:g} s per 1 mm head: "
              f"{'ok' if bet[0] <= BET_TARGET_S else 'OVER'})")
    if res["slowest"]:
        print("\nslowest nodes: " + ", ".join(f"{n} {d:.1f} s" for d, n in res["slowest"]))
    if res["rc"] != 0:
        print(f"\nFAILED: the App exited {res['rc']} on {res['name']}; the times above are of "
              "an unfinished run, not a verdict on the targets.")
        print("\n```\n" + "\n".join(res["log"].splitlines()[-30:]) + "\n```")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bids", type=Path, default=SHARED)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--omp-nthreads", type=int, default=2)
    ap.add_argument("--case", choices=list(CASES), action="append",
                    help="run only these cases (default: all)")
    ap.add_argument("--brain-extraction", choices=("deep", "template"), default="deep")
    ap.add_argument("--no-uncertainty", action="store_true",
                    help="run the App with --no-uncertainty (issue 9's targets)")
    ap.add_argument("--keep", action="store_true", help="keep the output/work folders")
    ap.add_argument("--top", type=int, default=6, help="list the N slowest nodes")
    args = ap.parse_args(argv)
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    print(f"synth7t pipeline benchmark: {args.bids}, --nprocs {args.nprocs} --omp-nthreads "
          f"{args.omp_nthreads} --brain-extraction {args.brain_extraction}"
          f"{' --no-uncertainty' if args.no_uncertainty else ' (uncertainty maps on)'}, {os.cpu_count()} "
          f"CPUs, load average {' '.join(load)}")
    failed = []
    for name in args.case or list(CASES):
        label, without, with_map = CASES[name]
        res = run_case(name, label, without if args.no_uncertainty else with_map, args)
        print_case(res)
        if res["rc"] != 0:
            failed.append(f"{name} (exit {res['rc']})")
        if args.keep:
            print(f"\n(kept in {res['root']})")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
