"""MLflow tracking-store selection: config vs MLFLOW_TRACKING_URI, one process, many configs."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from fastfill_udfs.config import load_config


def _config(tmp_path, name):
    return load_config(["conf/test.yaml"], [f"mlflow.tracking_uri=sqlite:///{tmp_path / name}",
                                            "mlflow.experiment=tracking-test"])


def _run_names(db):
    with sqlite3.connect(db) as con:
        return sorted(r[0] for r in con.execute("select name from runs"))


@pytest.fixture
def no_user_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_each_config_gets_its_own_store_in_one_process(tmp_path, no_user_uri):
    import mlflow

    from fastfill_udfs.tracking import configure_mlflow

    for name in ("a.db", "b.db"):
        configure_mlflow(_config(tmp_path, name))
        with mlflow.start_run(run_name=f"run-{name}"):
            pass
    assert _run_names(tmp_path / "a.db") == ["run-a.db"]
    assert _run_names(tmp_path / "b.db") == ["run-b.db"]
    # the config's store does not leak into the environment (and so into subprocesses)
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_subprocess_after_configure_uses_its_own_config(tmp_path, no_user_uri):
    from fastfill_udfs.tracking import configure_mlflow

    configure_mlflow(_config(tmp_path, "parent.db"))
    code = ("from fastfill_udfs.config import load_config\n"
            "from fastfill_udfs.tracking import tracking_uri_for\n"
            f"print(tracking_uri_for(load_config(['conf/test.yaml'], "
            f"['mlflow.tracking_uri=sqlite:///{tmp_path / 'child.db'}'])))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ)).stdout.strip()
    assert out == f"sqlite:///{tmp_path / 'child.db'}"


def test_user_environment_wins_over_config(tmp_path, monkeypatch):
    import mlflow

    from fastfill_udfs.tracking import configure_mlflow

    user = f"sqlite:///{tmp_path / 'user.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user)
    configure_mlflow(_config(tmp_path, "config.db"))
    assert mlflow.get_tracking_uri() == user
    assert os.environ["MLFLOW_TRACKING_URI"] == user
    assert not (tmp_path / "config.db").exists()


def test_relative_sqlite_path_is_taken_from_project_root():
    from fastfill_udfs.config import PROJECT_ROOT
    from fastfill_udfs.tracking import resolve_tracking_uri

    assert resolve_tracking_uri("sqlite:///mlruns.db") == f"sqlite:///{PROJECT_ROOT / 'mlruns.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("databricks") == "databricks"


# --------------------------------------------------------------- what the MLflow UI shows
def test_experiments_open_as_model_training(tmp_path, no_user_uri):
    """A new experiment is created as a model-training one; an existing one (made by an
    older version, or by hand) is tagged on the next use."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.tracking import (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND,
                                        configure_mlflow, experiment_url)

    cfg = _config(tmp_path, "kind.db")
    exp_id = configure_mlflow(cfg)
    assert MlflowClient().get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'kind.db'}")
    old = MlflowClient().create_experiment("made-elsewhere")
    configure_mlflow(cfg, experiment="made-elsewhere")
    assert MlflowClient().get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    url = experiment_url("http://127.0.0.1:5000/", exp_id, view="v")
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?")
    assert "workflowType=machine_learning" in url and "viewStateShareKey=v" in url


def test_backfill_run_is_named_and_described_after_policy_model_and_data(tmp_path, no_user_uri):
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.tracking import backfill_mlflow_run

    params = {"policy": "uncertainty", "dataset": "gallery_table", "n_gallery": 1234,
              "model_new": "models:/shop_embedder/7", "model_h": "models:/shop_h/2",
              "gallery_table": "/Volumes/main/shop/fastfill/warehouse/gallery",
              "backfill_batch_size": 500, "n_queries": 99}
    cfg = _config(tmp_path, "names.db")
    run_id = backfill_mlflow_run(cfg, "shop_uncertainty", "uncertainty", params, ranking="17")
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "shop_uncertainty · uncertainty · shop_embedder v7"
    tags = run.data.tags
    assert tags["fastfill.policy"] == "uncertainty" and tags["fastfill.kind"] == "backfill"
    assert tags["fastfill.model_new"] == "models:/shop_embedder/7"
    assert tags["fastfill.model_h"] == "models:/shop_h/2"
    assert tags["fastfill.dataset"] == "gallery_table" and tags["fastfill.n_gallery"] == "1234"
    note = tags["mlflow.note.content"]
    for words in ("models:/shop_embedder/7", "**uncertainty**", "models:/shop_h/2", "1234",
                  "/Volumes/main/shop/fastfill/warehouse/gallery", "batch_size 500"):
        assert words in note, words
    # the same run and ranking: found again, not duplicated
    assert backfill_mlflow_run(cfg, "shop_uncertainty", "uncertainty", params,
                               ranking="17") == run_id


def test_nan_metrics_are_logged_not_dropped(tmp_path, no_user_uri):
    import math

    from mlflow.tracking import MlflowClient

    from fastfill_udfs.tracking import configure_mlflow, log_step_metrics

    exp = configure_mlflow(_config(tmp_path, "nan.db"))
    run_id = MlflowClient().create_run(exp).info.run_id
    log_step_metrics(run_id, {"mAP": float("nan"), "top1": 0.5, "skipped": None}, step=3)
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert math.isnan(metrics["mAP"]) and metrics["top1"] == 0.5 and "skipped" not in metrics


def _status(run_id):
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(run_id)
    return run.info.status, run.data.tags


