#!/usr/bin/env bash
# Stop the single-node SLURM started by scripts/start_slurm.sh: slurmd, slurmctld, munged, each
# by its pid file (never by name). Safe to run when nothing is running.
set -uo pipefail
stop_pid_file() {
    local pf="$1" name="$2" pid
    [[ -s "$pf" ]] || return 0
    pid="$(cat "$pf")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null; fi
        echo "stop_slurm: stopped $name (pid $pid)" >&2
    fi
    rm -f "$pf"
}
stop_pid_file /run/slurmd.pid slurmd
stop_pid_file /run/slurmctld.pid slurmctld
if [[ "${1:-}" != "--keep-munge" ]]; then
    stop_pid_file /run/munge/munged.pid munged
fi
exit 0
