"""A user's source table that moves: the foreign gallery of `own_gallery_data` as a Delta table
with Change Data Feed on, and the edits a shop makes to it (rows added, changed, deleted) as
plain Delta writes by another writer. Added rows reuse the image files and old embeddings of
existing items under new ids; a changed row points at another image of its class with that
image's old embedding."""
from __future__ import annotations

from pathlib import Path

from .own_gallery_data import make_gallery


def make_delta_source(root: Path, per_class: int, *, spark) -> dict:
    """make_gallery, then its table as Delta (CDF on) at root/bucket/tables/gallery_delta."""
    setup = make_gallery(root, per_class)
    path = str(root / "bucket" / "tables" / "gallery_delta")
    (spark.read.parquet(str(setup["table"])).write.format("delta")
     .option("delta.enableChangeDataFeed", "true").save(path))
    return {**setup, "table": path}


def source_ids(spark, path: str) -> set[str]:
    return {r["item_id"] for r in spark.read.format("delta").load(path).select("item_id")
            .collect()}


def add_rows(spark, path: str, copies: dict[str, str]) -> None:
    """Append one row per `new_id -> existing_id`: the existing row's image, old embedding and
    class under the new id (one Delta commit)."""
    from pyspark.sql import functions as F

    src = spark.read.format("delta").load(path)
    pairs = spark.createDataFrame(list(copies.items()), "new_id string, item_id string")
    rows = src.join(pairs, "item_id").withColumn("item_id", F.col("new_id")).drop("new_id")
    rows.select(*src.columns).write.format("delta").mode("append").save(path)


def change_rows(spark, path: str, to: dict[str, str]) -> None:
    """Give each `id -> other_id` the other row's image path and old embedding (one MERGE)."""
    from delta.tables import DeltaTable

    src = spark.read.format("delta").load(path)
    other = (spark.createDataFrame(list(to.items()), "item_id string, other string")
             .join(src.selectExpr("item_id AS other", "image_path AS p", "old_embedding AS e"),
                   "other"))
    (DeltaTable.forPath(spark, path).alias("t").merge(other.alias("o"), "t.item_id = o.item_id")
     .whenMatchedUpdate(set={"image_path": "o.p", "old_embedding": "o.e"}).execute())


def delete_rows(spark, path: str, ids: list[str]) -> None:
    from delta.tables import DeltaTable

    quoted = ", ".join(f"'{i}'" for i in ids)
    DeltaTable.forPath(spark, path).delete(f"item_id IN ({quoted})")
