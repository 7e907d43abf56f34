"""A foreign user's setup, from scratch, through the README's "Your own gallery" config and
commands (plain spark-submit): PNG files on disk referenced by relative path, old embeddings
made by a torch module that only this test knows, a new model defined in a test module and
logged by the test as an MLflow pytorch model. ingest -> train_transformation -> rank_gallery
-> backfill -> evaluate, in the README's default `auto` policy (run `products_auto`): counts
reconcile, the sampled and probed items are never embedded again, a missing image and a broken
old embedding are quarantined, the forecast's decision is logged, and the auto order's realised
mAP AUC is not below the random order's (issue 25)."""
from __future__ import annotations

import tempfile

import numpy as np
import pytest
import yaml

from .own_gallery_data import N_CLASSES, ROOT, TRAIN_ROWS, readme_commands, readme_config

RUN = "products_auto"      # the README's commands name no policy: backfill.policy's default
AUC_TOLERANCE = 0.005      # half a mAP point (forecast.stop_epsilon's default)


@pytest.fixture(scope="module")
def random_run(spark, own_gallery):
    """The same gallery in random order, for comparison (in this process: quicker)."""
    from fastfill_udfs.spark.jobs import backfill_job, rank_job

    cfg = own_gallery["make_cfg"]()
    rank_job(cfg, policy="random")
    return backfill_job(cfg, policy="random", evaluate=True)


def test_readme_config_is_valid_and_the_commands_name_real_jobs():
    from fastfill_udfs.config import load_config

    cfg = readme_config()
    assert cfg["data"]["dataset"] == "gallery_table" and cfg["models"]["new"].startswith("models:/")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        yaml.safe_dump(cfg, fh)
        load_config([fh.name])
    for args in readme_commands():
        assert (ROOT / args[1]).is_file(), args[1]


@pytest.fixture(scope="module")
def foreign_setup(own_gallery):
    """Images, the user's gallery table and the user's registered new model."""
    return own_gallery["setup"]


@pytest.fixture(scope="module")
def run(spark, own_gallery):
    """The README run's config, tables (as pandas), MLflow client and the user's h version."""
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.spark.delta_io import read_table, run_id_for, table_paths
    from fastfill_udfs.tracking import configure_mlflow

    cfg = own_gallery["make_cfg"]()
    assert run_id_for(cfg) == RUN
    paths = table_paths(cfg, RUN)
    configure_mlflow(cfg)
    client = MlflowClient()
    quarantine = read_table(spark, paths.quarantine).toPandas()
    quarantine = quarantine[quarantine["run"] == RUN]
    h_version = client.get_model_version_by_alias("product_embedder_h", "champion")
    pairs = read_table(spark, paths.train_pairs).toPandas()
    return {
        "cfg": cfg, "paths": paths, "client": client, "h_version": h_version,
        "h_params": client.get_run(h_version.run_id).data.params,
        "gallery": read_table(spark, paths.gallery).toPandas().set_index("id"),
        "pairs": pairs, "sample": pairs[pairs["role"] == "sample"],
        "probes": pairs[pairs["role"] == "probe"],
        "plan": read_table(spark, paths.backfill_plan).toPandas(),
        "at_rank": quarantine[quarantine["stage"] == "rank"],
        "at_backfill": quarantine[quarantine["stage"] == "backfill"],
        "features": read_table(spark, paths.gallery_features).toPandas().set_index("id"),
        "log": read_table(spark, paths.backfill_log).toPandas().sort_values("batch_id"),
    }


def test_ingest_takes_the_users_table_as_the_contracts_gallery(foreign_setup, run):
    gallery = run["gallery"]   # the extra column carried along, images by relative path
    assert len(gallery) == len(foreign_setup["ids"])
    assert "shop" in gallery.columns and "image_uri" in gallery
    assert gallery.loc["item-3-005", "label"] == 3
    assert gallery.loc["item-3-005", "image_uri"] == "cls3/img_005.png"


def test_train_transformation_samples_pairs_by_label_and_registers_h(foreign_setup, run):
    pairs, sample = run["pairs"], run["sample"]  # h's sample, and h where models.h points
    assert pairs["id"].is_unique and set(pairs["role"]) <= {"sample", "probe"}
    assert 0 < len(sample) <= TRAIN_ROWS
    assert foreign_setup["broken"] not in set(pairs["id"])
    per_class = sample["label"].value_counts()         # stratified by label (the missing
    assert sorted(per_class.index) == list(range(N_CLASSES))   # image may cost class 0 one)
    assert per_class.max() == TRAIN_ROWS // N_CLASSES and per_class.min() >= per_class.max() - 1
    h_params = run["h_params"]
    assert h_params["class_term"] == "prototypes"
    assert h_params["new_model_version"] == "models:/product_embedder/1"
    assert int(h_params["n_pairs"]) == len(sample)
    # the forecast holds pairs out of h's training; a handful (< MIN_HELD_OUT) is too few to fit
    # the benefit head on, so h's own sigma is its uncertainty order
    assert 0 < int(h_params["n_pairs_held_out"]) < len(sample)
    assert h_params["order_head_fitted"] == "sigma"


