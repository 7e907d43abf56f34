"""sync_gallery: bring the warehouse's `gallery` and the backfill runs on it up to date with the
user's source table, while a backfill may be running (docs/moving_gallery.md).

Two steps, each safe to kill and rerun:

1. **Source -> gallery.** The rows the source gained, changed or lost since the last sync (or
   the ingest) are found with the source's Delta Change Data Feed when it has one and it reaches
   back far enough, else by a keyed comparison of the whole source with `gallery` (Parquet, CDF
   off); the result says which. Rows that fail the data contract go to `quarantine` (stage
   `sync`, batch_id = the sync's number) and leave the gallery. One tagged MERGE moves
   `gallery`; its counts must equal the change set's.
2. **Gallery -> run.** Each run follows the gallery from the version it last synced to (its
   `sync_log`, else the version it was ranked on): added and changed items (a new old embedding
   or image) are embedded by the run's new model on arrival (`sync.mode: embed`; an image that
   cannot be embedded falls back to `h(old)` and is quarantined), or transformed by the run's
   `h` and queued in the plan by their score (`sync.mode: transform`); deleted items leave
   `backfill_plan` and `gallery_features`. The plan is written first, then the features in
   small conditioned MERGEs that are exact whatever a concurrent backfill commits (each counts
   its own change of `new` rows, see `sync_history`), then the run's `sync_log` row.

A running backfill and a sync only meet in `gallery_features`: the backfill owns the partitions
of its batches (1, 2, ...), a sync writes items into partition 0 (arrived `new`) or -1 (queued)
and only takes rows out of batch partitions. A batch embeds only rows still `transformed` in its
partition and merges only rows still there, so it never overwrites what a sync made `new` and
never brings a deleted row back; the queued items are moved into a batch by the backfill
before it reads its input (the backfill's side: `pending`). Delta write conflicts are retried
(`lease.retry_conflicts`), then refused with a message."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.model_loading import ModelRef
from fastfill_udfs.spark.delta_io import (TableNotFoundError, commit_metadata, is_delta_table,
                                          latest_version, merge_counts, quarantine_count,
                                          read_table, table_paths, tagged, write_quarantine,
                                          write_table)
from fastfill_udfs.spark.lease import RunLease, conflict_attempts, retry_conflicts
from fastfill_udfs.spark.sync_history import (ARRIVED_BATCH, QUEUE_BATCH, SYNC_TAG,
                                              moved_by_syncs_only)
from fastfill_udfs.spark.validation import ReconciliationError, reconcile

log = logging.getLogger(__name__)
SYNC_MODES = ("embed", "transform")
SYNC_LOG_SCHEMA = ("sync_id long, gallery_version long, features_version long, method string, "
                   "n_added long, n_changed long, n_deleted long, n_new long, "
                   "n_transformed long, n_queued long, n_quarantined long, new_delta long, "
                   "started_at timestamp, finished_at timestamp")
CDF_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")


# ----------------------------------------------------------------------------- helpers
def sync_log_path(cfg: Config, run: str) -> str:
    """`runs/<run>/sync_log`: one row per sync that reached the run."""
    return table_paths(cfg, run).backfill_log.rsplit("/", 1)[0] + "/sync_log"


def gallery_lease_path(cfg: Config) -> str:
    return cfg.resolve_path("paths.warehouse").rstrip("/") + "/gallery_lease"


class GalleryLease(RunLease):
    """One sync per warehouse at a time (a lease row on `gallery`, as `lease.RunLease`)."""

    def _busy(self, row):
        from fastfill_udfs.spark.lease import RunBusyError

        return RunBusyError(
            f"the gallery is already being synced by {row['owner']} (host {row['host']}, pid "
            f"{row['pid']}) since {row['acquired_at']} UTC. Not starting a second sync: wait "
            f"for it, or, if it died on another machine, rerun after "
            f"backfill.lease_timeout_s ({self.timeout_s:.0f} s)")


def _content_hash(image_col: str):
    """What a change must touch for an item to be embedded again: old embedding and image."""
    return F.xxhash64(F.lit("c"), F.col("old_embedding"), F.col(f"`{image_col}`"))


def _image_column(df: DataFrame) -> str:
    return "image_uri" if "image_uri" in df.columns else "image"


def net_events(changes: DataFrame, key: str) -> tuple[DataFrame, DataFrame]:
    """(first, last) change event per `key` of a Change Data Feed read (`_change_type`,
    `_commit_version`): within a commit a pre-image or delete comes before an insert or
    post-image. An id whose last event is an insert / post-image exists afterwards with that
    row; one whose first event is a pre-image / delete existed before with that row."""
    kind = F.col("_change_type")
    order = [F.col("_commit_version"), F.when(kind == "update_preimage", 0)
             .when(kind == "delete", 1).when(kind == "insert", 2).otherwise(3)]
    last = Window.partitionBy(key).orderBy(*[c.desc() for c in order])
    first = Window.partitionBy(key).orderBy(*order)
    return (changes.withColumn("_n", F.row_number().over(first)).where("_n = 1").drop("_n"),
            changes.withColumn("_n", F.row_number().over(last)).where("_n = 1").drop("_n"))


def read_change_feed(spark: SparkSession, path: str, start: int, end: int) -> DataFrame:
    """The Change Data Feed of the Delta table at `path` for versions [start, end]. Raises
    ValueError (with Delta's reason) when it is not there: CDF off then, or vacuumed."""
    try:
        df = (spark.read.format("delta").option("readChangeFeed", "true")
              .option("startingVersion", int(start)).option("endingVersion", int(end)).load(path))
        df.limit(0).collect()   # Delta checks the range when the read is planned
        return df
    except Exception as exc:
        raise ValueError(str(exc).strip().splitlines()[0][:300]) from None


def cdf_enabled(spark: SparkSession, path: str) -> bool:
    from delta.tables import DeltaTable

    props = DeltaTable.forPath(spark, path).detail().select("properties").first()[0] or {}
    return str(props.get("delta.enableChangeDataFeed", "false")).lower() == "true"


# ----------------------------------------------------------------------------- source -> gallery
@dataclass
class SourceChanges:
    """What the source gained, changed and lost, in the gallery's shape."""

    method: str                       # "cdf" | "keyed"
    why: str                          # why that method
    source_version: int | None        # the Delta version synced to (None for Parquet)
    upserts: DataFrame                # conformed rows: inserts and updates
    gone: DataFrame | None            # DataFrame[id] the CDF says left (None: keyed)
    bad: DataFrame                    # DataFrame[id, reason] rows that fail the contract
    first_inserts: DataFrame | None = None   # CDF: ids whose first event is an insert


def source_changes(spark: SparkSession, cfg: Config, gallery_path: str) -> SourceChanges:
    """The source's changes since the gallery last took it in (see the module docstring)."""
    from fastfill_udfs.spark.sources import derived_subgroups, source_table
    from fastfill_udfs.spark.sources import conform

    path, is_delta = source_table(spark, cfg)
    columns = cfg.get_path("data.columns")
    where = f"gallery table {path}"
    last = commit_metadata(spark, gallery_path, "source_version") or {}
    version = latest_version(spark, path) if is_delta else None
    why = ""
    if not is_delta:
        why = "the source is not a Delta table (no Change Data Feed): keyed comparison"
    elif last.get("source_version") is None:
        why = ("the gallery does not record which source version it holds (ingested before "
               "sync existed, or from Parquet): keyed comparison")
    elif last.get("source_table") not in (None, path):
        why = f"the gallery was taken from {last.get('source_table')}: keyed comparison"
    elif not cdf_enabled(spark, path):
        why = ("Change Data Feed is off on the source (ALTER TABLE ... SET TBLPROPERTIES "
               "(delta.enableChangeDataFeed = true) turns it on): keyed comparison")
    if is_delta and not why:
        start = int(last["source_version"]) + 1
        if start > version:
            empty = spark.createDataFrame([], "id string")
            rows, _ = conform(read_source_table_at(spark, path, version).limit(0), columns,
                              where, old_embedding=True)
            return SourceChanges("cdf", f"Change Data Feed, nothing after version {version}",
                                 version, rows, empty,
                                 spark.createDataFrame([], "id string, reason string"))

        try:
            feed = read_change_feed(spark, path, start, version)
        except ValueError as exc:
            why = f"the Change Data Feed does not reach back to version {start} ({exc}): keyed"
        else:
            return _cdf_changes(spark, cfg, feed, columns, where, start, version,
                                derived_subgroups, conform)
    source = read_source_table_at(spark, path, version)
    rows, bad = conform(source, columns, where, old_embedding=True)
    return SourceChanges("keyed", why, version, derived_subgroups(rows, cfg), None, bad)


def read_source_table_at(spark: SparkSession, path: str, version: int | None) -> DataFrame:
    from fastfill_udfs.spark.sources import read_source_table

    if version is None:
        return read_source_table(spark, path, "parquet")
    return read_table(spark, path, version=version)


def _cdf_changes(spark, cfg, feed, columns, where, start, end, derive, conform) -> SourceChanges:
    key = columns.get("id") or "id"
    if key not in feed.columns:
        raise ValueError(f"{where} has no column {key!r} (data.columns.id)")
    keyed = feed.where(F.col(f"`{key}`").isNotNull())
    after = ("insert", "update_postimage")
    dupes = (keyed.where(F.col("_change_type").isin(*after))
             .groupBy(key, "_commit_version").count().where("count > 1"))
    sample = [r[key] for r in dupes.limit(5).collect()]
    if sample:
        raise ValueError(f"{where} holds duplicated ids after version {start - 1}, e.g. "
                         f"{sample}; ids must be unique (nothing was synced)")
    first, last = net_events(keyed, key)
    present = last.where(F.col("_change_type").isin(*after))
    null_ids = feed.where(F.col(f"`{key}`").isNull() & F.col("_change_type").isin(*after))
    raw = present.unionByName(null_ids).drop(*CDF_COLUMNS)
    rows, bad = conform(raw, columns, where, old_embedding=True)
    gone = last.where(~F.col("_change_type").isin(*after)).select(
        F.col(f"`{key}`").cast("string").alias("id"))
    inserted_first = first.where(F.col("_change_type") == "insert").select(
        F.col(f"`{key}`").cast("string").alias("id"))
    return SourceChanges("cdf", f"Change Data Feed, versions {start}..{end}", end,
                         derive(rows, cfg), gone, bad, inserted_first)


@dataclass
class GalleryDiff:
    """The MERGE source that brings `gallery` to the source (gallery columns + `_kind`:
    insert | update | delete, `_content`: the old embedding or image changed) and its counts."""

    rows: DataFrame
    counts: dict


def diff_gallery(spark: SparkSession, gallery: DataFrame, changes: SourceChanges,
                 where: str) -> GalleryDiff:
    """What brings `gallery` to the source: inserts, updates (any column) and deletes, as one
    persisted DataFrame (unpersist `.rows` when done). Raises ValueError for duplicated ids."""
    from fastfill_udfs.spark.validation import check_unique_ids

    cols = list(gallery.columns)
    image_col = _image_column(gallery)
    new_cols = [c for c in changes.upserts.columns if c not in cols]
    if new_cols:
        log.warning("sync: %s has columns the gallery does not (%s): not taken in by a sync; "
                    "re-ingest to add them", where, new_cols)
    if _image_column(changes.upserts) != image_col:
        raise ValueError(f"{where}: the image column changed type (the gallery holds "
                         f"{image_col}); re-ingest the gallery")
    types = dict(gallery.dtypes)
    up = changes.upserts.select(*[
        (F.col(f"`{c}`") if c in changes.upserts.columns else F.lit(None)).cast(types[c])
        .alias(c) for c in cols])
    keyed = changes.gone is None
    if keyed:
        check_unique_ids(up.select("id"), where)
    elif changes.first_inserts is not None:
        again = changes.first_inserts.join(gallery.select("id"), "id", "left_semi").join(
            changes.gone, "id", "left_anti")
        sample = [r["id"] for r in again.limit(5).collect()]
        if sample:
            raise ValueError(f"{where} inserted rows with ids the gallery already holds, e.g. "
                             f"{sample}: duplicated ids (nothing was synced)")

    def hashed(df):
        return df.select("*", F.xxhash64(*[F.col(f"`{c}`") for c in cols if c != "id"],
                                         F.lit("a")).alias("_all"),
                         _content_hash(image_col).alias("_content_h"))

    g = hashed(gallery).select("id", F.col("_all").alias("_g_all"),
                               F.col("_content_h").alias("_g_content"))
    upserts = (hashed(up).join(g, "id", "left")
               .withColumn("_kind", F.when(F.col("_g_all").isNull(), "insert")
                           .when(F.col("_all") != F.col("_g_all"), "update"))
               .where("_kind IS NOT NULL")
               .select(*cols, "_kind", F.coalesce(F.col("_content_h") != F.col("_g_content"),
                                                  F.lit(True)).alias("_content")))
    if keyed:   # every gallery id the source no longer has (as a good row)
        deletes = gallery.select("id").join(up.select("id"), "id", "left_anti")
    else:
        deletes = (changes.gone.unionByName(changes.bad.select("id")).distinct()
                   .join(gallery.select("id"), "id", "left_semi"))
    deletes = deletes.select("id", *[F.lit(None).cast(types[c]).alias(c) for c in cols
                                     if c != "id"], F.lit("delete").alias("_kind"),
                             F.lit(True).alias("_content"))
    rows = upserts.unionByName(deletes).persist()
    found = {(r["_kind"], r["_content"]): r["count"]
             for r in rows.groupBy("_kind", "_content").count().collect()}
    counts = {"inserted": found.get(("insert", True), 0),
              "updated": found.get(("update", True), 0) + found.get(("update", False), 0),
              "content_changed": found.get(("update", True), 0),
              "deleted": found.get(("delete", True), 0)}
    if keyed:
        counts["source_rows"] = up.count()
    return GalleryDiff(rows, counts)


def _ensure_change_feed(spark: SparkSession, path: str, sync_id: int) -> None:
    """Turn on the Change Data Feed of `gallery` (runs follow it from there); a tagged commit,
    so a plan ranked before it is still current."""
    if cdf_enabled(spark, path):
        return
    with tagged(spark, {SYNC_TAG: sync_id, "setup": "delta.enableChangeDataFeed"}):
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES "
                  "(delta.enableChangeDataFeed = true)")


