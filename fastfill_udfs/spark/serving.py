"""The serving alias: which servable index of which run is published, moved atomically.

The alias is a row of a small Delta table, `<warehouse>/serving` (one row per alias; why a Delta
pointer table rather than an MLflow alias: docs/moving_gallery.md). A publish first writes the
servable index (`search.export_servable`, an immutable folder per run, batch and Delta version),
then moves the alias in one Delta commit; a reader (`search.py --serving`) reads the row and
loads that folder, so it sees the old index or the new one, never half of one. Each row names
the pointer table's version it replaced (`previous_version`): `--rollback` puts that state back
(one commit), and rolling back again walks further back. Two publishers at once: each MERGE is
conditioned on the row it read, so the one that lost re-reads and tries again, or a rollback
refuses with the state it found."""
from __future__ import annotations

import getpass
import logging
import socket
import uuid
from datetime import datetime, timezone

from pyspark.sql import SparkSession

from fastfill_udfs.config import Config
from fastfill_udfs.spark.delta_io import TableNotFoundError, is_delta_table, write_table
from fastfill_udfs.spark.lease import ConcurrentWriteError, retry_conflicts
from fastfill_udfs.spark.serving_pointer import (COLUMNS, SERVING_SCHEMA, check_alias, current,
                                                 describe, serving_path)

log = logging.getLogger(__name__)
def _move(spark: SparkSession, cfg: Config, alias: str, state: dict, expected: dict | None
          ) -> bool:
    """One commit: set `alias`'s row to `state` if it is still `expected` (None: absent)."""
    from delta.tables import DeltaTable

    path = serving_path(cfg)
    if not is_delta_table(spark, path):
        write_table(spark.createDataFrame([], SERVING_SCHEMA), path)
    row = spark.createDataFrame([tuple(state[c] for c in COLUMNS)], SERVING_SCHEMA)
    merge = DeltaTable.forPath(spark, path).alias("p").merge(row.alias("n"), "p.alias = n.alias")
    if expected is None:
        merge = merge.whenNotMatchedInsertAll()
    else:   # compare-and-swap on the state read
        merge = merge.whenMatchedUpdateAll(condition=f"p.state_id = '{expected['state_id']}'")
    got = merge.execute().first()
    return int(got["num_affected_rows"]) == 1


def _state(alias: str, served_info: dict, location: str, action: str,
           previous_version: int | None) -> dict:
    new_model = served_info.get("new_model") or {}
    return {"alias": alias, "state_id": uuid.uuid4().hex, "run": served_info["run"], "batch_id": int(served_info["batch_id"]),
            "features_version": int(served_info["features_version"]), "location": location,
            "ranking": served_info.get("ranking"),
            "new_model": new_model.get("version") if isinstance(new_model, dict) else new_model,
            "n_items": int(served_info.get("n_items", 0)), "n_new": int(served_info.get("n_new", 0)),
            "published_at": datetime.now(timezone.utc),
            "published_by": f"{getpass.getuser()}@{socket.gethostname()}", "action": action,
            "previous_version": previous_version}


def _exported(location: str, run: str, batch_id: int, version: int) -> bool:
    """True when `location` (local) already holds this run's index at (batch, version)."""
    from fastfill_udfs.search import ServableIndex
    from fastfill_udfs.spark.delta_io import is_local_uri, local_path

    if not is_local_uri(location):
        return False
    try:
        info = ServableIndex.read_info(local_path(location))
    except (FileNotFoundError, ValueError):
        return False
    return (info.get("run"), info.get("batch_id"), info.get("features_version")) == (
        run, batch_id, version)


