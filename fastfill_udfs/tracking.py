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


def configure_mlflow(cfg: Config, experiment: str | None = None) -> str:
    """Point MLflow at the configured tracking store and experiment; returns the experiment id.

    `MLFLOW_TRACKING_URI` in the environment wins over the config (Databricks sets it)."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(
        cfg.get_path("mlflow.tracking_uri"))
    mlflow.set_tracking_uri(uri)
    name = experiment or cfg.get_path("mlflow.experiment")
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        exp_id = mlflow.create_experiment(name, artifact_location=artifact_root(uri))
    else:
        exp_id = found.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