def sync_source(spark: SparkSession, cfg: Config) -> dict:
    """Step 1: bring `gallery` up to date with the source (hold the gallery lease). Returns
    the counts, the method and why, the sync id and the gallery version it committed."""
    paths = table_paths(cfg)
    if not is_delta_table(spark, paths.gallery):
        raise TableNotFoundError(f"no gallery at {paths.gallery}: run pipelines/ingest.py first")
    previous = commit_metadata(spark, paths.gallery, SYNC_TAG) or {}
    sync_id = int(previous.get(SYNC_TAG, 0)) + 1
    changes = source_changes(spark, cfg, paths.gallery)
    where = f"gallery table {cfg.get_path('data.gallery_table')}"
    gallery = read_table(spark, paths.gallery)
    n_before = gallery.count()
    diff = diff_gallery(spark, gallery, changes, where)
    try:
        n_bad = (write_quarantine(spark, paths.quarantine, changes.bad, stage="sync",
                                  batch_id=sync_id) if changes.bad.limit(1).count() else 0)
        counts = {**diff.counts, "quarantined": n_bad}
        n_after = n_before + counts["inserted"] - counts["deleted"]
        if n_after <= 0:
            raise ValueError(f"{where}: a sync would leave the gallery empty "
                             f"({counts['deleted']} of {n_before} items deleted); nothing synced")
        info = {"sync_id": sync_id, "method": changes.method, "why": changes.why,
                "source_version": changes.source_version, **counts}
        moved = counts["inserted"] + counts["updated"] + counts["deleted"]
        _ensure_change_feed(spark, paths.gallery, sync_id)
        if moved:
            version = _merge_gallery(spark, cfg, paths.gallery, diff, info)
        else:   # still one tagged commit: the sync's id and the source version it read
            version = _mark_gallery(spark, cfg, paths.gallery, info)
    finally:
        diff.rows.unpersist()
    if "source_rows" in counts:   # keyed: the gallery is the source's good rows, the rest bad
        reconcile({"gallery": n_after, "source_good": counts["source_rows"]},
                  [("gallery", "source_good")])
    log.info("sync %d: %s (%s); gallery %d -> %d items, version %d: %s", sync_id,
             changes.method, changes.why, n_before, n_after, version, counts)
    return {**info, "n_before": n_before, "n_after": n_after, "gallery_version": version}


