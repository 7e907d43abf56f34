"""Which trained models the pipeline uses: `<paths.models>/manifest.json` maps model names
("old", "new", "h_fastfill", "h_fct") to MLflow model URIs. Written by the study / training job,
read by ingest, rank and backfill."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from torch import nn

from fastfill_udfs.config import Config

MANIFEST_FILE = "manifest.json"


def manifest_path(cfg: Config) -> Path:
    return Path(cfg.resolve_path("paths.models")) / MANIFEST_FILE


def write_manifest(cfg: Config, model_uris: dict[str, str], mlflow_run_id: str) -> Path:
    path = manifest_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "models": model_uris, "mlflow_run_id": mlflow_run_id,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=2))
    return path


def read_manifest(cfg: Config) -> dict:
    """Raises FileNotFoundError naming the manifest and the command that writes it."""
    path = manifest_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained models: {path} is missing. Train them first with "
            "`python pipelines/run_study.py` (the README's main command does it).")
    return json.loads(path.read_text())


def model_uri(cfg: Config, name: str) -> str:
    models = read_manifest(cfg)["models"]
    if name not in models:
        raise KeyError(f"model '{name}' is not in {manifest_path(cfg)} (has: {sorted(models)})")
    return models[name]


def load_manifest_model(cfg: Config, name: str) -> nn.Module:
    """Load model `name` from the manifest through MLflow (state dict, no pickled code)."""
    from fastfill_udfs.model_store import load_model
    from fastfill_udfs.tracking import configure_mlflow

    configure_mlflow(cfg)
    return load_model(model_uri(cfg, name))
