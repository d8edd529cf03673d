#!/usr/bin/env bash
# Single-node SLURM test cluster for tests/test_slurm.py, on Debian 12 (slurm 22.05), as root,
# without systemd: installs the packages if missing, writes /etc/slurm/slurm.conf for this host
# (CPUs from nproc, 90 % of memory, one default partition `debug`, no accounting storage, a fake
# GRES of two GPUs: two plain files declared as gpu devices), starts munged, slurmctld and slurmd
# and waits until the node accepts work. Stop with stop-slurm.sh. Adapted from shared/slurm/.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
command -v slurmctld >/dev/null || {
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
}
H=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') * 9 / 10 ))
FAKEGPU=/var/spool/slurmd/fakegpu
# munge (the package's postinst already wrote /etc/munge/munge.key)
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; fi
for i in $(seq 50); do munge -n | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
touch "${FAKEGPU}0" "${FAKEGPU}1"
cat > /etc/slurm/gres.conf <<CONF
NodeName=${H} Name=gpu File=${FAKEGPU}[0-1]
CONF
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=testcluster
SlurmctldHost=${H}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue/scontrol for an hour (default 300 s): the test reads
# their resources after the run.
MinJobAge=3600
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
NodeName=${H} CPUs=${CPUS} RealMemory=${MEM} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# -c: a fresh controller forgets the jobs of an earlier run that was killed (state files).
scontrol ping >/dev/null 2>&1 || slurmctld -c
pgrep -F /run/slurmd.pid >/dev/null 2>&1 || slurmd
for i in $(seq 120); do
  [ "$(sinfo -h -n "$H" -o %T 2>/dev/null)" = idle ] && break
  sleep 0.5
done
[ "$(sinfo -h -n "$H" -o %T)" = idle ] || { sinfo -R; tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; exit 1; }
# `idle` can show before the node accepts work (after a restart): wait for a real job step.
# Then wait for that probe to leave the queue (it shows as COMPLETING for a moment), so that
# callers find the queue empty.
for i in $(seq 30); do
  if timeout 20 srun -t 1 true 2>/dev/null; then
    for j in $(seq 50); do [ -z "$(squeue -h)" ] && exit 0; sleep 0.2; done
    echo "start-slurm.sh: the probe job stays in the queue" >&2; squeue >&2; exit 1
  fi
  sleep 1
done
echo "start-slurm.sh: the node is idle but accepts no job" >&2
tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2
exit 1
