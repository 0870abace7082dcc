#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for tests/slurm: Debian's slurmctld, slurmd, slurm-client and munge, run
# as root without systemd or cgroups (proctrack/linuxproc, task/none), no accounting, one fake GPU (gres backed by a
# character device) so that `--gpus-per-node=1` requests schedule.
#
#   bash tests/slurm/cluster.sh install | start | stop | status | up
#
# `up` installs what is missing and starts the daemons with no jobs (state from an earlier run is cleared); `stop`
# cancels the jobs still there (a job whose test has its result can still be finishing), waits for their steps to end,
# then kills exactly the daemons `start` started (by the pids they wrote): a job left behind would otherwise come back
# with the next `up` and hold the node, so that the next run's jobs pend. Everything lives under $HPA_SLURM_DIR (default /tmp/hpa-slurm); /etc/slurm and /etc/munge are written.
set -euo pipefail
BASE=${HPA_SLURM_DIR:-/tmp/hpa-slurm}
HOST=$(hostname -s)

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || { echo "cluster.sh: installing SLURM needs root" >&2; return 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
}

configure() {
  local mem_mb cpus
  mem_mb=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 1024 ))
  cpus=$(nproc)
  mkdir -p "$BASE"/state "$BASE"/spool "$BASE"/log "$BASE"/run "$BASE"/dev /etc/slurm
  [ -e "$BASE"/dev/nvidia0 ] || mknod "$BASE"/dev/nvidia0 c 1 3   # a fake GPU: /dev/null's device numbers
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=hpa-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
JobRequeue=0   # as on clusters that do not requeue by default: the launcher must ask (--requeue)
ReturnToService=2
MinJobAge=600
KillWait=30
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
# a partition that never runs anything: jobs sent there pend (reason PartitionDown), for the pending-job report
PartitionName=closed Nodes=$HOST MaxTime=INFINITE State=DOWN
CONF
  cat > /etc/slurm/gres.conf <<CONF
AutoDetect=off
NodeName=$HOST Name=gpu File=$BASE/dev/nvidia0
CONF
  [ -s /etc/munge/munge.key ] || mungekey --create 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
}

start() {
  configure
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid"
  /usr/sbin/slurmctld -c -i
  for _ in $(seq 30); do scontrol ping >/dev/null 2>&1 && break; sleep 1; done
  /usr/sbin/slurmd
  for _ in $(seq 30); do sinfo -h -o %T 2>/dev/null | grep -qx idle && break; sleep 1; done
  sinfo -h -o "%P %T %c cpus %m MB %G" || true
  echo "pids: munged $(cat /run/munge/munged.pid) slurmctld $(cat "$BASE"/run/slurmctld.pid) slurmd $(cat "$BASE"/run/slurmd.pid)"
}

stop() {
  local f pid
  if scontrol ping >/dev/null 2>&1; then
    scancel --full --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 30); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
  fi
  for f in "$BASE"/run/slurmd.pid "$BASE"/run/slurmctld.pid /run/munge/munged.pid; do
    if [ -s "$f" ]; then
      pid=$(cat "$f")
      kill "$pid" 2>/dev/null && echo "stopped $pid ($f)" || true
      rm -f "$f"
    fi
  done
}

status() { sinfo -h -o "%P %T" 2>/dev/null | grep -q . ; }

case "${1:-up}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  up) install && start ;;
  *) echo "usage: $0 install|start|stop|status|up" >&2; exit 2 ;;
esac
