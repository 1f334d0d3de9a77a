#!/usr/bin/env bash
# Side by side on this machine: job submissions per second into a real Slurm
# (Debian's slurm-wlm and munge, one node, started here) with `sbatch`, and
# into suanwang with `suanwang bench submit`, both from 64 concurrent
# clients, both accepting jobs durably and not running them (Slurm jobs are
# submitted held; suanwang's server runs without agents). Prints the ratio.
# Then the same cluster as a site of suanwang (`suanwang bench slurm`):
# submit-to-running latency, and dispatch beside plain sbatch.
#
# Needs root (scripts/slurm-clusters.sh installs packages and starts the
# daemons). Usage:
#   scripts/bench-slurm.sh [JOBS] [CLIENTS]
set -euo pipefail
jobs=${1:-2000}
clients=${2:-64}
cd "$(dirname "$0")/.."

# A one-node cluster, started by the project's own script (which installs
# slurm-wlm and munge if missing), stopped when this ends.
work=$(mktemp -d /tmp/suanwang-slurm-bench.XXXXXX)
# 1024 count-only GPUs: the network never holds work back for want of them.
export SUANWANG_SLURM_CLUSTERS="bench:127.0.0.1:16917:a100:1024"
trap 'scancel --quiet --user root 2>/dev/null || true; scripts/slurm-clusters.sh down "$work"' EXIT
scripts/slurm-clusters.sh up "$work"
export SLURM_CONF=$work/bench/slurm.conf

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

scancel --quiet --user root || true
./target/release/suanwang bench slurm --slurm-conf "$SLURM_CONF" --dir "$work/slurm-site"
