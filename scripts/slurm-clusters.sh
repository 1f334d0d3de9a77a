#!/usr/bin/env bash
# Real Slurm clusters for the Slurm sites' tests and demos: two (or more)
# independent clusters on loopback, each one slurmctld and one slurmd with
# count-only GPU GRES of its own type, sharing one munged, all under one
# directory and torn down by pid.
#
#   scripts/slurm-clusters.sh up     [DIR]   install if missing, start
#   scripts/slurm-clusters.sh status [DIR]   each cluster's controller and node
#   scripts/slurm-clusters.sh down   [DIR]   stop everything started in DIR
#
# DIR defaults to $SUANWANG_SLURM_DIR or /tmp/suanwang-slurm. Each cluster
# NAME gets DIR/NAME/slurm.conf: clients take SLURM_CONF=DIR/NAME/slurm.conf.
# The clusters are given as NAME:ADDRESS:CTLD_PORT:GPU_TYPE:GPUS in
# $SUANWANG_SLURM_CLUSTERS (default: alpha on 127.0.0.1 with 4 a100, beta on
# 127.0.0.2 with 4 910b). The main scheduler and backfill run every second.
#
# With SUANWANG_SLURM_ACCOUNTING=1 the clusters keep accounting: one
# slurmdbd on a MariaDB of its own (data in DIR/db, its password random and
# root-only), both clusters registered with it, GPUs counted as TRES; the
# first cluster's controller port + 4 and + 5 are MariaDB's and slurmdbd's.
set -euo pipefail

action=${1:-status}
dir=${2:-${SUANWANG_SLURM_DIR:-/tmp/suanwang-slurm}}
clusters=${SUANWANG_SLURM_CLUSTERS:-"alpha:127.0.0.1:16817:a100:4 beta:127.0.0.2:16827:910b:4"}

accounting=${SUANWANG_SLURM_ACCOUNTING:-0}
first=${clusters%% *}
first_port=$(echo "$first" | cut -d: -f3)
db_port=$((first_port + 4))
dbd_port=$((first_port + 5))

need_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    if [ "$accounting" = 1 ]; then
        command -v slurmdbd >/dev/null || missing+=(slurmdbd)
        command -v mariadbd >/dev/null || missing+=(mariadb-server)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    local m=$dir/munge
    mkdir -p "$m"
    chmod 700 "$m"
    if [ ! -f "$m/munge.key" ]; then
        dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
        chmod 400 "$m/munge.key"
    fi
    if alive "$m/munged.pid"; then return; fi
    munged --force --key-file="$m/munge.key" --socket="$m/munge.socket" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed"
}

accounting_lines() {
    if [ "$accounting" = 1 ]; then
        printf 'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=%s\nAccountingStoragePass=%s\nAccountingStorageTRES=gres/gpu\n' \
            "$dbd_port" "$dir/munge/munge.socket"
    else
        echo "AccountingStorageType=accounting_storage/none"
    fi
}

# MariaDB in DIR/db as root on its own port, and one slurmdbd for every cluster.
start_accounting() {
    local d=$dir/db
    mkdir -p "$d/dbd"
    chmod 700 "$d"
    if [ ! -d "$d/data/mysql" ]; then
        mariadb-install-db --user=root --datadir="$d/data" --auth-root-authentication-method=normal >"$d/install.log" 2>&1
    fi
    if ! alive "$d/mariadb.pid"; then
        mariadbd --no-defaults --user=root --datadir="$d/data" --socket="$d/mysql.sock" --port="$db_port" \
            --bind-address=127.0.0.1 --pid-file="$d/mariadb.pid" --log-error="$d/mariadb.log" --skip-name-resolve \
            </dev/null >/dev/null 2>&1 &
        for _ in $(seq 1 150); do [ -S "$d/mysql.sock" ] && break; sleep 0.1; done
    fi
    if [ ! -f "$d/password" ]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$d/password")
    fi
    local pw
    pw=$(cat "$d/password")
    mariadb --no-defaults -S "$d/mysql.sock" -u root \
        -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    # slurmdbd reads slurmdbd.conf next to $SLURM_CONF.
    cp "$dir/${first%%:*}/slurm.conf" "$d/dbd/slurm.conf"
    (
        umask 077
        printf '%s\n' "AuthType=auth/munge" "AuthInfo=socket=$dir/munge/munge.socket" "DbdHost=localhost" \
            "DbdAddr=127.0.0.1" "DbdPort=$dbd_port" "SlurmUser=root" "StorageType=accounting_storage/mysql" \
            "StorageHost=127.0.0.1" "StoragePort=$db_port" "StorageUser=slurm" "StoragePass=$pw" \
            "StorageLoc=slurm_acct_db" "PidFile=$d/dbd/slurmdbd.pid" "LogFile=$d/dbd/slurmdbd.log" \
            >"$d/dbd/slurmdbd.conf"
    )
    if ! alive "$d/dbd/slurmdbd.pid"; then
        SLURM_CONF=$d/dbd/slurm.conf slurmdbd
    fi
    local ready=0
    for _ in $(seq 1 50); do
        if SLURM_CONF=$d/dbd/slurm.conf timeout 2 sacctmgr -n list cluster >/dev/null 2>&1; then
            ready=1
            break
        fi
        sleep 0.2
    done
    if [ $ready = 0 ]; then
        echo "slurm-clusters: slurmdbd does not answer; see $d/dbd/slurmdbd.log" >&2
        return 1
    fi
    for spec in $clusters; do
        IFS=: read -r name _ <<<"$spec"
        SLURM_CONF=$dir/$name/slurm.conf sacctmgr -i add cluster "$name" >/dev/null 2>&1 || true
    done
}