def test_run_lifecycle_statuses_and_a_job_that_is_gone(tmp_path, no_user_uri):
    """open: RUNNING for the job; close: the status with its reason; a RUNNING run left by
    another job is recorded KILLED (at its last sign of life) before it is reopened; a job
    does not close a run another job has opened since."""
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.tracking import (backfill_mlflow_run, configure_mlflow,
                                        close_backfill_run, log_step_metrics, open_backfill_run)

    cfg = _config(tmp_path, "life.db")
    run_id = backfill_mlflow_run(cfg, "t_random", "random", {}, ranking="1")
    assert open_backfill_run(run_id, "host:1:a") == "RUNNING"   # a fresh run, no job yet
    status, tags = _status(run_id)
    assert status == "RUNNING" and tags["fastfill.job"] == "host:1:a"
    assert "KILLED" not in tags["fastfill.history"]
    log_step_metrics(run_id, {"mAP": 0.5}, step=1)
    assert close_backfill_run(run_id, "host:1:a", "SCHEDULED", "1 of 3 batches committed")
    status, tags = _status(run_id)
    assert status == "SCHEDULED" and tags["fastfill.state"].startswith("SCHEDULED: 1 of 3")
    assert tags["fastfill.job"] == ""

    assert open_backfill_run(run_id, "host:2:b") == "SCHEDULED"
    # job b is killed with SIGKILL: nothing closes the run; job c finds it RUNNING
    assert open_backfill_run(run_id, "host:3:c") == "KILLED"
    status, tags = _status(run_id)
    assert status == "RUNNING" and tags["fastfill.job"] == "host:3:c"
    history = tags["fastfill.history"].splitlines()
    assert "KILLED: job host:2:b stopped without closing the run" in history[-2]
    assert history[-1].endswith("RUNNING: opened by job host:3:c (was KILLED)")
    assert not close_backfill_run(run_id, "host:2:b", "FAILED", "late")  # not b's any more
    assert _status(run_id)[0] == "RUNNING"
    assert close_backfill_run(run_id, "host:3:c", "FINISHED", "all 3 batches")
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time
    assert open_backfill_run(run_id, "host:4:d") == "FINISHED"     # a resume reopens it
    with pytest.raises(ValueError, match="status"):
        close_backfill_run(run_id, "host:4:d", "RUNNING", "no")
    # a run left RUNNING by a version that did not record jobs counts as a job gone
    legacy = MlflowClient().create_run(configure_mlflow(cfg)).info.run_id
    assert open_backfill_run(legacy, "host:5:e") == "KILLED"
    assert "an earlier job stopped without closing" in _status(legacy)[1]["fastfill.history"]


def test_backfill_view_puts_the_curves_first_and_decodes_as_the_ui_does():
    import base64
    import json
    import zlib

    from fastfill_udfs.tracking import backfill_view_state, encode_view

    keys = ["top1_gap", "mAP_auc", "backfill_fraction", "top5", "mAP_footwear", "mAP",
            "new_new_mAP", "footwear_share_first_10pct", "top1"]
    state = backfill_view_state(keys)
    charts = state["compareRunCharts"]
    assert [c["metricKey"] for c in charts[:4]] == ["mAP", "top1", "top5", "backfill_fraction"]
    by_section = {}
    for c in charts:
        by_section.setdefault(c["metricSectionId"], []).append(c["metricKey"])
    assert [s["uuid"] for s in state["compareRunSections"]] == list(by_section)
    assert by_section["fastfill-steps"] == ["mAP_footwear", "top1_gap"]
    assert sorted(by_section["fastfill-final"]) == sorted(
        ["footwear_share_first_10pct", "mAP_auc", "new_new_mAP"])
    assert all(c["type"] == "LINE" and c["xAxisKey"] == "step" for c in charts[:6])
    assert "fastfill.kind" in state["searchFilter"]
    # a forecast: one chart with both shares of the gain, in a section of its own, second
    with_forecast = backfill_view_state(keys + ["gain_share", "forecast_gain_share",
                                                "forecast_gap_max", "agreement_at_10"])
    fc = [c for c in with_forecast["compareRunCharts"]
          if c["metricSectionId"] == "fastfill-forecast"]
    assert [c["selectedMetricKeys"] for c in fc] == [["forecast_gain_share", "gain_share"]]
    assert with_forecast["compareRunSections"][1]["uuid"] == "fastfill-forecast"
    steps = [c["metricKey"] for c in with_forecast["compareRunCharts"]
             if c["metricSectionId"] == "fastfill-steps"]
    assert steps == ["agreement_at_10", "mAP_footwear", "top1_gap"]
    envelope = json.loads(encode_view("Backfill curves", state))
    assert envelope["name"] == "Backfill curves" and envelope["state"].startswith("deflate;")
    packed = base64.b64decode(envelope["state"][len("deflate;"):])
    assert json.loads(zlib.decompress(packed)) == state


def test_a_status_this_process_cannot_set_is_set_from_a_fresh_one(tmp_path, no_user_uri,
                                                                   monkeypatch):
    """After a signal, this process's clients may be unusable: the status still gets set."""
    from fastfill_udfs import tracking
    from fastfill_udfs.spark.run_status import BackfillRunStatus

    cfg = _config(tmp_path, "fresh.db")
    run_id = tracking.backfill_mlflow_run(cfg, "f_random", "random", {}, ranking="1")
    tracking.open_backfill_run(run_id, "host:7:g")

    def broken(*args, **kwargs):
        raise KeyError("c")   # what a py4j connection out of step gave MLflow's client

    monkeypatch.setattr(tracking, "close_backfill_run", broken)
    status = BackfillRunStatus(None, cfg, "f_random", "host:7:g")
    status.mlflow_run_id = run_id
    status.close("KILLED", "the job was stopped: terminated by SIGTERM")
    state, tags = _status(run_id)
    assert state == "KILLED" and tags["fastfill.state"].endswith("terminated by SIGTERM")
