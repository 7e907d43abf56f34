"""What a gallery sync left in the Delta history: the commit tags the sync writes, read back by
the jobs that must accept a gallery moved by syncs (`rank.check_ranking_current`), follow it
(`evaluate`, `search`) or reconcile against it.

A sync tags every commit it makes (on `gallery`, and on a run's `gallery_features` and
`backfill_plan`) with `{"fastfill_sync": <sync id>, ...}` in the commit's user metadata. On
`gallery_features` each tagged commit also says which gallery version it brings the run to
(`gallery_version`) and how it moves the count of `new` rows: `new_sign` (+1: the rows counted
became `new`, -1: they stopped being `new`, 0: no change) and `new_counts`, the names of the
commit's own operation metrics that count those rows. That keeps the evaluation's
reconciliation exact without another table: rows `new` at version v = h's pairs + items merged
by batches 1..k (backfill_log) + the net of the sync commits up to v.

Only `fastfill_udfs.spark.delta_io` is imported here, so every job can use it."""
from __future__ import annotations

import json
from dataclasses import dataclass

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

SYNC_TAG = "fastfill_sync"          # user metadata key of every commit a sync makes
ABSORB_TAG = "fastfill_absorb"      # a backfill moving queued items into its batch (no vectors)
QUEUE_BATCH = -1                    # plan batch_id / planned_batch_id of items a sync queued
ARRIVED_BATCH = 0                   # partition of items outside the plan: h's pairs, synced items


@dataclass(frozen=True)
class Commit:
    """One commit of a Delta table's history, with its user metadata parsed (or {})."""

    version: int
    operation: str
    read_version: int | None
    metrics: dict
    meta: dict

    @property
    def sync_id(self) -> int | None:
        value = self.meta.get(SYNC_TAG)
        return int(value) if value is not None else None

    def new_delta(self) -> int:
        """How this sync commit changed the number of `new` rows (0 for other commits)."""
        sign = int(self.meta.get("new_sign", 0) or 0) if self.sync_id is not None else 0
        if not sign:
            return 0
        counted = self.meta.get("new_counts") or ("numTargetRowsUpdated",
                                                  "numTargetRowsInserted", "numTargetRowsDeleted")
        return sign * sum(int(self.metrics.get(k, 0) or 0) for k in counted)


def history_since(spark: SparkSession, path: str, since_version: int) -> list[Commit]:
    """The commits of the Delta table at `path` newer than `since_version`, oldest first; only
    those are read (the cost grows with the commits asked for, not the table's age)."""
    from delta.tables import DeltaTable

    from fastfill_udfs.spark.delta_io import latest_version

    newer = latest_version(spark, path) - int(since_version)
    if newer <= 0:
        return []
    rows = (DeltaTable.forPath(spark, path).history(newer)
            .select("version", "operation", "readVersion", "operationMetrics", "userMetadata")
            .collect())
    out = []
    for row in rows:
        if int(row["version"]) <= since_version:
            continue
        try:
            meta = json.loads(row["userMetadata"]) if row["userMetadata"] else {}
        except ValueError:
            meta = {}
        out.append(Commit(int(row["version"]), str(row["operation"]),
                          None if row["readVersion"] is None else int(row["readVersion"]),
                          dict(row["operationMetrics"] or {}),
                          meta if isinstance(meta, dict) else {}))
    return sorted(out, key=lambda c: c.version)


def moved_by_syncs_only(spark: SparkSession, gallery_path: str, since_version: int) -> bool:
    """True when every commit of `gallery` after `since_version` was made by a sync (so a plan
    ranked on `since_version` is still current: the sync brings its run along)."""
    return all(c.sync_id is not None for c in history_since(spark, gallery_path, since_version))