def _sync_meta(cfg: Config, info: dict) -> dict:
    return {SYNC_TAG: info["sync_id"], "source_table": cfg.resolve_path("data.gallery_table"),
            **{k: info[k] for k in ("method", "why", "source_version", "inserted", "updated",
                                    "content_changed", "deleted", "quarantined")}}


def _mark_gallery(spark, cfg, path: str, info: dict) -> int:
    """A sync with nothing to change still leaves one tagged commit on `gallery` (a table
    property naming it): the next sync reads the source from the version this one read, and
    every sync has its own gallery version and id."""
    with tagged(spark, _sync_meta(cfg, info)):
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES "
                  f"('fastfill.last_sync' = '{int(info['sync_id'])}')")
    return latest_version(spark, path)


def _merge_gallery(spark, cfg, path: str, diff: GalleryDiff, info: dict) -> int:
    from delta.tables import DeltaTable

    cols = [c for c in diff.rows.columns if c not in ("_kind", "_content")]
    src = diff.rows
    meta = _sync_meta(cfg, info)

    def write():
        with tagged(spark, meta):
            return (DeltaTable.forPath(spark, path).alias("g")
                    .merge(src.alias("s"), "g.id = s.id")
                    .whenMatchedDelete(condition="s._kind = 'delete'")
                    .whenMatchedUpdate(condition="s._kind = 'update'",
                                       set={c: f"s.`{c}`" for c in cols if c != "id"})
                    .whenNotMatchedInsert(condition="s._kind = 'insert'",
                                          values={c: f"s.`{c}`" for c in cols})
                    .execute())
    got = merge_counts(retry_conflicts(write, f"sync {info['sync_id']}: MERGE into the gallery",
                                       conflict_attempts(cfg)))
    want = {"updated": info["updated"], "inserted": info["inserted"], "deleted": info["deleted"]}
    if got != want:
        raise ReconciliationError(f"sync {info['sync_id']}: the gallery MERGE changed {got} "
                                  f"rows, the change set has {want}")
    return latest_version(spark, path)


