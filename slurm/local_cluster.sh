#!/usr/bin/env bash
# Single-node SLURM cluster on this machine, built from Debian's packages.
#
#   bash slurm/local_cluster.sh up      # install (if needed), configure, start, wait until idle
#   bash slurm/local_cluster.sh status  # sinfo + daemon state; non-zero if not usable
#   bash slurm/local_cluster.sh down    # stop slurmd + slurmctld (munged is left running)
#
# Afterwards plain sbatch/squeue/scancel/sinfo/scontrol/srun work from any shell.
# Idempotent and non-interactive (works with CI=true and no stdin). Needs root
# for up/down (re-executes itself through `sudo -n` when not root). No systemd
# needed: the daemons are started directly.
#
# Environment overrides (all optional):
#   SLURM_LOCAL_WAIT   seconds to wait for the node to become idle (default 60)
#   SLURM_LOCAL_CLUSTER cluster name (default cityseg)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

CLUSTER_NAME="${SLURM_LOCAL_CLUSTER:-cityseg}"
WAIT_S="${SLURM_LOCAL_WAIT:-60}"
PARTITION=debug

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
CGROUP_CONF="$CONF_DIR/cgroup.conf"
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_LOG=/var/log/munge/munged.log

NODE="$(hostname -s)"

log() { printf '[local_cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
    if [[ $EUID -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            exec sudo -n -E bash "$0" "$@"
        fi
        die "must run as root (or with passwordless sudo)"
    fi
}

# pid of a running daemon by exact process name ("" if none).
daemon_pids() { pgrep -x "$1" 2>/dev/null || true; }
is_running() { [[ -n "$(daemon_pids "$1")" ]]; }

# ---------------------------------------------------------------- install
install_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge) missing=() p
    for p in "${pkgs[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
            missing+=("$p")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0

    log "installing: ${missing[*]}"
    # Keep the packages' maintainer scripts from trying to start services
    # (no config yet; and with or without systemd we start the daemons ourselves).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    {
        apt-get update -q -o DPkg::Lock::Timeout=300 &&
        apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}"
    } </dev/null || rc=$?
    if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi
    [[ $rc -eq 0 ]] || die "apt-get failed (rc=$rc)"
}

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge "$MUNGE_KEY"
    chmod 700 /etc/munge
    chmod 400 "$MUNGE_KEY"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge

    if is_running munged && munge_ok; then
        return 0
    fi
    if is_running munged; then
        log "munged running but not answering; restarting it"
        local pid
        for pid in $(daemon_pids munged); do kill "$pid" 2>/dev/null || true; done
        sleep 1
    fi
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force </dev/null ||
        die "munged failed to start: $(tail -n 20 "$MUNGE_LOG" 2>/dev/null)"
    for _ in $(seq 1 50); do
        munge_ok && return 0
        sleep 0.2
    done
    tail -n 30 "$MUNGE_LOG" >&2 2>/dev/null || true
    die "munge -n | unmunge does not work"
}

