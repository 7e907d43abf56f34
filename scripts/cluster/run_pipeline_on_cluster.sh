#!/usr/bin/env bash
# Run the pipeline (ingest -> rank_gallery -> backfill, evaluating each batch as it commits) on
# a local standalone Spark cluster (a master and two workers on 127.0.0.1), the way a user runs
# it on a real cluster: spark-submit --master spark://..., the package shipped to the executors
# as a zip (--py-files), Delta from spark-defaults.conf (spark.jars; the driver serves the jars
# to the executors).
#
#   bash scripts/cluster/run_pipeline_on_cluster.sh [WORKDIR]
#
# WORKDIR (default: a new temp folder) receives the run's own warehouse, outputs, models and
# MLflow database. The models come from a tiny study run locally first (pipelines/run_study.py,
# no cluster needed), unless WORKDIR already holds an MLflow database (WORKDIR/mlflow.db) where
# a study registered them (models:/fastfill_old, fastfill_new, fastfill_h @current): then those
# are used as they are (a rerun in the same WORKDIR, or the test suite's own models). Data: a
# small Fashion-MNIST subset (FASTFILL_CLUSTER_TEST_LIMIT=200 gallery items,
# FASTFILL_CLUSTER_TRAIN_LIMIT=1000 training items, FASTFILL_CLUSTER_BATCHES=2 batches),
# ingested on the cluster unless WORKDIR/warehouse already holds the `gallery` table (then the
# ingest is skipped: the test suite brings the gallery its session ingested).
# The cluster is started here and stopped on exit unless one is already running from the same
# FASTFILL_CLUSTER_DIR (then it is left running). See scripts/cluster/common.sh for ports etc.
# Exit status: 0 on success, 3 when the cluster cannot start because a port is taken, else 1.
set -euo pipefail
. "$(dirname "$0")/common.sh"
cd "$ROOT"

WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/fastfill-cluster.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
TEST_LIMIT=${FASTFILL_CLUSTER_TEST_LIMIT:-200}
TRAIN_LIMIT=${FASTFILL_CLUSTER_TRAIN_LIMIT:-1000}
BATCHES=${FASTFILL_CLUSTER_BATCHES:-2}
SETS=(
  --set "paths.warehouse=$WORK/warehouse" --set "paths.outputs=$WORK/outputs"
  --set "mlflow.tracking_uri=sqlite:///$WORK/mlflow.db"
  --set run_name=cluster --set backfill.policy=uncertainty
  --set "data.test_limit=$TEST_LIMIT" --set "data.train_limit=$TRAIN_LIMIT"
  --set "backfill.num_batches=$BATCHES"
)
STUDY_SETS=(
  --set "study.policies=[fastfill_uncertainty]" --set transformation.objective=fastfill
  --set "demo.old_model.channels=[4, 8]" --set demo.old_model.embedding_dim=16
  --set "demo.new_model.channels=[4, 8]" --set demo.new_model.embedding_dim=24
  --set transformation.hidden_dim=32 --set transformation.epochs=2
  --set transformation.batch_size=128
)
export MLFLOW_ENABLE_ASYNC_LOGGING=false
# This run has its own MLflow database in WORKDIR (read back at step 6/6); an inherited
# MLFLOW_TRACKING_URI would win over the config and send the runs elsewhere.
unset MLFLOW_TRACKING_URI
T0=$(date +%s)
step() { clog "[$(( $(date +%s) - T0 )) s] $*"; }

step "work folder $WORK"
STARTED=0
START_PID=""
cleanup() {
  [ -n "$START_PID" ] && wait "$START_PID" 2>/dev/null || true
  if [ "$STARTED" = 1 ]; then step "stopping the cluster"; bash "$ROOT/scripts/cluster/stop_cluster.sh" || true; fi
}
trap cleanup EXIT
# The cluster starts in the background while the models train (both take a while).
if "$SPARK_HOME/sbin/spark-daemon.sh" status "$MASTER_CLASS" 1 >/dev/null 2>&1; then
  step "1/6 using the cluster already running from $CLUSTER_DIR"
else
  step "1/6 starting the cluster (in the background; log $WORK/start_cluster.log)"
  STARTED=1
  bash "$ROOT/scripts/cluster/start_cluster.sh" > "$WORK/start_cluster.log" 2>&1 &
  START_PID=$!
fi

: > "$WORK/timings.txt"
if [ -f "$WORK/mlflow.db" ]; then
  step "2/6 models from the MLflow store already in $WORK/mlflow.db (no training)"
else
  step "2/6 training tiny models locally (pipelines/run_study.py; no cluster needed)"
  TS=$(date +%s)
  "$PY" pipelines/run_study.py --config conf/test.yaml "${SETS[@]}" "${STUDY_SETS[@]}" \
    > "$WORK/run_study.log" 2>&1 || { tail -40 "$WORK/run_study.log"; exit 1; }
  grep -q "h models:/fastfill_h@current -> models:/fastfill_h/" "$WORK/run_study.log"
  echo "run_study $(( $(date +%s) - TS ))" >> "$WORK/timings.txt"
fi

ZIP="$WORK/fastfill_udfs.zip"
"$PY" - "$ZIP" <<'PYEOF'
import sys, zipfile
from pathlib import Path
root = Path("fastfill_udfs")
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as zf:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            zf.write(path, path.as_posix())
print(f"[cluster] packaged the package for the executors: {sys.argv[1]} "
      f"({len(zipfile.ZipFile(sys.argv[1]).namelist())} files)")
