# Databricks notebook source
# MAGIC %md
# MAGIC # 5. Compare backfill runs
# MAGIC Tabulates the MLflow runs of this `run_name` (one per policy) and overlays their curves.
# MAGIC Only rankings current in Delta are compared; runs left out are listed with the reason.
# MAGIC `filter` takes an MLflow search filter, e.g. `tags.fastfill.policy = 'uncertainty'` or
# MAGIC `metrics.mAP_auc > 0.7`; set `run_name` empty to compare across run names. Same job as
# MAGIC `pipelines/compare.py`.

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

from fastfill_udfs.notebook import Show, notebook_config, notebook_flag

cfg = notebook_config(["run_name", "warehouse", "outputs", "tracking_uri", "experiment"], dbutils)
search_filter = notebook_flag("filter", dbutils)
show = Show(display)

# COMMAND ----------

from fastfill_udfs.compare import compare

found = compare(cfg, run_prefix=cfg.get_path("run_name") or None,
                filter_string=search_filter or None)
table, plot_path = found.table, found.plot
show(table, "current backfill runs" + (f" matching {search_filter}" if search_filter else ""))
if not found.left_out.empty:
    show(found.left_out, "left out")

# COMMAND ----------

if plot_path is not None:
    show(plot_path, "curves")
