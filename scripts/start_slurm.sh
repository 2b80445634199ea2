#!/usr/bin/env bash
# Start a single-node SLURM (controller + compute node) on this machine, for CI and for trying
# synth7t's SLURM / SLURMGraph execution plugins for real. Needs root. Idempotent: a second call
# with the cluster up returns at once.
#
#   scripts/start_slurm.sh            # install (Debian packages) if needed, configure, start, wait
#   scripts/stop_slurm.sh             # stop the daemons by pid
#
# Debian bookworm ships SLURM 22.05 (slurmctld slurmd slurm-client munge). Without systemd or
# cgroups it runs with proctrack/linuxproc, task/none, no accounting (see
# ../shared/design/HPC_SLURM.md). Environment overrides: SLURM_CONF (default /etc/slurm/slurm.conf),
# SLURM_START_TIMEOUT (seconds to wait for the node to be idle, default 90).
set -euo pipefail

CONF="${SLURM_CONF:-/etc/slurm/slurm.conf}"
TIMEOUT="${SLURM_START_TIMEOUT:-90}"
NODE="$(hostname -s)"
LOGDIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

say() { echo "start_slurm: $*" >&2; }
running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }

if [[ "$(id -u)" != 0 ]]; then
    say "must run as root (it installs packages and starts daemons)"; exit 77
fi

# Already up? Nothing to do.
if command -v sinfo >/dev/null && running "$CTLD_PID" && running "$SLURMD_PID" \
        && [[ "$(node_state)" == idle || "$(node_state)" == mixed || "$(node_state)" == allocated ]]; then
    say "already running: node $NODE is $(node_state)"; exit 0
fi

# 1. Packages
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge; do
    command -v "${pair%%:*}" >/dev/null || [[ -x "/usr/sbin/${pair%%:*}" ]] || need+=("${pair##*:}")
done
if ((${#need[@]})); then
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
PATH="/usr/sbin:/sbin:$PATH"

# 2. Configuration (rewritten only when it changes)
cpus="$(nproc)"
mem_mb="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
mkdir -p "$(dirname "$CONF")" /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
new_conf="$(cat <<EOF
# Written by synth7t scripts/start_slurm.sh: single-node SLURM on $NODE (no systemd, no cgroups)
ClusterName=synth7t
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
DefMemPerCPU=512
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)"
if [[ ! -f "$CONF" ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" > "$CONF"
    say "wrote $CONF (node $NODE, CPUs=$cpus, RealMemory=$mem_mb MB)"
    # a running daemon must pick up the new configuration
    for pf in "$SLURMD_PID" "$CTLD_PID"; do
        if running "$pf"; then kill "$(cat "$pf")"; sleep 1; fi
    done
fi

# 3. munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! running "$MUNGE_PID"; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" \
        || runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done

# 4. SLURM daemons (they daemonise and write their pid files)
if ! running "$CTLD_PID"; then
    say "starting slurmctld"
    slurmctld -f "$CONF"
fi
if ! running "$SLURMD_PID"; then
    say "starting slurmd"
    slurmd -f "$CONF"
fi

# 5. Wait until the node is idle
t0=$SECONDS
while ((SECONDS - t0 < TIMEOUT)); do
    state="$(node_state || true)"
    case "$state" in
        idle|mixed|allocated)
            say "node $NODE is $state after $((SECONDS - t0)) s"; sinfo; exit 0 ;;
        down|drained|draining|fail|failing)
            scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
say "node $NODE not idle after ${TIMEOUT} s (state: ${state:-unknown}); logs in $LOGDIR"
tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
exit 1