# ----------------------------------------------------------------------------- gallery -> run
def run_gallery_version(spark: SparkSession, cfg: Config, run: str, meta: dict) -> int:
    """The gallery version run `run` reflects: its newest sync_log row since its ranking, else
    the one it was ranked on."""
    from fastfill_udfs.spark.rank import RANKED_ON
    from fastfill_udfs.spark.sync_history import ranked_features_version

    path = sync_log_path(cfg, run)
    if is_delta_table(spark, path):
        since = ranked_features_version(spark, table_paths(cfg, run).backfill_log)
        row = (read_table(spark, path).where(F.col("features_version") > since)
               .agg(F.max("gallery_version").alias("g")).first())
        if row["g"] is not None:
            return int(row["g"])
    return int(meta[RANKED_ON])


def gallery_changes(spark: SparkSession, gallery_path: str, since: int, upto: int
                    ) -> tuple[DataFrame, DataFrame, str]:
    """(puts [id, old_embedding, image, _added], deletes [id], method) between two versions
    of `gallery`: items added (`_added`) or whose old embedding or image changed, items
    removed. From the
    gallery's Change Data Feed when it covers the range, else a keyed comparison of the two
    versions (Delta time travel)."""
    now = read_table(spark, gallery_path, version=upto)
    image_col = _image_column(now)
    try:
        feed = read_change_feed(spark, gallery_path, since + 1, upto)
    except ValueError as exc:
        log.info("sync: gallery versions %d..%d by keyed comparison (%s)", since, upto, exc)
        before = read_table(spark, gallery_path, version=since).select(
            "id", _content_hash(image_col).alias("_b"))
        after = now.select("id", "old_embedding", image_col, _content_hash(image_col).alias("_a"))
        puts = after.join(before, "id", "left").where("_b IS NULL OR _a != _b").select(
            "id", "old_embedding", image_col, F.col("_b").isNull().alias("_added"))
        deletes = before.select("id").join(after.select("id"), "id", "left_anti")
        return puts, deletes, "keyed"
    feed = feed.withColumn("_h", _content_hash(image_col))
    first, last = net_events(feed, "id")
    after_types = ("insert", "update_postimage")
    b = first.select("id", F.when(~F.col("_change_type").isin(*after_types), F.col("_h"))
                     .alias("_b"))
    a = last.join(b, "id")
    puts = a.where(F.col("_change_type").isin(*after_types)
                   & (F.col("_b").isNull() | (F.col("_h") != F.col("_b")))).select(
        "id", "old_embedding", image_col, F.col("_b").isNull().alias("_added"))
    deletes = a.where(~F.col("_change_type").isin(*after_types) & F.col("_b").isNotNull()) \
        .select("id")
    return puts, deletes, "cdf"


def _check_models(meta: dict, run: str, new_model: ModelRef, h: ModelRef) -> None:
    from fastfill_udfs.spark.backfill import ModelMismatchError, check_new_model

    check_new_model(meta, new_model, run)
    was = meta.get("h") or {}
    if (was.get("version"), was.get("weights")) != (h.version, h.weights_hash):
        raise ModelMismatchError(
            f"run '{run}' was ranked with h {was.get('version')} (weights {was.get('weights')}), "
            f"but models.h is {h.version} (weights {h.weights_hash}); nothing was synced into "
            f"it. Point models.h back at {was.get('uri')}, or re-rank the run")