def ranked_features_version(spark: SparkSession, log_path: str) -> int:
    """The `gallery_features` version a run's ranking wrote (its backfill_log batch 0); -1 when
    the run is not ranked. Sync commits and sync_log rows before it belong to an earlier
    ranking of the run."""
    from fastfill_udfs.spark.delta_io import is_delta_table, read_table

    if not is_delta_table(spark, log_path):
        return -1
    row = read_table(spark, log_path).where("batch_id = 0").select("table_version").first()
    return -1 if row is None else int(row["table_version"])


def latest_synced_version(spark: SparkSession, features_path: str, logged_version: int) -> int:
    """The newest version of a run's `gallery_features` that differs from `logged_version` (a
    committed batch's) only by sync commits: the gallery as it is now, when no batch has
    started merging since."""
    version = int(logged_version)
    for commit in history_since(spark, features_path, version):
        if commit.sync_id is None and ABSORB_TAG not in commit.meta:
            break
        version = commit.version
    return version


class SyncedHistory:
    """The sync commits of one run's `gallery_features`, read once and extended on demand:
    which gallery version the run had reached at a features version, and the net change of
    `new` rows the syncs made up to it."""

    def __init__(self, spark: SparkSession, features_path: str, ranked_gallery_version: int,
                 sync_log_path: str | None = None, gallery_path: str | None = None,
                 ranked_features_version: int = -1):
        self.spark, self.path, self.gallery_path = spark, features_path, gallery_path
        self.ranked = int(ranked_gallery_version)
        self.sync_log_path = sync_log_path
        self.commits: list[Commit] = []
        # what came before this ranking (a run re-ranked with --force) is not this plan's
        self.read_upto = self.since = int(ranked_features_version)
        self.logged: list[dict] = []     # sync_log rows: the syncs that reached the run
        self._static_at: int | None = None

    def _read(self, version: int) -> None:
        from fastfill_udfs.spark.delta_io import is_delta_table, latest_version, read_table

        if version <= self.read_upto or version == self._static_at:
            return
        if (not self.commits and self.gallery_path
                and latest_version(self.spark, self.gallery_path) == self.ranked):
            self._static_at = version   # no sync moved the gallery since the ranking: none
            return                      # reached the run (checked once per version asked)
        self.commits += [c for c in history_since(self.spark, self.path, self.read_upto)
                         if c.sync_id is not None]

        self.read_upto = latest_version(self.spark, self.path)
        if self.sync_log_path and is_delta_table(self.spark, self.sync_log_path):
            self.logged = sorted((r.asDict() for r in read_table(self.spark, self.sync_log_path)
                                  .where(F.col("features_version") > self.since).collect()),
                                 key=lambda r: r["features_version"])

    def any_between(self, after_version: int, upto_version: int) -> bool:
        """True when a sync commit lies in (after_version, upto_version]."""
        self._read(upto_version)
        return any(after_version < c.version <= upto_version for c in self.commits)

    def new_delta(self, version: int) -> int:
        """Net change of `new` rows made by sync commits up to `version`."""
        self._read(version)
        return sum(c.new_delta() for c in self.commits if c.version <= version)

    def gallery_version(self, version: int) -> int:
        """The gallery version the run's features reflect at `version`: the newest one a sync
        commit (or a finished sync, from sync_log) up to it names; the ranked version before
        any sync."""
        self._read(version)
        seen = [int(c.meta["gallery_version"]) for c in self.commits
                if c.version <= version and "gallery_version" in c.meta]
        seen += [int(r["gallery_version"]) for r in self.logged
                 if r["features_version"] <= version]
        return max([self.ranked] + seen)

    def synced_counts(self, version: int) -> dict:
        """Items added, changed and deleted by the syncs that had finished with the run by
        `version` (its sync_log: a sync killed half-way is counted by the one that finished
        its work)."""
        self._read(version)
        done = [r for r in self.logged if r["features_version"] <= version]
        return {key: sum(int(r[f"n_{key}"]) for r in done)
                for key in ("added", "changed", "deleted")}
