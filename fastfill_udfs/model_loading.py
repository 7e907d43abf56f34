"""One loader for every job's models: the new model, `h` and (for image sources) the old model.

A model is named by a string from config (`models.new`, `models.h`, `models.old`):

* an MLflow model URI: `models:/name@alias`, `models:/name/3`, `runs:/<run id>/<path>` or a
  local MLflow model folder. Our own models (the project's pyfunc flavor: a JSON spec plus a
  state dict) are rebuilt without unpickling anything; MLflow's `pytorch` flavor is loaded
  with `mlflow.pytorch.load_model` (it unpickles the module the user logged: their own model);
* a Python entry point `package.module:factory`: `factory()` returns a torch module.

`resolve_model` pins the configured name to one concrete version (an alias is looked up once)
and loads it on the driver; `ModelRef.payload()` is the code-free (or folder-as-bytes) form a
Spark job broadcasts, rebuilt once per Python worker (`ModelPayload.load`).
Errors name the URI and the command that creates the model.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
ROLES = ("new", "h", "old")
# What creates each model when it is missing (named in the error).
CREATED_BY = {
    "new": "your own new model (log it with mlflow.pytorch.log_model and register it), or the "
           "demo's: python pipelines/run_study.py --config conf/fashion_mnist.yaml",
    "h": "spark-submit pipelines/train_transformation.py (or, for the demo, "
         "python pipelines/run_study.py --config conf/fashion_mnist.yaml)",
    "old": "the demo's: python pipelines/run_study.py --config conf/fashion_mnist.yaml (only "
           "image sources need an old model; a gallery_table brings its old embeddings)",
}

_WORKER_MODELS: dict[str, nn.Module] = {}


class ModelNotFoundError(FileNotFoundError):
    """A configured model URI does not resolve to a model."""


@dataclass(frozen=True)
class ModelPayload:
    """A model in a form that travels to Spark workers and is rebuilt there once per process.

    kind "spec": our models (JSON spec + state-dict bytes, loaded with weights_only=True);
    "mlflow_dir": an MLflow model folder as tar bytes (e.g. the pytorch flavor);
    "entry_point": `package.module:factory`, imported on the worker."""

    key: str
    kind: str
    data: Any

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelPayload":
        """The spec form of one of our own models (see `fastfill_udfs.models.MODEL_KINDS`)."""
        from fastfill_udfs.model_store import model_to_bytes

        spec, weights = model_to_bytes(model)
        return cls(hashlib.sha256(weights).hexdigest()[:16], "spec", (spec, weights))

    def load(self) -> nn.Module:
        """The model in eval mode, built once per (worker) process."""
        model = _WORKER_MODELS.get(self.key)
        if model is None:
            model = _WORKER_MODELS[self.key] = _eval_mode(_build(self.kind, self.data))
        return model


def _build(kind: str, data: Any) -> nn.Module:
    if kind == "spec":
        from fastfill_udfs.model_store import model_from_bytes

        return model_from_bytes(*data)
    if kind == "entry_point":
        return _call_entry_point(data)
    if kind == "mlflow_dir":
        folder = Path(tempfile.mkdtemp(prefix="fastfill-model-"))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(folder, filter="data")
        return _load_mlflow_folder(folder, str(folder))
    raise ValueError(f"unknown model payload kind {kind!r}")


def _call_entry_point(target: str) -> nn.Module:
    module_name, attr = target.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelNotFoundError(f"model entry point {target!r} cannot be imported: {exc} (is "
                                 f"{module_name} on the PYTHONPATH of the driver and workers?)"
                                 ) from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model entry point {target!r} returned {type(model).__name__}, "
                        "expected a torch.nn.Module")
    return _eval_mode(model)


def _eval_mode(model: nn.Module) -> nn.Module:
    """`model.eval()`, where the module supports it (an exported pt2 program does not: it
    is traced in inference form already)."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def _load_mlflow_folder(folder: Path, uri: str) -> nn.Module:
    """Load a downloaded MLflow model folder: our spec form when it holds one, else the
    pytorch flavor."""
    from fastfill_udfs.model_store import SPEC_FILE, load_model_dir

    specs = list(folder.rglob(SPEC_FILE))
    if specs:
        return load_model_dir(specs[0].parent)
    mlmodel = folder / "MLmodel"
    flavors = _flavors(mlmodel)
    if "pytorch" in flavors:
        import mlflow.pytorch

        return _eval_mode(mlflow.pytorch.load_model(str(folder), map_location="cpu"))
    raise ValueError(f"MLflow model {uri} has flavors {sorted(flavors) or 'none'}: expected the "
                     "pytorch flavor (mlflow.pytorch.log_model) or one of this project's models")


def _flavors(mlmodel: Path) -> dict:
    if not mlmodel.is_file():
        return {}
    import yaml

    return (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})


def _tar_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buf.getvalue()


