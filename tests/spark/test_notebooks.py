"""The Databricks notebooks, run here in sequence as plain Python:

- as the Databricks job runs them: a `dbutils` whose widgets return the bundle's job
  parameters (same names, local values) and a `display` that records what was shown. Ingest ->
  train h -> rank -> backfill with evaluation -> compare, then a forced re-rank and a compare
  with an MLflow search filter;
- as a user runs them locally (no dbutils; FASTFILL_CONFIG / FASTFILL_SET): the "your own
  gallery" notebook, end to end, on a foreign Parquet gallery with image paths."""
from __future__ import annotations

import runpy
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fastfill_udfs.spark.delta_io import read_table, table_paths

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
JOB_NOTEBOOKS = ["00_ingest.py", "01_train_transformation.py", "02_rank_gallery.py",
                 "03_backfill_and_evaluate.py", "05_compare_runs.py"]
NOTEBOOKS = JOB_NOTEBOOKS + ["06_your_own_gallery.py"]


class FakeWidgets:
    """dbutils.widgets as a Databricks job sees it: a job parameter of the widget's name wins
    over the widget's default; reading a widget that was never created fails, as there."""

    def __init__(self, parameters: dict):
        self.parameters, self.defaults = parameters, {}

    def text(self, name, default, label=None):
        self.defaults[name] = default

    def dropdown(self, name, default, choices, label=None):
        assert default in choices
        self.defaults[name] = default

    def get(self, name):
        if name not in self.defaults:
            raise ValueError(f"InputWidgetNotDefined: {name}")
        return self.parameters.get(name, self.defaults[name])


class FakeDbutils:
    def __init__(self, parameters: dict):
        self.widgets = FakeWidgets(parameters)


def _bundle_parameters() -> list[str]:
    job = yaml.safe_load((ROOT / "resources" / "fastfill_job.yml").read_text())
    return [p["name"] for p in job["resources"]["jobs"]["fastfill_backfill"]["parameters"]]


def _run(name: str, **init) -> dict:
    return runpy.run_path(str(ROOT / "notebooks" / name), init_globals=init, run_name="__main__")


def test_notebooks_are_databricks_source_format():
    for name in NOTEBOOKS:
        text = (ROOT / "notebooks" / name).read_text()
        assert text.startswith("# Databricks notebook source\n"), name
        assert "# COMMAND ----------" in text and "notebook_config(" in text, name
        assert "show(" in text, f"{name} displays nothing"


