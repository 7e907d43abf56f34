"""Ingest: bring the gallery and the queries into the contract's Delta tables `gallery`,
`queries` and `query_features` (the new model's query embeddings).

Gallery sources (`data.dataset`):
* `gallery_table`: the user's own table (Delta or Parquet) with `id`, `old_embedding` and an
  image column (bytes or a path/URI); no old model is involved. Copied (validated, columns
  renamed per `data.columns`, extra columns untouched) into `gallery`, a versioned snapshot
  every plan is checked against.
* `image_folder` / `image_table` / `fashion_mnist`: images; `old_embedding` is computed by the
  old model (`models.old`) in Spark. For the first two the demo's training split
  (`data.train_fraction`, see `demo.protocol.train_mask`) is held out of the gallery.
Queries (`data.queries.source`): the gallery items themselves (leave-one-out), a table or an
image folder. Rows that cannot be used go to `quarantine` with a reason; counts reconcile.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import DATASETS, QUERY_SOURCES, Config
from fastfill_udfs.model_loading import ModelRef
from fastfill_udfs.preprocess import Preprocess
from fastfill_udfs.spark.delta_io import read_table, table_paths, write_quarantine, write_table
from fastfill_udfs.spark.images import attach_images
from fastfill_udfs.spark.sources import (conform, derived_subgroups, read_image_folder,
                                         read_source_table, source_marker)
from fastfill_udfs.spark.udfs import broadcast_payload, embed_images_fn, spread_over_slots
from fastfill_udfs.spark.validation import check_gallery, reconcile

log = logging.getLogger(__name__)
URI_CHUNK = 50_000  # image URIs named per binaryFile read when a whole source is embedded


def embed_images(spark: SparkSession, df: DataFrame, model: ModelRef, cfg: Config,
                 keep: list[str]) -> DataFrame:
    """`df` (with `id` and encoded `image` bytes) -> `keep` columns + `embedding` + `reason`
    (null when the item embedded), running `model` in Spark (loaded once per worker)."""
    payload = broadcast_payload(spark, model.payload())
    schema = ", ".join([f"`{f.name}` {f.dataType.simpleString()}" for f in df.schema.fields
                        if f.name in keep] + ["embedding array<float>", "reason string"])
    fn = embed_images_fn(payload, keep, Preprocess.from_config(cfg.get_path("models.preprocess")),
                         device=cfg.get_path("backfill.device"),
                         batch_size=cfg.get_path("backfill.inference_batch_size"),
                         decode_device=cfg.get_path("backfill.decode_device"))
    return spread_over_slots(spark, df).mapInArrow(fn, schema)


def with_image_bytes(spark: SparkSession, df: DataFrame, cfg: Config
                     ) -> tuple[DataFrame, DataFrame]:
    """`df` with an `image` bytes column: as it is, or read from `image_uri` (in chunks of
    URI_CHUNK URIs; missing files come back in the second DataFrame[id, reason])."""
    if "image_uri" not in df.columns:
        return df, spark.createDataFrame([], "id string, reason string")
    root = cfg.get_path("data.image_root")
    n = df.count()
    chunks = max(1, -(-n // URI_CHUNK))
    parts, bad = [], []
    for k in range(chunks):
        rows = df.where(F.pmod(F.xxhash64("id"), F.lit(chunks)) == k) if chunks > 1 else df
        with_bytes, missing = attach_images(spark, rows, root)
        parts.append(with_bytes)
        bad.append(missing)
    union = parts[0]
    for p in parts[1:]:
        union = union.unionByName(p)
    missing = bad[0]
    for b in bad[1:]:
        missing = missing.unionByName(b)
    return union, missing


def _train_split_filter(cfg: Config):
    """A mapInArrow function dropping the demo's training items (same rule as the study)."""
    from fastfill_udfs.demo.protocol import train_mask

    seed, fraction = cfg.get_path("seed"), cfg.get_path("data.train_fraction")

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            ids = batch.column("id").to_numpy(zero_copy_only=False)
            yield batch.filter(pa.array(~train_mask(ids, seed, fraction)))
    return run


def image_source(spark: SparkSession, cfg: Config, dataset: str
                 ) -> tuple[DataFrame, DataFrame]:
    """(items[id, label, subgroup, image | image_uri, ...], bad[id, reason]) of an image source,
    the demo's training split held out (image_folder / image_table with train_fraction > 0)."""
    empty_bad = spark.createDataFrame([], "id string, reason string")
    if dataset == "fashion_mnist":
        from fastfill_udfs.data import encode_png
        from fastfill_udfs.demo.protocol import load_split

        split = load_split(cfg, "test")
        items = pd.DataFrame({"id": split.ids.astype(str), "label": split.labels.astype(np.int32),
                              "subgroup": [g or None for g in split.subgroups],
                              "image": [encode_png(img) for img in split.images]})
        df = spark.createDataFrame(items, "id string, label int, subgroup string, image binary")
        return df, empty_bad
    if dataset == "image_folder":
        items, bad = read_image_folder(spark, cfg.resolve_path("data.image_folder"))
        df = items.select("id", "label", F.lit(None).cast("string").alias("subgroup"),
                          "image_uri", F.col("content").alias("image"))
    else:
        table = read_source_table(spark, cfg.resolve_path("data.image_table"),
                                  cfg.get_path("data.table_format"), key="data.image_table")
        df, bad = conform(table, cfg.get_path("data.columns"),
                          f"image table {cfg.get_path('data.image_table')}", old_embedding=False)
    if cfg.get_path("data.train_fraction") > 0:
        df = df.mapInArrow(_train_split_filter(cfg), df.schema)
    return derived_subgroups(df, cfg), bad


