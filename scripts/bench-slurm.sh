#!/usr/bin/env bash
# Side by side on this machine: job submissions per second into a real Slurm
# (Debian's slurm-wlm and munge, one node, started here) with `sbatch`, and
# into suanwang with `suanwang bench submit`, both from 64 concurrent
# clients, both accepting jobs durably and not running them (Slurm jobs are
# submitted held; suanwang's server runs without agents). Prints the ratio.
#
# Needs root (it installs packages and starts the daemons). Usage:
#   scripts/bench-slurm.sh [JOBS] [CLIENTS]
set -euo pipefail
jobs=${1:-2000}
clients=${2:-64}
cd "$(dirname "$0")/.."

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get install -y -q slurm-wlm munge >/dev/null
fi

work=$(mktemp -d /tmp/suanwang-slurm.XXXXXX)
host=$(hostname -s)
cpus=$(nproc)
memory=$(awk '/MemTotal/ {print int($2 / 1024) - 512}' /proc/meminfo)

# munge: a key, and the daemon.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

# A one-node cluster.
mkdir -p "$work/spool" "$work/state" /etc/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=bench
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
ReturnToService=2
MpiDefault=none
MaxJobCount=1000000
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=bench Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
stop() {
  scancel --quiet --user root 2>/dev/null || true
  [ -f "$work/slurmctld.pid" ] && kill "$(cat "$work/slurmctld.pid")" 2>/dev/null || true
  [ -f "$work/slurmd.pid" ] && kill "$(cat "$work/slurmd.pid")" 2>/dev/null || true
}
trap stop EXIT
/usr/sbin/slurmctld -i
/usr/sbin/slurmd
for _ in $(seq 1 60); do
  sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed' && break
  sleep 1
done
sinfo -h -o '%P %T %c'

# Slurm: held batch jobs from $clients concurrent sbatch clients.
start=$(date +%s.%N)
seq "$jobs" | xargs -P "$clients" -I{} sbatch --hold --quiet --output=/dev/null --wrap true
end=$(date +%s.%N)
accepted=$(squeue -h -t PD | wc -l)
slurm_rate=$(echo "$jobs / ($end - $start)" | bc -l)

# suanwang: the same, through its HTTP API.
cargo build --release -q -p suanwang
suanwang_rate=$(./target/release/suanwang bench submit --clients "$clients" --jobs $((jobs * 10)) --quiet --dir "$work/suanwang")

printf '%-12s %12s %10s %14s\n' system submissions clients submissions/s
printf '%-12s %12s %10s %14.0f\n' slurm "$accepted" "$clients" "$slurm_rate"
printf '%-12s %12s %10s %14.0f\n' suanwang $((jobs * 10)) "$clients" "$suanwang_rate"
printf 'ratio suanwang/slurm: %.1f\n' "$(echo "$suanwang_rate / $slurm_rate" | bc -l)"
