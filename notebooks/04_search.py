# Databricks notebook source
# MAGIC %md
# MAGIC # 4. Search the gallery mid-backfill
# MAGIC Every item is searchable in the new space at every moment of the backfill: the `new` items
# MAGIC by the new model's embeddings, the rest by `h`'s transformation of their old ones. This
# MAGIC notebook searches a run at its latest (or any earlier) committed batch with one query (an
# MAGIC image file, an item id or an embedding) and shows, for each hit, which model made it.
# MAGIC `serving = true` searches what the serving alias points at instead
# MAGIC (`pipelines/publish.py`; `docs/moving_gallery.md`).

# COMMAND ----------

try:
    dbutils  # noqa: F821 - defined on Databricks
except NameError:
    dbutils = None

import os

from fastfill_udfs.notebook import notebook_config

cfg = notebook_config({"policy": "backfill.policy", "run_name": "run_name",
                       "warehouse": "paths.warehouse", "k": "search.topk"}, dbutils)


def _query_param(name: str, default: str = "") -> str:
    """A query widget on Databricks, FASTFILL_SEARCH_<NAME> when run as plain Python."""
    if dbutils is not None:
        dbutils.widgets.text(name, default, name)
        return dbutils.widgets.get(name).strip()
    return os.environ.get(f"FASTFILL_SEARCH_{name.upper()}", default).strip()


image = _query_param("image")          # an image file, embedded by the run's new model
item_id = _query_param("item_id")      # or an item id (its new-model embedding)
embedding = _query_param("embedding")  # or numbers / a .npy file
batch = _query_param("batch")          # a committed batch; empty = the latest
serving = _query_param("serving", "false")   # true: what the serving alias points at (publish.py)

# COMMAND ----------

from fastfill_udfs.spark.search import search_job

if not (image or item_id or embedding):     # nothing asked: search with the first query item
    from fastfill_udfs.spark.delta_io import read_table, table_paths
    from fastfill_udfs.spark.session import get_spark

    item_id = read_table(get_spark(cfg["spark"]), table_paths(cfg).query_features) \
        .select("id").orderBy("id").first()["id"]

from fastfill_udfs.notebook import is_true

if is_true(serving):
    result = search_job(cfg, image=image or None, item_id=item_id or None,
                        embedding=embedding or None, serving=True)
else:
    result = search_job(cfg, policy=cfg.get_path("backfill.policy"), image=image or None,
                        item_id=item_id or None, embedding=embedding or None,
                        batch=int(batch) if batch else None)
hits = result["hits"]

# COMMAND ----------

# MAGIC %md
# MAGIC Which model answered: the share of `new` hits grows as the backfill proceeds.

# COMMAND ----------

print(hits.groupby(["source", "model_version"]).size().rename("hits").to_string())
