# Databricks notebook source
# MAGIC %md
# MAGIC # 2. Rank the gallery for backfilling
# MAGIC Scores every gallery item with the transformation `h` (transformed embedding + sigma) in a
# MAGIC Spark UDF, ranks by the chosen policy and writes `backfill_plan`, the initial
# MAGIC `gallery_features` and batch 0 of `backfill_log`. With `policy = auto` (the default) the
# MAGIC order is the one `train_transformation` chose from its forecast on held-out pairs
# MAGIC (random order when no candidate beat random there): shown below. An already ranked run is skipped;
# MAGIC `force = true` re-ranks it (its backfill starts over in a new MLflow run). Same job as
# MAGIC `pipelines/rank_gallery.py`.

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

cfg = notebook_config(["policy", "run_name", "warehouse", "tracking_uri", "model_new",
                       "model_h", "batch_size", "spark_log_level"], dbutils)
force = is_true(notebook_flag("force", dbutils))
show = Show(display)

# COMMAND ----------

from fastfill_udfs.spark.jobs import rank_job

result = rank_job(cfg, policy=cfg.get_path("backfill.policy"), force=force)
show(result, "rank_gallery" + (" (already ranked: skipped; force=true re-ranks)"
                                if result.get("skipped") else ""))

# COMMAND ----------

from pyspark.sql import functions as F

from fastfill_udfs.spark.delta_io import read_table, run_id_for, table_paths
from fastfill_udfs.spark.session import get_spark

spark = get_spark(cfg["spark"])
plan = read_table(spark, table_paths(cfg, run_id_for(cfg)).backfill_plan)
batches = (plan.groupBy("batch_id")
           .agg(F.count("*").alias("items"), F.min("rank").alias("first_rank"),
                F.round(F.avg("score"), 4).alias("mean_score"))
           .orderBy("batch_id").toPandas())
show(batches, f"the plan of {run_id_for(cfg)}: items and mean score (sigma) per batch")

# COMMAND ----------

from fastfill_udfs.model_loading import load_configured_model
from fastfill_udfs.spark.forecast import load_forecast

forecast = load_forecast(load_configured_model(cfg, "h"))
if forecast is not None:
    show(forecast.table(), f"forecast: {forecast.decision['key']} ({forecast.metric} AUC, "
         f"band {forecast.info.get('band', 0.9):.0%}) -- {forecast.decision['reason']}")
    show(forecast.stop["reason"], "where to stop")
