# Databricks notebook source
# MAGIC %md
# MAGIC # 7. Sync the gallery with your source table
# MAGIC Your table moves while the backfill runs: items arrive, change and leave. This brings the
# MAGIC gallery and every ranked run of `run_name` up to date: added rows are embedded by the new
# MAGIC model on arrival (`sync_mode = transform`: transformed by `h` and queued in the plan by
# MAGIC their score), rows with a new image or old embedding are embedded again, deleted rows
# MAGIC leave `gallery_features`, the plan and the index. It may run while the backfill task
# MAGIC works on the same run. Same job as `pipelines/sync_gallery.py`; the reference is
# MAGIC `docs/moving_gallery.md`.

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

cfg = notebook_config(["run_name", "warehouse", "tracking_uri", "gallery_table", "image_root",
                       "model_new", "model_h", "sync_mode", "spark_log_level"], dbutils)
show = Show(display)

# COMMAND ----------

import pandas as pd

from fastfill_udfs.spark.sync import sync_job

result = sync_job(cfg)
gallery = result["gallery"]
show(pd.DataFrame([{k: gallery[k] for k in (
    "sync_id", "method", "why", "source_version", "n_before", "n_after", "inserted", "updated",
    "content_changed", "deleted", "quarantined", "gallery_version")}]),
    f"the gallery: synced by {gallery['method']}")
show(pd.DataFrame(result["runs"]), "the runs brought along")

# COMMAND ----------

# MAGIC %md
# MAGIC Every sync that reached a run, from its `sync_log` (the backfill's MLflow run carries the
# MAGIC totals in the tag `fastfill.synced`; the curve's `n_gallery` and `synced_*` metrics).

# COMMAND ----------

from fastfill_udfs.spark.delta_io import is_delta_table, read_table
from fastfill_udfs.spark.session import get_spark
from fastfill_udfs.spark.sync import sync_log_path

spark = get_spark(cfg["spark"])
for r in result["runs"]:
    path = sync_log_path(cfg, r["run"])
    if is_delta_table(spark, path):
        show(read_table(spark, path).orderBy("sync_id").toPandas(), f"{r['run']}: sync_log")
