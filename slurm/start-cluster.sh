#!/usr/bin/env bash
# A single-node SLURM test cluster with accounting (slurmctld + slurmd + slurmdbd on MariaDB, munge
# auth) from Debian 12's packages, for samat's SLURM tests. Run as root; idempotent: it installs what
# is missing, starts only daemons that are not running, and waits until the node is idle.
# Daemons it starts are listed in $STATE/started so that stop-cluster.sh stops exactly those.
# Settings: SLURM_TEST_STATE (state/log directory), SLURM_TEST_MAX_ARRAY_SIZE (MaxArraySize).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "start-cluster.sh: run as root (it installs packages and starts daemons)" >&2; exit 2; }
STATE=${SLURM_TEST_STATE:-/var/lib/slurm-test}
mkdir -p "$STATE"/{spool,state,log,run}
touch "$STATE/started"

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v mariadbd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client slurmdbd mariadb-server munge >/dev/null
fi

host=$(hostname -s)
# every processor this machine gives us: OMP_NUM_THREADS (which GNU nproc honours) is not the node's size
cpus=$(OMP_NUM_THREADS= OMP_THREAD_LIMIT= nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))

mkdir -p /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=samat-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again only after its credential expires (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# no systemd or cgroup v2 delegation here: track processes the simple way
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# sacct (which submitit and samat status call) needs slurmdbd
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, every job asks for the whole node's memory and tasks run one at a time
DefMemPerCPU=1024
MaxArraySize=${SLURM_TEST_MAX_ARRAY_SIZE:-1001}
MpiDefault=none
ReturnToService=2
# do not drain the node when the configured size differs from what slurmd detects
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
MailProg=/bin/true
MessageTimeout=20
KillWait=5
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm-test-only
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# Start a daemon with stdio on /dev/null and no other inherited descriptors: munged and slurmdbd keep
# what they inherit, and an inherited pipe keeps `start-cluster.sh | tee log` (or a CI log) open forever.
daemon() { ( cd /; for fd in $(ls /proc/$BASHPID/fd); do [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null; done
             exec "$@" </dev/null >/dev/null 2>&1 ); }
# Remember a daemon by its pid file, once, for stop-cluster.sh.
started() { grep -qxF "$1" "$STATE/started" || echo "$1" >> "$STATE/started"; }

# munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  daemon runuser -u munge -- /usr/sbin/munged
  started /run/munge/munged.pid
  for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n | unmunge >/dev/null

# MariaDB on a local socket, then the accounting database
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
if ! mariadb -e 'select 1' >/dev/null 2>&1; then
  # mariadbd stays in the foreground: setsid -f forks it away so that no shell waits on it
  daemon setsid -f mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --bind-address=127.0.0.1 --pid-file=/run/mysqld/mariadbd.pid --log-error="$STATE/log/mariadb.log"
  started /run/mysqld/mariadbd.pid
  for _ in $(seq 1 60); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
fi
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-test-only';
  ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'slurm-test-only';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

if ! running "$STATE/run/slurmdbd.pid"; then daemon slurmdbd; started "$STATE/run/slurmdbd.pid"; fi
# slurmctld exits at once if it cannot reach slurmdbd on its first start
ok=0; for _ in $(seq 1 60); do sacctmgr -n list cluster >/dev/null 2>&1 && { ok=1; break; }; sleep 1; done
[ "$ok" = 1 ] || { echo "slurmdbd did not answer:" >&2; tail -n 20 "$STATE/log/slurmdbd.log" >&2; exit 1; }
if ! running "$STATE/run/slurmctld.pid"; then daemon slurmctld; started "$STATE/run/slurmctld.pid"; fi
if ! running "$STATE/run/slurmd.pid"; then daemon slurmd; started "$STATE/run/slurmd.pid"; fi

for _ in $(seq 1 60); do
  case "$(sinfo -h -N -o '%t' 2>/dev/null | head -1)" in
    idle|mix|alloc)
      for _ in $(seq 1 30); do sacct -n >/dev/null 2>&1 && break; sleep 1; done
      echo "slurm test cluster up on $host ($cpus CPUs, ${mem} MB); stop it with slurm/stop-cluster.sh"
      exit 0;;
  esac
  sleep 1
done
echo "slurm test cluster did not come up; last log lines:" >&2
tail -n 20 "$STATE"/log/*.log >&2 || true
exit 1
