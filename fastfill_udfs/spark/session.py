"""The one SparkSession helper used by every job, notebook and test.

- Reuses an already active session (Databricks, a notebook, a test fixture).
- Under `spark-submit` keeps the master and settings spark-submit was given.
- Otherwise starts `spark.master` from the config (default `local[*]`).
Delta Lake is required: without its jars the helper stops with the setup command to run.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

from pyspark.sql import SparkSession

from fastfill_udfs.config import LOG_LEVELS
from fastfill_udfs.spark import jars


class DeltaUnavailableError(RuntimeError):
    """The session cannot read or write Delta tables."""


def _launched_by_spark_submit() -> bool:
    # spark-submit starts the Python driver with the JVM gateway already running.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def get_spark(
    spark_cfg: Mapping | None = None,
    *,
    master: str | None = None,
    app_name: str | None = None,
) -> SparkSession:
    """Return the active SparkSession or build one with Delta enabled.

    `spark_cfg` is the config's `spark` section (master, app_name, arrow_batch_size,
    shuffle_partitions, driver_memory, log_level, conf); `master` overrides it. Raises
    DeltaUnavailableError when the Delta jars are missing (names the setup command)."""
    spark_cfg = dict(spark_cfg or {})
    active = SparkSession.getActiveSession()
    if active is not None:
        _apply_runtime_conf(active, spark_cfg)
        _check_delta(active)
        return active

    builder = SparkSession.builder.appName(app_name or spark_cfg.get("app_name", "fastfill"))
    if master or not _launched_by_spark_submit():
        builder = builder.master(master or spark_cfg.get("master", "local[*]"))
    if not _launched_by_spark_submit():
        # Python launch: spark-defaults.conf normally supplies these; set them anyway so a
        # pyspark without our spark-defaults still gets Delta from the project jar cache.
        if not jars.delta_jars_present():
            raise DeltaUnavailableError(jars.missing_jars_message())
        for key, value in jars.delta_spark_conf().items():
            builder = builder.config(key, value)
        if spark_cfg.get("driver_memory"):
            builder = builder.config("spark.driver.memory", spark_cfg["driver_memory"])
        if not os.environ.get("PYSPARK_PYTHON"):
            # the workers run on this interpreter (which has numpy, torch, ...), not on the
            # first `python3` on PATH. pyspark takes the workers' interpreter from this
            # variable alone (SparkContext.pythonExec); spark.pyspark.python only reaches
            # spark-submit.
            os.environ["PYSPARK_PYTHON"] = sys.executable
            builder = builder.config("spark.pyspark.python", sys.executable)
    builder = builder.config("spark.sql.session.timeZone", "UTC")
    for key, value in _static_conf(spark_cfg).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    _apply_runtime_conf(spark, spark_cfg)
    _check_delta(spark)
    return spark


def _static_conf(spark_cfg: Mapping) -> dict[str, str]:
    conf = {str(k): str(v) for k, v in (spark_cfg.get("conf") or {}).items()}
    conf.setdefault("spark.ui.showConsoleProgress", "false")
    return conf


def _apply_runtime_conf(spark: SparkSession, spark_cfg: Mapping) -> None:
    level = str(spark_cfg.get("log_level") or "").upper()
    if level:  # spark.log_level: Spark's chatter back on (or off) for this job
        if level not in LOG_LEVELS:
            raise ValueError(f"config key 'spark.log_level' must be one of {LOG_LEVELS} or "
                             f"'', got {spark_cfg.get('log_level')!r}")
        spark.sparkContext.setLogLevel(level)
    settings = {"spark.sql.execution.arrow.pyspark.enabled": "true"}
    if spark_cfg.get("arrow_batch_size"):
        settings["spark.sql.execution.arrow.maxRecordsPerBatch"] = spark_cfg["arrow_batch_size"]
    if spark_cfg.get("shuffle_partitions"):
        settings["spark.sql.shuffle.partitions"] = spark_cfg["shuffle_partitions"]
    for key, value in settings.items():
        try:
            spark.conf.set(key, str(value))
        except Exception:  # some managed runtimes refuse to change a setting; keep theirs
            pass


def _check_delta(spark: SparkSession) -> None:
    if _on_databricks():
        return
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    if jars.DELTA_EXTENSION not in extensions:
        raise DeltaUnavailableError(
            "the SparkSession does not have Delta's SQL extension "
            f"({jars.DELTA_EXTENSION}) enabled. Run `{jars.SETUP_COMMAND}`, or start Spark with "
            f"--packages {jars.delta_maven_coordinate()} and "
            f"--conf spark.sql.extensions={jars.DELTA_EXTENSION} "
            f"--conf spark.sql.catalog.spark_catalog={jars.DELTA_CATALOG}"
        )
