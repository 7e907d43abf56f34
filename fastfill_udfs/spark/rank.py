"""rank_gallery: score the gallery with `h` in an Arrow UDF, rank it by the policy with a
distributed sort, cut it into batches, and write `backfill_plan`, the initial
`gallery_features` (transformed, plus the items `h` was trained on as `new`) and batch 0 of
`backfill_log`, whose commit metadata records what the plan was made from (gallery version, h,
the new model and its dimension, policy, counts).

Layout: `backfill_plan` is partitioned by `batch_id` and carries each item's image (bytes or
URI), `gallery_features` is partitioned by `planned_batch_id`, so a backfill batch reads and
rewrites only its own partition (write and read amplification ~1)."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np
import pandas as pd  # module level: the pandas UDF's type hints resolve against it
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.model_loading import ModelRef
from fastfill_udfs.policies import POLICIES, batching_from_config
from fastfill_udfs.spark.delta_io import (commit_metadata, is_delta_table, latest_version,
                                          quarantine_count, read_table, table_paths,
                                          write_quarantine, write_table)
from fastfill_udfs.spark.sync_history import moved_by_syncs_only
from fastfill_udfs.spark.udfs import transform_fn
from fastfill_udfs.spark.validation import check_embedding_dim, check_gallery, reconcile

log = logging.getLogger(__name__)
LOG_SCHEMA = ("batch_id int, n_items long, table_version long, started_at timestamp, "
              "finished_at timestamp")


def batch_id_column(rank: Column, n_items: int, *, batch_size: int | None = None,
                    num_batches: int | None = None) -> Column:
    """1-based batch id of a 0-based rank, the same rule as `policies.batch_id_for_rank`."""
    if (batch_size is None) == (num_batches is None):
        raise ValueError("give exactly one of batch_size or num_batches")
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return (F.floor(rank / batch_size) + 1).cast("int")
    if not 1 <= num_batches <= max(n_items, 1):
        raise ValueError(f"num_batches must be in [1, {n_items}], got {num_batches}")
    q, big = divmod(n_items, num_batches)
    split = big * (q + 1)
    return F.when(rank < split, F.floor(rank / (q + 1)) + 1).otherwise(
        F.floor((rank - split) / max(q, 1)) + big + 1).cast("int")


@contextmanager
def assign_ranks(scored: DataFrame, storage: StorageLevel = StorageLevel.DISK_ONLY
                 ) -> Iterator[DataFrame]:
    """Context manager yielding `scored` with `rank` added (0 = highest score; ties by id), by a
    distributed sort: each sorted partition counts its rows, the driver turns the (few) counts
    into offsets, and rank = offset + position in partition. Nothing but one count per
    partition reaches the driver. The sorted rows are cached while the block runs (both passes
    must see the same partitioning) and released when it ends."""
    ordered = (scored.orderBy(F.desc("score"), F.asc("id"))
               .withColumn("_part", F.spark_partition_id())
               .withColumn("_mid", F.monotonically_increasing_id())
               .persist(storage))
    try:
        counts = sorted((r["_part"], r["count"])
                        for r in ordered.groupBy("_part").count().collect())
        offsets, total = [], 0
        for part, count in counts:
            offsets.append((part, total))
            total += count
        offset_df = scored.sparkSession.createDataFrame(offsets, "_part int, _offset long")
        # monotonically_increasing_id = partition index << 33 | position in partition
        position = F.col("_mid") - F.shiftleft(F.col("_part").cast("long"), 33)
        yield (ordered.join(F.broadcast(offset_df), "_part")
               .withColumn("rank", F.col("_offset") + position)
               .drop("_part", "_mid", "_offset"))
    finally:
        ordered.unpersist()


RANKED_ON = "ranked_on_gallery_version"  # key of the batch-0 commit's metadata


class StaleRankingError(ValueError):
    """A run's plan was ranked on another gallery version or another `h` than the current."""


def plan_metadata(spark: SparkSession, cfg: Config, run: str) -> dict | None:
    """What batch 0 of `run` recorded about its plan (gallery version, h, new model, new_dim,
    policy, counts); None for a run not ranked (or ranked before this was recorded)."""
    path = table_paths(cfg, run).backfill_log
    if not is_delta_table(spark, path):
        return None
    return commit_metadata(spark, path, RANKED_ON)


