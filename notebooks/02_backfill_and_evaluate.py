# Databricks notebook source
# MAGIC %md
# MAGIC # 2. Backfill with evaluation
# MAGIC Runs the new model on each pending batch in rank order, MERGEs the embeddings into
# MAGIC `gallery_features`, logs the batch, and evaluates retrieval after each batch in MLflow.
# MAGIC Rerunning continues where the last run stopped; `max_batches` is a compute budget.

# COMMAND ----------

try:
    dbutils  # noqa: F821 - defined on Databricks
except NameError:
    dbutils = None

from fastfill_udfs.notebook import notebook_config

cfg = notebook_config({"policy": "backfill.policy", "run_name": "run_name",
                       "warehouse": "paths.warehouse", "max_batches": "backfill.max_batches"},
                      dbutils)

# COMMAND ----------

from fastfill_udfs.spark.jobs import backfill_job

result = backfill_job(cfg, policy=cfg.get_path("backfill.policy"), evaluate=True)
print(result)

# COMMAND ----------

from fastfill_udfs.spark.delta_io import read_table, run_id_for, table_paths
from fastfill_udfs.spark.session import get_spark

read_table(get_spark(cfg["spark"]), table_paths(cfg, run_id_for(cfg)).backfill_log) \
    .orderBy("batch_id").show(100, truncate=False)
