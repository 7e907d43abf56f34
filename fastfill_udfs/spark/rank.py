"""rank_gallery: score the gallery with `h` in a pandas/Arrow UDF, rank it by the policy with a
distributed sort, cut it into batches, and write `backfill_plan`, the initial
`gallery_features` (all transformed) and batch 0 of `backfill_log`."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.models import Transformation
from fastfill_udfs.policies import POLICIES, batching_from_config
from fastfill_udfs.spark.delta_io import (commit_metadata, is_delta_table, latest_version,
                                          read_table, table_paths, write_quarantine, write_table)
from fastfill_udfs.spark.udfs import ModelPayload, transform_fn
from fastfill_udfs.spark.validation import (check_embedding_dim, check_not_empty,
                                            check_unique_ids, reconcile)

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
def assign_ranks(scored: DataFrame) -> Iterator[DataFrame]:
    """Context manager yielding `scored` with `rank` added (0 = highest score; ties by id), by a
    distributed sort: each sorted partition counts its rows, the driver turns the (few) counts
    into offsets, and rank = offset + position in partition. Nothing but one count per
    partition reaches the driver. The sorted rows are cached while the block runs (both passes
    must see the same partitioning) and released when it ends."""
    ordered = (scored.orderBy(F.desc("score"), F.asc("id"))
               .withColumn("_part", F.spark_partition_id())
               .withColumn("_mid", F.monotonically_increasing_id())
               .persist(StorageLevel.MEMORY_AND_DISK))
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


def check_ranking_current(spark: SparkSession, cfg: Config, run: str,
                          h_key: str | None = None) -> None:
    """Raise StaleRankingError when `run` was ranked on another version of the gallery table (a
    new ingest) or, given `h_key`, with another `h`. Runs ranked before this was recorded pass."""
    paths = table_paths(cfg, run)
    if not is_delta_table(spark, paths.backfill_log):
        return  # not ranked at all: the caller says so in its own words
    ranked = commit_metadata(spark, paths.backfill_log, RANKED_ON)
    if ranked is None:
        return
    problems = []
    now = latest_version(spark, paths.gallery)
    if ranked[RANKED_ON] != now:
        problems.append(f"the gallery table is at version {now}, the plan was ranked on version "
                        f"{ranked[RANKED_ON]}")
    if h_key is not None and ranked.get("h") != h_key:
        problems.append(f"h is {h_key}, the plan was ranked with h {ranked.get('h')}")
    if problems:
        raise StaleRankingError(
            f"run '{run}' is stale: {'; '.join(problems)}. Re-rank it with "
            f"pipelines/rank_gallery.py --policy {ranked.get('policy', '<policy>')} --force "
            "(its backfill starts over)")


def is_ranked(spark: SparkSession, cfg: Config, run: str) -> bool:
    """True when batch 0 of `run` is committed in backfill_log (ranking finished)."""
    path = table_paths(cfg, run).backfill_log
    return is_delta_table(spark, path) and read_table(spark, path).where("batch_id = 0").count() > 0


def rank_gallery(spark: SparkSession, cfg: Config, h: Transformation, policy: str, run: str,
                 *, force: bool = False) -> dict:
    """Rank the gallery for `run` by `policy` ("uncertainty" | "random").

    Skips when the run is already ranked, unless `force`: then the run's log is emptied first
    and the backfill starts over (in a new MLflow run). Raises ValueError for an unknown
    policy, `uncertainty` with an `h` lacking an uncertainty head, an empty gallery, duplicate
    ids or a gallery whose embeddings do not fit `h`. Rows with null / wrong-size / NaN
    embeddings are quarantined with the reason; counts reconcile."""
    if policy not in POLICIES:
        raise ValueError(f"backfill.policy must be one of {POLICIES}, got {policy!r}")
    if policy == "oracle":
        raise ValueError("policy 'oracle' needs the new model's embeddings of the whole gallery; "
                         "it is an analysis ceiling (see pipelines/run_study.py), not a plan")
    if policy == "uncertainty" and not h.has_uncertainty:
        raise ValueError("policy 'uncertainty' needs an h trained with the fastfill objective "
                         "(this h has no uncertainty head)")
    paths = table_paths(cfg, run)
    payload = ModelPayload.from_model(h)
    if is_ranked(spark, cfg, run):
        if not force:
            check_ranking_current(spark, cfg, run, h_key=payload.key)
            log.info("rank %s: already ranked (batch 0 in %s); skipping", run, paths.backfill_log)
            return {"skipped": True}
        # Unrank first: a re-rank that dies half-way must not leave the old log (batches done)
        # beside a new plan. The next backfill starts over and logs into a new MLflow run.
        log.warning("rank %s: --force: discarding the run's backfill log and plan", run)
        write_table(spark.createDataFrame([], LOG_SCHEMA), paths.backfill_log)
    started = datetime.now(timezone.utc)
    ranked_on = {RANKED_ON: latest_version(spark, paths.gallery), "h": payload.key,
                 "policy": policy}
    gallery = read_table(spark, paths.gallery, version=ranked_on[RANKED_ON]).select(
        "id", "old_embedding")
    n_gallery = check_not_empty(gallery, f"gallery table {paths.gallery}")
    check_unique_ids(gallery, f"gallery table {paths.gallery}")
    check_embedding_dim(gallery, "old_embedding", h.old_dim, f"gallery table {paths.gallery}", "h")

    scored = gallery.mapInArrow(
        transform_fn(spark.sparkContext.broadcast(payload), h.old_dim, ["id"], policy=policy,
                     seed=cfg.get_path("seed")),
        "id string, transformed array<float>, sigma double, score double, reason string",
    ).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n_quarantined = write_quarantine(spark, paths.quarantine,
                                         scored.where("reason IS NOT NULL"), stage="rank", run=run)
        good = scored.where("reason IS NULL")
        n_items = n_gallery - n_quarantined
        batching = batching_from_config(cfg.get_path("backfill"))
        with assign_ranks(good.select("id", "score")) as ranked:
            plan = ranked.withColumn("batch_id", batch_id_column(F.col("rank"), n_items, **batching))
            write_table(plan.select("id", "score", "rank", "batch_id"), paths.backfill_plan,
                        partition_by=["batch_id"])
        write_table(good.select("id", F.col("transformed").alias("embedding"),
                                F.lit("transformed").alias("source"),
                                F.lit(None).cast("int").alias("batch_id"),
                                F.current_timestamp().alias("updated_at")),
                    paths.gallery_features)
    finally:
        scored.unpersist()
    counts = {"gallery": n_gallery, "quarantine": n_quarantined,
              "backfill_plan": read_table(spark, paths.backfill_plan).count(),
              "gallery_features": read_table(spark, paths.gallery_features).count()}
    reconcile(counts, [("gallery", "backfill_plan+quarantine"),
                       ("backfill_plan", "gallery_features")])
    version = latest_version(spark, paths.gallery_features)
    log_row = spark.createDataFrame(
        [(0, counts["gallery_features"], version, started, datetime.now(timezone.utc))], LOG_SCHEMA)
    write_table(log_row, paths.backfill_log, metadata=ranked_on)  # the marker: ranking is done
    log.info("rank %s (%s): %s; gallery_features version %d", run, policy, counts, version)
    return {"skipped": False, **counts, "table_version": version}