def _transform(spark, h: ModelRef, rows: DataFrame, image_col: str, policy: str | None,
               seed: int) -> DataFrame:
    """rows[id, old_embedding, image] -> [id, image, transformed, sigma, score?, reason]."""
    from fastfill_udfs.spark.udfs import transform_fn

    image_type = dict(rows.dtypes)[image_col]
    schema = (f"id string, {image_col} {image_type}, transformed array<float>, sigma double, "
              + ("score double, " if policy else "") + "reason string")
    return rows.select("id", "old_embedding", image_col).mapInArrow(
        transform_fn(spark.sparkContext.broadcast(h.payload()), h.model.old_dim,
                     ["id", image_col], policy=policy, seed=seed), schema)


def _features_rows(df: DataFrame, vector: str, source: str, batch_id, model_version: str,
                   planned: int) -> DataFrame:
    return df.select("id", F.col(vector).cast("array<float>").alias("embedding"),
                     F.lit(source).alias("source"), F.lit(batch_id).cast("int").alias("batch_id"),
                     F.current_timestamp().alias("updated_at"),
                     F.lit(model_version).alias("model_version"),
                     F.lit(planned).cast("int").alias("planned_batch_id"))


@dataclass
class RunPlan:
    """What one sync does to one run: `rows` (persisted) the MERGE source for
    `gallery_features`, its columns and `_k`: `new` (becomes new, partition 0), `put` (becomes
    transformed: partition 0, or -1 when queued) or `drop` (leaves the run); `queued` the plan
    rows queued by score; `quarantine` [id, reason]; `counts`."""

    rows: DataFrame
    queued: DataFrame
    quarantine: DataFrame
    counts: dict


FEATURES_COLUMNS = ("id", "embedding", "source", "batch_id", "updated_at", "model_version",
                    "planned_batch_id")


def _run_changes(spark, cfg: Config, run: str, meta: dict, puts: DataFrame, deletes: DataFrame,
                 new_model: ModelRef, h: ModelRef, mode: str) -> tuple[RunPlan, list]:
    from fastfill_udfs.spark.ingest import embed_images

    image_col = meta.get("image_column", _image_column(puts))
    image_type = dict(puts.dtypes)[image_col]
    cached = []
    no_rows = spark.createDataFrame([], "id string, reason string")
    queued = spark.createDataFrame([], f"id string, score double, rank long, batch_id int, "
                                       f"{image_col} {image_type}")
    if mode == "embed":
        items, missing = puts.select("id", image_col), no_rows
        if image_col == "image_uri":
            from fastfill_udfs.spark.images import attach_images

            items, missing = attach_images(spark, items, cfg.get_path("data.image_root"))
        embedded = embed_images(spark, items, new_model, cfg, ["id"]).persist(
            StorageLevel.MEMORY_AND_DISK)
        cached.append(embedded)
        failed = missing.unionByName(embedded.where("reason IS NOT NULL").select("id", "reason"))
        parts = [_features_rows(embedded.where("reason IS NULL"), "embedding", "new",
                                ARRIVED_BATCH, new_model.version, ARRIVED_BATCH)
                 .withColumn("_k", F.lit("new"))]
        quarantine, h_bad = no_rows, no_rows
        if failed.limit(1).count():   # an image that cannot be embedded now: h(old) for now
            fallback = _transform(spark, h, puts.join(failed.select("id"), "id", "left_semi"),
                                  image_col, None, 0).persist()
            cached.append(fallback)
            parts.append(_features_rows(fallback.where("reason IS NULL"), "transformed",
                                        "transformed", None, h.version, ARRIVED_BATCH)
                         .withColumn("_k", F.lit("put")))
            h_bad = fallback.where("reason IS NOT NULL").select("id", "reason")
            quarantine = (failed.join(h_bad.select("id"), "id", "left_anti").select(
                "id", F.concat("reason", F.lit("; searchable by h(old) until its image is "
                                               "fixed")).alias("reason"))
                .unionByName(h_bad.join(failed.withColumnRenamed("reason", "_img"), "id")
                             .select("id", F.concat("_img", F.lit("; and "), "reason")
                                     .alias("reason"))))
    else:
        scored = _transform(spark, h, puts, image_col, meta.get("policy", "uncertainty"),
                            cfg.get_path("seed")).persist()
        cached.append(scored)
        good = scored.where("reason IS NULL")
        parts = [_features_rows(good, "transformed", "transformed", None, h.version,
                                QUEUE_BATCH).withColumn("_k", F.lit("put"))]
        queued = good.select("id", "score", F.lit(None).cast("long").alias("rank"),
                             F.lit(QUEUE_BATCH).alias("batch_id"), image_col)
        h_bad = quarantine = scored.where("reason IS NOT NULL").select("id", "reason")
    drop = deletes.select("id").unionByName(h_bad.select("id")).distinct()
    parts.append(drop.select("id", *[F.lit(None).cast(t).alias(c) for c, t in parts[0].dtypes
                                     if c not in ("id", "_k")], F.lit("drop").alias("_k")))
    rows = parts[0]
    for part in parts[1:]:
        rows = rows.unionByName(part)
    rows, quarantine = rows.persist(), quarantine.persist()
    cached += [rows, quarantine]
    by_kind = {r["_k"]: r["count"] for r in rows.groupBy("_k").count().collect()}
    by_put = {r["_added"]: r["count"] for r in puts.groupBy("_added").count().collect()}
    # relative to the gallery the run followed, so a rerun after a kill counts the same
    counts = {"added": by_put.get(True, 0), "changed": by_put.get(False, 0),
              "deleted": deletes.count(), "new": by_kind.get("new", 0),
              "transformed": by_kind.get("put", 0),
              "queued": by_kind.get("put", 0) if mode == "transform" else 0,
              "quarantined": quarantine.count(), "_drop": by_kind.get("drop", 0)}
    return RunPlan(rows, queued, quarantine, counts), cached


