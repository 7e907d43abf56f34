"""Backfill: run the new model on each planned batch in rank order, MERGE the new embeddings
into `gallery_features` and record each committed batch (with the table version it produced)
in `backfill_log`.

Cost: batch k reads its own partition of `backfill_plan` (ids and images or image URIs, and
then only those image files) and rewrites only its own partition of `gallery_features`.

Exactly once, whatever dies when:
* the MERGE is one Delta commit, tagged with the batch (`fastfill_batch` in its user metadata):
  a crash before it commits leaves nothing, and a rerun that finds the tagged commit (a crash
  between the MERGE and the log row) logs that commit instead of merging the batch again;
* the MERGE only updates rows still `transformed`, and its updated-row count must equal the
  batch's, so a batch can never be applied twice;
* the log row is a MERGE keyed on `batch_id` (one row per batch, however often it is written);
* one job per run at a time (`lease.RunLease`).
Items whose image is missing or does not decode go to `quarantine` (stage `backfill`, with
the path and the reason) and stay `transformed`; the rest of the batch commits."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Callable

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.model_loading import ModelRef
from fastfill_udfs.progress import Progress
from fastfill_udfs.spark.delta_io import (TableNotFoundError, quarantine_count, read_table,
                                          table_paths, write_quarantine)
from fastfill_udfs.spark.ingest import embed_images
from fastfill_udfs.spark.lease import retry_conflicts
from fastfill_udfs.spark.rank import LOG_SCHEMA, check_ranking_current, plan_metadata
from fastfill_udfs.spark.validation import ReconciliationError

log = logging.getLogger(__name__)
BatchCallback = Callable[[int, int], None]  # (batch_id, table_version)
BATCH_TAG = "fastfill_batch"


class ModelMismatchError(ValueError):
    """The configured new model is not the one the run's plan was made for."""


def committed_batches(spark: SparkSession, cfg: Config, run: str) -> list[int]:
    rows = read_table(spark, table_paths(cfg, run).backfill_log).select("batch_id").distinct()
    return sorted(r["batch_id"] for r in rows.collect())


def ranked_batches(spark: SparkSession, cfg: Config, run: str) -> dict[int, int]:
    """batch_id -> number of items of the run's plan as ranked (from batch 0's record of its
    size and batching; an aggregate over backfill_plan for runs ranked before that was
    recorded)."""
    from fastfill_udfs.policies import batch_sizes

    meta = plan_metadata(spark, cfg, run) or {}
    if "backfill_plan" in meta and "batching" in meta:
        sizes = batch_sizes(int(meta["backfill_plan"]), **meta["batching"])
        return {b: int(n) for b, n in enumerate(sizes, start=1)}
    plan = read_table(spark, table_paths(cfg, run).backfill_plan)
    return {r["batch_id"]: r["count"] for r in plan.groupBy("batch_id").count().collect()
            if r["batch_id"] > 0}


def planned_batches(spark: SparkSession, cfg: Config, run: str) -> dict[int, int]:
    """`ranked_batches`, plus batches after them for items a sync queued once the ranked plan
    was done (`sync.extra_batches`)."""
    from fastfill_udfs.spark.pending import extra_batches

    ranked = ranked_batches(spark, cfg, run)
    batching = (plan_metadata(spark, cfg, run) or {}).get("batching") or {}
    return {**ranked, **extra_batches(spark, cfg, run, ranked, batching)}


def check_new_model(meta: dict, new_model: ModelRef, run: str) -> None:
    """Refuse a new model other than the one batch 0 recorded (version and weights)."""
    want = meta.get("new_model") or {}
    if (want.get("version"), want.get("weights")) != (new_model.version,
                                                       new_model.weights_hash):
        raise ModelMismatchError(
            f"run '{run}' was planned for the new model {want.get('version')} (weights "
            f"{want.get('weights')}), but models.new is {new_model.version} (weights "
            f"{new_model.weights_hash}); nothing was merged. Point models.new back at "
            f"{want.get('uri')}, or re-rank the run for the new model (rank_gallery.py --force)")


def tagged_commits(spark: SparkSession, path: str, since_version: int, *,
                   newest_only: bool = False) -> dict[int, dict]:
    """batch_id -> {version, metrics} of the MERGE commits this backfill tagged after
    `since_version` (or, `newest_only`, only the newest commit). Reads only the commits after
    it (a backfill adds one per batch), so the cost does not grow with the run's history."""
    from fastfill_udfs.spark.delta_io import latest_version

    newer = 1 if newest_only else latest_version(spark, path) - since_version
    if newer <= 0:
        return {}
    history = (DeltaTable.forPath(spark, path).history(newer)
               .where(F.col("version") > since_version).where("userMetadata IS NOT NULL")
               .select("version", "userMetadata", "operationMetrics", "readVersion").collect())
    out = {}
    for row in history:
        try:
            meta = json.loads(row["userMetadata"])
        except ValueError:
            continue
        if isinstance(meta, dict) and BATCH_TAG in meta:
            out[int(meta[BATCH_TAG])] = {"version": int(row["version"]),
                                         "metrics": dict(row["operationMetrics"] or {}),
                                         "read_version": row["readVersion"]}
    return out