def gallery_source(spark: SparkSession, cfg: Config, old_model: ModelRef | None
                   ) -> tuple[DataFrame, DataFrame, DataFrame, list[DataFrame]]:
    """(gallery rows in the contract's shape, bad[id, reason], the source's items, what it
    cached: unpersist when done) for `data.dataset`; every source item ends up in exactly one
    of the first two."""
    dataset = cfg.get_path("data.dataset")
    if dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset == "gallery_table":
        path = cfg.resolve_path("data.gallery_table")
        table = read_source_table(spark, path, cfg.get_path("data.table_format"))
        rows, bad = conform(table, cfg.get_path("data.columns"), f"gallery table {path}",
                            old_embedding=True)
        return derived_subgroups(rows, cfg), bad, table, []
    if old_model is None:
        raise ValueError(f"data.dataset {dataset!r} holds images: models.old must name the model "
                         "that computes their old embeddings")
    items, bad = image_source(spark, cfg, dataset)
    source = items.select("id").unionByName(bad.select("id"))
    with_bytes, missing = with_image_bytes(spark, items, cfg)
    keep = [c for c in with_bytes.columns if c != "image"]
    if "image_uri" not in items.columns:
        keep.append("image")
    embedded = embed_images(spark, with_bytes, old_model, cfg, keep).persist()
    good = (embedded.where("reason IS NULL").drop("reason")
            .withColumnRenamed("embedding", "old_embedding"))
    bad = bad.unionByName(missing).unionByName(
        embedded.where("reason IS NOT NULL").select("id", "reason"))
    return good, bad, source, [embedded]


def query_source(spark: SparkSession, cfg: Config, gallery_path: str
                 ) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(query rows [id, label, subgroup, image | image_uri], bad[id, reason], source items)."""
    source = cfg.get_path("data.queries.source")
    if source not in QUERY_SOURCES:
        raise ValueError(f"data.queries.source must be one of {QUERY_SOURCES}, got {source!r}")
    empty_bad = spark.createDataFrame([], "id string, reason string")
    if source == "gallery":
        gallery = read_table(spark, gallery_path)
        image = "image_uri" if "image_uri" in gallery.columns else "image"
        rows = gallery.select("id", "label", "subgroup", image)
        return rows, empty_bad, rows
    path = cfg.resolve_path("data.queries.path")
    if source == "image_folder":
        items, bad = read_image_folder(spark, path)
        rows = derived_subgroups(items.select(
            "id", "label", F.lit(None).cast("string").alias("subgroup"), "image_uri"), cfg)
        return rows, bad, items.select("id").unionByName(bad.select("id"))
    table = read_source_table(spark, path, cfg.get_path("data.table_format"),
                              key="data.queries.path")
    rows, bad = conform(table, cfg.get_path("data.columns"), f"query table {path}",
                        old_embedding=False)
    image = "image_uri" if "image_uri" in rows.columns else "image"
    return derived_subgroups(rows.select("id", "label", "subgroup", image), cfg), bad, table


def ingest(spark: SparkSession, cfg: Config, *, new_model: ModelRef,
           old_model: ModelRef | None = None) -> dict:
    """Write `gallery`, `queries` and `query_features`; quarantine what cannot be used (stage
    `ingest` for the gallery, `queries` for the queries).

    Raises ValueError for an empty gallery or duplicate ids (naming a few), a missing or
    ill-typed source column (naming column and table), ReconciliationError on lost rows."""

    paths = table_paths(cfg)
    marker = source_marker(spark, cfg)     # before the copy: what a sync starts from
    rows, bad, source, cached = gallery_source(spark, cfg, old_model)
    where = f"gallery source ({cfg.get_path('data.dataset')})"
    rows = rows.persist()
    try:
        n_gallery = check_gallery(rows.select("id"), where)
        write_table(rows, paths.gallery,
                    metadata={"source": cfg.get_path("data.dataset"), **marker})
        n_bad = write_quarantine(spark, paths.quarantine, bad, stage="ingest")
        n_source = source.count()
    finally:  # a failing job releases what it cached
        for df in [rows, *cached]:
            df.unpersist()
    log.info("ingest: gallery %d rows, %d quarantined", n_gallery, n_bad)

    queries, q_bad, q_source = query_source(spark, cfg, paths.gallery)
    n_q_source = q_source.count()
    write_table(queries, paths.queries)
    queries = read_table(spark, paths.queries)
    with_bytes, missing = with_image_bytes(spark, queries, cfg)
    features = embed_images(spark, with_bytes, new_model, cfg,
                            ["id", "label", "subgroup"]).persist()
    try:
        write_table(features.where("reason IS NULL").select("id", "label", "subgroup",
                                                            "embedding"),
                    paths.query_features, metadata={"new_model": new_model.identity})
        n_q_bad = write_quarantine(spark, paths.quarantine, q_bad.unionByName(missing).unionByName(
            features.where("reason IS NOT NULL").select("id", "reason")), stage="queries")
    finally:
        features.unpersist()
    counts = {"source": n_source, "gallery": read_table(spark, paths.gallery).count(),
              "quarantine": n_bad, "query_source": n_q_source,
              "queries": read_table(spark, paths.queries).count(),
              "query_features": read_table(spark, paths.query_features).count(),
              "query_quarantine": n_q_bad}
    reconcile(counts, [("source", "gallery+quarantine"),
                       ("query_source", "query_features+query_quarantine")])
    log.info("ingest: wrote %s", counts)
    return counts
