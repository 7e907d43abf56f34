"""One loader for every model: registry aliases pinned to versions, MLflow's pytorch flavor
(pickle and pt2), this project's own models, Python entry points; what travels to a worker
rebuilds the same model; missing models name the URI and the command that creates them."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from fastfill_udfs.model_loading import (ModelNotFoundError, ModelPayload, ModelRef,
                                         _WORKER_MODELS, register_logged_model, registry_target,
                                         resolve_model)
from fastfill_udfs.models import Transformation

MODEL_DIR = Path(__file__).resolve().parent / "data" / "foreign_model"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("models")
    monkeypatch.syspath_prepend(str(MODEL_DIR))
    yield tmp_path
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _template_net():
    from foreign_model import TemplateNet, make_templates

    return TemplateNet(make_templates())


def _on_a_worker(ref: ModelRef) -> torch.nn.Module:
    """Rebuild the payload as a fresh worker process would (no cached model)."""
    payload = ref.payload()
    _WORKER_MODELS.pop(payload.key, None)
    return ModelPayload(payload.key, payload.kind, payload.data).load()


def test_own_model_registered_alias_resolves_to_its_version(store):
    from fastfill_udfs.model_store import log_model

    torch.manual_seed(0)
    h = Transformation(6, 4, hidden_dim=8).eval()
    with mlflow.start_run() as run:
        uri = log_model(h, "h")
    assert register_logged_model(uri, "models:/my_h@prod", "h") == "models:/my_h/1"
    ref = resolve_model("models:/my_h@prod", "h")
    assert ref.version == "models:/my_h/1" and ref.run_id == run.info.run_id
    assert ref.payload().kind == "spec"                    # code-free: spec + state dict
    x = torch.randn(3, 6)
    assert torch.equal(_on_a_worker(ref)(x)[0], h(x)[0])
    again = resolve_model("models:/my_h/1", "h")
    assert again.weights_hash == ref.weights_hash and again.identity == {
        "uri": "models:/my_h/1", "version": "models:/my_h/1", "weights": ref.weights_hash}


@pytest.mark.parametrize("fmt", ["pickle", "pt2"])
def test_mlflow_pytorch_flavor_loads_on_driver_and_worker(store, fmt):
    import mlflow.pytorch

    net = _template_net()
    with mlflow.start_run():
        mlflow.pytorch.log_model(net, name="model", serialization_format=fmt,
                                 code_paths=[str(MODEL_DIR / "foreign_model.py")],
                                 input_example=np.zeros((2, 1, 16, 16), np.float32),
                                 registered_model_name="embedder")
    mlflow.MlflowClient().set_registered_model_alias("embedder", "champion", "1")
    ref = resolve_model("models:/embedder@champion")
    assert ref.version == "models:/embedder/1" and ref.payload().kind == "mlflow_dir"
    x = torch.rand(5, 1, 16, 16)                           # another batch size than logged
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(ref.model(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_on_a_worker(ref)(x), want, atol=1e-5, rtol=1e-5)


def test_entry_point(store):
    ref = resolve_model("foreign_model:factory")
    assert ref.version == "foreign_model:factory" and ref.payload().kind == "entry_point"
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(_on_a_worker(ref)(x), _template_net()(x))
    assert resolve_model("foreign_model:factory").weights_hash == ref.weights_hash


def test_missing_models_name_the_uri_and_the_command(store):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("models:/nobody@champion", "h")
    msg = str(err.value)
    assert "models.h = 'models:/nobody@champion'" in msg and "train_transformation.py" in msg
    with pytest.raises(ModelNotFoundError, match="models.new = 'runs:/0123/model'"):
        resolve_model("runs:/0123/model", "new")
    with pytest.raises(ModelNotFoundError, match="no_such_module.*PYTHONPATH"):
        resolve_model("no_such_module:factory")
    with pytest.raises(ModelNotFoundError, match="has no attribute"):
        resolve_model("foreign_model:no_factory")
    with pytest.raises(ValueError, match="models.new is empty"):
        resolve_model("  ", "new")


def test_entry_point_must_return_a_module(store, tmp_path, monkeypatch):
    (tmp_path / "not_a_model.py").write_text("def factory():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="returned int, expected a torch.nn.Module"):
        resolve_model("not_a_model:factory")


def test_registry_target_needs_an_alias():
    assert registry_target("models:/a_b@prod", "h") == ("a_b", "prod")
    for bad in ("models:/a/3", "runs:/x/y", "pkg.mod:factory", ""):
        with pytest.raises(ValueError, match="models.h must be models:/<name>@<alias>"):
            registry_target(bad, "h")


def test_in_memory_module_ref_is_versioned_by_its_weights():
    torch.manual_seed(1)
    a = ModelRef.from_module(Transformation(4, 3, hidden_dim=8))
    torch.manual_seed(2)
    b = ModelRef.from_module(Transformation(4, 3, hidden_dim=8))
    assert a.version.startswith("in-memory:") and a.version != b.version
    assert a.payload().kind == "spec"