# ---------------------------------------------------------------- config
# The machine's CPUs, counted in a way no environment variable changes: `nproc` honours OMP_NUM_THREADS and
# OMP_THREAD_LIMIT, which many HPC login shells set to 1. slurmd's own count first (what it will register).
machine_cpus() {
    local hw
    hw="$(slurmd -C 2>/dev/null | head -n 1 || true)"
    if [[ $hw =~ CPUs=([0-9]+) ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        getconf _NPROCESSORS_ONLN
    fi
}

# CPUs of the node in the running cluster's slurm.conf (0 if none).
configured_cpus() {
    sed -n 's/^NodeName=.* CPUs=\([0-9]*\).*/\1/p' "$CONF" 2>/dev/null | head -n 1 | grep . || echo 0
}

node_line() {
    local cpus mem real topo="" hw running
    cpus="$(machine_cpus)"
    # `up` on a running cluster never shrinks it: keep its node line as it is.
    running="$(configured_cpus)"
    if { is_running slurmctld || is_running slurmd; } && (( running > cpus )); then
        log "keeping the running cluster's node (CPUs=$running; counted $cpus now)"
        grep -m 1 '^NodeName=' "$CONF"
        return
    fi
    mem="$(free -m | awk '/^Mem:/ {print $2}')"
    # Leave a little headroom so slurmd never reports less than configured.
    real=$(( mem > 2048 ? mem - 512 : mem * 9 / 10 ))
    # Use slurmd's view of the socket/core/thread layout when it agrees with the CPU count
    # (avoids "Node configuration differs from hardware"); otherwise just CPUs.
    hw="$(slurmd -C 2>/dev/null | head -n 1 || true)"
    if [[ $hw =~ CPUs=([0-9]+).*Boards=([0-9]+).*SocketsPerBoard=([0-9]+).*CoresPerSocket=([0-9]+).*ThreadsPerCore=([0-9]+) ]] \
        && [[ ${BASH_REMATCH[1]} == "$cpus" ]]; then
        topo=" Boards=${BASH_REMATCH[2]} SocketsPerBoard=${BASH_REMATCH[3]} CoresPerSocket=${BASH_REMATCH[4]} ThreadsPerCore=${BASH_REMATCH[5]}"
    fi
    echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus$topo RealMemory=$real State=UNKNOWN"
}

render_conf() {
    cat <<EOF
# Generated by slurm/local_cluster.sh -- single-node test cluster. Do not edit.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (BeginTime = requeue time + cred_expire + 1; Slurm's default is 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true

SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Re-evaluate pending jobs every few seconds (defaults: 60 s / 30 s), so jobs whose
# BeginTime passed (e.g. after a requeue) start promptly.
SchedulerParameters=sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the node line below even if slurmd detects a different topology.
SlurmdParameters=config_overrides

ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=300
Waittime=0

$(node_line)
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

CONF_CHANGED=0
write_config() {  # sets CONF_CHANGED=1 when slurm.conf was (re)written
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    chmod 755 "$CTLD_SPOOL" "$SLURMD_SPOOL"
    local tmp
    tmp="$(mktemp)"
    render_conf >"$tmp"
    if ! cmp -s "$tmp" "$CONF"; then
        install -m 644 "$tmp" "$CONF"
        CONF_CHANGED=1
    fi
    rm -f "$tmp"
    # Only read by cgroup plugins (not used here), but keep slurm from complaining.
    if [[ ! -e $CGROUP_CONF ]]; then
        printf '# Generated by slurm/local_cluster.sh (cgroup plugins are not used)\nCgroupPlugin=autodetect\n' >"$CGROUP_CONF"
        chmod 644 "$CGROUP_CONF"
    fi
}

# ---------------------------------------------------------------- daemons
stop_daemon() {  # name pidfile
    local name=$1 pidfile=$2 pids pid=""
    pids="$(daemon_pids "$name")"
    [[ -z $pids ]] && { rm -f "$pidfile"; return 0; }
    # Signal the main daemon (its pidfile); it takes its helpers (e.g.
    # slurmctld's slurmscriptd) down itself. Fall back to every matching pid.
    if [[ -s $pidfile ]]; then
        pid="$(cat "$pidfile")"
        grep -qx "$pid" <<<"$pids" || pid=""
    fi
    [[ -n $pid ]] && pids=$pid
    log "stopping $name (pid ${pids//$'\n'/ })"
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
        is_running "$name" || { rm -f "$pidfile"; return 0; }
        sleep 0.2
    done
    log "$name did not stop on SIGTERM; sending SIGKILL"
    for pid in $(daemon_pids "$name"); do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.5
    rm -f "$pidfile"
}

dump_logs() {
    local f
    for f in "$CTLD_LOG" "$SLURMD_LOG"; do
        if [[ -f $f ]]; then
            echo "----- tail $f -----" >&2
            tail -n 40 "$f" >&2 || true
        fi
    done
}

start_daemons() {
    if ! is_running slurmctld; then
        log "starting slurmctld"
        /usr/sbin/slurmctld </dev/null || { dump_logs; die "slurmctld failed to start"; }
    fi
    # slurmctld must answer before slurmd registers.
    local ok=0
    for _ in $(seq 1 60); do
        if scontrol ping 2>/dev/null | grep -q 'is UP'; then ok=1; break; fi
        is_running slurmctld || break
        sleep 0.5
    done
    [[ $ok -eq 1 ]] || { dump_logs; die "slurmctld is not responding"; }

    if ! is_running slurmd; then
        log "starting slurmd"
        SLURMD_STARTED_AT=$(date +%s)
        /usr/sbin/slurmd </dev/null || { dump_logs; die "slurmd failed to start"; }
    fi
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }

SLURMD_STARTED_AT=0
# True once the slurmd we started has registered with slurmctld (after a
# slurmctld restart the node's saved state can read "idle" before that).
slurmd_registered() {
    (( SLURMD_STARTED_AT == 0 )) && return 0
    local t
    t="$(scontrol show node "$NODE" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')"
    [[ -n $t && $t != None ]] || return 1
    t="$(date -d "$t" +%s 2>/dev/null)" || return 1
    (( t >= SLURMD_STARTED_AT - 2 ))
}

wait_idle() {
    local deadline=$(( SECONDS + WAIT_S )) state="" resumed=0
    while (( SECONDS < deadline )); do
        state="$(node_state || true)"
        case "$state" in
            idle|mixed|allocated|completing)
                slurmd_registered && return 0 ;;
            *drain*|*down*|*fail*)
                if ! is_running slurmd || ! is_running slurmctld; then break; fi
                if (( resumed == 0 )) || (( SECONDS % 10 == 0 )); then
                    log "node $NODE is '$state'; resuming it"
                    scontrol update nodename="$NODE" state=resume 2>/dev/null || true
                    resumed=1
                fi ;;
        esac
        sleep 1
    done
    log "node $NODE not idle after ${WAIT_S}s (state: '${state:-?}')"
    sinfo -N -l >&2 2>/dev/null || true
    scontrol show node "$NODE" >&2 2>/dev/null || true
    dump_logs
    return 1
}

# ---------------------------------------------------------------- commands
cmd_up() {
    need_root up
    local t0=$SECONDS
    install_packages
    start_munge
    write_config
    if [[ $CONF_CHANGED == 1 ]] && { is_running slurmctld || is_running slurmd; }; then
        log "slurm.conf changed; restarting daemons"
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$CTLD_PID"
    fi
    start_daemons
    wait_idle || die "cluster did not come up"
    local version
    version="$(sinfo --version 2>/dev/null | awk '{print $2}')"
    echo "local SLURM cluster '$CLUSTER_NAME' up: slurm $version, node $NODE ($(configured_cpus) CPUs), partition $PARTITION (default): $(node_state) [$(( SECONDS - t0 ))s]"
}

cmd_down() {
    need_root down
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    echo "local SLURM cluster stopped (munged left running)"
}

cmd_status() {
    local rc=0 d
    for d in munged slurmctld slurmd; do
        if is_running "$d"; then
            echo "$d: running (pid $(daemon_pids "$d" | tr '\n' ' ' | sed 's/ $//'))"
        else
            echo "$d: not running"
            rc=1
        fi
    done
    if ! is_running slurmctld; then
        echo "sinfo: skipped (slurmctld not running)"
        rc=1
    elif command -v sinfo >/dev/null 2>&1 && timeout 20 sinfo 2>/dev/null; then
        local state
        state="$(node_state || true)"
        case "$state" in
            idle|mixed|allocated|completing) echo "node $NODE: $state (usable)" ;;
            *) echo "node $NODE: ${state:-unknown} (not usable)"; rc=1 ;;
        esac
    else
        echo "sinfo: controller not reachable"
        rc=1
    fi
    return "$rc"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
