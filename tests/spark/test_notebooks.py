"""The Databricks notebooks run locally as plain Python (no dbutils): config from
FASTFILL_CONFIG / FASTFILL_SET, each cell calling the package."""
import runpy
from pathlib import Path

from fastfill_udfs.spark.delta_io import read_table, table_paths

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ["01_rank_gallery.py", "02_backfill_and_evaluate.py", "03_compare_runs.py"]


def test_notebooks_are_databricks_source_format():
    for name in NOTEBOOKS:
        text = (ROOT / "notebooks" / name).read_text()
        assert text.startswith("# Databricks notebook source\n"), name
        assert "# COMMAND ----------" in text and "notebook_config(" in text, name


def test_notebooks_run_locally_in_sequence(spark, pipeline_env, monkeypatch):
    cfg = pipeline_env.make_cfg("nb", "backfill.policy=random")
    root = pipeline_env.root
    monkeypatch.setenv("FASTFILL_CONFIG", "conf/test.yaml")
    from tests.spark.conftest import TINY
    monkeypatch.setenv("FASTFILL_SET", ";".join([
        f"paths.warehouse={root / 'warehouse'}", f"paths.outputs={root / 'outputs'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        *TINY, "run_name=nb", "backfill.policy=random"]))
    monkeypatch.chdir(ROOT)
    globals_after = {}
    for name in NOTEBOOKS:
        globals_after[name] = runpy.run_path(str(ROOT / "notebooks" / name), run_name="__main__")
    paths = table_paths(cfg, "nb_random")
    log = read_table(spark, paths.backfill_log).toPandas()
    planned = read_table(spark, paths.backfill_plan).select("batch_id").distinct().count()
    assert sorted(log["batch_id"]) == list(range(planned + 1))
    table = globals_after["03_compare_runs.py"]["table"]
    assert "nb_random" in set(table["run"])
    assert Path(globals_after["03_compare_runs.py"]["plot_path"]).is_file()
