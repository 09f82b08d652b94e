#!/usr/bin/env bash
# A SLURM cluster on this machine, built from Debian's packages: one node (the machine itself), or N nodes, each
# a Linux network + UTS namespace with its own host name and address on a bridge.
#
#   bash slurm/local_cluster.sh up [--nodes N]  # install (if needed), configure, start, wait until idle
#   bash slurm/local_cluster.sh status          # daemons, and each node with its address and state
#   bash slurm/local_cluster.sh exec NODE CMD.. # run a command on a node (its network, host name and files)
#   bash slurm/local_cluster.sh down            # stop the daemons; remove namespaces, bridge and hosts entries
#
# One node (the default): slurmctld and slurmd run on this host at 127.0.0.1, and sbatch/squeue/scancel/sinfo/
# scontrol/srun work from any shell.
# N nodes: slurmctld runs in namespace cityseg-ctl (host cityseg-ctl, 10.213.0.1), which holds a bridge; node K
# is namespace cityseg-nodeK (host nodeK, 10.213.0.(10+K)) on it, with a slurmd of its own and its own spool,
# log and pid files (/var/spool/slurmd/nodeK, /var/log/slurm/slurmd-nodeK.log, /run/slurm/slurmd-nodeK.pid).
# Names resolve on every node (/etc/netns/<namespace>/hosts). The private addresses exist only inside these
# namespaces and nothing is routed off the machine: this shell reaches slurmctld through a forwarder on
# 127.0.0.1:6817 (socat), so sbatch, squeue, scancel, sinfo and scontrol work from any shell; what talks to
# slurmd directly (srun, salloc, scancel of a job step) runs inside a job or on a node (`exec`); the range is
# unreachable from this host (a route of type unreachable). `up` switches between 1 and N nodes.
# Idempotent and non-interactive (works with CI=true and no stdin). Needs root for up/down/exec (re-executes
# itself through `sudo -n` when not root). No systemd needed: the daemons are started directly.
#
# Environment overrides (all optional):
#   SLURM_LOCAL_WAIT   seconds to wait for the nodes to become idle (default 60)
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
NODES=1                                 # up --nodes N
MODE_FILE="$RUN_DIR/cityseg-nodes"      # the node count of a running cluster in namespaces
NET=10.213.0                            # private, inside the namespaces only
CTL_NS=cityseg-ctl
CTL_HOST=cityseg-ctl
PROXY_PID="$RUN_DIR/cityseg-proxy.pid"
HOSTS_MARK="# cityseg local_cluster"
node_ns() { echo "cityseg-node$1"; }

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
    local pkgs=(slurmctld slurmd slurm-client munge socat iproute2) missing=() p
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

