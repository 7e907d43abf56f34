# Databricks notebook source
# MAGIC %md
# MAGIC # 1. Train the transformation h
# MAGIC Samples `train_rows` gallery rows (seeded, stratified by label), embeds their images with
# MAGIC the new model in Spark (`train_pairs`), trains `h` (old embedding -> new space + sigma,
# MAGIC FastFill loss) and registers it where `model_h` points (`models:/<name>@<alias>`). Same
# MAGIC job as `pipelines/train_transformation.py`.

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

from fastfill_udfs.notebook import Show, notebook_config

cfg = notebook_config(["run_name", "warehouse", "tracking_uri", "experiment", "model_new",
                       "model_h", "train_rows", "device", "outputs", "spark_log_level"], dbutils)
show = Show(display)

# COMMAND ----------

from fastfill_udfs.spark.jobs import train_transformation_job

result = train_transformation_job(cfg)
show(result, f"h trained and registered as {result['h_version']}")

# COMMAND ----------

from pathlib import Path

from mlflow.tracking import MlflowClient

from fastfill_udfs.reporting import pyplot

losses = [(m.step, m.value) for m in MlflowClient().get_metric_history(result["run_id"], "loss_h")]
plt = pyplot()
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([s for s, _ in losses], [v for _, v in losses])
ax.set(xlabel="epoch", ylabel="FastFill loss", title="training h")
ax.grid(alpha=0.3)
loss_plot = Path(cfg.resolve_path("paths.outputs")) / "train_transformation" / "loss_h.png"
loss_plot.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(loss_plot, dpi=100, bbox_inches="tight")
plt.close(fig)
show(loss_plot, "loss of h per epoch")
