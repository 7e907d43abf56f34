"""The MLflow UI in a real browser: `mlflow server` on a small real store (two backfill runs
with their curves, statuses and `curve.png`, logged through the project's own tracking code),
opened in headless Chromium. The experiment opens on its runs (not the GenAI overview), lists
both runs with their AUCs, the "Backfill curves" view shows mAP first for both runs, and the
`curve.png` artifact renders. Without Chromium it skips, except under FASTFILL_REQUIRE_DATA=1
(scripts/test.sh, so CI), where what the test needs must be there and a missing browser fails:
scripts/setup.sh installs Debian's chromium."""
from __future__ import annotations

import pytest

from fastfill_udfs.config import load_config
from tests.conftest import REQUIRE_DATA


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Two finished backfill runs, as the pipeline logs them."""
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.reporting import plot_curves
    from fastfill_udfs.tracking import (backfill_mlflow_run, close_backfill_run,
                                        log_step_metrics, open_backfill_run)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config(["conf/test.yaml"], [f"mlflow.tracking_uri={uri}",
                                           "mlflow.experiment=fastfill"])
    t = np.linspace(0, 1, 6)
    ids = {}
    for policy, lift in (("random", 0.0), ("uncertainty", 0.03)):
        params = {"policy": policy, "dataset": "fashion_mnist", "n_gallery": 500,
                  "model_new": "models:/fastfill_new/1", "model_h": "models:/fastfill_h/1"}
        run_id = backfill_mlflow_run(cfg, f"ui_{policy}", policy, params, ranking="1")
        open_backfill_run(run_id, f"test:{policy}")
        curve = pd.DataFrame({"backfill_fraction": t, "mAP": 0.70 + 0.1 * t + lift * np.sin(
            np.pi * t), "top1": 0.85 + 0.04 * t})
        for step, row in curve.iterrows():
            log_step_metrics(run_id, row.to_dict(), step=int(step))
            if policy == "uncertainty":   # the forecast, and the realised share beside it
                log_step_metrics(run_id, {"forecast_gain_share": float(np.sqrt(t[step])),
                                          "gain_share": float(t[step] ** 0.6)}, step=int(step))
        log_step_metrics(run_id, {"mAP_auc": float(np.trapezoid(curve["mAP"], t))}, step=5)
        png = plot_curves(curve.assign(policy=policy), tmp_path / policy / "curve.png")
        MlflowClient().log_artifact(run_id, str(png))
        close_backfill_run(run_id, f"test:{policy}", "FINISHED", "the plan is fully backfilled")
        ids[policy] = run_id
    return {"uri": uri, "ids": ids}


def test_the_ui_shows_both_runs_their_map_curves_and_the_curve_artifact(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.mlflow_ui import BrowserUnavailableError, capture_screenshots

    try:
        shots = capture_screenshots(store["uri"], tmp_path / "shots", run_name="ui_uncertainty")
    except BrowserUnavailableError as exc:
        if REQUIRE_DATA:
            pytest.fail(f"no Chromium under FASTFILL_REQUIRE_DATA=1 (bash scripts/setup.sh "
                        f"installs it): {exc}")
        pytest.skip(f"no Chromium here: {exc}")
    texts = shots["texts"]
    names = [MlflowClient(store["uri"]).get_run(i).info.run_name for i in store["ids"].values()]
    assert names == ["ui_random · random · fastfill_new v1",
                     "ui_uncertainty · uncertainty · fastfill_new v1"]
    # the run list: both runs, the AUC column, the model-training view (not GenAI's traces)
    for name in names:
        assert name in texts["runs"]
    assert "mAP_auc" in texts["runs"] and "Token Usage" not in texts["runs"]
    # the chart view: curves first, mAP for both runs
    curves = texts["curves"]
    assert curves.index("Backfill curves") < curves.index("mAP") < curves.index(
        "Final values (AUC")
    for name in names:
        assert f"{name} (mAP)" in texts["mAP_chart"]
    assert "Step" in texts["mAP_chart"]
    assert "curve.png" in texts["curve_artifact"] and names[1] in texts["curve_artifact"]
    # forecast and realised share of the gain on one chart, for the run that has them
    for key in ("forecast_gain_share", "gain_share"):
        assert f"{names[1]} ({key})" in texts["forecast_chart"]
    for name, path in shots.items():
        if name != "texts":
            assert path.stat().st_size > 20_000, name   # a rendered page, not a blank one