write_conf() {
    local name=$1 address=$2 port=$3 gpu=$4 count=$5 c=$dir/$1
    mkdir -p "$c/state" "$c/spool"
    cat >"$c/slurm.conf" <<EOF
ClusterName=$name
SlurmctldHost=localhost($address)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$c/state
SlurmdSpoolDir=$c/spool/%n
SlurmctldPidFile=$c/slurmctld.pid
SlurmdPidFile=$c/slurmd.pid
SlurmctldLogFile=$c/slurmctld.log
SlurmdLogFile=$c/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
$(accounting_lines)
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
MaxJobCount=100000
KillWait=2
InactiveLimit=0
SlurmctldTimeout=10
SlurmdTimeout=30
NodeName=${name}1 NodeAddr=$address NodeHostname=localhost CPUs=16 RealMemory=16000 Gres=gpu:$gpu:$count State=UNKNOWN
PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Stand-ins for device files: slurmd counts a GPU by its file; jobs
    # never open them (GPU counts are resources the scheduler accounts for).
    mkdir -p "$c/dev"
    for i in $(seq 0 $((count - 1))); do : >"$c/dev/gpu$i"; done
    cat >"$c/gres.conf" <<EOF
AutoDetect=off
NodeName=${name}1 Name=gpu Type=$gpu File=$c/dev/gpu[0-$((count - 1))]
EOF
}

up() {
    need_packages
    mkdir -p "$dir"
    start_munge
    for spec in $clusters; do
        IFS=: read -r name address port gpu count <<<"$spec"
        write_conf "$name" "$address" "$port" "$gpu" "$count"
    done
    if [ "$accounting" = 1 ]; then start_accounting; fi
    for spec in $clusters; do
        IFS=: read -r name address port gpu count <<<"$spec"
        local c=$dir/$name
        alive "$c/slurmctld.pid" || SLURM_CONF=$c/slurm.conf slurmctld -f "$c/slurm.conf"
        alive "$c/slurmd.pid" || SLURM_CONF=$c/slurm.conf slurmd -f "$c/slurm.conf" -N "${name}1"
    done
    # Ready when every node answers as idle (or allocated, if jobs already
    # run); a daemon that died says why at once.
    for _ in $(seq 1 50); do
        if status >/dev/null 2>&1; then
            status
            return
        fi
        for spec in $clusters; do
            IFS=: read -r name _ <<<"$spec"
            for daemon in slurmctld slurmd; do
                if ! alive "$dir/$name/$daemon.pid"; then
                    echo "slurm-clusters: $daemon of $name is not running:" >&2
                    tail -3 "$dir/$name/$daemon.log" >&2
                    return 1
                fi
            done
        done
        sleep 0.2
    done
    status
    echo "slurm-clusters: not every cluster came up; logs are in $dir/*/slurm*.log" >&2
    return 1
}

status() {
    local ok=0
    for spec in $clusters; do
        IFS=: read -r name _ _ gpu count <<<"$spec"
        local c=$dir/$name state
        state=$(SLURM_CONF=$c/slurm.conf timeout 2 sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
        echo "$name: SLURM_CONF=$c/slurm.conf node ${name}1 ${state:-unreachable} gpu:$gpu:$count"
        case $state in idle | mix | alloc | drain* | drng) ;; *) ok=1 ;; esac
    done
    return $ok
}

down() {
    for spec in $clusters; do
        IFS=: read -r name _ <<<"$spec"
        for daemon in slurmd slurmctld; do
            local pidfile=$dir/$name/$daemon.pid
            if alive "$pidfile"; then
                kill "$(cat "$pidfile")"
                for _ in $(seq 1 50); do alive "$pidfile" || break; sleep 0.1; done
                alive "$pidfile" && kill -9 "$(cat "$pidfile")"
            fi
            rm -f "$pidfile"
        done
    done
    for pidfile in "$dir/db/dbd/slurmdbd.pid" "$dir/db/mariadb.pid"; do
        if alive "$pidfile"; then
            kill "$(cat "$pidfile")"
            for _ in $(seq 1 100); do alive "$pidfile" || break; sleep 0.1; done
            alive "$pidfile" && kill -9 "$(cat "$pidfile")"
        fi
        rm -f "$pidfile"
    done
    if alive "$dir/munge/munged.pid"; then kill "$(cat "$dir/munge/munged.pid")"; fi
    rm -f "$dir/munge/munged.pid"
}

case $action in
up) up ;;
status) status ;;
down) down ;;
*)
    echo "usage: $0 up|status|down [DIR]" >&2
    exit 2
    ;;
esac
