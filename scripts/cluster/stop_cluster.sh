#!/usr/bin/env bash
# Stop the standalone cluster started by start_cluster.sh (same FASTFILL_CLUSTER_DIR): the workers
# (which end their executors) and the master, by the pids in $FASTFILL_CLUSTER_DIR/pids. Waits
# for each process to exit (SIGKILL after 30 s). Safe to run when nothing is running.
set -uo pipefail
. "$(dirname "$0")/common.sh"

stop_one() {  # class instance
  local pidfile="$SPARK_PID_DIR/spark-$SPARK_IDENT_STRING-$1-$2.pid" pid=""
  [ -f "$pidfile" ] && pid=$(cat "$pidfile")
  "$SPARK_HOME/sbin/spark-daemon.sh" stop "$1" "$2" | sed 's/^/[cluster] /'
  [ -n "$pid" ] || return 0
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  clog "process $pid ($1) did not exit after SIGTERM; sending SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

shopt -s nullglob
for pidfile in "$SPARK_PID_DIR"/spark-"$SPARK_IDENT_STRING"-"$WORKER_CLASS"-*.pid; do
  instance=${pidfile##*-}; instance=${instance%.pid}
  stop_one "$WORKER_CLASS" "$instance"
done
stop_one "$MASTER_CLASS" 1
clog "stopped (logs kept in $CLUSTER_DIR/logs)"