def test_job_notebooks_run_in_sequence_with_the_jobs_parameters(spark, pipeline_env,
                                                                 monkeypatch):
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.tracking import configure_mlflow

    root = pipeline_env.root
    monkeypatch.delenv("FASTFILL_CONFIG", raising=False)
    monkeypatch.delenv("FASTFILL_SET", raising=False)
    monkeypatch.chdir(ROOT)
    local = {   # the bundle's parameters, with this machine's values
        "config": "conf/test.yaml", "set": ";".join(TINY), "run_name": "nb",
        "warehouse": str(root / "nb_warehouse"), "outputs": str(root / "nb_outputs"),
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "nb-notebooks",
        "dataset": "fashion_mnist", "gallery_table": "", "image_root": "",
        "model_new": "models:/fastfill_new@current", "model_h": "models:/nb_h@current",
        "train_rows": "100", "policy": "random", "force": "false", "batch_size": "100",
        "max_batches": "0", "evaluate": "true", "device": "cpu", "filter": "",
        "stop": "none", "estimate_only": "false",
    }
    assert set(local) == set(_bundle_parameters())
    dbutils = FakeDbutils(local)
    shown = []
    after = {}
    for name in JOB_NOTEBOOKS:
        after[name] = _run(name, dbutils=dbutils, display=shown.append)
        assert after[name]["show"].shown, f"{name} showed nothing"
    cfg = after["03_backfill_and_evaluate.py"]["cfg"]
    assert cfg.get_path("paths.warehouse") == str(root / "nb_warehouse")   # from the job
    assert cfg.get_path("models.h") == "models:/nb_h@current"
    assert cfg.get_path("backfill.device") == "cpu"

    # 00: the gallery in the job's warehouse; 01: h registered where model_h points
    counts = after["00_ingest.py"]["counts"]
    gallery = read_table(spark, table_paths(cfg).gallery).count()
    assert gallery == counts["gallery"] == 300
    trained = after["01_train_transformation.py"]["result"]
    assert trained["h_version"].startswith("models:/nb_h/") and 0 < trained["n_pairs"] <= 100
    assert Path(after["01_train_transformation.py"]["loss_plot"]).stat().st_size > 0
    # 02: ranked with that h; the shown plan is the Delta plan
    paths = table_paths(cfg, "nb_random")
    batches = after["02_rank_gallery.py"]["batches"]
    assert batches["items"].sum() == read_table(spark, paths.backfill_plan).count() \
        == 300 - trained["n_pairs"] - trained["n_probe"]   # probes entered as new
    # 03: every batch committed and evaluated, the MLflow run FINISHED, the curve shown
    log = read_table(spark, paths.backfill_log).toPandas()
    assert sorted(log["batch_id"]) == list(range(len(batches) + 1))
    configure_mlflow(cfg)
    run = MlflowClient().get_run(after["03_backfill_and_evaluate.py"]["run_id"])
    assert run.info.status == "FINISHED" and "mAP_auc" in run.data.metrics
    curve = after["03_backfill_and_evaluate.py"]["curve"]
    assert list(curve.index) == list(range(len(batches) + 1))
    assert ("image", "the backfilling curve so far") in after["03_backfill_and_evaluate.py"][
        "show"].shown
    # 05: the comparison of this run name
    table = after["05_compare_runs.py"]["table"]
    assert table["run"].tolist() == ["nb_random"] and table["status"].tolist() == ["FINISHED"]
    assert Path(after["05_compare_runs.py"]["plot_path"]).is_file()
    # what Databricks' display got: tables (pandas) for every notebook
    assert sum(isinstance(x, pd.DataFrame) for x in shown) >= len(JOB_NOTEBOOKS)

    # force=true re-ranks (a new plan, its backfill starts over); compare then leaves out the
    # old MLflow run, saying why, and an MLflow filter selects by policy
    dbutils.widgets.parameters["force"] = "true"
    reranked = _run("02_rank_gallery.py", dbutils=dbutils, display=shown.append)
    assert reranked["result"]["skipped"] is False
    dbutils.widgets.parameters["filter"] = "tags.fastfill.policy = 'random'"
    compared = _run("05_compare_runs.py", dbutils=dbutils, display=shown.append)
    assert compared["table"].empty               # the new ranking has no curve yet
    left = compared["found"].left_out
    assert left["mlflow_run_id"].tolist() == [run.info.run_id]
    assert left["reason"].iloc[0].startswith("re-ranked since")
    dbutils.widgets.parameters["filter"] = "tags.fastfill.policy = 'uncertainty'"
    compared = _run("05_compare_runs.py", dbutils=dbutils, display=shown.append)
    assert compared["table"].empty and compared["found"].left_out.empty


def test_your_own_gallery_notebook_runs_locally_end_to_end(spark, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from .own_gallery_data import COLUMNS, make_gallery, sets

    setup = make_gallery(tmp_path, per_class=16)
    overrides = sets(setup, transformation__train_rows=32, backfill__batch_size=32,
                     models__new="models:/product_embedder@champion",
                     models__h="models:/product_embedder_h@champion", models__classifier="",
                     run_name="mine")
    overrides += [f"data.columns.{k}={v}" for k, v in COLUMNS.items()]
    monkeypatch.delenv("FASTFILL_CONFIG", raising=False)
    monkeypatch.setenv("FASTFILL_SET", ";".join(overrides))
    monkeypatch.chdir(ROOT)
    out = _run("06_your_own_gallery.py")
    shown = [title for _, title in out["show"].shown]
    assert shown[0] == "your gallery table" and "first rows" in shown
    assert ("image", "the backfilling curve so far") in out["show"].shown
    cfg = out["cfg"]
    assert cfg.get_path("data.dataset") == "gallery_table"
    assert out["missing"] == []
    assert out["trained"]["h_version"].startswith("models:/product_embedder_h/")
    n_items = len(setup["ids"])
    assert read_table(spark, table_paths(cfg).gallery).count() == n_items
    assert out["trained"]["forecast"]["decided"] in (True, False)   # the forecast ran
    log = read_table(spark, table_paths(cfg, "mine_auto").backfill_log).toPandas()
    n_batches = read_table(spark, table_paths(cfg, "mine_auto").backfill_plan) \
        .select("batch_id").distinct().count()
    assert sorted(log["batch_id"]) == list(range(n_batches + 1))
    assert out["curve"]["backfill_fraction"].iloc[-1] == pytest.approx(1.0)
    run = MlflowClient().get_run(out["result"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["fastfill.model_new"].startswith("models:/product_embedder/")