def _write_plan(spark, cfg, paths, plan: RunPlan, meta: dict, image_col: str) -> None:
    """The plan first: items leaving their batch (deleted, made new, re-transformed) and the
    queued ones; a batch that reads its input afterwards no longer embeds them."""
    from delta.tables import DeltaTable

    leave = plan.rows.select("id").join(plan.queued.select("id"), "id", "left_anti")
    image_type = dict(plan.queued.dtypes)[image_col]
    src = (leave.select("id", F.lit(None).cast("double").alias("score"),
                        F.lit(None).cast("long").alias("rank"),
                        F.lit(None).cast("int").alias("batch_id"),
                        F.lit(None).cast(image_type).alias(image_col), F.lit("drop").alias("_k"))
           .unionByName(plan.queued.withColumn("_k", F.lit("queue"))))

    def write():
        with tagged(spark, meta):
            return (DeltaTable.forPath(spark, paths.backfill_plan).alias("p")
                    .merge(src.alias("s"), "p.id = s.id")
                    .whenMatchedDelete(condition="s._k = 'drop'")
                    .whenMatchedUpdate(condition="s._k = 'queue'", set={
                        "score": "s.score", "rank": "s.rank", "batch_id": "s.batch_id",
                        image_col: f"s.{image_col}"})
                    .whenNotMatchedInsert(condition="s._k = 'queue'", values={
                        "id": "s.id", "score": "s.score", "rank": "s.rank",
                        "batch_id": "s.batch_id", image_col: f"s.{image_col}"})
                    .execute())
    retry_conflicts(write, f"sync {meta[SYNC_TAG]}: MERGE into {paths.backfill_plan}",
                    conflict_attempts(cfg))


def _write_features(spark, cfg, paths, plan: RunPlan, meta: dict) -> int:
    """Conditioned MERGEs, those on `transformed` rows first: a concurrent batch can only turn
    `transformed` rows into `new`, never back, so after them the MERGEs on `new` rows see
    every row they must. Each commit records which of its operation metrics count rows that
    became `new` (+) or stopped being `new` (-), so the net is exact whatever a batch did
    meanwhile (`sync_history.Commit.new_delta`). Returns that net."""
    from delta.tables import DeltaTable

    setall = {c: f"s.{c}" for c in FEATURES_COLUMNS if c != "id"}
    values = {c: f"s.{c}" for c in FEATURES_COLUMNS}
    same = ("s.embedding <=> f.embedding AND f.planned_batch_id <=> s.planned_batch_id "
            "AND f.model_version <=> s.model_version")
    n = plan.counts
    new_or_drop = plan.rows.where("_k != 'put'")
    put = plan.rows.where("_k = 'put'")
    steps = [   # (step, source, how many rows in it, sign, metrics counted, clauses)
        ("arrive", new_or_drop, n["new"] + n["_drop"], 1,
         ["numTargetRowsUpdated", "numTargetRowsInserted"], lambda m: m
         .whenMatchedUpdate(condition="f.source = 'transformed' AND s._k = 'new'", set=setall)
         .whenNotMatchedInsert(condition="s._k = 'new'", values=values)
         .whenMatchedDelete(condition="f.source = 'transformed' AND s._k = 'drop'")),
        ("arrive_transformed", put, n["transformed"], 0, [], lambda m: m
         .whenMatchedUpdate(condition="f.source = 'transformed'", set=setall)
         .whenNotMatchedInsert(values=values)),
        ("leave", new_or_drop, n["new"] + n["_drop"], -1, ["numTargetRowsDeleted"], lambda m: m
         .whenMatchedUpdate(condition=f"f.source = 'new' AND s._k = 'new' AND NOT ({same})",
                            set=setall)
         .whenMatchedDelete(condition="f.source = 'new' AND s._k = 'drop'")),
        ("leave_new", put, n["transformed"], -1, ["numTargetRowsUpdated"], lambda m: m
         .whenMatchedUpdate(condition="f.source = 'new'", set=setall)),
    ]
    delta = 0
    for step, src, size, sign, counted, clauses in steps:
        if not size:
            continue

        def write(src=src, clauses=clauses, step=step, sign=sign, counted=counted):
            with tagged(spark, {**meta, "step": step, "new_sign": sign, "new_counts": counted}):
                merge = DeltaTable.forPath(spark, paths.gallery_features).alias("f").merge(
                    src.alias("s"), "f.id = s.id")
                return clauses(merge).execute()
        got = merge_counts(retry_conflicts(
            write, f"sync {meta[SYNC_TAG]}: {step} MERGE into {paths.gallery_features}",
            conflict_attempts(cfg)))
        names = {"numTargetRowsUpdated": "updated", "numTargetRowsInserted": "inserted",
                 "numTargetRowsDeleted": "deleted"}
        delta += sign * sum(got[names[c]] for c in counted)
    return delta