auth_conf() {  # users and authentication, the same in both modes
    cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (BeginTime = requeue time + cred_expire + 1; Slurm's default is 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
EOF
}

scheduling_conf() {  # the settings both modes share: plugins, scheduling, requeue and timeouts
    cat <<EOF
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
# Seconds between a job's SIGTERM and its SIGKILL (default 30): cityseg's tiny test jobs save in well under a
# second, and a task that cannot take a signal (a stopped one, as in the stall watchdog's test) goes in 5 s.
KillWait=5
MinJobAge=300
Waittime=0
EOF
}

render_conf() {
    cat <<EOF
# Generated by slurm/local_cluster.sh -- single-node test cluster. Do not edit.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
$(auth_conf)

SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL

$(scheduling_conf)

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

# ---------------------------------------------------------------- several nodes
# Every node (and the controller) gets the same hosts file; this host reaches the controller at 127.0.0.1.
render_hosts() {
    echo "127.0.0.1 localhost"
    echo "$NET.1 $CTL_HOST"
    local i
    for i in $(seq 1 "$1"); do echo "$NET.$((10 + i)) node$i"; done
}

setup_network() {  # N: the bridge in the controller's namespace, one veth and namespace per node
    local n=$1 i ns
    ip netns list | grep -qw "$CTL_NS" || ip netns add "$CTL_NS"
    ip -n "$CTL_NS" link set lo up
    ip -n "$CTL_NS" link show br0 >/dev/null 2>&1 || ip -n "$CTL_NS" link add br0 type bridge
    ip -n "$CTL_NS" addr replace "$NET.1/24" dev br0
    ip -n "$CTL_NS" link set br0 up
    for i in $(seq 1 "$n"); do
        ns=$(node_ns "$i")
        ip netns list | grep -qw "$ns" || ip netns add "$ns"
        if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
            ip link add "vnode$i" netns "$CTL_NS" type veth peer name eth0 netns "$ns"
        fi
        ip -n "$CTL_NS" link set "vnode$i" master br0 up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr replace "$NET.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
    for ns in "$CTL_NS" $(for i in $(seq 1 "$n"); do node_ns "$i"; done); do
        mkdir -p "/etc/netns/$ns"
        render_hosts "$n" >"/etc/netns/$ns/hosts"
    done
    grep -q "$HOSTS_MARK" /etc/hosts || echo "127.0.0.1 $CTL_HOST $HOSTS_MARK" >>/etc/hosts
    # This host has no address in the range; a client here that tries one (srun, or scancel signalling a step,
    # talk to slurmd directly) must fail at once instead of sending it to the default gateway, off the machine.
    ip route replace unreachable "$NET.0/24"
}

remove_network() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cityseg-' || true); do
        ip netns del "$ns" 2>/dev/null || true  # the bridge and the veths go with the controller's namespace
        rm -rf "/etc/netns/$ns"
    done
    ip route del unreachable "$NET.0/24" 2>/dev/null || true
    if grep -q "$HOSTS_MARK" /etc/hosts; then
        grep -v "$HOSTS_MARK" /etc/hosts >/etc/hosts.cityseg.tmp || true
        cat /etc/hosts.cityseg.tmp >/etc/hosts  # in place: /etc/hosts may be a bind mount
        rm -f /etc/hosts.cityseg.tmp
    fi
}

render_conf_multi() {
    local n=$1 mem real i cpus
    cpus="$(machine_cpus)"
    mem="$(free -m | awk '/^Mem:/ {print $2}')"
    real=$(( mem > 2048 ? mem - 512 : mem * 9 / 10 ))
    cat <<CONF
# Generated by slurm/local_cluster.sh -- $n-node test cluster in network namespaces. Do not edit.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$CTL_HOST
$(auth_conf)

SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL/%n

$(scheduling_conf)

CONF
    for i in $(seq 1 "$n"); do
        echo "NodeName=node$i NodeAddr=$NET.$((10 + i)) CPUs=$cpus RealMemory=$real State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
}

stop_all_daemons() {  # every slurmd and slurmctld of either mode, and the forwarder
    local pid
    for pid in $(daemon_pids slurmd); do kill -TERM "$pid" 2>/dev/null || true; done
    stop_daemon slurmctld "$CTLD_PID"
    for _ in $(seq 1 100); do is_running slurmd || break; sleep 0.2; done
    for pid in $(daemon_pids slurmd); do kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$SLURMD_PID" "$RUN_DIR"/slurmd-*.pid
    if [[ -s $PROXY_PID ]]; then kill "$(cat "$PROXY_PID")" 2>/dev/null || true; rm -f "$PROXY_PID"; fi
}

node_pid() { cat "$RUN_DIR/slurmd-$1.pid" 2>/dev/null || true; }

# Start a daemon as host HOST in network namespace NS: a UTS namespace for its name and a mount namespace whose
# /etc/hosts is the namespace's (mounts made later on this host still reach it: propagation slave). Unlike
# `ip netns exec`, this keeps the host's /sys, where slurmd finds its cgroup file systems.
run_as_host() {  # NS HOST COMMAND...
    local ns=$1 host=$2
    shift 2
    nsenter --net="/run/netns/$ns" unshare --mount --uts --propagation slave \
        sh -c "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $host && exec \"\$@\"" sh "$@" </dev/null
}

start_multi() {
    local n=$1 i pid
    if ! is_running slurmctld; then
        log "starting slurmctld in $CTL_NS"
        run_as_host "$CTL_NS" "$CTL_HOST" /usr/sbin/slurmctld || { dump_logs; die "slurmctld failed to start"; }
    fi
    if ! { [[ -s $PROXY_PID ]] && kill -0 "$(cat "$PROXY_PID")" 2>/dev/null; }; then
        printf '#!/bin/sh\nexec ip netns exec %s socat STDIO TCP:%s:6817\n' "$CTL_NS" "$NET.1" \
            >"$RUN_DIR/cityseg-ctl-connect"
        chmod 755 "$RUN_DIR/cityseg-ctl-connect"
        setsid socat TCP-LISTEN:6817,bind=127.0.0.1,reuseaddr,fork EXEC:"$RUN_DIR/cityseg-ctl-connect" \
            </dev/null >/dev/null 2>&1 &
        echo $! >"$PROXY_PID"
    fi
    local ok=0
    for _ in $(seq 1 60); do
        if scontrol ping 2>/dev/null | grep -q 'is UP'; then ok=1; break; fi
        sleep 0.5
    done
    [[ $ok -eq 1 ]] || { dump_logs; die "slurmctld is not responding"; }
    for i in $(seq 1 "$n"); do
        pid="$(node_pid "node$i")"
        if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
            mkdir -p "$SLURMD_SPOOL/node$i"
            log "starting slurmd of node$i in $(node_ns "$i")"
            run_as_host "$(node_ns "$i")" "node$i" /usr/sbin/slurmd -N "node$i" \
                || { dump_logs; die "slurmd of node$i failed to start"; }
        fi
    done
}

wait_idle_multi() {
    local n=$1 deadline=$(( SECONDS + WAIT_S )) states="" node
    while (( SECONDS < deadline )); do
        states="$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)"
        if [[ $(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states" || true) -eq $n ]]; then return 0; fi
        for node in $(grep -E ' (down|drain|fail)' <<<"$states" | awk '{print $1}' || true); do
            scontrol update nodename="$node" state=resume 2>/dev/null || true
        done
        sleep 1
    done
    log "nodes not all idle after ${WAIT_S}s: ${states:-?}"
    dump_logs
    return 1
}

remove_extra_nodes() {  # namespaces of nodes beyond N, from a larger cluster before
    local n=$1 ns i
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cityseg-node' || true); do
        i=${ns#cityseg-node}
        if (( i > n )); then ip netns del "$ns" 2>/dev/null || true; rm -rf "/etc/netns/$ns"; fi
    done
}

cmd_up_multi() {
    local n=$1 conf_tmp previous
    previous="$(cat "$MODE_FILE" 2>/dev/null || echo 1)"
    if [[ $previous != "$n" ]] && { is_running slurmctld || is_running slurmd; }; then
        log "switching from $previous node(s) to $n"
        stop_all_daemons
        rm -rf "${CTLD_SPOOL:?}"/*  # the other cluster's nodes and jobs
    fi
    remove_extra_nodes "$n"
    setup_network "$n"
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    conf_tmp="$(mktemp)"
    render_conf_multi "$n" >"$conf_tmp"
    if ! cmp -s "$conf_tmp" "$CONF"; then
        install -m 644 "$conf_tmp" "$CONF"
        if is_running slurmctld || is_running slurmd; then stop_all_daemons; fi
    fi
    rm -f "$conf_tmp"
    echo "$n" >"$MODE_FILE"
    start_multi "$n"
    wait_idle_multi "$n" || die "cluster did not come up"
}

# ---------------------------------------------------------------- commands
parse_nodes() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --nodes) NODES="${2:-}"; shift; shift || true ;;
            --nodes=*) NODES="${1#--nodes=}"; shift ;;
            *) die "unknown option $1 (usage: $0 up [--nodes N])" ;;
        esac
    done
    [[ $NODES =~ ^[1-9][0-9]?$ ]] || die "--nodes: got '$NODES'; must be an integer from 1 to 99"
}

cmd_up() {
    need_root up "$@"
    parse_nodes "$@"
    local t0=$SECONDS version
    install_packages
    start_munge
    # from the package: sinfo --version itself needs a slurm.conf, which a fresh machine does not have yet
    version="$(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null | cut -d- -f1)"
    if (( NODES > 1 )); then
        cmd_up_multi "$NODES"
        echo "local SLURM cluster '$CLUSTER_NAME' up: slurm $version, $NODES nodes in network namespaces," \
             "partition $PARTITION (default) [$(( SECONDS - t0 ))s]"
        sinfo -N -h -o '  %N %o %T' 2>/dev/null | sort -u
        return
    fi
    if [[ "$(cat "$MODE_FILE" 2>/dev/null || echo 1)" != 1 ]]; then
        log "switching to one node"
        stop_all_daemons
        remove_network
        rm -rf "${CTLD_SPOOL:?}"/*
    fi
    rm -f "$MODE_FILE"
    write_config
    if [[ $CONF_CHANGED == 1 ]] && { is_running slurmctld || is_running slurmd; }; then
        log "slurm.conf changed; restarting daemons"
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$CTLD_PID"
    fi
    start_daemons
    wait_idle || die "cluster did not come up"
    echo "local SLURM cluster '$CLUSTER_NAME' up: slurm $version, node $NODE ($(configured_cpus) CPUs), partition $PARTITION (default): $(node_state) [$(( SECONDS - t0 ))s]"
}

cmd_down() {
    need_root down
    stop_all_daemons
    remove_network
    rm -f "$MODE_FILE"
    echo "local SLURM cluster stopped (munged left running)"
}

cmd_exec() {  # exec NODE CMD...: in the node's network, UTS and mount namespaces (its slurmd's)
    need_root exec "$@"
    local node=${1:-} pid
    shift || true
    [[ -n $node && $# -gt 0 ]] || die "usage: $0 exec NODE COMMAND..."
    pid="$(node_pid "$node")"
    if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then die "no running node '$node' (see: $0 status)"; fi
    exec nsenter -t "$pid" -n -u -m -- "$@"
}

cmd_status() {
    local rc=0 d node addr state total=0
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
        return 1
    fi
    if ! timeout 20 sinfo >/dev/null 2>&1; then
        echo "sinfo: controller not reachable"
        return 1
    fi
    while read -r node addr state; do
        [[ -n $node ]] || continue
        total=$(( total + 1 ))
        case "$state" in
            idle|mixed|allocated|completing) echo "node $node ($addr): $state (usable)" ;;
            *) echo "node $node ($addr): ${state:-unknown} (not usable)"; rc=1 ;;
        esac
    done < <(sinfo -h -N -o '%N %o %T' 2>/dev/null | sort -u)
    (( total > 0 )) || rc=1
    return "$rc"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    exec) shift; cmd_exec "$@" ;;
    *) echo "usage: $0 up [--nodes N]|status|exec NODE COMMAND...|down" >&2; exit 2 ;;
esac
