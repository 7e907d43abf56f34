"""MLflow glue: tracking store, experiments, and safe (state-dict) model logging."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from fastfill_udfs.config import PROJECT_ROOT, Config

log = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` URI absolute against the project root."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(PROJECT_ROOT / uri[len(prefix):])
    return uri


def artifact_root(uri: str) -> str | None:
    """Where a local store keeps artifacts: next to the SQLite file, not in the CWD."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def tracking_uri_for(cfg: Config) -> str:
    """The tracking URI a job uses: `MLFLOW_TRACKING_URI` from the environment (Databricks sets
    it), else the config's `mlflow.tracking_uri` (a relative SQLite path is taken from the
    project root)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(
        cfg.get_path("mlflow.tracking_uri"))


def configure_mlflow(cfg: Config, experiment: str | None = None) -> str:
    """Point MLflow at the tracking store (`tracking_uri_for`) and experiment; returns its id.

    The environment is left as it was: mlflow.set_tracking_uri copies the URI into
    MLFLOW_TRACKING_URI, where it would pose as the user's setting and override the next
    config's store in this process and in every subprocess started after it."""
    import mlflow

    uri = tracking_uri_for(cfg)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    name = experiment or cfg.get_path("mlflow.experiment")
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        exp_id = mlflow.create_experiment(name, artifact_location=artifact_root(uri))
    else:
        exp_id = found.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


RUN_TAG = "fastfill.run"


RANKING_TAG = "fastfill.ranking"


def backfill_mlflow_run(cfg: Config, run: str, policy: str, params: dict, *,
                        ranking: str) -> str:
    """The MLflow run id of backfill run `run` (tag fastfill.run) as ranked at `ranking` (tag
    fastfill.ranking; a re-ranked run starts a new MLflow run), created on first use.

    Params are logged once; a later call with different values for an existing key keeps the
    first (MLflow params are immutable) and logs a warning naming the key."""
    import mlflow
    from mlflow.tracking import MlflowClient

    exp_id = configure_mlflow(cfg)
    client = MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run}' and "
                               f"tags.`{RANKING_TAG}` = '{ranking}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        existing = found[0].data.params
    else:
        created = client.create_run(exp_id, run_name=run, tags={
            RUN_TAG: run, RANKING_TAG: ranking, "fastfill.policy": policy,
            "fastfill.kind": "backfill"})
        run_id, existing = created.info.run_id, {}
    new = {}
    for key, value in params.items():
        value = str(value)[:6000]
        if key not in existing:
            new[key] = value
        elif existing[key] != value:
            log.warning("MLflow run %s keeps param %s=%r (now %r)", run, key, existing[key], value)
    if new:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, v) for k, v in new.items()])
    mlflow.end_run() if mlflow.active_run() else None
    return run_id


def log_step_metrics(run_id: str, metrics: dict, step: int) -> None:
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    ts = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[
        Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None and np_finite(v)])


def np_finite(value) -> bool:
    import math

    return isinstance(value, (int, float)) and math.isfinite(value)


def logged_steps(run_id: str, key: str = "mAP") -> set[int]:
    from mlflow.tracking import MlflowClient

    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}
