"""The pipeline's jobs, wired: session, models (MLflow URIs or entry points from config, one
loader), tables, MLflow. Each `pipelines/<job>.py` and notebook cell calls one of these.

JOBS lists them in the order a whole pipeline runs them (the Databricks bundle is checked
against it)."""
from __future__ import annotations

import logging

from fastfill_udfs.config import Config
from fastfill_udfs.model_loading import load_configured_model
from fastfill_udfs.spark.delta_io import run_id_for
from fastfill_udfs.spark.run_status import backfill_run_status
from fastfill_udfs.spark.session import get_spark

log = logging.getLogger(__name__)
JOBS = ("ingest", "train_transformation", "rank_gallery", "backfill", "evaluate")


def ingest_job(cfg: Config, *, master: str | None = None) -> dict:
    """Gallery, queries and query features (old model only for image sources)."""
    from fastfill_udfs.spark.ingest import ingest

    spark = get_spark(cfg["spark"], master=master)
    old = (None if cfg.get_path("data.dataset") == "gallery_table"
           else load_configured_model(cfg, "old"))
    return ingest(spark, cfg, new_model=load_configured_model(cfg, "new"), old_model=old)


def train_transformation_job(cfg: Config, *, master: str | None = None) -> dict:
    """Sample gallery rows, embed them with the new model, train `h`, log and register it."""
    from fastfill_udfs.spark.train_transformation import train_transformation_on_gallery

    spark = get_spark(cfg["spark"], master=master)
    return train_transformation_on_gallery(spark, cfg, load_configured_model(cfg, "new"))


def rank_job(cfg: Config, *, policy: str | None = None, master: str | None = None,
             force: bool = False) -> dict:
    from fastfill_udfs.spark.rank import rank_gallery

    from fastfill_udfs.spark.rank import is_ranked

    policy = policy or cfg.get_path("backfill.policy")
    spark = get_spark(cfg["spark"], master=master)
    h, new = load_configured_model(cfg, "h"), load_configured_model(cfg, "new")
    run = run_id_for(cfg, policy)
    if force and is_ranked(spark, cfg, run):  # never re-rank under a job backfilling it
        with _lease(spark, cfg, run):
            return rank_gallery(spark, cfg, h, new, policy, run, force=True)
    return rank_gallery(spark, cfg, h, new, policy, run, force=force)


def _check_ranked(spark, cfg: Config, run: str) -> None:
    """Raises TableNotFoundError (before anything is created) for a run that is not ranked."""
    from fastfill_udfs.spark.delta_io import TableNotFoundError, table_paths
    from fastfill_udfs.spark.rank import is_ranked

    if not is_ranked(spark, cfg, run):
        raise TableNotFoundError(f"run '{run}' is not ranked yet: run pipelines/rank_gallery.py "
                                 f"first (no batch 0 in {table_paths(cfg, run).backfill_log})")


def _lease(spark, cfg: Config, run: str):
    """The run's lease; raises TableNotFoundError for a run that is not ranked."""
    from fastfill_udfs.spark.backfill import run_lease

    _check_ranked(spark, cfg, run)
    return run_lease(spark, cfg, run)


def _plan_ahead(spark, cfg: Config, new_model, run: str, policy: str, stop: str,
                max_batches: int | None) -> dict:
    """`estimate.plan_ahead`, its cost lines printed."""
    from fastfill_udfs.spark.estimate import plan_ahead

    plan = plan_ahead(spark, cfg, new_model, run, policy, stop=stop, max_batches=max_batches)
    for line in plan["lines"]:
        log.info("estimate %s: %s", run, line)
    return plan


def _tracker(spark, cfg: Config, policy: str):
    from fastfill_udfs.spark.evaluate import BackfillTracker
    from fastfill_udfs.spark.rank import check_ranking_current

    check_ranking_current(spark, cfg, run_id_for(cfg, policy))  # no curve of a stale plan
    return BackfillTracker(spark, cfg, run_id_for(cfg, policy), policy)


def backfill_job(cfg: Config, *, policy: str | None = None, max_batches: int | None = None,
                 evaluate: bool | None = None, master: str | None = None,
                 stop: str | None = None, estimate_only: bool = False) -> dict:
    """Backfill pending batches (at most `max_batches`; with `stop` ``forecast`` (default:
    backfill.stop) no further than the forecast's recommended stop), evaluating after each
    when `evaluate` (default: backfill.evaluate). Before the first batch it measures the new
    model's rate on the plan's images and prints the cost; `estimate_only` prints it and
    returns (no lease, nothing written)."""
    from fastfill_udfs.spark.backfill import run_backfill

    policy = policy or cfg.get_path("backfill.policy")
    evaluate = cfg.get_path("backfill.evaluate") if evaluate is None else evaluate
    max_batches = max_batches if max_batches is not None else cfg.get_path("backfill.max_batches")
    stop = stop or cfg.get_path("backfill.stop")
    spark = get_spark(cfg["spark"], master=master)
    run = run_id_for(cfg, policy)
    new_model = load_configured_model(cfg, "new")
    if estimate_only:
        _check_ranked(spark, cfg, run)
        plan = _plan_ahead(spark, cfg, new_model, run, policy, stop, max_batches or None)
        return {"run": run, "estimate": plan["lines"], "committed_now": []}
    tracker = None
    with _lease(spark, cfg, run) as lease, \
            backfill_run_status(spark, cfg, run, lease.owner) as status:  # MLflow run status
        if evaluate:
            tracker = _tracker(spark, cfg, policy)
            status.track(tracker.run_id)
            tracker.catch_up()
        else:
            status.track_existing()
        plan = _plan_ahead(spark, cfg, new_model, run, policy, stop, max_batches or None)
        if tracker is not None and plan["pending"]:   # a rerun of a finished run logs nothing
            from fastfill_udfs.tracking import log_step_metrics

            log_step_metrics(tracker.run_id, plan["metrics"], step=0)
        done = [] if plan["max_batches"] == 0 else run_backfill(
            spark, cfg, new_model, run, max_batches=plan["max_batches"],
            on_committed=tracker.on_committed if tracker else None, lease=lease,
            rate=plan["rate"])
        aucs = tracker.finalize() if tracker else None
    return {"run": run, "committed_now": done, "aucs": aucs, "estimate": plan["lines"],
            "mlflow_run_id": tracker.run_id if tracker else None}


def evaluate_job(cfg: Config, *, policy: str | None = None, master: str | None = None) -> dict:
    """Evaluate (after the fact) every committed batch of the run not yet logged in MLflow."""
    policy = policy or cfg.get_path("backfill.policy")
    spark = get_spark(cfg["spark"], master=master)
    run = run_id_for(cfg, policy)
    with _lease(spark, cfg, run) as lease, \
            backfill_run_status(spark, cfg, run, lease.owner) as status:
        tracker = _tracker(spark, cfg, policy)
        status.track(tracker.run_id)
        n = tracker.catch_up()
        aucs = tracker.finalize()
    return {"run": run, "steps_evaluated": n, "aucs": aucs, "mlflow_run_id": tracker.run_id}
