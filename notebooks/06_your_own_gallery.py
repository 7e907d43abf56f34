# Databricks notebook source
# MAGIC %md
# MAGIC # 6. Your own gallery, end to end
# MAGIC Your gallery table already holds `old_embedding` from a model that may no longer run;
# MAGIC your images live in object storage (or a Unity Catalog volume), referenced by path; your
# MAGIC new model was trained elsewhere and logged to MLflow. No old model is needed.
# MAGIC
# MAGIC Fill in the widgets: the table (`gallery_table`, Delta or Parquet), its column names
# MAGIC (`column_*`; `column_label` / `column_subgroup` may be empty), where relative image paths
# MAGIC start (`image_root`), the new model (`model_new`, `models:/name@alias`), where `h` is to
# MAGIC be registered (`model_h`) and the warehouse for the pipeline's own tables. Then run all:
# MAGIC it checks the table, ingests it, trains `h`, ranks the gallery by `policy` and backfills
# MAGIC `max_batches` batches (0 = all) with evaluation. Rerun the last cell to continue.

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

cfg = notebook_config(["gallery_table", "column_id", "column_old_embedding", "column_image",
                       "column_label", "column_subgroup", "image_root", "model_new", "model_h",
                       "warehouse", "outputs", "run_name", "tracking_uri", "experiment", "train_rows",
                       "policy", "batch_size", "max_batches", "device"], dbutils,
                      config_files="", overrides=["data.dataset=gallery_table"])
show = Show(display)

# COMMAND ----------

# 1. Your table as it is: its columns, its size, a few rows (no embeddings printed)
from fastfill_udfs.spark.session import get_spark
from fastfill_udfs.spark.sources import read_source_table

spark = get_spark(cfg["spark"])
source = read_source_table(spark, cfg.get_path("data.gallery_table"),
                           cfg.get_path("data.table_format"))
columns = cfg.get_path("data.columns")
missing = [f"{role}={name}" for role, name in columns.items()
           if name and name not in source.columns]
show({"table": cfg.get_path("data.gallery_table"), "rows": source.count(),
      "columns": ", ".join(source.columns),
      "missing (set the column_* widgets)": ", ".join(missing) or "none"},
     "your gallery table")
shown = [c for c in (columns["id"], columns["image"], columns["label"], columns["subgroup"])
         if c and c in source.columns]
show(source.select(*shown).limit(10).toPandas(), "first rows")

# COMMAND ----------

# 2. Ingest: validated, renamed to the data contract, snapshot as the `gallery` Delta table
from fastfill_udfs.spark.jobs import ingest_job

show(ingest_job(cfg), "ingest: row counts")

# COMMAND ----------

# 3. Train h on a sample of your gallery (new-model embeddings of their images as targets)
from fastfill_udfs.spark.jobs import train_transformation_job

trained = train_transformation_job(cfg)
show(trained, f"h registered as {trained['h_version']}")

# COMMAND ----------

# 4. Rank: sigma of every item (uncertainty) or a seeded random order, in batches
from pyspark.sql import functions as F

from fastfill_udfs.spark.delta_io import read_table, run_id_for, table_paths
from fastfill_udfs.spark.jobs import rank_job

policy = cfg.get_path("backfill.policy")
show(rank_job(cfg, policy=policy), f"rank ({policy})")
run = run_id_for(cfg)
plan = read_table(spark, table_paths(cfg, run).backfill_plan)
show(plan.groupBy("batch_id").agg(F.count("*").alias("items"),
                                  F.round(F.avg("score"), 4).alias("mean_score"))
     .orderBy("batch_id").toPandas(), f"the plan of {run}")

# COMMAND ----------

# 5. Backfill (max_batches at a time; rerun to continue) and the curve so far
from pathlib import Path

from fastfill_udfs.compare import run_curves
from fastfill_udfs.reporting import plot_curves
from fastfill_udfs.spark.jobs import backfill_job

result = backfill_job(cfg, policy=policy, evaluate=True)
show(read_table(spark, table_paths(cfg, run).backfill_log).orderBy("batch_id").toPandas(),
     "backfill_log")
curve = run_curves(result["mlflow_run_id"], ["backfill_fraction", "mAP", "top1", "top5"])
show(curve.reset_index(names="step"), f"{run}: retrieval after each committed batch")
curve_plot = plot_curves(curve.assign(policy=policy),
                         Path(cfg.resolve_path("paths.outputs")) / "backfill" / f"{run}_curve.png",
                         title=f"{run}: retrieval vs backfill fraction")
show(curve_plot, "the backfilling curve so far")
