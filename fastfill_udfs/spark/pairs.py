"""The pairs `train_transformation` trains `h` on and the forecast's probes: gallery items with
both embeddings (old from the table, new from the new model on their images), sampled by label
and seeded, written to `train_pairs`."""
from __future__ import annotations

import logging

import numpy as np
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.model_loading import ModelRef
from fastfill_udfs.spark.delta_io import latest_version, read_table, table_paths, write_table

log = logging.getLogger(__name__)


def _uniform(seed: int):
    """A seeded uniform [0, 1) value per id (independent of partitioning)."""
    h = F.xxhash64(F.col("id"), F.lit(f"fastfill-train-sample-{int(seed)}"))
    return (F.pmod(h, F.lit(1 << 52)).cast("double") / float(1 << 52)).alias("_u")


def sample_rows(df: DataFrame, rows: int, seed: int) -> DataFrame:
    """About exactly `rows` rows of `df`, seeded; each label keeps its share of the sample
    (largest remainder), rows without a label form a group of their own. Only one count per
    label reaches the driver. Raises ValueError for a non-positive `rows`."""
    if rows <= 0:
        raise ValueError(f"transformation.train_rows must be positive, got {rows}")
    counts = {r["label"]: r["count"] for r in df.groupBy("label").count().collect()}
    total = sum(counts.values())
    if rows >= total:
        return df
    exact = {k: c * rows / total for k, c in counts.items()}
    quota = {k: int(np.floor(v)) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (-(exact[k] - quota[k]), str(k)))[:rows - sum(quota.values())]:
        quota[k] += 1
    spark = df.sparkSession
    limits = spark.createDataFrame(
        [(k, int(q), min(1.0, 1.5 * q / counts[k] + 50.0 / counts[k])) for k, q in quota.items()],
        "label int, _quota int, _cut double")
    candidates = (df.withColumn("_u", _uniform(seed))
                  .join(F.broadcast(limits), df["label"].eqNullSafe(limits["label"]))
                  .drop(limits["label"]).where(F.col("_u") < F.col("_cut")))
    by_label = Window.partitionBy("label").orderBy("_u", "id")
    return (candidates.withColumn("_n", F.row_number().over(by_label))
            .where(F.col("_n") <= F.col("_quota")).drop("_u", "_quota", "_cut", "_n"))


def usable_gallery(spark: SparkSession, cfg: Config, version: int | None = None
                   ) -> tuple[DataFrame, str]:
    """(gallery rows with an old embedding free of NaN, at `version` (default latest), the
    name of their image column)."""
    gallery = read_table(spark, table_paths(cfg).gallery, version=version)
    image_col = "image_uri" if "image_uri" in gallery.columns else "image"
    return (gallery.where(F.col("old_embedding").isNotNull()
                          & ~F.exists("old_embedding", lambda x: F.isnan(x))), image_col)


def embed_pairs(spark: SparkSession, cfg: Config, new_model: ModelRef, sample: DataFrame,
                image_col: str, role: str) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(the pairs of `sample` (gallery rows) embedded by the new model: id, old_embedding,
    new_embedding, label, role; the items whose image is missing (id, reason); every embedded
    row with its `reason`, null when it embedded)."""
    from fastfill_udfs.spark.images import attach_images
    from fastfill_udfs.spark.ingest import embed_images

    missing = spark.createDataFrame([], "id string, reason string")
    if image_col == "image_uri":
        sample, missing = attach_images(spark, sample, cfg.get_path("data.image_root"))
    embedded = embed_images(spark, sample, new_model, cfg, ["id", "label", "old_embedding"])
    pairs = (embedded.where("reason IS NULL")
             .select("id", "old_embedding", F.col("embedding").alias("new_embedding"), "label",
                     F.lit(role).alias("role")))
    return pairs, missing, embedded


def build_pairs(spark: SparkSession, cfg: Config, new_model: ModelRef) -> dict:
    """Sample, embed and write `train_pairs` (role `sample`); returns {table, version, n_pairs,
    n_failed, n_gallery}."""
    paths = table_paths(cfg)
    gallery_version = latest_version(spark, paths.gallery)
    usable, image_col = usable_gallery(spark, cfg, gallery_version)
    sample = sample_rows(usable.select("id", "label", "old_embedding", image_col),
                         cfg.get_path("transformation.train_rows"), cfg.get_path("seed"))
    pairs, missing, embedded = embed_pairs(spark, cfg, new_model, sample, image_col, "sample")
    write_table(pairs, paths.train_pairs, metadata={
        "gallery_version": gallery_version, "new_model": new_model.identity,
        "seed": cfg.get_path("seed"), "train_rows": cfg.get_path("transformation.train_rows")})
    written = read_table(spark, paths.train_pairs)
    n_failed = missing.count() + embedded.where("reason IS NOT NULL").count()
    if n_failed:
        log.warning("train_transformation: %d sampled items could not be embedded (they stay "
                    "in the backfill plan)", n_failed)
    return {"table": paths.train_pairs, "version": latest_version(spark, paths.train_pairs),
            "n_pairs": written.count(), "n_failed": n_failed, "n_gallery": usable.count()}
