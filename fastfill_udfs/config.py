"""Layered YAML configuration: base file, overlays, then `--set key=value` overrides.

Every key must exist in the base file; its default value fixes its type. Unknown keys and
ill-typed values raise `ConfigError` naming the dotted key (and the overlay file or `--set`
it came from); so does a value outside its key's allowed set (`CHOICES`), when the config
loads: before a job starts Spark.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = PROJECT_ROOT / "conf" / "base.yaml"
# Mappings under these keys are passed through without a schema (e.g. arbitrary spark.* settings).
FREE_FORM_KEYS = {"spark.conf"}


class ConfigError(ValueError):
    """A configuration key is unknown, or its value has the wrong type or is not allowed."""


# ----------------------------------------------------------------------------- allowed values
# The values of a key that takes one of a fixed set. Each set is defined once: where the module
# that reads the key needs neither torch nor pyspark, in that module (imported by `choices()`
# when a config loads); otherwise here, and that module imports it from here (a config load
# must not import torch or start a JVM: torch alone takes seconds).
DATASETS = ("gallery_table", "image_folder", "image_table", "fashion_mnist")  # spark/ingest.py
QUERY_SOURCES = ("gallery", "table", "image_folder")                        # spark/ingest.py
TABLE_FORMATS = ("auto", "delta", "parquet")                                # spark/sources.py
LOG_LEVELS = ("ALL", "DEBUG", "ERROR", "FATAL", "INFO", "OFF", "TRACE", "WARN")  # spark/session.py
EXPORT_TARGETS = ("warehouse", "mlflow")                                   # spark/search.py
DEVICES = ("auto", "cpu", "cuda", "cuda:<N>")                              # inference.py
OBJECTIVES = ("fastfill", "fct")                                          # training.py
ORDER_HEADS = ("sigma", "benefit")                                        # order_fitting.py
H_TRAIN_DATA = ("all", "old_model")                                       # demo/study.py
BACKFILL_STOPS = ("none", "forecast")                                     # spark/estimate.py
# demo/study.py: study policy name -> (which h, ordering policy)
STUDY_POLICIES = {
    "fct_random": ("fct", "random"),
    "fastfill_random": ("fastfill", "random"),
    "fastfill_uncertainty": ("fastfill", "uncertainty"),        # the paper's sigma head
    "fastfill_benefit": ("fastfill_benefit", "uncertainty"),    # head refit to the benefit
    "fastfill_prototype": ("fastfill", "prototype"),            # classifier-free
    "fastfill_oracle": ("fastfill", "oracle"),                  # needs the new embeddings
    "fastfill_auto": ("fastfill", "auto"),                      # the forecast's choice
}


def choices() -> dict[str, tuple]:
    """Enumerated key (a list key: each of its entries) -> the values it accepts. An entry
    `prefix:<N>` accepts `prefix:` followed by digits; "" is accepted only where listed."""
    from fastfill_udfs.calibration import CALIBRATIONS
    from fastfill_udfs.faiss_index import INDEX_KINDS
    from fastfill_udfs.metrics import DISTANCES
    from fastfill_udfs.policies import RUN_POLICIES

    return {
        "data.dataset": DATASETS, "data.table_format": TABLE_FORMATS,
        "data.queries.source": QUERY_SOURCES,
        "transformation.objective": OBJECTIVES, "transformation.train_data": H_TRAIN_DATA,
        "transformation.order_head": ORDER_HEADS, "transformation.calibration": CALIBRATIONS,
        "backfill.policy": RUN_POLICIES, "backfill.policies": RUN_POLICIES,
        "backfill.device": DEVICES, "backfill.stop": BACKFILL_STOPS,
        "evaluation.distance": DISTANCES, "evaluation.index": INDEX_KINDS,
        "evaluation.export_index": ("",) + EXPORT_TARGETS,
        "spark.log_level": ("",) + LOG_LEVELS,         # any case (spark/session.py)
        "study.policies": tuple(STUDY_POLICIES),
    }


CASE_FREE_KEYS = {"spark.log_level"}


def _allowed(value: Any, allowed: Sequence) -> bool:
    for choice in allowed:
        if value == choice:
            return True
        if (isinstance(choice, str) and choice.endswith(":<N>") and isinstance(value, str)
                and value.startswith(choice[:-3]) and value[len(choice) - 3:].isdigit()):
            return True
    return False


def check_choices(cfg: Mapping) -> None:
    """Raise ConfigError naming the key, the value and the allowed ones for every value of
    `cfg` outside its key's set (`choices()`), and for a `models.preprocess` that no model
    could be fed with."""
    config = cfg if isinstance(cfg, Config) else Config(cfg)
    for key, allowed in choices().items():
        value = config.get_path(key)
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            seen = item.upper() if key in CASE_FREE_KEYS and isinstance(item, str) else item
            if not _allowed(seen, allowed):
                where = key if i is None else f"{key}[{i}]"
                shown = ", ".join(repr(a) for a in allowed)
                raise ConfigError(f"config key '{where}' must be one of {shown}; got {item!r}")
    from fastfill_udfs.preprocess import Preprocess

    try:
        Preprocess.from_config(config.get_path("models.preprocess"))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config key 'models.preprocess': {exc}") from None


class Config(dict):
    """A nested dict with dotted access: ``cfg.get_path("backfill.batch_size")``."""

    def get_path(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"unknown config key '{dotted}'")
            node = node[part]
        return node

    def resolve_path(self, dotted: str) -> str:
        """Return the path at `dotted`, made absolute against the project root when relative
        and local (URIs such as s3://, dbfs:/ are returned unchanged)."""
        return resolve_project_path(str(self.get_path(dotted)))


def resolve_project_path(value: str) -> str:
    if "://" in value or value.startswith("dbfs:"):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else PROJECT_ROOT / p)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Check `value` against the type of `default`; ints are accepted where floats are."""
    if default is None or key in FREE_FORM_KEYS:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            if default:
                return [_coerce(f"{key}[{i}]", default[0], v) for i, v in enumerate(value)]
            return value
    elif isinstance(default, Mapping):
        if isinstance(value, Mapping):
            return value
    raise ConfigError(
        f"config key '{key}' expects {_type_name(default)}, got {_type_name(value)} ({value!r})"
    )


def _merge(base: dict, overlay: Mapping, prefix: str = "") -> None:
    for k, v in overlay.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise ConfigError(f"unknown config key '{key}'")
        if key in FREE_FORM_KEYS:
            if not isinstance(v, Mapping):
                raise ConfigError(f"config key '{key}' expects a mapping, got {v!r}")
            base[k] = {**base[k], **v}
        elif isinstance(base[k], Mapping) and isinstance(v, Mapping):
            _merge(base[k], v, key + ".")
        elif isinstance(base[k], Mapping):
            raise ConfigError(f"config key '{key}' is a section; set one of its keys instead")
        else:
            base[k] = _coerce(key, base[k], v)


def parse_override(text: str) -> dict:
    """Turn ``a.b=value`` into ``{"a": {"b": value}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override for '{key}' is not valid YAML: {exc}") from None
    node: dict = {}
    root = node
    parts = key.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return root


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return dict(data)


def load_config(
    overlays: Iterable[str | Path] = (),
    overrides: Sequence[str] = (),
    base: str | Path = BASE_CONFIG,
) -> Config:
    """Load `base`, merge each overlay file in order, then the `key=value` overrides.

    Raises ConfigError for a missing file, an unknown key, an ill-typed value (naming the key
    and the file or override it came from) or a value outside its key's allowed set."""
    cfg = _read_yaml(Path(base))
    for overlay in overlays:
        path = Path(overlay)
        if not path.is_absolute() and not path.exists():
            path = PROJECT_ROOT / path
        if path.resolve() == Path(base).resolve():
            continue
        data = _read_yaml(path)
        try:
            _merge(cfg, data)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {path})") from None
    for text in overrides:
        try:
            _merge(cfg, parse_override(text))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in --set {text})") from None
    config = Config(copy.deepcopy(cfg))
    check_choices(config)
    return config


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", action="append", default=[], metavar="YAML",
        help="overlay config file(s) on top of conf/base.yaml, applied in order",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key (dotted), applied last, e.g. --set backfill.batch_size=1000",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