def publish(spark: SparkSession, cfg: Config, run: str, *, batch: int | None = None,
            alias: str | None = None) -> dict:
    """Point `alias` at the servable index of `run` at committed `batch` (None: the run as it
    is now, its latest batch and the syncs since), written to the warehouse first if it is not
    there. Returns {"alias", "before", "after"} (the states as dicts). Raises ValueError for a
    batch not committed, TableNotFoundError for a run not ranked, ConcurrentWriteError when
    other publishers keep moving the alias first."""
    from fastfill_udfs.spark.search import (build_servable, export_servable, resolve_batch,
                                            warehouse_location)

    alias = check_alias(cfg, alias)
    batch_id, version, _ = resolve_batch(spark, cfg, run, batch)
    location = warehouse_location(cfg, run, batch_id, version)
    if _exported(location, run, batch_id, version):
        from fastfill_udfs.search import ServableIndex
        from fastfill_udfs.spark.delta_io import local_path

        info = ServableIndex.read_info(local_path(location))
    else:
        served, _ = build_servable(spark, cfg, run, batch)
        location = export_servable(spark, cfg, run, served, "warehouse")
        info = served.info
    for attempt in range(cfg.get_path("sync.conflict_retries")):
        before = current(spark, cfg, alias)
        state = _state(alias, info, location, "publish",
                       before["pointer_version"] if before else None)
        if retry_conflicts(lambda: _move(spark, cfg, alias, state, before),
                           f"publish {alias}", cfg.get_path("sync.conflict_retries")):
            log.info("publish: %s -> run %s batch %d (gallery_features v%d), %s", alias, run,
                     batch_id, version, location)
            return {"alias": alias, "before": before, "after": state}
        log.warning("publish %s: the alias moved meanwhile; reading it again", alias)
    raise ConcurrentWriteError(f"publish {alias}: other publishers kept moving the alias first; "
                               "nothing changed by this one: rerun it")


def rollback(spark: SparkSession, cfg: Config, *, alias: str | None = None) -> dict:
    """Put `alias` back to the state it had before its current one (one commit). Raises
    TableNotFoundError when nothing was published, ValueError when there is nothing earlier
    (or the serving table's history no longer reaches it), ConcurrentWriteError when the
    alias moved while rolling back (nothing changed then)."""
    alias = check_alias(cfg, alias)
    now = current(spark, cfg, alias)
    if now is None:
        raise TableNotFoundError(f"nothing is published under alias {alias!r} "
                                 f"({serving_path(cfg)}): run pipelines/publish.py first")
    if now["previous_version"] is None:
        raise ValueError(f"alias {alias!r} has no earlier published state to roll back to (it "
                         f"points at its first: run {now['run']} batch {now['batch_id']})")
    try:
        earlier = current(spark, cfg, alias, version=now["previous_version"])
    except Exception as exc:
        raise ValueError(f"alias {alias!r}: the serving table's history no longer holds version "
                         f"{now['previous_version']} ({str(exc).splitlines()[0][:200]}); publish "
                         "the state you want with pipelines/publish.py --to <batch>") from None
    if earlier is None:
        raise ValueError(f"alias {alias!r} did not exist at serving version "
                         f"{now['previous_version']}: nothing to roll back to")
    state = {**{c: earlier[c] for c in COLUMNS}, "action": "rollback",
             "state_id": uuid.uuid4().hex, "published_at": datetime.now(timezone.utc),
             "published_by": f"{getpass.getuser()}@{socket.gethostname()}"}
    if not retry_conflicts(lambda: _move(spark, cfg, alias, state, now), f"rollback {alias}",
                           cfg.get_path("sync.conflict_retries")):
        raise ConcurrentWriteError(f"rollback {alias}: the alias moved while rolling back "
                                   "(another publish); nothing changed: look at it and rerun")
    log.info("rollback: %s -> run %s batch %d (was batch %d)", alias, state["run"],
             state["batch_id"], now["batch_id"])
    return {"alias": alias, "before": now, "after": state}


def publish_job(cfg: Config, *, policy: str | None = None, batch: int | None = None,
                alias: str | None = None, do_rollback: bool = False,
                master: str | None = None, out=print) -> dict:
    """What pipelines/publish.py runs: publish the run of `policy` at `batch` (None: as it is
    now), or roll `alias` back; prints the alias before and after."""
    from fastfill_udfs.spark.delta_io import run_id_for
    from fastfill_udfs.spark.session import get_spark

    spark = get_spark(cfg["spark"], master=master)
    if do_rollback:
        result = rollback(spark, cfg, alias=alias)
    else:
        result = publish(spark, cfg, run_id_for(cfg, policy), batch=batch, alias=alias)
    out(f"alias {result['alias']} was: {describe(result['before'])}")
    out(f"alias {result['alias']} now: {describe(result['after'])}")
    return result
