# Databricks notebook source
# MAGIC %md
# MAGIC # 3. Backfill with evaluation
# MAGIC Runs the new model on each pending batch in rank order, MERGEs the embeddings into
# MAGIC `gallery_features` (exactly once), logs the batch, and evaluates retrieval after each
# MAGIC batch in MLflow (`evaluate = false` skips it; the last cell then evaluates after the
# MAGIC fact). Rerunning continues where the last run stopped; `max_batches` is a compute budget
# MAGIC (0 = all); `stop = forecast` stops at the forecast's recommended fraction. Before the first
# MAGIC batch it measures the new model's rate on the plan's images and prints the cost;
# MAGIC `estimate_only = true` prints that and stops. Same jobs as `pipelines/backfill.py` and
# MAGIC `pipelines/evaluate.py`.

# COMMAND ----------

import os
import sys

try:
    import fastfill_udfs  # noqa: F401 - installed, or the checkout is on sys.path
except ImportError:  # a Databricks notebook runs in notebooks/: the bundle root is its parent
    sys.path.insert(0, os.path.dirname(os.getcwd()))

try:
    dbutils, display  # noqa: F821 - defined on Databricks
except NameError:
    dbutils = display = None

from fastfill_udfs.notebook import Show, is_true, notebook_config, notebook_flag

cfg = notebook_config(["policy", "run_name", "warehouse", "tracking_uri", "experiment",
                       "model_new", "model_h", "max_batches", "stop", "evaluate", "device",
                       "outputs", "spark_log_level"],
                      dbutils)
estimate_only = is_true(notebook_flag("estimate_only", dbutils))
show = Show(display)

# COMMAND ----------

from fastfill_udfs.spark.jobs import backfill_job, evaluate_job

result = backfill_job(cfg, policy=cfg.get_path("backfill.policy"), estimate_only=estimate_only)
show("\n".join(result["estimate"]), "what the backfill costs (measured before its first batch)")
if estimate_only and dbutils is not None:
    dbutils.notebook.exit("estimate only")
elif estimate_only:
    sys.exit(0)
show(result, "backfill")
if not cfg.get_path("backfill.evaluate"):
    result = evaluate_job(cfg, policy=cfg.get_path("backfill.policy"))
    show(result, "evaluate (after the fact, from the backfill log)")

# COMMAND ----------

from fastfill_udfs.spark.delta_io import read_table, run_id_for, table_paths
from fastfill_udfs.spark.session import get_spark

backfill_log = read_table(get_spark(cfg["spark"]), table_paths(cfg, run_id_for(cfg)).backfill_log)
show(backfill_log.orderBy("batch_id").toPandas(), "backfill_log")

# COMMAND ----------

from pathlib import Path

from mlflow.tracking import MlflowClient

from fastfill_udfs.compare import run_curves
from fastfill_udfs.reporting import plot_curves

run_id = result["mlflow_run_id"]
mlflow_run = MlflowClient().get_run(run_id)
curve = run_curves(run_id, ["backfill_fraction", "mAP", "top1", "top5"])
show(curve.reset_index(names="step"), f"MLflow run {mlflow_run.info.run_name}: "
     f"{mlflow_run.info.status} ({mlflow_run.data.tags.get('fastfill.state', '')})")
curve_plot = plot_curves(curve.assign(policy=cfg.get_path("backfill.policy")),
                         Path(cfg.resolve_path("paths.outputs")) / "backfill"
                         / f"{run_id_for(cfg)}_curve.png",
                         title=f"{run_id_for(cfg)}: retrieval vs backfill fraction")
show(curve_plot, "the backfilling curve so far")

# COMMAND ----------

import tempfile

names = {a.path for a in MlflowClient().list_artifacts(run_id)}
if "forecast_vs_realised.png" in names:  # the run is complete and its order had a forecast
    chart = MlflowClient().download_artifacts(run_id, "forecast_vs_realised.png",
                                              tempfile.mkdtemp())
    show(chart, "what the forecast said before the first batch, and what the backfill did")