def check_ranking_current(spark: SparkSession, cfg: Config, run: str,
                          h: ModelRef | None = None) -> None:
    """Raise StaleRankingError when `run` was ranked on another version of the gallery table (a
    new ingest) or, given `h`, with another `h` (version or weights)."""
    ranked = plan_metadata(spark, cfg, run)
    if ranked is None:
        return  # not ranked at all: the caller says so in its own words
    paths = table_paths(cfg, run)
    problems = []
    now = latest_version(spark, paths.gallery)
    # a gallery moved by sync_gallery.py only is still this plan's: the sync brings the run along
    if ranked[RANKED_ON] != now and not moved_by_syncs_only(spark, paths.gallery,
                                                            ranked[RANKED_ON]):
        problems.append(f"the gallery table is at version {now}, the plan was ranked on version "
                        f"{ranked[RANKED_ON]}")
    was = ranked.get("h") or {}
    if h is not None and (was.get("version"), was.get("weights")) != (h.version, h.weights_hash):
        problems.append(f"models.h is {h.version} (weights {h.weights_hash}), the plan was ranked "
                        f"with {was.get('version')} (weights {was.get('weights')})")
    if problems:
        raise StaleRankingError(
            f"run '{run}' is stale: {'; '.join(problems)}. Re-rank it with "
            f"pipelines/rank_gallery.py --policy {ranked.get('policy', '<policy>')} --force "
            "(its backfill starts over)")


def is_ranked(spark: SparkSession, cfg: Config, run: str) -> bool:
    """True when batch 0 of `run` is committed in backfill_log (ranking finished)."""
    path = table_paths(cfg, run).backfill_log
    return is_delta_table(spark, path) and read_table(spark, path).where("batch_id = 0").count() > 0


def batch_boundaries(ranked: DataFrame, n_items: int, batching: dict) -> list[tuple[float, str]]:
    """(score, id) of the first item of batches 2, 3, ...: with them any row's batch follows
    from its own (score, id) alone (`planned_batch_udf`), without joining it to the plan."""
    from fastfill_udfs.policies import batch_sizes

    starts = np.cumsum(batch_sizes(n_items, **batching))[:-1]
    if not len(starts):
        return []
    rows = (ranked.where(F.col("rank").isin([int(s) for s in starts]))
            .select("rank", "score", "id").collect())
    return [(r["score"], r["id"]) for r in sorted(rows, key=lambda r: r["rank"])]


def batch_of(scores: np.ndarray, ids: np.ndarray, boundaries: list[tuple[float, str]]
             ) -> np.ndarray:
    """1-based batch id of rows ordered by (score descending, id ascending), given the first
    (score, id) of each batch after the first."""
    out = np.ones(len(scores), dtype=np.int32)
    if not boundaries or not len(scores):
        return out
    neg = -np.array([b[0] for b in boundaries], dtype=np.float64)
    bids = np.array([b[1] for b in boundaries], dtype=object)
    key = -np.asarray(scores, dtype=np.float64)
    lo = np.searchsorted(neg, key, side="left")
    hi = np.searchsorted(neg, key, side="right")
    out += lo.astype(np.int32)
    for i in np.flatnonzero(hi > lo):  # equal scores: the id decides
        out[i] += int(np.sum(bids[lo[i]:hi[i]] <= ids[i]))
    return out


def planned_batch_udf(boundaries_bc):
    """Scalar pandas UDF (score, id) -> `planned_batch_id`. Only these two columns travel to the
    Python worker; the wide `transformed` arrays stay in the JVM (a mapInArrow over whole rows
    shipped them there and back, ~2 s per million 128-d rows)."""
    @F.pandas_udf("int")
    def planned_batch_id(score: pd.Series, item_id: pd.Series) -> pd.Series:
        return pd.Series(batch_of(score.to_numpy(dtype=np.float64),
                                  item_id.to_numpy(dtype=object), boundaries_bc.value))
    return planned_batch_id


def order_metadata(h: ModelRef, policy: str) -> dict:
    """What batch 0 records of the order: for ``auto``, the order h's forecast chose, the
    MLflow run that holds the forecast, and the mixed-gallery calibration the chosen order
    includes (the evaluation and search score the run's transformed items with it)."""
    if policy != "auto":
        return {"forecast_run": h.run_id}
    spec = h.model.auto_order or {}
    return {"order": spec.get("name"), "forecast_run": h.run_id,
            "calibration": spec.get("calibration")}


