"""Delta Lake I/O: where each table of the data contract lives, and reading/writing them.

Tables are path-based (`<warehouse>/<name>`), so the same code runs locally and on a cluster.
Files beside the tables (a commit's JSON, an exported index) go through Hadoop's file systems
(`hadoop_fs`), so any store Spark reads works.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.spark.arrow_utils import arrow_rows


class TableNotFoundError(FileNotFoundError):
    """A Delta table the job needs does not exist (yet)."""


@dataclass(frozen=True)
class TablePaths:
    """Paths of the data contract's tables; per-run tables live under runs/<run>/."""

    gallery: str
    queries: str
    query_features: str
    quarantine: str
    train_pairs: str
    backfill_plan: str | None = None
    gallery_features: str | None = None
    backfill_log: str | None = None
    backfill_lease: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def run_id_for(cfg: Config, policy: str | None = None) -> str:
    """The backfill run's name: `<run_name>_<policy>` (one run per policy when comparing)."""
    import re

    policy = policy or cfg.get_path("backfill.policy")
    run = f"{cfg.get_path('run_name')}_{policy}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", run):  # it names folders and SQL literals
        raise ValueError(f"run_name must use letters, digits, '_', '-' or '.', got {run!r}")
    return run


def table_paths(cfg: Config, run: str | None = None) -> TablePaths:
    root = cfg.resolve_path("paths.warehouse").rstrip("/")
    per_run = {}
    if run is not None:
        base = f"{root}/runs/{run}"
        per_run = dict(backfill_plan=f"{base}/backfill_plan",
                       gallery_features=f"{base}/gallery_features",
                       backfill_log=f"{base}/backfill_log",
                       backfill_lease=f"{base}/backfill_lease")
    return TablePaths(gallery=f"{root}/gallery", queries=f"{root}/queries",
                      query_features=f"{root}/query_features",
                      quarantine=f"{root}/quarantine", train_pairs=f"{root}/train_pairs",
                      **per_run)


def hadoop_path(spark: SparkSession, path: str):
    """`path` (a local path or any URI the cluster's Hadoop file systems read) as a Hadoop
    `Path` (a JVM object)."""
    return spark.sparkContext._jvm.org.apache.hadoop.fs.Path(str(path))


def hadoop_fs(spark: SparkSession, path: str):
    """(the Hadoop `FileSystem` holding `path`, `path` as a Hadoop `Path`), both JVM objects:
    local, `file:`, `hdfs:`, `s3a:`, `abfss:`, `dbfs:`, whatever the session is configured for."""
    hpath = hadoop_path(spark, path)
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath


def read_text_file(spark: SparkSession, path: str) -> str | None:
    """The text (UTF-8) of the file at `path` through Hadoop's file systems, or None when
    there is no file there."""
    fs, hpath = hadoop_fs(spark, path)
    if not fs.exists(hpath):
        return None
    stream = fs.open(hpath)
    try:
        return spark.sparkContext._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
    finally:
        stream.close()


def is_delta_table(spark: SparkSession, path: str) -> bool:
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, path)


def read_table(spark: SparkSession, path: str, version: int | None = None) -> DataFrame:
    """Read the Delta table at `path`, optionally as of `version` (time travel).

    Raises TableNotFoundError naming the path when there is no Delta table there."""
    if not is_delta_table(spark, path):
        raise TableNotFoundError(f"no Delta table at {path}")
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", int(version))
    return reader.load(path)


def local_data_files(spark: SparkSession, path: str) -> list[str]:
    """Filesystem paths of the Parquet files in the current version of the Delta table at
    `path`, a table on local disk. Raises TableNotFoundError (no table) or ValueError naming a
    file that is not local."""
    files = [f.removeprefix("file:") for f in read_table(spark, path).inputFiles()]
    remote = [f for f in files if "://" in f]
    if remote:
        raise ValueError(f"the Delta table at {path} is not on local disk: {remote[0]}")
    return files


