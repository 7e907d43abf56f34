"""The backfill's side of a moving gallery (docs/moving_gallery.md): what a batch takes as its
input and must merge when a sync may commit beside it, and the items a sync queued
(`sync.mode: transform`), which the backfill moves into its batches.

A batch owns the partition of `gallery_features` with its `planned_batch_id`; a sync only writes
into partitions 0 and -1 and takes rows out of batch partitions. So a batch embeds the plan rows
still `transformed` in its partition (`batch_input`), its MERGE updates only rows still there,
and the rows it had to update are those still pending at the MERGE's own snapshot
(`merged_expected`). Queued items (partition -1) enter a batch before it reads its input
(`absorb_queued`, one commit); once the ranked plan is done, extra batches take the rest
(`extra_batches`)."""
from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.spark.delta_io import (is_delta_table, latest_version, merge_counts, read_table,
                                          table_paths, tagged)
from fastfill_udfs.spark.lease import conflict_attempts, retry_conflicts
from fastfill_udfs.spark.sync_history import ABSORB_TAG, QUEUE_BATCH

log = logging.getLogger(__name__)


def queued_items(spark: SparkSession, paths) -> DataFrame:
    """Items a sync queued that no batch has taken yet: [id, score] (plan partition -1 whose
    features row is still transformed in partition -1)."""
    waiting = (read_table(spark, paths.gallery_features)
               .where((F.col("planned_batch_id") == QUEUE_BATCH)
                      & (F.col("source") == "transformed")).select("id"))
    return (read_table(spark, paths.backfill_plan).where(F.col("batch_id") == QUEUE_BATCH)
            .select("id", "score").join(waiting, "id", "left_semi"))


def extra_batches(spark: SparkSession, cfg: Config, run: str, planned: dict[int, int],
                  batching: dict) -> dict[int, int]:
    """Batches beyond the ranked plan: those already logged, and the next one while items a
    sync queued wait (transform mode, after the plan's last batch)."""
    paths = table_paths(cfg, run)
    last = max(planned, default=0)
    logged = {r["batch_id"]: r["n_items"] for r in read_table(spark, paths.backfill_log)
              .where(F.col("batch_id") > last).select("batch_id", "n_items").collect()}
    if not is_delta_table(spark, paths.backfill_plan):
        return logged
    waiting = queued_items(spark, paths).count()
    if waiting:
        logged[max([last, *logged]) + 1] = min(waiting, extra_batch_size(planned, batching))
    return logged


def extra_batch_size(planned: dict[int, int], batching: dict) -> int:
    if batching.get("batch_size"):
        return int(batching["batch_size"])
    sizes = [n for n in planned.values() if n]
    return max(1, max(sizes, default=1))


def absorb_queued(spark: SparkSession, cfg: Config, run: str, batch_id: int,
                  planned: dict[int, int], batching: dict, ranked_batches: int) -> int:
    """Before batch `batch_id` reads its input: move the queued items that rank into it (score
    at least its planned items' lowest; after the ranked plan, the best `batch_size`) into its
    partition of `gallery_features`. One commit, retried on conflicts; returns how many."""
    from delta.tables import DeltaTable

    paths = table_paths(cfg, run)
    queue = queued_items(spark, paths)
    if not queue.limit(1).count():
        return 0
    if batch_id <= ranked_batches:
        floor = (read_table(spark, paths.backfill_plan)
                 .where((F.col("batch_id") == batch_id) & F.col("rank").isNotNull())
                 .agg(F.min("score").alias("s")).first()["s"])
        if floor is None and batch_id < ranked_batches:
            return 0
        chosen = queue if floor is None else queue.where(F.col("score") >= floor)
    else:
        chosen = queue.orderBy(F.desc("score"), "id").limit(extra_batch_size(planned, batching))
    chosen = chosen.select("id").persist()
    try:
        if not chosen.limit(1).count():
            return 0

        def write():
            with tagged(spark, {ABSORB_TAG: batch_id, "run": run}):
                return (DeltaTable.forPath(spark, paths.gallery_features).alias("f")
                        .merge(chosen.alias("s"),
                               f"f.planned_batch_id = {QUEUE_BATCH} AND f.id = s.id")
                        .whenMatchedUpdate(condition="f.source = 'transformed'",
                                           set={"planned_batch_id": F.lit(batch_id)})
                        .execute())
        n = merge_counts(retry_conflicts(
            write, f"backfill {run} batch {batch_id}: taking queued items",
            conflict_attempts(cfg)))["updated"]
    finally:
        chosen.unpersist()
    log.info("backfill %s batch %d: took %d item(s) a sync queued", run, batch_id, n)
    return n


def batch_input(spark: SparkSession, paths, batch_id: int, image_col: str
                ) -> tuple[DataFrame, int]:
    """(the items batch `batch_id` embeds [id, image], the gallery_features version read): the
    plan rows of its partition (and of the queue, for items moved into it) whose features row
    is still `transformed` in its partition. An item a sync made `new`, re-queued or deleted
    is not embedded."""
    version = latest_version(spark, paths.gallery_features)
    pending = (read_table(spark, paths.gallery_features, version=version)
               .where((F.col("planned_batch_id") == batch_id)
                      & (F.col("source") == "transformed")).select("id"))
    plan = (read_table(spark, paths.backfill_plan)
            .where(F.col("batch_id").isin(batch_id, QUEUE_BATCH)).select("id", image_col))
    return plan.join(pending, "id", "left_semi"), version


def merged_expected(spark: SparkSession, paths, batch_id: int, good: DataFrame, n_good: int,
                    read_version: int | None, input_version: int) -> int:
    """How many of a batch's embedded items its MERGE had to update: all of them, unless a
    commit (a sync) came between the input read and the MERGE's snapshot; then those still
    `transformed` in the batch's partition at that snapshot."""
    if read_version is None or read_version == input_version:
        return n_good
    return (read_table(spark, paths.gallery_features, version=read_version)
            .where((F.col("planned_batch_id") == batch_id) & (F.col("source") == "transformed"))
            .select("id").join(good.select("id"), "id", "left_semi").count())