PYEOF

if [ -n "$START_PID" ]; then
  rc=0
  wait "$START_PID" || rc=$?
  START_PID=""
  sed 's/^/    /' "$WORK/start_cluster.log"
  echo "cluster_ready_after $(( $(date +%s) - T0 ))" >> "$WORK/timings.txt"
  if [ "$rc" != 0 ]; then
    STARTED=0  # start_cluster.sh stops what it started when it fails
    clog "ERROR: the cluster did not start (exit $rc)"
    exit "$rc"
  fi
fi
step "3/6 cluster up at $MASTER_URL"

# Executors: 1 core / 1g each, one per worker; the driver serves the Delta jars (spark.jars in
# spark-defaults.conf) and the zip to them. Executors run the venv's python.
SUBMIT=("$SPARK_HOME/bin/spark-submit" --master "$MASTER_URL" --deploy-mode client
  --driver-memory 1g --executor-memory 1g --executor-cores 1 --total-executor-cores "$NUM_WORKERS"
  --conf "spark.pyspark.python=$PY" --conf "spark.pyspark.driver.python=$PY"
  --conf spark.ui.showConsoleProgress=false --conf spark.ui.enabled=false
  --conf "spark.sql.shuffle.partitions=$((2 * NUM_WORKERS))" --conf spark.default.parallelism=$((2 * NUM_WORKERS))
  --py-files "$ZIP")
submit() {  # name, script, args...: run one job, its log in $WORK/<name>.log
  local name=$1; shift
  local t=$(date +%s)
  if ! "${SUBMIT[@]}" "$@" > "$WORK/$name.log" 2>&1; then
    clog "ERROR: $name failed; last lines of $WORK/$name.log:"
    grep -v -E '^\s+at |WARN' "$WORK/$name.log" | tail -40
    exit 1
  fi
  grep -E '^CLUSTER_CHECK |^\[cluster-check\]' "$WORK/$name.log" || true
  grep -E 'INFO fastfill_udfs' "$WORK/$name.log" | grep -v -E 'batch [0-9]+/' | tail -4 | sed 's/^/    /' || true
  step "$name done in $(( $(date +%s) - t )) s"
  echo "$name $(( $(date +%s) - t ))" >> "$WORK/timings.txt"
}

step "4/6 cluster check: executors on the workers, package from --py-files, Delta MERGE on executors"
submit cluster_check scripts/cluster/cluster_check.py --scratch "$WORK/scratch" \
  --expect-executors "$NUM_WORKERS"
"$PY" "$ROOT/scripts/cluster/cluster_status.py" --url "$MASTER_JSON" --workers "$NUM_WORKERS" --timeout 5

step "5/6 pipeline on $MASTER_URL: ingest, rank_gallery, backfill (evaluating each batch)"
if [ -d "$WORK/warehouse/gallery/_delta_log" ]; then
  step "gallery already ingested in $WORK/warehouse (no ingest)"
else
  submit ingest pipelines/ingest.py --config conf/test.yaml "${SETS[@]}"
fi
submit rank_gallery pipelines/rank_gallery.py --config conf/test.yaml "${SETS[@]}" --policy uncertainty
submit backfill pipelines/backfill.py --config conf/test.yaml "${SETS[@]}" --policy uncertainty

step "6/6 results"
"$PY" "$ROOT/scripts/cluster/cluster_status.py" --url "$MASTER_JSON" --apps || true
"$PY" - "$WORK" "$T0" "$MASTER_URL" <<'PYEOF'
import json, os, sys, time
from pathlib import Path
import mlflow
from mlflow.tracking import MlflowClient
import pyarrow.parquet as pq
from urllib.parse import unquote
work = Path(sys.argv[1])
table = work / "warehouse/runs/cluster_uncertainty/backfill_log"
live = set()   # replay the Delta log: the data files of the latest version
for commit in sorted((table / "_delta_log").glob("*.json")):
    for line in commit.read_text().splitlines():
        action = json.loads(line)
        if "add" in action:
            live.add(unquote(action["add"]["path"]))
        elif "remove" in action:
            live.discard(unquote(action["remove"]["path"]))
batches = sorted(b for f in live for b in pq.read_table(table / f, columns=["batch_id"])
                 .column("batch_id").to_pylist())
mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
runs = MlflowClient().search_runs(
    [e.experiment_id for e in MlflowClient().search_experiments()],
    filter_string="tags.`fastfill.run` = 'cluster_uncertainty'")
metrics = runs[0].data.metrics if runs else {}
timings = dict(line.split() for line in (work / "timings.txt").read_text().splitlines() if line)
summary = {"backfill_log_batches": batches, "mlflow_run": runs[0].info.run_id if runs else None,
           "mAP_auc": metrics.get("mAP_auc"), "top1_auc": metrics.get("top1_auc"),
           "master": sys.argv[3], "wall_s": round(time.time() - int(sys.argv[2])),
           "step_s": {k: int(v) for k, v in timings.items()},
           "nproc": os.cpu_count(), "loadavg_end": list(os.getloadavg())}
(work / "cluster_result.json").write_text(json.dumps(summary, indent=2))
print("CLUSTER_RESULT " + json.dumps(summary))
PYEOF
step "done: pipeline ran on $MASTER_URL; logs and tables in $WORK"