def training_pairs(spark: SparkSession, h: ModelRef, new_model: ModelRef) -> DataFrame | None:
    """The (id, embedding) pairs `h` was trained on (train_transformation.py records their table
    and version in h's MLflow run), or None for an `h` trained elsewhere. Raises ValueError when
    they were embedded by another new model than `new_model`, naming both."""
    params = h.run_params()
    table, version = params.get("pairs_table"), params.get("pairs_version")
    if not table:
        return None
    made_by = params.get("new_model_version")
    if made_by and made_by != new_model.version:
        raise ValueError(f"h ({h.version}) was trained on pairs embedded by {made_by}, but "
                         f"models.new is {new_model.version}: retrain h with "
                         "pipelines/train_transformation.py or point models.new at that model")
    return (read_table(spark, table, version=int(version))
            .select("id", F.col("new_embedding").alias("embedding")))


def rank_gallery(spark: SparkSession, cfg: Config, h: ModelRef, new_model: ModelRef,
                 policy: str, run: str, *, force: bool = False) -> dict:
    """Rank the gallery for `run` by `policy` ("uncertainty" | "random").

    Skips when the run is already ranked, unless `force`: then the run's log is emptied first
    and the backfill starts over (in a new MLflow run). Raises ValueError for an unknown
    policy, `uncertainty` with an `h` lacking an uncertainty head, `prototype` with an `h`
    without prototypes, a gallery whose embeddings
    do not fit `h`, or one whose rows are all quarantined (with the count and reasons). Rows
    with null / wrong-size / NaN embeddings, or a non-finite output of `h`, are quarantined
    with the reason; counts reconcile."""
    if policy not in POLICIES:
        raise ValueError(f"backfill.policy must be one of {POLICIES}, got {policy!r}")
    if policy == "oracle":
        raise ValueError("policy 'oracle' needs the new model's embeddings of the whole gallery; "
                         "it is an analysis ceiling (see pipelines/run_study.py), not a plan")
    model = h.model
    if policy == "uncertainty" and not model.has_uncertainty:
        raise ValueError("policy 'uncertainty' needs an h trained with the fastfill objective "
                         f"(h {h.version} has no uncertainty head)")
    if policy == "auto":
        from fastfill_udfs.spark.forecast import announce_forecast

        announce_forecast(h)           # refuses an h without a forecast choice
    if policy == "prototype" and getattr(model, "prototypes", None) is None:
        raise ValueError(f"policy 'prototype' needs class prototypes stored with h (h {h.version} "
                         "has none): train h with pipelines/train_transformation.py on labelled "
                         "pairs")
    paths = table_paths(cfg, run)
    if is_ranked(spark, cfg, run):
        if not force:
            check_ranking_current(spark, cfg, run, h=h)
            log.info("rank %s: already ranked (batch 0 in %s); skipping", run, paths.backfill_log)
            return {"skipped": True}
        # Unrank first: a re-rank that dies half-way must not leave the old log (batches done)
        # beside a new plan. The next backfill starts over and logs into a new MLflow run.
        log.warning("rank %s: --force: discarding the run's backfill log and plan", run)
        write_table(spark.createDataFrame([], LOG_SCHEMA), paths.backfill_log)
    started = datetime.now(timezone.utc)
    version = latest_version(spark, paths.gallery)
    gallery = read_table(spark, paths.gallery, version=version)
    image_col = "image_uri" if "image_uri" in gallery.columns else "image"
    n_gallery = check_gallery(gallery.select("id"), f"gallery table {paths.gallery}")
    check_embedding_dim(gallery.limit(1000), "old_embedding", model.old_dim,
                        f"gallery table {paths.gallery}", f"h ({h.version})")
    if is_delta_table(spark, paths.query_features):  # the queries the curve will rank with
        check_embedding_dim(read_table(spark, paths.query_features).limit(1000), "embedding",
                            model.new_dim, f"query_features {paths.query_features} (embedded by "
                            f"the new model)", f"h ({h.version}), whose output")
    pairs = training_pairs(spark, h, new_model)
    if pairs is not None:
        pairs = pairs.join(gallery.select("id"), "id", "left_semi").persist()
        scored_input = gallery.join(F.broadcast(pairs.select("id")), "id", "left_anti")
    else:
        scored_input = gallery
    scored = scored_input.select("id", "old_embedding", image_col).mapInArrow(
        transform_fn(spark.sparkContext.broadcast(h.payload()), model.old_dim,
                     ["id", image_col], policy=policy, seed=cfg.get_path("seed")),
        f"id string, {image_col} {dict(gallery.dtypes)[image_col]}, transformed array<float>, "
        "sigma double, score double, reason string",
    ).persist(StorageLevel.DISK_ONLY)
    try:
        bad = scored.where("reason IS NOT NULL").select("id", "reason")
        n_quarantined = bad.count()
        if n_quarantined or quarantine_count(spark, paths.quarantine, "rank", run):
            write_quarantine(spark, paths.quarantine, bad, stage="rank", run=run)
        n_pairs = pairs.count() if pairs is not None else 0
        n_items = n_gallery - n_quarantined - n_pairs
        if n_items <= 0 and n_pairs == 0:
            reasons = (bad.groupBy("reason").count().orderBy(F.desc("count")).limit(3).collect())
            raise ValueError(
                f"all {n_gallery} rows of the gallery {paths.gallery} were quarantined at rank "
                f"(run {run}); most common reasons: "
                + "; ".join(f"{r['count']} x {r['reason']}" for r in reasons))
        good = scored.where("reason IS NULL")
        batching = batching_from_config(cfg.get_path("backfill"))
        boundaries = []
        if n_items > 0:
            with assign_ranks(good.select("id", "score", image_col)) as ranked:
                plan = ranked.withColumn("batch_id",
                                         batch_id_column(F.col("rank"), n_items, **batching))
                write_table(plan.select("id", "score", "rank", "batch_id", image_col),
                            paths.backfill_plan, partition_by=["batch_id"])
                boundaries = batch_boundaries(ranked, n_items, batching)
        else:  # h's training pairs cover the whole gallery: nothing left to backfill
            write_table(spark.createDataFrame(
                [], f"id string, score double, rank long, batch_id int, {image_col} "
                    f"{dict(gallery.dtypes)[image_col]}"), paths.backfill_plan,
                partition_by=["batch_id"])
        planned = planned_batch_udf(spark.sparkContext.broadcast(boundaries))
        transformed = good.select("id", F.col("transformed").alias("embedding"),
                                  F.lit("transformed").alias("source"),
                                  F.lit(None).cast("int").alias("batch_id"),
                                  F.current_timestamp().alias("updated_at"),
                                  F.lit(h.version).alias("model_version"),
                                  planned("score", "id").alias("planned_batch_id"))
        if pairs is not None:
            transformed = transformed.unionByName(pairs.select(
                "id", F.col("embedding").cast("array<float>"), F.lit("new").alias("source"),
                F.lit(0).alias("batch_id"), F.current_timestamp().alias("updated_at"),
                F.lit(new_model.version).alias("model_version"),
                F.lit(0).alias("planned_batch_id")))
        write_table(transformed.repartition("planned_batch_id"), paths.gallery_features,
                    partition_by=["planned_batch_id"])
    finally:
        scored.unpersist()
        if pairs is not None:
            pairs.unpersist()
    counts = {"gallery": n_gallery, "quarantine": n_quarantined, "pairs": n_pairs,
              "backfill_plan": read_table(spark, paths.backfill_plan).count(),
              "gallery_features": read_table(spark, paths.gallery_features).count()}
    reconcile(counts, [("gallery", "backfill_plan+quarantine+pairs"),
                       ("gallery_features", "backfill_plan+pairs")])
    fver = latest_version(spark, paths.gallery_features)
    metadata = {RANKED_ON: version, "policy": policy, "dataset": cfg.get_path("data.dataset"),
                "h": h.identity, **order_metadata(h, policy),
                "new_model": new_model.identity, "new_dim": int(model.new_dim),
                "image_column": image_col, "batching": batching, **counts}
    log_row = spark.createDataFrame(
        [(0, n_pairs, fver, started, datetime.now(timezone.utc))], LOG_SCHEMA)
    if not is_delta_table(spark, paths.backfill_lease):  # made here, by one writer
        from fastfill_udfs.spark.lease import LEASE_SCHEMA

        write_table(spark.createDataFrame([], LEASE_SCHEMA), paths.backfill_lease)
    write_table(log_row, paths.backfill_log, metadata=metadata)  # the marker: ranking is done
    log.info("rank %s (%s): %s; gallery_features version %d", run, policy, counts, fver)
    return {"skipped": False, **counts, "table_version": fver}
