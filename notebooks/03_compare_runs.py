# Databricks notebook source
# MAGIC %md
# MAGIC # 3. Compare backfill runs
# MAGIC Tabulates the MLflow runs of this `run_name` (one per policy) and overlays their curves.

# COMMAND ----------

try:
    dbutils  # noqa: F821 - defined on Databricks
except NameError:
    dbutils = None

from fastfill_udfs.notebook import notebook_config

cfg = notebook_config({"run_name": "run_name", "experiment": "mlflow.experiment"}, dbutils)

# COMMAND ----------

from fastfill_udfs.compare import compare_runs
from fastfill_udfs.reporting import markdown_table

table, plot_path = compare_runs(cfg, run_prefix=cfg.get_path("run_name"))
print(markdown_table(table) if plot_path else "no backfill runs yet")

# COMMAND ----------

if plot_path is not None:
    try:
        from IPython.display import Image, display

        display(Image(filename=str(plot_path)))
    except ImportError:
        print(f"plot: {plot_path}")