def test_train_transformation_probes_within_budget_and_logs_the_forecast(run):
    """Too few held-out pairs for the forecast (forecast.min_items): it embeds gallery items as
    probes, at most forecast.probe_max_share of the gallery, and logs them and its decision."""
    from fastfill_udfs.model_loading import load_configured_model

    cfg, h_params, probes = run["cfg"], run["h_params"], run["probes"]
    assert len(run["pairs"]) == len(run["sample"]) + len(probes)
    budget = int(cfg.get_path("forecast.probe_max_share") * len(run["gallery"]))
    assert 0 < len(probes) <= budget
    assert int(h_params["n_probe"]) == int(h_params["forecast_probes"]) == len(probes)
    assert h_params["forecast_metric"] == "mAP" and h_params["forecast_reason"]
    held_out = int(h_params["n_pairs_held_out"])
    assert int(h_params["forecast_items"]) == held_out + len(probes)
    artifacts = {a.path for a in run["client"].list_artifacts(run["h_version"].run_id,
                                                              "forecast")}
    assert {"forecast/forecast.json", "forecast/forecast.png"} <= artifacts
    # the order h carries for `auto` is the one the logged decision named
    order = load_configured_model(cfg, "h").model.auto_order
    choice = h_params["forecast_choice"]
    if choice.startswith("random"):
        assert order["random"], (choice, order)
    else:
        assert order["name"] == choice and not order.get("random"), (choice, order)


def test_rank_plans_all_but_the_pairs_and_quarantines_the_broken_row(foreign_setup, run):
    plan, pairs, at_rank = run["plan"], run["pairs"], run["at_rank"]
    # pairs (sample and probes) are new at batch 0, not in the plan; the broken row quarantined
    assert at_rank["id"].tolist() == [foreign_setup["broken"]]
    assert not set(pairs["id"]) & set(plan["id"])
    assert len(plan) + len(pairs) + len(at_rank) == len(foreign_setup["ids"])


def test_backfill_embeds_every_planned_item_but_the_missing_image(spark, foreign_setup, run):
    from fastfill_udfs.spark.delta_io import dictionary_columns, local_data_files

    feats, pairs, plan, log = run["features"], run["pairs"], run["plan"], run["log"]
    at_backfill, missing = run["at_backfill"], foreign_setup["missing"]
    # every planned item new but the missing image, quarantined with its path
    assert at_backfill["id"].tolist() == [missing]
    assert "cls0/gone.png" in at_backfill["reason"].iloc[0]
    assert feats.loc[missing, "source"] == "transformed"
    assert (feats.drop(index=missing)["source"] == "new").all()
    assert set(feats["model_version"]) == {"models:/product_embedder/1",
                                           f"models:/product_embedder_h/{run['h_version'].version}"}
    # the sampled and probed items were never embedded again: batch 0, the pairs' very vectors
    sampled = feats.loc[pairs["id"]]
    assert (sampled["batch_id"] == 0).all()
    np.testing.assert_array_equal(np.stack(sampled["embedding"]), np.stack(pairs["new_embedding"]))
    # rank's and backfill's writes follow conf/base.yaml: no Parquet dictionaries (Spark's
    # default would give the constant `source` and `model_version` columns one)
    files = local_data_files(spark, run["paths"].gallery_features)
    assert files and {f: dictionary_columns(f) for f in files} == {f: set() for f in files}
    assert log["n_items"].iloc[0] == len(pairs)
    assert log["n_items"].sum() == (feats["source"] == "new").sum()
    assert log["n_items"].iloc[1:].sum() + len(at_backfill) == len(plan)


def test_evaluate_finds_the_auto_order_not_below_random_on_map_auc(run, random_run):
    from fastfill_udfs.tracking import find_backfill_run

    client, cfg = run["client"], run["cfg"]
    experiment = client.get_experiment_by_name(cfg.get_path("mlflow.experiment")).experiment_id
    aucs = {}
    for name in (RUN, random_run["run"]):
        runs = client.search_runs([experiment], filter_string=f"tags.`fastfill.run` = '{name}'")
        assert len(runs) == 1, name
        aucs[name] = runs[0].data.metrics["mAP_auc"]
    assert random_run["run"] == "products_random"
    assert aucs[RUN] >= aucs["products_random"] - AUC_TOLERANCE, aucs
    # the backfill run names the order it took: the one train_transformation's forecast chose
    backfill = find_backfill_run(client, experiment, RUN).data.params
    assert backfill["forecast_order"] == run["h_params"]["forecast_choice"]