def check_run(spark: SparkSession, cfg: Config, run: str, gallery_version: int) -> dict:
    """The run against the gallery it was synced to: every gallery item has exactly one row in
    `gallery_features` or is quarantined for the run, no row and no plan row is of an item
    that left the gallery. One pass over the ids; raises ReconciliationError naming a few."""
    paths = table_paths(cfg, run)
    ids = (read_table(spark, paths.gallery, version=gallery_version).select(
               "id", F.lit(1).alias("g"))
           .join(read_table(spark, paths.gallery_features).groupBy("id").agg(
               F.count(F.lit(1)).alias("f")), "id", "full")
           .join(read_table(spark, paths.backfill_plan).select("id", F.lit(1).alias("p")),
                 "id", "left")
           .join(read_table(spark, paths.quarantine)
                 .where((F.col("run") == run) & F.col("stage").isin("rank", "sync"))
                 .select("id", F.lit(1).alias("q")).distinct(), "id", "left"))
    problem = (F.when(F.col("f") > 1, "ids with more than one row in gallery_features")
               .when(F.col("g").isNull() & F.col("f").isNotNull(),
                     "rows in gallery_features of items no longer in the gallery")
               .when(F.col("g").isNull() & F.col("p").isNotNull(),
                     "plan rows of items no longer in the gallery")
               .when(F.col("g").isNotNull() & F.col("f").isNull() & F.col("q").isNull(),
                     "gallery items with no row in gallery_features and no quarantine entry"))
    found = ids.select("id", "g", "f", problem.alias("problem")).persist()
    try:
        bad = found.where("problem IS NOT NULL").limit(20).collect()
        totals = found.agg(F.sum("g").alias("gallery"), F.sum("f").alias("features")).first()
    finally:
        found.unpersist()
    if bad:
        kinds: dict[str, list] = {}
        for r in bad:
            kinds.setdefault(r["problem"], []).append(r["id"])
        raise ReconciliationError(
            f"run '{run}' after syncing to gallery version {gallery_version}: "
            + "; ".join(f"{k}, e.g. {v[:5]}" for k, v in kinds.items()))
    return {"gallery": int(totals["gallery"] or 0),
            "gallery_features": int(totals["features"] or 0)}


def sync_run(spark: SparkSession, cfg: Config, run: str, *, new_model: ModelRef, h: ModelRef,
             sync_id: int, mode: str | None = None) -> dict:
    """Step 2 for one run (see the module docstring); the gallery lease must be held. Returns
    the run's counts; {"skipped": reason} when the run is up to date or not ranked. Raises
    ModelMismatchError for another new model or h than the run's, StaleRankingError for a
    gallery re-ingested since the run was ranked."""
    from fastfill_udfs.spark.rank import StaleRankingError, is_ranked, plan_metadata

    mode = mode or cfg.get_path("sync.mode")
    if mode not in SYNC_MODES:
        raise ValueError(f"sync.mode must be one of {SYNC_MODES}, got {mode!r}")
    if not is_ranked(spark, cfg, run):
        return {"run": run, "skipped": "not ranked"}
    paths = table_paths(cfg, run)
    meta = plan_metadata(spark, cfg, run) or {}
    since = run_gallery_version(spark, cfg, run, meta)
    upto = latest_version(spark, paths.gallery)
    if since == upto:
        return {"run": run, "skipped": f"up to date (gallery version {upto})"}
    if since > upto or not moved_by_syncs_only(spark, paths.gallery, since):
        raise StaleRankingError(
            f"run '{run}' follows gallery version {since}, but the gallery was re-ingested "
            f"since (now version {upto}): a sync cannot bring it along. Re-rank it with "
            f"pipelines/rank_gallery.py --policy {meta.get('policy')} --force")
    _check_models(meta, run, new_model, h)
    started = datetime.now(timezone.utc)
    puts, deletes, method = gallery_changes(spark, paths.gallery, since, upto)
    puts, deletes = puts.persist(), deletes.persist()
    cached = [puts, deletes]
    counts = dict.fromkeys(("added", "changed", "deleted", "new", "transformed", "queued",
                            "quarantined"), 0)
    new_delta, checked = 0, {}
    try:
        if puts.limit(1).count() or deletes.limit(1).count():
            plan, more = _run_changes(spark, cfg, run, meta, puts, deletes, new_model, h, mode)
            cached += more
            counts = {k: v for k, v in plan.counts.items() if k != "_drop"}
            if counts["quarantined"] or quarantine_count(spark, paths.quarantine, "sync", run,
                                                         sync_id):
                write_quarantine(spark, paths.quarantine, plan.quarantine, stage="sync",
                                 run=run, batch_id=sync_id)
            meta_tag = {SYNC_TAG: sync_id, "run": run, "gallery_version": upto, "mode": mode,
                        "run_counts": counts}
            image_col = meta.get("image_column", _image_column(puts))
            _write_plan(spark, cfg, paths, plan, meta_tag, image_col)
            new_delta = _write_features(spark, cfg, paths, plan, meta_tag)
    finally:
        for df in cached:
            df.unpersist()
    if any(counts.values()):
        checked = check_run(spark, cfg, run, upto)
    fver = latest_version(spark, paths.gallery_features)
    row = spark.createDataFrame([(
        sync_id, upto, fver, method, counts["added"], counts["changed"], counts["deleted"],
        counts["new"], counts["transformed"], counts["queued"], counts["quarantined"],
        new_delta, started, datetime.now(timezone.utc))], SYNC_LOG_SCHEMA)
    write_table(row, sync_log_path(cfg, run), mode="append")   # each sync has its own id
    out = {"run": run, "method": method, "gallery_version": upto, "features_version": fver,
           "new_delta": new_delta, **counts, **checked}
    log.info("sync %d -> run %s (%s, gallery v%d -> v%d): %s", sync_id, run, mode, since, upto,
             out)
    return out


