#!/usr/bin/env bash
# Start a standalone Spark cluster on this machine: one master and $FASTFILL_WORKERS (2) workers
# of 1 core / 1500m each, all bound to 127.0.0.1, with the venv's own Spark (pyspark).
#
#   bash scripts/cluster/start_cluster.sh        # then: spark-submit --master spark://127.0.0.1:7077
#   bash scripts/cluster/stop_cluster.sh
#
# pip's pyspark ships sbin/spark-daemon.sh but not start-master.sh / start-worker.sh; those two are
# thin wrappers around `spark-daemon.sh start <Master|Worker class> <instance> <args>`, which is
# what this script calls. Logs and pid files: $FASTFILL_CLUSTER_DIR (.cache/cluster, git-ignored).
# Exit status: 0 when the master reports all workers ALIVE; 3 when a port is taken (nothing is
# started); 1 when a daemon fails to come up (whatever was started is stopped again).
set -euo pipefail
. "$(dirname "$0")/common.sh"
mkdir -p "$CLUSTER_DIR/logs" "$CLUSTER_DIR/pids" "$CLUSTER_DIR/work"

if "$SPARK_HOME/sbin/spark-daemon.sh" status "$MASTER_CLASS" 1 >/dev/null 2>&1; then
  clog "a master from $CLUSTER_DIR is already running; checking it"
  exec "$PY" "$ROOT/scripts/cluster/cluster_status.py" --url "$MASTER_JSON" \
    --workers "$NUM_WORKERS" --timeout 60
fi

ports=("$MASTER_PORT" "$MASTER_WEBUI_PORT")
for i in $(seq 1 "$NUM_WORKERS"); do ports+=($((WORKER_WEBUI_PORT + i - 1))); done
if ! "$PY" "$ROOT/scripts/cluster/cluster_status.py" --check-ports "${ports[@]}"; then
  clog "ERROR: cannot start the cluster: a port it needs is in use (set FASTFILL_MASTER_PORT, FASTFILL_MASTER_WEBUI_PORT, FASTFILL_WORKER_WEBUI_PORT)"
  exit 3
fi

clog "SPARK_HOME=$SPARK_HOME ($("$PY" -c 'import pyspark; print("Spark", pyspark.__version__)'))"
clog "starting the master at $MASTER_URL (web UI http://127.0.0.1:$MASTER_WEBUI_PORT)"
"$SPARK_HOME/sbin/spark-daemon.sh" start "$MASTER_CLASS" 1 \
  --host 127.0.0.1 --port "$MASTER_PORT" --webui-port "$MASTER_WEBUI_PORT"
for i in $(seq 1 "$NUM_WORKERS"); do
  clog "starting worker $i: $WORKER_CORES core(s), $WORKER_MEMORY"
  mkdir -p "$CLUSTER_DIR/work/worker$i"
  "$SPARK_HOME/sbin/spark-daemon.sh" start "$WORKER_CLASS" "$i" "$MASTER_URL" \
    --host 127.0.0.1 --cores "$WORKER_CORES" --memory "$WORKER_MEMORY" \
    --webui-port $((WORKER_WEBUI_PORT + i - 1)) --work-dir "$CLUSTER_DIR/work/worker$i"
done

if ! "$PY" "$ROOT/scripts/cluster/cluster_status.py" --url "$MASTER_JSON" \
     --workers "$NUM_WORKERS" --timeout "${FASTFILL_CLUSTER_START_TIMEOUT:-120}"; then
  clog "ERROR: the cluster did not come up; last lines of its logs:"
  for f in "$CLUSTER_DIR"/logs/*.out; do echo "--- $f"; tail -15 "$f"; done
  bash "$(dirname "$0")/stop_cluster.sh" || true
  exit 1
fi
clog "cluster up: master $MASTER_URL, logs in $CLUSTER_DIR/logs"
