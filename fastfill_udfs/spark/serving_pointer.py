"""The serving pointer: a small Delta table (warehouse/serving) with one row per alias saying
which run, batch and servable index the alias serves. `publish` and `rollback`
(`spark/serving.py`) move it; `search --serving` reads it."""
from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.spark.delta_io import is_delta_table, latest_version, read_table

SERVING_SCHEMA = ("alias string, state_id string, run string, batch_id int, features_version long, "
                  "location string, ranking string, new_model string, n_items long, n_new long, "
                  "published_at timestamp, published_by string, action string, "
                  "previous_version long")
COLUMNS = [c.split()[0] for c in SERVING_SCHEMA.split(", ")]


def serving_path(cfg: Config) -> str:
    """Where the pointer table lives: <warehouse>/serving."""
    return cfg.resolve_path("paths.warehouse").rstrip("/") + "/serving"


def check_alias(cfg: Config, alias: str | None) -> str:
    """`alias` (default serving.alias), checked: ValueError unless letters, digits, _ - .."""
    import re

    alias = alias or cfg.get_path("serving.alias")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", alias or ""):
        raise ValueError(f"serving alias must use letters, digits, '_', '-' or '.', got {alias!r}")
    return alias


def current(spark: SparkSession, cfg: Config, alias: str | None = None,
            version: int | None = None) -> dict | None:
    """The published state of `alias` (serving.alias) as a dict, with `pointer_version` (the
    serving table's version read); None when nothing was ever published under it."""
    alias = check_alias(cfg, alias)
    path = serving_path(cfg)
    if not is_delta_table(spark, path):
        return None
    at = latest_version(spark, path) if version is None else int(version)
    rows = read_table(spark, path, version=at).where(F.col("alias") == alias).collect()
    if not rows:
        return None
    return {**rows[0].asDict(), "pointer_version": at}


def describe(state: dict | None) -> str:
    """One line about a published state."""
    if not state:
        return "(nothing published)"
    return (f"run {state['run']} at batch {state['batch_id']} (gallery_features version "
            f"{state['features_version']}; {state['n_items']} items, {state['n_new']} new), "
            f"{'rolled back to' if state['action'] == 'rollback' else 'published'} "
            f"{state['published_at']:%Y-%m-%d %H:%M:%S} by {state['published_by']}: "
            f"{state['location']}")
