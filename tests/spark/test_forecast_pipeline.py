"""The forecast through the jobs, on a foreign gallery WITHOUT labels (issue 25): train_transformation
probes gallery items and forecasts on the label-free agreement; rank_gallery's `auto` order
prints it; backfill measures its rate and prints the cost (--estimate-only writes nothing);
--stop forecast stops at the recommended batch; the finished run logs the agreement curve,
the realised share of the gain and the chart beside the forecast. One chain, several
assertions."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from .own_gallery_data import make_gallery, sets

PER_CLASS, TRAIN_ROWS, BATCH = 30, 64, 40


@pytest.fixture(scope="module")
def chain(spark, tmp_path_factory):
    from fastfill_udfs.config import load_config
    from fastfill_udfs.spark.jobs import (backfill_job, ingest_job, rank_job,
                                          train_transformation_job)

    setup = make_gallery(tmp_path_factory.mktemp("forecast_gallery"), PER_CLASS)
    cfg = load_config(["conf/my_gallery.yaml"], sets(
        setup, data__columns__label="", transformation__train_rows=TRAIN_ROWS,
        transformation__epochs=10, backfill__batch_size=BATCH, forecast__min_items=100,
        forecast__probe_max_share=0.5, forecast__random_orders=4, forecast__bootstrap=50,
        forecast__folds=3))
    out = {"cfg": cfg, "setup": setup}
    out["ingest"] = ingest_job(cfg)
    out["train"] = train_transformation_job(cfg)
    handler = _Capture()
    logger = logging.getLogger("fastfill_udfs")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        out["rank"] = rank_job(cfg)                          # policy: auto (the default)
        out["rank_log"] = list(handler.lines)
        out["estimate"] = backfill_job(cfg, estimate_only=True)
        out["log_after_estimate"] = _log(spark, cfg)
        out["stopped"] = backfill_job(cfg, stop="forecast", evaluate=True)
        out["finished"] = backfill_job(cfg, evaluate=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _log(spark, cfg):
    from fastfill_udfs.spark.delta_io import read_table, run_id_for, table_paths

    return (read_table(spark, table_paths(cfg, run_id_for(cfg)).backfill_log).toPandas()
            .sort_values("batch_id"))


def test_unlabelled_forecast_probes_and_decides_on_agreement(spark, chain):
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.model_loading import load_configured_model
    from fastfill_udfs.spark.delta_io import read_table, table_paths
    from fastfill_udfs.tracking import configure_mlflow

    cfg = chain["cfg"]
    pairs = read_table(spark, table_paths(cfg).train_pairs).toPandas()
    assert set(pairs["role"]) == {"sample", "probe"} and pairs["id"].is_unique
    assert pairs["label"].isna().all()
    n_probe = int((pairs["role"] == "probe").sum())
    assert n_probe == chain["train"]["n_probe"] > 0
    configure_mlflow(cfg)
    params = MlflowClient().get_run(chain["train"]["run_id"]).data.params
    assert params["forecast_metric"] == "agreement@10"
    assert int(params["n_probe"]) == n_probe
    artifacts = {a.path for a in MlflowClient().list_artifacts(chain["train"]["run_id"],
                                                               "forecast")}
    assert {"forecast/forecast.json", "forecast/forecast.png"} <= artifacts
    h = load_configured_model(cfg, "h").model
    assert h.auto_order is not None and h.prototypes is not None   # k-means prototypes


def test_rank_prints_the_forecast_and_takes_the_probes_as_new(spark, chain):
    from fastfill_udfs.spark.delta_io import read_table, run_id_for, table_paths

    text = "\n".join(chain["rank_log"])
    assert "forecast on" in text and "decision:" in text and "where to stop:" in text
    cfg = chain["cfg"]
    assert run_id_for(cfg) == "products_auto"
    paths = table_paths(cfg, "products_auto")
    pairs = read_table(spark, paths.train_pairs).select("id").toPandas()
    feats = read_table(spark, paths.gallery_features).toPandas().set_index("id")
    plan = read_table(spark, paths.backfill_plan).toPandas()
    assert (feats.loc[pairs["id"], "batch_id"] == 0).all()      # pairs and probes: new at 0
    assert not set(pairs["id"]) & set(plan["id"])
    assert len(plan) + len(pairs) == len(feats) == len(chain["setup"]["ids"])


def test_estimate_only_measures_and_writes_nothing(chain):
    lines = chain["estimate"]["estimate"]
    assert lines[0].startswith("items left to embed: ")
    assert any(line.startswith("measured rate: ") and "items/s" in line for line in lines)
    assert chain["estimate"]["committed_now"] == []
    assert chain["log_after_estimate"]["batch_id"].tolist() == [0]


def test_stop_forecast_stops_at_the_recommended_batch(chain):
    from fastfill_udfs.spark.delta_io import run_id_for

    from mlflow.tracking import MlflowClient

    stopped, finished = chain["stopped"], chain["finished"]
    run = MlflowClient().get_run(stopped["mlflow_run_id"])
    stop_batch = int(run.data.params["forecast_stop_batch"])
    assert stopped["committed_now"] == list(range(1, stop_batch + 1))
    assert any(f"stops after batch {stop_batch}" in line for line in stopped["estimate"])
    assert finished["committed_now"] == list(range(stop_batch + 1, stop_batch + 1
                                                   + len(finished["committed_now"])))
    assert finished["run"] == run_id_for(chain["cfg"])


def test_finished_run_logs_agreement_and_the_forecast_beside_it(chain):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = chain["finished"]["mlflow_run_id"]
    aucs = chain["finished"]["aucs"]
    assert "mAP_auc" not in aucs and 0.0 < aucs["agreement_auc"] <= 1.0
    agreement = {m.step: m.value for m in client.get_metric_history(run_id, "agreement_at_10")}
    steps = sorted(agreement)
    assert steps[0] == 0 and agreement[steps[-1]] == pytest.approx(1.0)
    share = {m.step: m.value for m in client.get_metric_history(run_id, "gain_share")}
    forecast = {m.step: m.value for m in
                client.get_metric_history(run_id, "forecast_gain_share")}
    assert sorted(share) == steps == sorted(forecast)
    assert share[0] == pytest.approx(0.0) and share[steps[-1]] == pytest.approx(1.0)
    gap = client.get_run(run_id).data.metrics["forecast_gap_max"]
    assert gap == pytest.approx(max(abs(forecast[s] - share[s]) for s in steps))
    assert "forecast_vs_realised.png" in {a.path for a in client.list_artifacts(run_id)}
    assert np.isnan(client.get_run(run_id).data.metrics.get("mAP", np.nan))
