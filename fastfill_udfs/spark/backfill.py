"""Backfill: run the new model on each planned batch in rank order, MERGE the new embeddings
into `gallery_features` and record each committed batch (with the table version it produced)
in `backfill_log`.

Resumable and idempotent: batches in the log are skipped; a crash between the MERGE and the log
append leaves the log without that batch, so a rerun redoes it (the MERGE sets the same values
again), and a crash inside the MERGE commits nothing (Delta commits are atomic)."""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Callable

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from torch import nn

from fastfill_udfs.config import Config
from fastfill_udfs.progress import Progress
from fastfill_udfs.spark.delta_io import TableNotFoundError, latest_version, read_table, table_paths
from fastfill_udfs.spark.ingest import embed_images
from fastfill_udfs.spark.rank import LOG_SCHEMA, check_ranking_current, is_ranked
from fastfill_udfs.spark.validation import ReconciliationError

log = logging.getLogger(__name__)
BatchCallback = Callable[[int, int], None]  # (batch_id, table_version)


def committed_batches(spark: SparkSession, cfg: Config, run: str) -> list[int]:
    return sorted(r["batch_id"] for r in
                  read_table(spark, table_paths(cfg, run).backfill_log).select("batch_id").collect())


def planned_batches(spark: SparkSession, cfg: Config, run: str) -> dict[int, int]:
    """batch_id -> number of items, from backfill_plan (one small aggregate)."""
    plan = read_table(spark, table_paths(cfg, run).backfill_plan)
    return {r["batch_id"]: r["count"] for r in plan.groupBy("batch_id").count().collect()}


def run_backfill(spark: SparkSession, cfg: Config, new_model: nn.Module, run: str, *,
                 max_batches: int | None = None, on_committed: BatchCallback | None = None,
                 _after_merge: Callable[[int], None] | None = None) -> list[int]:
    """Process pending batches of `run` in order; at most `max_batches` (None/0 = all).

    Calls `on_committed(batch_id, version)` after each batch is logged (e.g. evaluation).
    Returns the batch ids committed by this call. Raises TableNotFoundError when the run is not
    ranked, ValueError naming ids whose images fail, ReconciliationError on lost rows."""
    paths = table_paths(cfg, run)
    if not is_ranked(spark, cfg, run):
        raise TableNotFoundError(f"run '{run}' is not ranked yet: run pipelines/rank_gallery.py "
                                 f"first (no batch 0 in {paths.backfill_log})")
    check_ranking_current(spark, cfg, run)
    planned = planned_batches(spark, cfg, run)
    done = set(committed_batches(spark, cfg, run))
    pending = [b for b in sorted(planned) if b not in done]
    if max_batches:
        pending = pending[:max_batches]
    log.info("backfill %s: %d of %d batches committed, %d to do now", run,
             len(done & set(planned)), len(planned), len(pending))
    if not pending:
        return []
    plan = read_table(spark, paths.backfill_plan)
    gallery = read_table(spark, paths.gallery).select("id", "image")
    features = DeltaTable.forPath(spark, paths.gallery_features)
    progress = Progress(f"backfill {run}: batch", len(pending), log)
    finished = []
    for batch_id in pending:
        started = datetime.now(timezone.utc)
        items = plan.where(F.col("batch_id") == batch_id).select("id").join(gallery, "id")
        embedded = embed_images(spark, items, new_model, cfg, ["id"]).persist(
            StorageLevel.MEMORY_AND_DISK)
        n = embedded.count()
        if n != planned[batch_id]:
            raise ReconciliationError(
                f"batch {batch_id} of run '{run}' plans {planned[batch_id]} items but only {n} "
                f"have an image in {paths.gallery}")
        failed = embedded.where("reason IS NOT NULL").select("id", "reason").limit(5).collect()
        if failed:
            raise ValueError(f"batch {batch_id}: new-model inference failed for "
                             + "; ".join(f"{r['id']}: {r['reason']}" for r in failed))
        (features.alias("f")
         .merge(embedded.alias("n"), "f.id = n.id")
         .whenMatchedUpdate(set={"embedding": "n.embedding", "source": "'new'",
                                 "batch_id": F.lit(batch_id), "updated_at": F.current_timestamp()})
         .execute())
        embedded.unpersist()
        if _after_merge is not None:  # test hook: simulate a crash before the log append
            _after_merge(batch_id)
        version = latest_version(spark, paths.gallery_features)
        row = spark.createDataFrame(
            [(batch_id, n, version, started, datetime.now(timezone.utc))], LOG_SCHEMA)
        row.write.format("delta").mode("append").save(paths.backfill_log)
        finished.append(batch_id)
        progress.update(extra=f"batch {batch_id}: {n} items, gallery_features v{version}")
        if on_committed is not None:
            on_committed(batch_id, version)
    return finished