def append_log_row(spark: SparkSession, path: str, batch_id: int, n_items: int, version: int,
                   started: datetime) -> None:
    """Insert the log row of `batch_id` unless it is there already (idempotent)."""
    row = spark.createDataFrame(
        [(batch_id, n_items, version, started, datetime.now(timezone.utc))], LOG_SCHEMA)
    (DeltaTable.forPath(spark, path).alias("l")
     .merge(row.alias("n"), "l.batch_id = n.batch_id")
     .whenNotMatchedInsertAll().execute())


def _merge_batch(spark: SparkSession, features: DeltaTable, good, batch_id: int, run: str,
                 model_version: str) -> None:
    key = "spark.databricks.delta.commitInfo.userMetadata"
    spark.conf.set(key, json.dumps({BATCH_TAG: batch_id, "run": run}))
    try:
        (features.alias("f")
         .merge(good.alias("n"), f"f.planned_batch_id = {batch_id} AND f.id = n.id")
         .whenMatchedUpdate(condition="f.batch_id IS NULL", set={
             "embedding": "n.embedding", "source": "'new'", "batch_id": F.lit(batch_id),
             "updated_at": F.current_timestamp(), "model_version": F.lit(model_version)})
         .execute())
    finally:
        spark.conf.unset(key)


def backfill_batch(spark: SparkSession, cfg: Config, new_model: ModelRef, run: str,
                   batch_id: int, meta: dict, *, retried: bool = False) -> tuple[int, int]:
    """Embed and MERGE one batch; returns (items made new, gallery_features version).
    `retried`: an earlier job may have started this batch (its quarantine rows are replaced).

    Raises ValueError when the model's output dimension is not the plan's (before merging),
    ReconciliationError when the MERGE did not update exactly the embedded items."""
    from fastfill_udfs.spark.pending import batch_input, merged_expected

    paths = table_paths(cfg, run)
    image_col = meta.get("image_column", "image")
    # the plan's rows still transformed in the batch's partition (a sync may have taken some)
    items, input_version = batch_input(spark, paths, batch_id, image_col)
    missing = spark.createDataFrame([], "id string, reason string")
    if image_col == "image_uri":
        from fastfill_udfs.spark.images import attach_images

        items, missing = attach_images(spark, items, cfg.get_path("data.image_root"))
    embedded = embed_images(spark, items, new_model, cfg, ["id"]).persist(
        StorageLevel.MEMORY_AND_DISK)
    try:
        failed = missing.unionByName(embedded.where("reason IS NOT NULL").select("id", "reason"))
        good = embedded.where("reason IS NULL").select("id", "embedding")
        first = good.select(F.size("embedding").alias("dim")).first()
        want = int(meta.get("new_dim", 0) or 0)
        if first is not None and want and first["dim"] != want:
            raise ModelMismatchError(
                f"the new model {new_model.version} outputs {first['dim']}-d embeddings, but run "
                f"'{run}' (h {meta.get('h', {}).get('version')}, query_features) is "
                f"{want}-d; nothing was merged")
        counts = embedded.groupBy(F.col("reason").isNull().alias("ok")).count().collect()
        n_good = sum(r["count"] for r in counts if r["ok"])
        n_failed = sum(r["count"] for r in counts if not r["ok"]) + missing.count()
        if n_failed or (retried and quarantine_count(spark, paths.quarantine, "backfill", run,
                                                     batch_id)):
            write_quarantine(spark, paths.quarantine, failed, stage="backfill", run=run,
                             batch_id=batch_id)
        if n_failed:
            log.warning("backfill %s batch %d: %d item(s) quarantined, e.g. %s", run, batch_id,
                        n_failed, "; ".join(r["reason"] for r in failed.limit(2).collect()))
        features = DeltaTable.forPath(spark, paths.gallery_features)
        retry_conflicts(lambda: _merge_batch(spark, features, good, batch_id, run,
                                             new_model.version),
                        f"backfill {run} batch {batch_id}: MERGE into {paths.gallery_features}",
                        cfg.get_path("sync.conflict_retries"))
        # the lease keeps other backfills out, but a sync may commit beside it
        commit = tagged_commits(spark, paths.gallery_features, input_version)
        if batch_id not in commit:
            raise ReconciliationError(f"batch {batch_id} of run '{run}': its MERGE commit is "
                                      f"not in the history of {paths.gallery_features}")
        expected = merged_expected(spark, paths, batch_id, good, n_good,
                                   commit[batch_id]["read_version"], input_version)
    finally:
        embedded.unpersist()
    updated = int(commit[batch_id]["metrics"].get("numTargetRowsUpdated", -1))
    if expected != n_good:
        log.info("backfill %s batch %d: %d of its %d embedded items were taken by a sync "
                 "meanwhile (made new, queued again or deleted); not merged", run, batch_id,
                 n_good - expected, n_good)
    if updated != expected:
        raise ReconciliationError(
            f"batch {batch_id} of run '{run}': the MERGE updated {updated} rows of "
            f"{paths.gallery_features}, but {expected} items were embedded and still pending "
            f"(quarantined: {n_failed}); rows were applied twice or are missing")
    return updated, commit[batch_id]["version"]


