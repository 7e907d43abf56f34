"""Saving and loading models: folder round trip, MLflow round trip (MLflow 3 models-from-code),
and the safety property: a weights file that would unpickle arbitrary objects is refused."""
import json
import pickle

import numpy as np
import pytest
import torch

from fastfill_udfs.model_store import (SPEC_FILE, WEIGHTS_FILE, load_model, load_model_dir,
                                       log_model, model_from_bytes, model_to_bytes,
                                       save_model_dir)
from fastfill_udfs.demo.cnn import EmbeddingCNN
from fastfill_udfs.models import Transformation, model_spec


class Payload:
    """An arbitrary user class: a safe loader must refuse to rebuild it from a weights file."""

    def __init__(self):
        self.value = 42


class _Exploit:
    """Unpickling this would create a marker file (stands in for running arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _h(seed=0, uncertainty=True):
    torch.manual_seed(seed)
    h = Transformation(6, 10, hidden_dim=16, uncertainty=uncertainty)
    h.train()
    h(torch.randn(32, 6))          # move the BatchNorm running stats off their defaults
    return h.eval()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return EmbeddingCNN([4, 8], embedding_dim=12, num_classes=5).eval()


@pytest.mark.parametrize("make", [_h, _cnn], ids=["h", "cnn"])
def test_save_load_dir_round_trip(tmp_path, make):
    model = make()
    folder = save_model_dir(model, tmp_path / "m")
    assert json.loads((folder / SPEC_FILE).read_text()) == model_spec(model)
    loaded = load_model_dir(folder)
    assert not loaded.training
    x = torch.randn(5, 6) if isinstance(model, Transformation) else torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)


def test_bytes_round_trip():
    h = _h()
    spec, blob = model_to_bytes(h)
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(model_from_bytes(spec, blob)(x)[0], h(x)[0])


def test_load_model_dir_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=SPEC_FILE):
        load_model_dir(tmp_path)
    (tmp_path / SPEC_FILE).write_text(json.dumps(model_spec(_h())))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_model_dir(tmp_path)


def test_weights_with_a_pickled_custom_object_are_refused(tmp_path):
    h = _h()
    folder = save_model_dir(h, tmp_path / "m")
    state = h.state_dict()
    state["mlp.0.weight"] = Payload()
    torch.save(state, folder / WEIGHTS_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Payload|weights_only|Unsupported"):
        load_model_dir(folder)


def test_weights_that_would_run_code_are_refused_without_running_it(tmp_path):
    folder = save_model_dir(_h(), tmp_path / "m")
    marker = tmp_path / "pwned"
    torch.save({"mlp.0.weight": _Exploit(marker)}, folder / WEIGHTS_FILE)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        load_model_dir(folder)
    assert not marker.exists()


def test_mlflow_log_and_load_round_trip(test_config):
    import mlflow

    from fastfill_udfs.tracking import configure_mlflow

    configure_mlflow(test_config)
    h, h_fct, cnn = _h(), _h(1, uncertainty=False), _cnn()
    with mlflow.start_run(run_name="model-store-test"):
        uri_h = log_model(h, "h_fastfill")
        uri_fct = log_model(h_fct, "h_fct")
        uri_cnn = log_model(cnn, "new")
    assert uri_h.startswith("models:/")

    x = torch.randn(7, 6)
    loaded = load_model(uri_h)
    assert isinstance(loaded, Transformation) and loaded.has_uncertainty
    with torch.no_grad():
        for a, b in zip(h(x), loaded(x)):
            assert torch.equal(a, b)
    assert isinstance(load_model(uri_cnn), EmbeddingCNN)

    # the generic pyfunc flavour works too: embedding columns, then sigma for h with a head
    pred = np.asarray(mlflow.pyfunc.load_model(uri_h).predict(x.numpy()))
    with torch.no_grad():
        emb, s = h(x)
    assert pred.shape == (7, 11)
    np.testing.assert_allclose(pred[:, :10], emb.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred[:, 10], torch.exp(0.5 * s).numpy(), rtol=1e-5)
    assert np.asarray(mlflow.pyfunc.load_model(uri_fct).predict(x.numpy())).shape == (7, 10)
    images = torch.rand(3, 1, 28, 28)
    out = np.asarray(mlflow.pyfunc.load_model(uri_cnn).predict(images.reshape(3, -1).numpy()))
    with torch.no_grad():
        np.testing.assert_allclose(out, cnn.embed(images).numpy(), rtol=1e-5, atol=1e-6)
