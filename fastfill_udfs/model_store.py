"""Saving and loading torch models safely: a JSON architecture spec plus a state dict read with
`weights_only=True` (never a pickled module), locally or as an MLflow model (models-from-code)."""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from fastfill_udfs.models import build_model, model_spec

SPEC_FILE, WEIGHTS_FILE = "spec.json", "weights.pt"
CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")


def save_model_dir(model: nn.Module, path: str | Path) -> Path:
    """Write `spec.json` and `weights.pt` for `model` into the folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / SPEC_FILE).write_text(json.dumps(model_spec(model), indent=2))
    torch.save(model.state_dict(), path / WEIGHTS_FILE)
    return path


def load_model_dir(path: str | Path) -> nn.Module:
    """Rebuild a model saved by `save_model_dir`; raises FileNotFoundError naming the file."""
    path = Path(path)
    for name in (SPEC_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"model folder {path} has no {name}")
    spec = json.loads((path / SPEC_FILE).read_text())
    return model_from_bytes(spec, (path / WEIGHTS_FILE).read_bytes())


def model_to_bytes(model: nn.Module) -> tuple[dict, bytes]:
    """(spec, state-dict bytes): a compact, code-free form to broadcast to Spark workers."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return model_spec(model), buf.getvalue()


def model_from_bytes(spec: dict, weights: bytes) -> nn.Module:
    model = build_model(spec)
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def log_model(model: nn.Module, name: str, *, registered_name: str | None = None) -> str:
    """Log `model` to the active MLflow run as a pyfunc model from code; returns its URI."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model_dir(model, Path(tmp) / "model_dir")
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(CODE_FILE), artifacts={"model_dir": str(model_dir)},
            registered_model_name=registered_name, pip_requirements=["torch", "numpy"],
        )
    return info.model_uri


def load_model(model_uri: str) -> nn.Module:
    """Load a model logged by `log_model` as a torch module (no code is unpickled)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        candidates = list(local.rglob(SPEC_FILE))
        if not candidates:
            raise FileNotFoundError(f"MLflow model {model_uri} holds no {SPEC_FILE}")
        return load_model_dir(candidates[0].parent)