def run_lease(spark: SparkSession, cfg: Config, run: str):
    """The lease a job must hold to work on `run` (see `lease.RunLease`)."""
    from fastfill_udfs.spark.lease import RunLease

    return RunLease(spark, table_paths(cfg, run).backfill_lease, run,
                    cfg.get_path("backfill.lease_timeout_s"))


def run_backfill(spark: SparkSession, cfg: Config, new_model: ModelRef, run: str, *,
                 max_batches: int | None = None, on_committed: BatchCallback | None = None,
                 lease=None, rate=None) -> list[int]:
    """Process pending batches of `run` in order; at most `max_batches` (None/0 = all), holding
    `lease` (taken here when None); `rate` (`estimate.Rate`, measured before) gives the ETA
    before the first batch.

    Calls `on_committed(batch_id, version)` after each batch is logged (e.g. evaluation).
    Returns the batch ids committed by this call. Raises TableNotFoundError when the run is not
    ranked, StaleRankingError for a plan of another gallery version, ModelMismatchError for
    another new model, RunBusyError when another job works on the run."""
    if lease is None:
        with run_lease(spark, cfg, run) as held:
            return run_backfill(spark, cfg, new_model, run, max_batches=max_batches,
                                on_committed=on_committed, lease=held, rate=rate)
    paths = table_paths(cfg, run)
    meta = plan_metadata(spark, cfg, run)
    if meta is None or read_table(spark, paths.backfill_log).where("batch_id = 0").count() == 0:
        raise TableNotFoundError(f"run '{run}' is not ranked yet: run pipelines/rank_gallery.py "
                                 f"first (no batch 0 in {paths.backfill_log})")
    check_ranking_current(spark, cfg, run)
    check_new_model(meta, new_model, run)
    logged = read_table(spark, paths.backfill_log).select("table_version").toPandas()
    meta = {**meta, "last_version": int(logged["table_version"].max())}
    planned = planned_batches(spark, cfg, run)
    done = set(committed_batches(spark, cfg, run))
    pending = [b for b in sorted(planned) if b not in done]
    if max_batches:
        pending = pending[:max_batches]
    log.info("backfill %s: %d of %d batches committed, %d to do now", run,
             len(done & set(planned)), len(planned), len(pending))
    if rate is not None and pending and rate.items_per_s > 0:
        from fastfill_udfs.progress import format_seconds

        n_items = sum(planned[b] for b in pending)
        log.info("backfill %s: %d items in %d batches, ETA %s at the measured %.1f items/s "
                 "(embedding alone)", run, n_items, len(pending),
                 format_seconds(n_items / rate.items_per_s), rate.items_per_s)
    progress = Progress(f"backfill {run}: batch", len(pending), log)
    finished = []
    # a job that died can have merged (at most) its batch without logging it: the first one
    earlier = tagged_commits(spark, paths.gallery_features, meta["last_version"])
    n_ranked = len(ranked_batches(spark, cfg, run))
    while pending:
        batch_id = pending.pop(0)
        started = datetime.now(timezone.utc)
        if batch_id in earlier:  # merged by a job that died before logging it
            n = int(earlier[batch_id]["metrics"].get("numTargetRowsUpdated", 0))
            version = earlier[batch_id]["version"]
            log.warning("backfill %s batch %d: already merged (version %d) by an earlier "
                        "job that stopped before logging it; logging it now", run,
                        batch_id, version)
        else:
            from fastfill_udfs.spark.pending import absorb_queued

            absorb_queued(spark, cfg, run, batch_id, planned, meta.get("batching") or {},
                          n_ranked)             # items a sync queued (transform mode)
            n, version = backfill_batch(spark, cfg, new_model, run, batch_id, meta,
                                        retried=not finished)
        append_log_row(spark, paths.backfill_log, batch_id, n, version, started)
        meta["last_version"] = version
        lease.renew_if_due()
        finished.append(batch_id)
        progress.update(extra=f"batch {batch_id}: {n} items, gallery_features v{version}")
        if on_committed is not None:
            on_committed(batch_id, version)
        if not pending and (not max_batches or len(finished) < max_batches):
            planned = planned_batches(spark, cfg, run)   # a sync may have queued more
            pending = [b for b in sorted(planned) if b not in done | set(finished)]
            if max_batches:
                pending = pending[:max_batches - len(finished)]
    return finished

