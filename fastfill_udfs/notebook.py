"""Notebook parameters and output: Databricks widgets where `dbutils` exists, config defaults
(and environment variables) where not; results shown with Databricks' `display`, or printed.

Each notebook declares its widgets by name: a name in CONFIG_WIDGETS sets that config key (the
widget's default is the config's value, so an untouched widget changes nothing), a name in
FLAG_WIDGETS is a command-line flag of the job that is not a config key (`force`, `filter`).
Every notebook also has `config` (overlay files, comma-separated) and `set` (extra `key=value`
overrides, ';'-separated). A Databricks job passes its parameters to these widgets by name (the
bundle in `databricks.yml` is checked against both tables).

Locally (no dbutils), `FASTFILL_CONFIG` names the overlay files (comma-separated),
`FASTFILL_SET` extra overrides (';'-separated) and `FASTFILL_<FLAG>` a flag widget (e.g.
`FASTFILL_FORCE=true`), so the notebooks run as plain Python too."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

from fastfill_udfs.config import Config, load_config

# widget name -> config key
CONFIG_WIDGETS = {
    "run_name": "run_name",
    "warehouse": "paths.warehouse",
    "outputs": "paths.outputs",
    "tracking_uri": "mlflow.tracking_uri",
    "experiment": "mlflow.experiment",
    "model_new": "models.new",
    "model_h": "models.h",
    "model_old": "models.old",
    "dataset": "data.dataset",
    "gallery_table": "data.gallery_table",
    "image_root": "data.image_root",
    "column_id": "data.columns.id",
    "column_old_embedding": "data.columns.old_embedding",
    "column_image": "data.columns.image",
    "column_label": "data.columns.label",
    "column_subgroup": "data.columns.subgroup",
    "train_rows": "transformation.train_rows",
    "policy": "backfill.policy",
    "batch_size": "backfill.batch_size",
    "max_batches": "backfill.max_batches",
    "stop": "backfill.stop",
    "evaluate": "backfill.evaluate",
    "device": "backfill.device",
    "sync_mode": "sync.mode",
    "spark_log_level": "spark.log_level",
}
# widget name -> (its default, the pipelines/ script and flag it stands for)
FLAG_WIDGETS = {
    "force": ("false", "rank_gallery", "--force"),
    "filter": ("", "compare", "--filter"),
    "estimate_only": ("false", "backfill", "--estimate-only"),
}
GENERAL_WIDGETS = ("config", "set")


def _split(text: str, sep: str) -> list[str]:
    return [s.strip() for s in (text or "").split(sep) if s.strip()]


def _override(key: str, current, value: str) -> str:
    """`key=value` for --set; a string-typed key keeps the text as it is (quoted YAML), so a
    run name like 2024 stays a string."""
    if isinstance(current, str):
        return f"{key}='" + value.replace("'", "''") + "'"
    return f"{key}={value}"


def notebook_config(widgets: Mapping[str, str] | Iterable[str], dbutils=None,
                    config_files: str = "conf/fashion_mnist.yaml",
                    overrides: Iterable[str] = ()) -> Config:
    """Build the notebook's config. `widgets`: names from CONFIG_WIDGETS (or a mapping of
    widget name -> dotted config key). `overrides` (key=value) are the notebook's own, applied
    after the overlay files. With `dbutils`, a text widget per entry (plus `config` and `set`)
    is created with the config's value as its default and its current value applied; without,
    the FASTFILL_CONFIG / FASTFILL_SET environment applies. Raises ValueError for a widget name
    that is in neither table, ConfigError for a bad value."""
    if isinstance(widgets, Mapping):
        mapping = dict(widgets)
    else:
        unknown = [w for w in widgets if w not in CONFIG_WIDGETS]
        if unknown:
            raise ValueError(f"widgets: unknown widget name(s) {unknown}; known: "
                             f"{sorted(CONFIG_WIDGETS)}")
        mapping = {w: CONFIG_WIDGETS[w] for w in widgets}
    files = os.environ.get("FASTFILL_CONFIG", config_files)
    overrides = list(overrides) + _split(os.environ.get("FASTFILL_SET", ""), ";")
    if dbutils is not None:
        dbutils.widgets.text("config", files, "config overlays (comma-separated)")
        dbutils.widgets.text("set", "", "extra overrides key=value (';'-separated)")
        files = dbutils.widgets.get("config")
        overrides += _split(dbutils.widgets.get("set"), ";")
    cfg = load_config(_split(files, ","), overrides)
    if dbutils is None:
        return cfg
    widget_overrides = []
    for name, key in mapping.items():
        current = cfg.get_path(key)
        dbutils.widgets.text(name, _to_text(current), key)
        widget_overrides.append(_override(key, current, dbutils.widgets.get(name)))
    return load_config(_split(files, ","), overrides + widget_overrides)


def notebook_flag(name: str, dbutils=None) -> str:
    """The value of flag widget `name` (FLAG_WIDGETS): the widget's on Databricks, else
    FASTFILL_<NAME>, else its default. Raises ValueError for an unknown name."""
    if name not in FLAG_WIDGETS:
        raise ValueError(f"name: unknown flag widget {name!r}; known: {sorted(FLAG_WIDGETS)}")
    default, script, flag = FLAG_WIDGETS[name]
    if dbutils is not None:
        if default in ("false", "true"):
            dbutils.widgets.dropdown(name, default, ["false", "true"], f"{script}.py {flag}")
        else:
            dbutils.widgets.text(name, default, f"{script}.py {flag}")
        return dbutils.widgets.get(name)
    return os.environ.get(f"FASTFILL_{name.upper()}", default)


def is_true(value: str) -> bool:
    """A flag widget's text as a bool ('true', 'yes', '1'; anything else is False)."""
    return str(value).strip().lower() in ("true", "yes", "1")


def _to_text(value) -> str:
    if isinstance(value, (list, dict)):
        import yaml

        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


class Show:
    """Shows a notebook's results: with Databricks' `display` a table or image there, else
    printed (a table as markdown, an image as its path). Keeps what it showed in `shown` as
    (kind, title) pairs."""

    def __init__(self, display: Callable | None = None):
        self.display = display
        self.shown: list[tuple[str, str]] = []

    def __call__(self, obj, title: str = "") -> None:
        import pandas as pd

        if title:
            print(f"\n## {title}")
        if isinstance(obj, (str, Path)) and str(obj).lower().endswith(".png"):
            self._image(Path(obj))
            self.shown.append(("image", title))
            return
        if isinstance(obj, Mapping):
            obj = pd.DataFrame([{k: _cell(v) for k, v in obj.items()}])
        if self.display is not None:
            self.display(obj)
        elif isinstance(obj, pd.DataFrame):
            from fastfill_udfs.reporting import markdown_table

            print(markdown_table(obj) if len(obj.columns) else "(no rows)")
        elif hasattr(obj, "show"):            # a Spark DataFrame
            obj.show(50, truncate=False)
        else:
            print(obj)
        self.shown.append(("table", title))

    def _image(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"no image to show at {path}")
        try:
            from IPython.display import Image
            from IPython.display import display as ipython_display
        except ImportError:
            print(f"plot: {path}")
            return
        if self.display is not None or _in_ipython():
            ipython_display(Image(filename=str(path)))
        else:
            print(f"plot: {path}")


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def _cell(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
