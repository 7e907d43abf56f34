"""Notebook parameters: Databricks widgets where `dbutils` exists, config defaults where not.

Each notebook declares its widgets as {widget name: config key}; widget values become `--set`
overrides. Locally (no dbutils), `FASTFILL_CONFIG` names overlay files (comma-separated) and
`FASTFILL_SET` extra overrides (separated by ';'), so notebooks run as plain Python too."""
from __future__ import annotations

import os
from typing import Mapping

from fastfill_udfs.config import Config, load_config


def notebook_config(widgets: Mapping[str, str], dbutils=None,
                    config_files: str = "conf/fashion_mnist.yaml") -> Config:
    """Build the notebook's config. `widgets` maps widget names to dotted config keys; with
    `dbutils`, a text widget per entry (plus `config`) is created with the config's value as
    default and its current value applied; without, env overrides apply."""
    files = os.environ.get("FASTFILL_CONFIG", config_files)
    overrides = [s for s in os.environ.get("FASTFILL_SET", "").split(";") if s.strip()]
    if dbutils is not None:
        dbutils.widgets.text("config", files, "config overlays (comma-separated)")
        files = dbutils.widgets.get("config")
    cfg = load_config([f for f in files.split(",") if f.strip()], overrides)
    if dbutils is None:
        return cfg
    widget_overrides = []
    for name, key in widgets.items():
        dbutils.widgets.text(name, _to_text(cfg.get_path(key)), key)
        widget_overrides.append(f"{key}={dbutils.widgets.get(name)}")
    return load_config([f for f in files.split(",") if f.strip()], overrides + widget_overrides)


def _to_text(value) -> str:
    if isinstance(value, (list, dict)):
        import yaml

        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)