def _state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ModelRef:
    """A configured model resolved to one concrete version and loaded on the driver.

    `uri`: as configured; `version`: the concrete identity recorded on every row it produces
    (`models:/name/3`, `runs:/id/path`, the entry point); `weights_hash`: a hash of its state
    dict (two loads of the same model agree); `run_id`: the MLflow run that logged it, if any."""

    uri: str
    version: str
    model: nn.Module
    weights_hash: str
    run_id: str | None = None
    _payload: ModelPayload | None = field(default=None, repr=False)

    @property
    def identity(self) -> dict:
        """JSON-able identity for commit metadata and MLflow params."""
        return {"uri": self.uri, "version": self.version, "weights": self.weights_hash}

    def payload(self) -> ModelPayload:
        return self._payload

    @classmethod
    def from_module(cls, model: nn.Module, name: str = "in-memory") -> "ModelRef":
        """A model object used as it is (a notebook, a test): version `<name>:<weights hash>`.
        Only the project's own model kinds travel to workers this way."""
        model = _eval_mode(model)
        weights = _state_hash(model)
        return cls(name, f"{name}:{weights}", model, weights, None,
                   ModelPayload.from_model(model))

    def run_params(self) -> dict:
        """Params of the MLflow run that logged this model ({} when none)."""
        if not self.run_id:
            return {}
        from mlflow.tracking import MlflowClient

        return dict(MlflowClient().get_run(self.run_id).data.params)


def _registry_version(uri: str, role: str) -> tuple[str, str | None]:
    """models:/name@alias | models:/name/N -> (models:/name/N, run id)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    m = REGISTRY_URI.match(uri)
    client = MlflowClient()
    try:
        if m.group("alias"):
            mv = client.get_model_version_by_alias(m.group("name"), m.group("alias"))
        else:
            mv = client.get_model_version(m.group("name"), m.group("version"))
    except MlflowException as exc:
        raise ModelNotFoundError(_missing(uri, role, str(exc).splitlines()[0])) from None
    return f"models:/{mv.name}/{mv.version}", mv.run_id


def _missing(uri: str, role: str, why: str) -> str:
    import mlflow

    return (f"model models.{role} = {uri!r} not found in the MLflow store "
            f"{mlflow.get_tracking_uri()} ({why}). Create it with {CREATED_BY.get(role, '?')}, "
            f"or point models.{role} at another model (--set models.{role}=models:/<name>@<alias>"
            f" or package.module:factory)")


def resolve_model(uri: str, role: str = "new") -> ModelRef:
    """Resolve and load the model `uri` (configured as `models.<role>`) on the driver.

    MLflow must already point at the tracking store (`tracking.configure_mlflow`).
    Raises ModelNotFoundError naming the URI and the command that creates it, ValueError for
    an MLflow model of an unsupported flavor, TypeError when an entry point returns no module."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"models.{role} is empty: name an MLflow model URI or "
                         "package.module:factory")
    uri = uri.strip()
    if ENTRY_POINT.match(uri):
        model = _call_entry_point(uri)
        return ModelRef(uri, uri, model, _state_hash(model), None,
                        ModelPayload(hashlib.sha256(uri.encode()).hexdigest()[:16],
                                     "entry_point", uri))
    run_id = None
    version = uri
    if REGISTRY_URI.match(uri):
        version, run_id = _registry_version(uri, role)
    elif uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/")[0]
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version, dst_path=tmp))
        except Exception as exc:  # MlflowException, OSError: the URI does not lead to files
            raise ModelNotFoundError(_missing(uri, role, f"{type(exc).__name__}: "
                                              f"{str(exc).splitlines()[0]}")) from None
        if local.is_file():
            raise ModelNotFoundError(_missing(uri, role, "it is a file, not an MLflow model"))
        model = _load_mlflow_folder(local, uri)
        try:
            payload = ModelPayload.from_model(model)
        except TypeError:  # not one of ours: ship the folder itself
            data = _tar_folder(local)
            payload = ModelPayload(hashlib.sha256(data).hexdigest()[:16], "mlflow_dir", data)
    return ModelRef(uri, version, model, _state_hash(model), run_id, payload)


def load_configured_model(cfg, role: str) -> ModelRef:
    """`resolve_model(cfg models.<role>)` with MLflow pointed at the config's store."""
    from fastfill_udfs.tracking import configure_mlflow

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    configure_mlflow(cfg)
    return resolve_model(cfg.get_path(f"models.{role}"), role)


def registry_target(uri: str, role: str) -> tuple[str, str]:
    """(name, alias) of a `models:/name@alias` URI, for jobs that register a model there.

    Raises ValueError naming `models.<role>` for any other form."""
    m = REGISTRY_URI.match(uri or "")
    if not m or not m.group("alias"):
        raise ValueError(f"models.{role} must be models:/<name>@<alias> to register a model "
                         f"there, got {uri!r}")
    return m.group("name"), m.group("alias")


def register_logged_model(model_uri: str, uri: str, role: str) -> str:
    """Register the logged model `model_uri` under the name of `models:/name@alias` (= `uri`)
    and point the alias at the new version; returns `models:/name/<version>`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name, alias = registry_target(uri, role)
    mv = mlflow.register_model(model_uri, name)
    MlflowClient().set_registered_model_alias(name, alias, mv.version)
    return f"models:/{name}/{mv.version}"
