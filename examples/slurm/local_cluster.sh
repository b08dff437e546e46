#!/usr/bin/env bash
# A real single-node SLURM 22.05 cluster on this machine, for trying the sbatch templates and for the tests
# (tests/test_slurm.py). Needs the Debian packages slurm-wlm and munge and root (it writes /etc/slurm and starts
# munged, slurmctld and slurmd). Starts in ~1 s.
#
#   bash examples/slurm/local_cluster.sh start [CPUS]   # CPUS: how many CPUs the node declares (default 8)
#   bash examples/slurm/local_cluster.sh stop
#
# Settings a container needs: no cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), no accounting,
# the node named after `hostname -s`, munge's socket directory world-readable, and more CPUs declared than the
# machine has (SlurmdParameters=config_overrides) so 4-8 tasks of the tiny CPU model fit on a 2-core machine.
set -euo pipefail
cmd=${1:-start}
cpus=${2:-8}
node=$(hostname -s)
state=/var/spool/megallava-slurm

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  for _ in $(seq 50); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.1; done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
command -v slurmctld >/dev/null && command -v munged >/dev/null || {
  echo "slurm-wlm and munge are not installed (apt-get install -y slurm-wlm munge)" >&2; exit 3; }
stop
mkdir -p /etc/slurm "$state/ctld" "$state/d" /var/log/slurm /run/munge
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=megallava
SlurmctldHost=$node
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
KillWait=30
MinJobAge=600
NodeName=$node CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 755 /run/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
slurmctld
slurmd
for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then echo "slurm up: node $node, $cpus CPUs"; exit 0; fi
  sleep 0.1
done
echo "slurm did not come up; see /var/log/slurm/" >&2
exit 1
