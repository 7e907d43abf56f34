# Databricks notebook source
# MAGIC %md
# MAGIC # 0. Ingest the gallery
# MAGIC Validates the gallery source (your table with old embeddings: `dataset = gallery_table`;
# MAGIC or images embedded by `models.old`), renames your columns to the data contract's, and
# MAGIC writes the `gallery`, `queries` and `query_features` Delta tables under `warehouse`. Rows
# MAGIC with a null id or a bad label go to `quarantine`. Same job as `pipelines/ingest.py`.

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

cfg = notebook_config(["run_name", "warehouse", "tracking_uri", "dataset", "gallery_table",
                       "image_root", "column_id", "column_old_embedding", "column_image",
                       "column_label", "column_subgroup", "model_new", "model_old",
                       "spark_log_level"], dbutils)
show = Show(display)

# COMMAND ----------

from fastfill_udfs.spark.jobs import ingest_job

counts = ingest_job(cfg)
show(counts, "row counts (they reconcile: source = gallery + quarantined)")

# COMMAND ----------

from fastfill_udfs.spark.delta_io import is_delta_table, read_table, table_paths
from fastfill_udfs.spark.session import get_spark

spark = get_spark(cfg["spark"])
paths = table_paths(cfg)
gallery = read_table(spark, paths.gallery)
preview = gallery.drop(*[c for c in ("old_embedding", "image") if c in gallery.columns])
show(preview.limit(20).toPandas(), f"gallery ({paths.gallery}), first rows")
show(gallery.groupBy("label", "subgroup").count().orderBy("label").toPandas(),
     "items per label and subgroup")
if is_delta_table(spark, paths.quarantine):
    show(read_table(spark, paths.quarantine).groupBy("stage", "reason").count().toPandas(),
         "quarantined rows")
