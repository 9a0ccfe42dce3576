#!/usr/bin/env bash
# Bring up (start) or tear down (stop) a single-node SLURM on localhost for the workflow's SLURM
# test. Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages.
#   bash .ci/slurm.sh start   # installs the packages when missing, writes the config, starts daemons
#   bash .ci/slurm.sh stop
set -euo pipefail
STATE=/tmp/headperturb-slurm
case "${1:-}" in
start)
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
  mkdir -p "$STATE" /etc/slurm /var/spool/slurmctld /var/spool/slurmd /run/munge /var/log/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=headperturb
SlurmctldHost=localhost
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
CONF
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  pgrep -x slurmctld >/dev/null || (setsid slurmctld -D -i >"$STATE/ctld.out" 2>&1 & echo $! >"$STATE/ctld.pid")
  pgrep -x slurmd >/dev/null || (setsid slurmd -D -N localhost >"$STATE/d.out" 2>&1 & echo $! >"$STATE/d.pid")
  for _ in $(seq 60); do  # bounded wait for the node to come up
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      sinfo
      exit 0
    fi
    sleep 1
  done
  echo "SLURM did not come up in 60 s" >&2
  tail -20 "$STATE"/*.log "$STATE"/*.out >&2 || true
  exit 1
  ;;
stop)
  for name in slurmd slurmctld; do pkill -x "$name" || true; done
  pkill -x munged || true
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
