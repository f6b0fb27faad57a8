#!/usr/bin/env bash
# Stops the daemons that start-cluster.sh started (listed in $STATE/started), by pid file, in reverse
# order, and nothing else: a munged or MariaDB that was already running before stays up.
set -u
STATE=${SLURM_TEST_STATE:-/var/lib/slurm-test}
list="$STATE/started"
[ -s "$list" ] || { echo "slurm test cluster: nothing to stop"; exit 0; }
pids=()
for f in $(tac "$list"); do
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null && pids+=("$pid")
done
# wait (at most 20 s) until they have exited, so that a following start-cluster.sh starts afresh
for _ in $(seq 1 40); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.5
done
: > "$list"
echo "slurm test cluster stopped"