def dictionary_columns(parquet_file: str) -> set[str]:
    """The column paths of `parquet_file` that hold a dictionary page in any row group."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(parquet_file).metadata
    return {meta.row_group(g).column(c).path_in_schema for g in range(meta.num_row_groups)
            for c in range(meta.num_columns) if meta.row_group(g).column(c).has_dictionary_page}


def write_table(df: DataFrame, path: str, *, mode: str = "overwrite",
                partition_by: list[str] | None = None, metadata: dict | None = None) -> None:
    """Write `df` as a Delta table at `path` (`mode`: overwrite | append | errorifexists);
    `metadata` (JSON-able) is recorded with the commit (`commit_metadata` reads it back)."""
    writer = df.write.format("delta").mode(mode)
    if metadata is not None:
        writer = writer.option("userMetadata", json.dumps(metadata, sort_keys=True))
    if mode == "overwrite":
        writer = writer.option("overwriteSchema", "true")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.save(path)


def commit_metadata(spark: SparkSession, path: str, key: str) -> dict | None:
    """The newest commit metadata (`write_table(metadata=...)`) of the table at `path` that has
    `key`; None when no commit has it."""
    from delta.tables import DeltaTable

    rows = (DeltaTable.forPath(spark, path).history().where("userMetadata IS NOT NULL")
            .orderBy(F.desc("version")).select("userMetadata").collect())
    for row in rows:
        try:
            found = json.loads(row["userMetadata"])
        except ValueError:
            continue
        if isinstance(found, dict) and key in found:
            return found
    return None


def latest_version(spark: SparkSession, path: str) -> int:
    """The newest committed version of the Delta table at `path`."""
    from delta.tables import DeltaTable

    if not is_delta_table(spark, path):
        raise TableNotFoundError(f"no Delta table at {path}")
    row = DeltaTable.forPath(spark, path).history(1).select("version").first()
    return int(row["version"])


def read_features(spark: SparkSession, path: str, version: int,
                  columns=("id", "embedding", "source", "model_version", "batch_id")):
    """gallery_features at `version` (Delta time travel): (columns as pandas, embeddings)."""
    df = read_table(spark, path, version=version).select(*columns)
    return arrow_rows(df, f"gallery_features {path} at version {version}")


def logged_ranking(spark: SparkSession, log_table: str) -> str | None:
    """The ranking the backfill_log table at `log_table` records: when its batch 0 was started
    (microseconds since the epoch, whatever the session's time zone); None when the table or
    its batch 0 is not there."""
    if not is_delta_table(spark, log_table):
        return None
    row = (read_table(spark, log_table).where("batch_id = 0")
           .select(F.unix_micros("started_at").alias("started_at")).first())
    return None if row is None else str(row["started_at"])


def ranking_id(spark: SparkSession, cfg: Config, run: str) -> str:
    """Identifies one ranking of `run` (`logged_ranking` of its backfill_log). A re-ranked run
    (rank --force, or tables rebuilt from scratch) gets a new one, and with it a new MLflow
    run. Raises ValueError when `run` has not been ranked."""
    path = table_paths(cfg, run).backfill_log
    found = logged_ranking(spark, path)
    if found is None:
        raise ValueError(f"run {run!r} is not ranked (no batch 0 in {path}): run "
                         f"pipelines/rank_gallery.py first")
    return found


QUARANTINE_SCHEMA = ("id string, stage string, run string, reason string, detected_at timestamp, "
                     "batch_id int")
QUARANTINE_STAGES = ("ingest", "queries", "rank", "backfill", "sync")


def _quarantine_condition(stage: str, run: str | None, batch_id: int | None) -> str:
    condition = f"stage = '{stage}' AND " + (f"run = '{run}'" if run else "run IS NULL")
    if batch_id is not None:
        condition += f" AND batch_id = {int(batch_id)}"
    return condition


def write_quarantine(spark: SparkSession, path: str, rows: DataFrame, stage: str,
                     run: str | None = None, batch_id: int | None = None) -> int:
    """Replace the quarantine rows of (`stage`, `run`[, `batch_id`]) with `rows` (columns id,
    reason). One atomic Delta commit (replaceWhere), so a rerun never duplicates rows.
    Returns the count. Raises ValueError for an unknown stage."""
    if stage not in QUARANTINE_STAGES:
        raise ValueError(f"quarantine stage must be one of {QUARANTINE_STAGES}, got {stage!r}")
    out = rows.select(
        F.col("id").cast("string"), F.lit(stage).alias("stage"),
        F.lit(run).cast("string").alias("run"), F.col("reason").cast("string"),
        F.current_timestamp().alias("detected_at"), F.lit(batch_id).cast("int").alias("batch_id"))
    condition = _quarantine_condition(stage, run, batch_id)
    if not is_delta_table(spark, path):
        write_table(spark.createDataFrame([], QUARANTINE_SCHEMA), path)
    (out.write.format("delta").mode("overwrite").option("replaceWhere", condition)
     .option("mergeSchema", "true").save(path))
    return read_table(spark, path).where(condition).count()


def quarantine_count(spark: SparkSession, path: str, stage: str, run: str | None = None,
                     batch_id: int | None = None) -> int:
    if not is_delta_table(spark, path):
        return 0
    return read_table(spark, path).where(_quarantine_condition(stage, run, batch_id)).count()


METADATA_KEY = "spark.databricks.delta.commitInfo.userMetadata"


class tagged:
    """Context manager: every Delta commit made inside carries `meta` as user metadata."""

    def __init__(self, spark: SparkSession, meta: dict):
        import json

        self.spark, self.text = spark, json.dumps(meta, sort_keys=True, default=str)

    def __enter__(self):
        self.spark.conf.set(METADATA_KEY, self.text)

    def __exit__(self, *exc):
        self.spark.conf.unset(METADATA_KEY)


def merge_counts(result: DataFrame | None) -> dict:
    """{"updated", "inserted", "deleted"} rows of a Delta MERGE's `execute()` result."""
    row = result.first() if result is not None else None
    if row is None:
        return {"updated": 0, "inserted": 0, "deleted": 0}
    d = row.asDict()
    return {"updated": int(d.get("num_updated_rows", 0) or 0),
            "inserted": int(d.get("num_inserted_rows", 0) or 0),
            "deleted": int(d.get("num_deleted_rows", 0) or 0)}


def is_local_uri(uri: str) -> bool:
    """Whether `uri` is a path on this machine (no scheme, or file:)."""
    return "://" not in uri and not uri.startswith("dbfs:") or uri.startswith("file:")


def local_path(uri: str) -> Path:
    """The local path of a file: URI or plain path."""
    return Path(uri[len("file://"):] if uri.startswith("file://") else
                uri[len("file:"):] if uri.startswith("file:") else uri)
