#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the SLURM tests and for trying the profile.
#
#   sudo scripts/slurm-test-cluster.sh start    # install (Debian) if needed, configure, start, check sinfo
#   sudo scripts/slurm-test-cluster.sh status
#   sudo scripts/slurm-test-cluster.sh stop     # stop what start started
#
# Partitions `cpu` (default) and `gpu`; the node has one fake GPU (gres.conf: File=/dev/null), so GPU
# requests are scheduled and CUDA_VISIBLE_DEVICES is set, without a GPU. No accounting database:
# the executor plugin then needs `slurm-status-command: squeue`, and MinJobAge keeps finished jobs
# visible to squeue long enough for the plugin (and the tests) to read their final state.
set -euo pipefail

STATE_DIR=${SSL4SCI_SLURM_STATE:-/var/lib/ssl4sci-slurm}
CONF_DIR=/etc/slurm
HOST=$(hostname -s)

need_root() { [ "$(id -u)" = 0 ] || { echo "slurm-test-cluster: run as root (it writes $CONF_DIR and starts daemons)" >&2; exit 1; }; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null && command -v munged >/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null
}

write_config() {
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$CONF_DIR" "$STATE_DIR"/{ctld,spool,log}
    cat > "$CONF_DIR/slurm.conf" <<CONF
# Written by ssl4sci scripts/slurm-test-cluster.sh: a single-node test cluster.
ClusterName=ssl4sci-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
GresTypes=gpu
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$HOST CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
CONF
    echo "Name=gpu File=/dev/null" > "$CONF_DIR/gres.conf"
}

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    if ! pgrep -x munged >/dev/null; then
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- /usr/sbin/munged
        else
            /usr/sbin/munged --force
        fi
    fi
}

wait_for_node() {
    for _ in $(seq 1 60); do
        if sinfo --noheader --Node --format '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm-test-cluster: the node did not become idle; logs in $STATE_DIR/log" >&2
    sinfo >&2 || true
    tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
    return 1
}

start() {
    need_root
    install_packages
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
    wait_for_node
    # A node that was down in an earlier life comes back idle.
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
}

stop() {
    need_root
    for daemon in slurmd slurmctld munged; do
        pkill -x "$daemon" 2>/dev/null || true
    done
    echo "slurm-test-cluster: stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) sinfo && squeue --states=all ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