# ----------------------------------------------------------------------------- the job
def runs_to_sync(spark: SparkSession, cfg: Config, policy: str | None) -> list[str]:
    """`<run_name>_<policy>` for `policy`, or for every policy of backfill.policies and
    backfill.policy whose run is ranked."""
    from fastfill_udfs.spark.delta_io import run_id_for
    from fastfill_udfs.spark.rank import is_ranked

    if policy:
        return [run_id_for(cfg, policy)]
    policies = list(dict.fromkeys([*cfg.get_path("backfill.policies"),
                                   cfg.get_path("backfill.policy")]))
    return [run_id_for(cfg, p) for p in policies if is_ranked(spark, cfg, run_id_for(cfg, p))]


def sync_gallery(spark: SparkSession, cfg: Config, *, new_model: ModelRef, h: ModelRef,
                 policy: str | None = None, mode: str | None = None) -> dict:
    """Sync the gallery with the source, then the runs (`policy`'s, or every ranked one of
    run_name). Holds the gallery lease throughout. Returns {"gallery": ..., "runs": [...]}."""
    mode = mode or cfg.get_path("sync.mode")
    if mode not in SYNC_MODES:
        raise ValueError(f"sync.mode must be one of {SYNC_MODES}, got {mode!r}")
    with GalleryLease(spark, gallery_lease_path(cfg), "gallery",
                      cfg.get_path("backfill.lease_timeout_s")):
        gallery = sync_source(spark, cfg)
        runs = [sync_run(spark, cfg, run, new_model=new_model, h=h,
                         sync_id=gallery["sync_id"], mode=mode)
                for run in runs_to_sync(spark, cfg, policy)]
    _log_to_mlflow(spark, cfg, runs)
    return {"gallery": gallery, "runs": runs}


def _log_to_mlflow(spark: SparkSession, cfg: Config, runs: list[dict]) -> None:
    """Tag each synced run's MLflow run (when it has one) with what the syncs did so far."""
    try:
        from mlflow.tracking import MlflowClient

        from fastfill_udfs.spark.delta_io import ranking_id
        from fastfill_udfs.tracking import configure_mlflow, find_backfill_run

        exp = configure_mlflow(cfg)
        client = MlflowClient()
        for r in runs:
            if r.get("skipped"):
                continue
            found = find_backfill_run(client, exp, r["run"], ranking_id(spark, cfg, r["run"]))
            if found is None:
                continue
            totals = read_table(spark, sync_log_path(cfg, r["run"])).agg(
                *[F.sum(f"n_{k}").alias(k) for k in ("added", "changed", "deleted")]).first()
            client.set_tag(found.info.run_id, "fastfill.synced",
                           f"+{totals['added']} added, {totals['changed']} changed, "
                           f"-{totals['deleted']} deleted (gallery version "
                           f"{r['gallery_version']})")
    except Exception as exc:  # the record is in Delta; MLflow only mirrors it
        log.warning("sync: could not tag the MLflow runs: %s", exc)


def sync_job(cfg: Config, *, policy: str | None = None, mode: str | None = None,
             master: str | None = None, out=print) -> dict:
    """What pipelines/sync_gallery.py and notebooks/07_sync_gallery.py run: the session, the
    run's models, `sync_gallery`; prints the method used and the counts."""
    from fastfill_udfs.model_loading import load_configured_model
    from fastfill_udfs.spark.session import get_spark

    spark = get_spark(cfg["spark"], master=master)
    result = sync_gallery(spark, cfg, new_model=load_configured_model(cfg, "new"),
                          h=load_configured_model(cfg, "h"), policy=policy, mode=mode)
    g = result["gallery"]
    out(f"sync {g['sync_id']}: source read by {g['method']} ({g['why'] or 'Change Data Feed'}); "
        f"gallery {g['n_before']} -> {g['n_after']} items (version {g['gallery_version']}): "
        f"{g['inserted']} added, {g['updated']} updated ({g['content_changed']} with a new "
        f"image or old embedding), {g['deleted']} deleted, {g['quarantined']} quarantined")
    for r in result["runs"]:
        if r.get("skipped"):
            out(f"  run {r['run']}: {r['skipped']}")
            continue
        out(f"  run {r['run']}: {r['added']} added, {r['changed']} changed, {r['deleted']} "
            f"deleted -> {r['new']} embedded by the new model, {r['transformed']} by h "
            f"({r['queued']} queued), {r['quarantined']} quarantined (gallery version "
            f"{r['gallery_version']}, gallery_features version {r['features_version']})")
    return result


def synced_history(spark: SparkSession, cfg: Config, run: str):
    """(the run's `sync_history.SyncedHistory`, the gallery version it was ranked on); (None,
    None) for a run ranked before plans recorded it (the gallery is then read as it is)."""
    from fastfill_udfs.spark.rank import RANKED_ON, plan_metadata
    from fastfill_udfs.spark.sync_history import SyncedHistory, ranked_features_version

    ranked = (plan_metadata(spark, cfg, run) or {}).get(RANKED_ON)
    if ranked is None:
        return None, None
    paths = table_paths(cfg, run)
    return (SyncedHistory(spark, paths.gallery_features, int(ranked), sync_log_path(cfg, run),
                          paths.gallery, ranked_features_version(spark, paths.backfill_log)),
            int(ranked))
