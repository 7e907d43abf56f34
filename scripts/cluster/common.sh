# Sourced by the scripts/cluster/*.sh scripts: where the venv's Spark lives and the cluster's
# settings. Every setting can be overridden from the environment:
#   FASTFILL_CLUSTER_DIR         logs, pid files, worker dirs   (default .cache/cluster)
#   FASTFILL_MASTER_PORT         master RPC port                (default 7077)
#   FASTFILL_MASTER_WEBUI_PORT   master web UI / JSON status    (default 8080)
#   FASTFILL_WORKER_WEBUI_PORT   first worker's web UI port     (default 8081; next worker +1)
#   FASTFILL_WORKERS             number of workers              (default 2)
#   FASTFILL_WORKER_CORES        cores per worker               (default 1)
#   FASTFILL_WORKER_MEMORY       memory per worker              (default 1500m)
#   FASTFILL_PYTHON              python of driver and executors (default .venv/bin/python)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${FASTFILL_PYTHON:-$ROOT/.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "[cluster] ERROR: no python at $PY: run bash scripts/setup.sh first" >&2
  exit 2
fi
# pip's pyspark is a complete Spark: its folder is SPARK_HOME (bin/, jars/, sbin/, conf/ with the
# spark-defaults.conf that scripts/setup.sh writes to enable Delta).
SPARK_HOME=$("$PY" -c 'import pyspark, os; print(os.path.dirname(pyspark.__file__))')
export SPARK_HOME
CLUSTER_DIR=${FASTFILL_CLUSTER_DIR:-$ROOT/.cache/cluster}
MASTER_PORT=${FASTFILL_MASTER_PORT:-7077}
MASTER_WEBUI_PORT=${FASTFILL_MASTER_WEBUI_PORT:-8080}
WORKER_WEBUI_PORT=${FASTFILL_WORKER_WEBUI_PORT:-8081}
NUM_WORKERS=${FASTFILL_WORKERS:-2}
WORKER_CORES=${FASTFILL_WORKER_CORES:-1}
WORKER_MEMORY=${FASTFILL_WORKER_MEMORY:-1500m}
MASTER_URL="spark://127.0.0.1:$MASTER_PORT"
MASTER_JSON="http://127.0.0.1:$MASTER_WEBUI_PORT/json/"

# Bind everything to the loopback interface; pid files and logs stay in the cluster folder.
export SPARK_MASTER_HOST=127.0.0.1 SPARK_LOCAL_IP=127.0.0.1
export SPARK_LOG_DIR="$CLUSTER_DIR/logs" SPARK_PID_DIR="$CLUSTER_DIR/pids"
export SPARK_IDENT_STRING=fastfill
export PYSPARK_PYTHON="$PY" PYSPARK_DRIVER_PYTHON="$PY"

MASTER_CLASS=org.apache.spark.deploy.master.Master
WORKER_CLASS=org.apache.spark.deploy.worker.Worker

clog() { printf '[cluster] %s\n' "$*"; }
