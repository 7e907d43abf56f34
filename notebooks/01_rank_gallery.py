# Databricks notebook source
# MAGIC %md
# MAGIC # 1. Rank the gallery for backfilling
# MAGIC Scores every gallery item with the transformation `h` (transformed embedding + sigma) in a
# MAGIC Spark UDF, ranks by the chosen policy and writes `backfill_plan`, the initial
# MAGIC `gallery_features` and batch 0 of `backfill_log`. Run `pipelines/run_study.py` (models)
# MAGIC and the ingest cell first on a fresh warehouse.

# COMMAND ----------

try:
    dbutils  # noqa: F821 - defined on Databricks
except NameError:
    dbutils = None

from fastfill_udfs.notebook import notebook_config

cfg = notebook_config({"policy": "backfill.policy", "run_name": "run_name",
                       "warehouse": "paths.warehouse", "batch_size": "backfill.batch_size"},
                      dbutils)

# COMMAND ----------

# Ingest (skip when the gallery table already exists)
from fastfill_udfs.spark.delta_io import is_delta_table, table_paths
from fastfill_udfs.spark.jobs import ingest_job
from fastfill_udfs.spark.session import get_spark

spark = get_spark(cfg["spark"])
if not is_delta_table(spark, table_paths(cfg).gallery):
    ingest_job(cfg)

# COMMAND ----------

from fastfill_udfs.spark.jobs import rank_job

result = rank_job(cfg, policy=cfg.get_path("backfill.policy"))
print(result)

# COMMAND ----------

from fastfill_udfs.spark.delta_io import read_table, run_id_for

plan = read_table(spark, table_paths(cfg, run_id_for(cfg)).backfill_plan)
plan.groupBy("batch_id").count().orderBy("batch_id").show(50)
