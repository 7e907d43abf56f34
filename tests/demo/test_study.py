"""The study job end to end on a tiny real Fashion-MNIST subset (1 epoch, tiny widths), and the
report helpers."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fastfill_udfs.config import load_config
from fastfill_udfs.reporting import markdown_table, plot_curves, plot_loss_curves
from fastfill_udfs.training import History
from tests.conftest import needs_fashion_mnist

STUDY_FILES = ("references.csv", "summary.csv", "curves.csv", "study.md", "curves.png",
               "loss_curves.png")


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is as fast, and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config(tmp_path):
    return load_config(["conf/test.yaml"], [
        f"paths.warehouse={tmp_path / 'warehouse'}",
        f"paths.outputs={tmp_path / 'outputs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "data.train_limit=600", "data.test_limit=200",
        "demo.old_model.channels=[4, 8]", "demo.old_model.embedding_dim=16",
        "demo.new_model.channels=[4, 8]", "demo.new_model.embedding_dim=24",
        "transformation.hidden_dim=32", "transformation.epochs=2",
        "transformation.batch_size=128", "backfill.batch_size=50",
        "demo.holdout_items=150",
    ])


@needs_fashion_mnist
def test_run_study_job_writes_files_registers_models_and_logs_a_run(tiny_config, capsys,
                                                                      one_thread, monkeypatch):
    import mlflow

    import fastfill_udfs.demo.study as study
    from fastfill_udfs.demo.cnn import EmbeddingCNN
    from fastfill_udfs.demo.study_job import run_study_job
    from fastfill_udfs.model_loading import load_configured_model
    from fastfill_udfs.models import Transformation

    fits, real_fit = [], study.fit_h_extras

    def recording_fit(*args, **kwargs):   # the real fit; records what the config passed
        fits.append(kwargs)
        kwargs["fitted"] = real_fit(*args, **kwargs)
        return kwargs["fitted"]

    monkeypatch.setattr(study, "fit_h_extras", recording_fit)
    tiny_config["transformation"]["order_top1_weight"] = 0.75
    tiny_config["transformation"]["order_margin_weight"] = 0.25
    result = run_study_job(tiny_config)
    # the benefit head is fitted to mAP + 0.75 x top-1 (transformation.order_top1_weight), its
    # order blended with the prototype margin's at 0.25 (transformation.order_margin_weight)
    assert [(f["order_head"], f["top1_weight"], f["margin_weight"]) for f in fits] == [
        ("sigma", 0.75, 0.25), ("benefit", 0.75, 0.25)]
    assert fits[1]["fitted"].order_blend["weight"] == 0.25
    assert fits[0]["fitted"].order_blend is None    # the paper's sigma head stays unblended

    out = Path(tiny_config.resolve_path("paths.outputs")) / "study"
    for name in STUDY_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.policy) == ["fct_random", "fastfill_random", "fastfill_uncertainty",
                                    "fastfill_benefit", "fastfill_prototype", "fastfill_oracle"]
    assert summary[["mAP_auc", "top1_auc", "mAP_mean", "closure"]].apply(np.isfinite).all().all()
    s = summary.set_index("policy")
    assert s.loc["fct_random", "closure"] == 0.0
    assert s.loc["fct_random", "top1_min_vs_fct_random"] == 0.0
    refs = pd.read_csv(out / "references.csv")
    assert {"old/old", "new/new"} <= set(refs.setting)
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 6 * (200 // 50 + 1)            # t = 0 plus one row per batch
    md = (out / "study.md").read_text()
    assert "FastFill-uncertainty vs FCT-random" in md and "| FCT-random" in md
    printed = capsys.readouterr().out
    assert "FastFill-uncertainty vs FCT-random:" in printed and "mAP AUC points" in printed
    assert result["gain_mAP_auc_points"] == pytest.approx(
        100 * (summary.set_index("policy").mAP_auc["fastfill_uncertainty"]
               - summary.set_index("policy").mAP_auc["fct_random"]))

    assert set(result["model_uris"]) == {"old", "new", "h_fastfill", "h_fastfill_benefit",
                                         "h_fct"}
    assert result["registered"] == {"old": "models:/fastfill_old/1", "new": "models:/fastfill_new/1",
                                    "h": "models:/fastfill_h/1"}

    run = mlflow.get_run(result["run_id"])
    assert run.info.run_name == "study" and run.data.tags["fastfill.kind"] == "study"
    assert run.data.params["dataset"] == "fashion_mnist"
    assert run.data.params["train_limit"] == "600" and run.data.params["h_hidden_dim"] == "32"
    assert run.data.params["h_order_top1_weight"] == "0.75"
    assert run.data.params["h_order_margin_weight"] == "0.25"
    metrics = run.data.metrics
    for key in ("fct_random_mAP_auc", "fastfill_uncertainty_mAP_auc", "fastfill_oracle_top1_auc",
                "old_old_mAP", "new_new_mAP", "t0_h_fastfill_mAP", "t0_h_fct_mAP",
                "gain_uncertainty_vs_fct_random_mAP_auc_points"):
        assert key in metrics, key
    client = mlflow.MlflowClient()
    loss = client.get_metric_history(result["run_id"], "loss_h_fastfill")
    assert [m.step for m in loss] == [1, 2]
    for name in ("loss_old", "loss_new", "loss_h_fct"):
        assert client.get_metric_history(result["run_id"], name), name
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "study")}
    assert {f"study/{n}" for n in STUDY_FILES} <= artifacts

    # the jobs find the models where the config points (alias -> the version just registered)
    h = load_configured_model(tiny_config, "h")
    assert h.version == "models:/fastfill_h/1" and h.run_id == result["run_id"]
    assert isinstance(h.model, Transformation) and h.model.has_uncertainty
    assert (h.model.old_dim, h.model.new_dim) == (16, 24)
    # the registered h is the one with the benefit head (transformation.order_head), and it
    # carries its prototypes (and calibration, none here) through the registry
    assert h.model.head_hidden_dim == 64 and h.model.calibration is None
    assert len(h.model.prototypes["prototypes"]) == 10
    assert isinstance(load_configured_model(tiny_config, "new").model, EmbeddingCNN)
    assert mlflow.get_experiment(run.info.experiment_id).name == "fastfill-study"

    # a second study moves the aliases to new versions; the first stay loadable by number
    again = run_study_job(tiny_config)
    assert again["registered"]["h"] == "models:/fastfill_h/2"
    assert load_configured_model(tiny_config, "h").version == "models:/fastfill_h/2"


def test_markdown_table_formats_floats_and_aligns():
    df = pd.DataFrame({"policy": ["a", "long|name"], "mAP": [0.123456, float("nan")],
                       "n": [3, 10]})
    text = markdown_table(df, floatfmt=".3f")
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| policy") and "mAP" in lines[0]
    assert set(lines[1]) <= {"|", "-", ":"} and lines[1].count(":") == 2   # numeric: right
    assert "0.123" in lines[2] and "0.1234" not in lines[2]
    assert "long\\|name" in lines[3]
    assert len({len(line) for line in lines}) == 1                         # columns line up


def test_plots_write_png(tmp_path):
    curves = pd.DataFrame({
        "policy": ["fct_random"] * 3 + ["fastfill_uncertainty"] * 3,
        "backfill_fraction": [0.0, 0.5, 1.0] * 2,
        "mAP": [0.5, 0.6, 0.7, 0.55, 0.68, 0.7], "top1": [0.6, 0.7, 0.8, 0.65, 0.78, 0.8]})
    refs = pd.DataFrame({"setting": ["old/old", "new/new"], "mAP": [0.4, 0.7],
                         "top1": [0.5, 0.8]})
    path = plot_curves(curves, tmp_path / "sub" / "c.png", references=refs)
    assert path.read_bytes()[:4] == b"\x89PNG"
    loss = plot_loss_curves({"old": History([1.0, 0.5]), "h_fastfill": History([0.2, -0.1])},
                            tmp_path / "l.png")
    assert loss.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="lacks column"):
        plot_curves(curves.drop(columns="mAP"), tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plot_loss_curves({}, tmp_path / "y.png")


def test_h_training_rows_all_or_only_the_old_models_images():
    from fastfill_udfs.demo.study import h_training_rows

    old_rows = np.array([0, 2, 5])
    assert h_training_rows(load_config([]), 8, old_rows).tolist() == list(range(8))  # default
    biased = load_config(["conf/biased_footwear.yaml"])      # the biased demo: old model's rows
    assert h_training_rows(biased, 8, old_rows).tolist() == [0, 2, 5]
    with pytest.raises(ValueError, match="transformation.train_data"):
        h_training_rows(load_config([], ["transformation.train_data=old"]), 8, old_rows)
