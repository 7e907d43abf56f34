"""Ingest: load a dataset into the `gallery`, `queries` and `query_features` Delta tables.

The gallery's `old_embedding` is computed by the old model in Spark (this stands in for the
gallery a user already has); query features by the new model. Undecodable images and bad labels
go to the `quarantine` table with a reason; row counts reconcile."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from torch import nn

from fastfill_udfs.config import Config
from fastfill_udfs.spark.delta_io import table_paths, write_quarantine, write_table
from fastfill_udfs.spark.udfs import ModelPayload, embed_images_fn
from fastfill_udfs.spark.validation import reconcile

log = logging.getLogger(__name__)
ITEM_SCHEMA = "id string, label int, subgroup string, image binary"


def load_source_items(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items[id, label, subgroup, image], rejected[id, reason]) for `data.dataset`."""
    from fastfill_udfs.data import encode_png, load_image_folder, load_image_table
    from fastfill_udfs.demo_data import load_split, subgroup_of

    dataset = cfg.get_path("data.dataset")
    own_column = cfg.get_path("data.subgroups.column")
    if own_column and dataset != "image_table":
        raise ValueError(f"data.subgroups.column ({own_column!r}) is read from an image table; "
                         f"data.dataset is {dataset!r} (use data.subgroups.minority_classes)")
    if dataset == "fashion_mnist":
        split = load_split(cfg, "test")
        items = pd.DataFrame({"id": split.ids.astype(str), "label": split.labels.astype(np.int32),
                              "subgroup": split.subgroups.astype(str),
                              "image": [encode_png(img) for img in split.images]})
        return items, pd.DataFrame({"id": [], "reason": []})
    if dataset == "image_folder":
        items, rejected = load_image_folder(cfg.resolve_path("data.image_folder"))
    elif dataset == "image_table":
        items, rejected = load_image_table(cfg.resolve_path("data.image_table"),
                                           extra_columns=[own_column] if own_column else [])
    else:
        raise ValueError(f"data.dataset must be fashion_mnist, image_folder or image_table, "
                         f"got {dataset!r}")
    items = items.copy()
    items["label"] = items["label"].astype(np.int32)
    if own_column:  # the user's subgroups; a null one means "no subgroup" (left out of them)
        items["subgroup"] = [("" if v is None or v != v else str(v)) for v in items[own_column]]
    else:
        items["subgroup"] = subgroup_of(items["label"].to_numpy(), cfg).astype(str)
    return items[["id", "label", "subgroup", "image"]], rejected[["id", "reason"]]


def embed_images(spark: SparkSession, df: DataFrame, model: nn.Module, cfg: Config,
                 keep: list[str]) -> DataFrame:
    """Add `embedding` (and `reason` for undecodable images) by running `model` in Spark."""
    payload = spark.sparkContext.broadcast(ModelPayload.from_model(model))
    schema = ", ".join([f"{f.name} {f.dataType.simpleString()}" for f in df.schema.fields
                        if f.name in keep] + ["embedding array<float>", "reason string"])
    fn = embed_images_fn(payload, keep, device=cfg.get_path("backfill.device"),
                         batch_size=cfg.get_path("backfill.inference_batch_size"))
    return df.mapInArrow(fn, schema)


def ingest(spark: SparkSession, cfg: Config, old_model: nn.Module, new_model: nn.Module) -> dict:
    """Write gallery, queries (= the gallery items, per the protocol) and query_features.

    Raises ValueError for an empty source or duplicate ids (naming them)."""
    paths = table_paths(cfg)
    items, rejected = load_source_items(cfg)
    if items.empty:
        raise ValueError(f"data source ({cfg.get_path('data.dataset')}) has no valid items"
                         + (f"; {len(rejected)} rejected" if len(rejected) else ""))
    dupes = items["id"][items["id"].duplicated()].unique()[:5].tolist()
    if dupes:
        raise ValueError(f"data source has duplicated ids, e.g. {dupes}")
    log.info("ingest: %d items (%d rejected while reading)", len(items), len(rejected))
    n_parts = max(2, spark.sparkContext.defaultParallelism)
    source = spark.createDataFrame(items, ITEM_SCHEMA).repartition(n_parts, "id")
    keep = ["id", "label", "subgroup", "image"]
    embedded = embed_images(spark, source, old_model, cfg, keep).persist()
    good = embedded.where("reason IS NULL").withColumnRenamed("embedding", "old_embedding")
    gallery = good.select(*keep, "old_embedding")
    write_table(gallery, paths.gallery)
    write_table(gallery, paths.queries)
    bad = embedded.where("reason IS NOT NULL").select("id", "reason")
    if len(rejected):
        bad = bad.unionByName(spark.createDataFrame(rejected.astype(str), "id string, reason string"))
    n_quarantined = write_quarantine(spark, paths.quarantine, bad, stage="ingest")
    embedded.unpersist()

    queries = spark.read.format("delta").load(paths.queries)
    features = embed_images(spark, queries.select(*keep), new_model, cfg, keep)
    write_table(features.where("reason IS NULL").select("id", "label", "subgroup", "embedding"),
                paths.query_features)
    counts = {"source": len(items) + len(rejected),
              "gallery": spark.read.format("delta").load(paths.gallery).count(),
              "quarantine": n_quarantined,
              "queries": queries.count(),
              "query_features": spark.read.format("delta").load(paths.query_features).count()}
    reconcile(counts, [("source", "gallery+quarantine"), ("queries", "query_features")])
    log.info("ingest: wrote %s", counts)
    return counts
