"""The pipeline's jobs, wired: session, models from the manifest, tables, MLflow. Each
`pipelines/<job>.py` and notebook cell calls one of these."""
from __future__ import annotations

import logging

from fastfill_udfs.config import Config
from fastfill_udfs.model_manifest import load_manifest_model, read_manifest
from fastfill_udfs.spark.delta_io import run_id_for
from fastfill_udfs.spark.session import get_spark

log = logging.getLogger(__name__)


def h_model_name(cfg: Config) -> str:
    return f"h_{cfg.get_path('transformation.objective')}"


def ingest_job(cfg: Config, *, master: str | None = None) -> dict:
    from fastfill_udfs.spark.ingest import ingest

    spark = get_spark(cfg["spark"], master=master)
    return ingest(spark, cfg, load_manifest_model(cfg, "old"), load_manifest_model(cfg, "new"))


def rank_job(cfg: Config, *, policy: str | None = None, master: str | None = None,
             force: bool = False) -> dict:
    from fastfill_udfs.spark.rank import rank_gallery

    policy = policy or cfg.get_path("backfill.policy")
    spark = get_spark(cfg["spark"], master=master)
    h = load_manifest_model(cfg, h_model_name(cfg))
    return rank_gallery(spark, cfg, h, policy, run_id_for(cfg, policy), force=force)


def _tracker(spark, cfg: Config, policy: str):
    from fastfill_udfs.spark.evaluate import BackfillTracker
    from fastfill_udfs.spark.rank import check_ranking_current

    check_ranking_current(spark, cfg, run_id_for(cfg, policy))  # no curve of a stale plan
    models = read_manifest(cfg)["models"]
    uris = {name: models[name] for name in ("new", h_model_name(cfg)) if name in models}
    return BackfillTracker(spark, cfg, run_id_for(cfg, policy), policy, uris)


def backfill_job(cfg: Config, *, policy: str | None = None, max_batches: int | None = None,
                 evaluate: bool | None = None, master: str | None = None) -> dict:
    """Backfill pending batches (at most `max_batches`), evaluating after each when `evaluate`
    (default: backfill.evaluate)."""
    from fastfill_udfs.spark.backfill import run_backfill

    policy = policy or cfg.get_path("backfill.policy")
    evaluate = cfg.get_path("backfill.evaluate") if evaluate is None else evaluate
    max_batches = max_batches if max_batches is not None else cfg.get_path("backfill.max_batches")
    spark = get_spark(cfg["spark"], master=master)
    run = run_id_for(cfg, policy)
    tracker = None
    if evaluate:
        tracker = _tracker(spark, cfg, policy)
        tracker.catch_up()
    done = run_backfill(spark, cfg, load_manifest_model(cfg, "new"), run,
                        max_batches=max_batches or None,
                        on_committed=tracker.on_committed if tracker else None)
    aucs = tracker.finalize() if tracker else None
    return {"run": run, "committed_now": done, "aucs": aucs,
            "mlflow_run_id": tracker.run_id if tracker else None}


def evaluate_job(cfg: Config, *, policy: str | None = None, master: str | None = None) -> dict:
    """Evaluate (after the fact) every committed batch of the run not yet logged in MLflow."""
    policy = policy or cfg.get_path("backfill.policy")
    spark = get_spark(cfg["spark"], master=master)
    tracker = _tracker(spark, cfg, policy)
    n = tracker.catch_up()
    return {"run": run_id_for(cfg, policy), "steps_evaluated": n, "aucs": tracker.finalize(),
            "mlflow_run_id": tracker.run_id}
