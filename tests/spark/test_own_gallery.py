"""A foreign user's setup, from scratch, through the README's "Your own gallery" config and
commands (plain spark-submit): PNG files on disk referenced by relative path, old embeddings
made by a torch module that only this test knows, a new model defined in a test module and
logged by the test as an MLflow pytorch model. ingest -> train_transformation -> rank_gallery
-> backfill -> evaluate: counts reconcile, the sampled items are never embedded again, a
missing image and a broken old embedding are quarantined, and the uncertainty order beats the
random order on mAP AUC."""
from __future__ import annotations

import tempfile

import numpy as np
import pytest
import yaml

from .own_gallery_data import N_CLASSES, ROOT, TRAIN_ROWS, readme_commands, readme_config


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

    from fastfill_udfs.spark.delta_io import read_table, table_paths
    from fastfill_udfs.tracking import configure_mlflow

    cfg = own_gallery["make_cfg"]()
    paths = table_paths(cfg, "products_uncertainty")
    configure_mlflow(cfg)
    client = MlflowClient()
    quarantine = read_table(spark, paths.quarantine).toPandas()
    quarantine = quarantine[quarantine["run"] == "products_uncertainty"]
    return {
        "cfg": cfg, "paths": paths, "client": client,
        "h_version": client.get_model_version_by_alias("product_embedder_h", "champion"),
        "gallery": read_table(spark, paths.gallery).toPandas().set_index("id"),
        "pairs": read_table(spark, paths.train_pairs).toPandas(),
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
    pairs = run["pairs"]       # the sample's pairs, and h registered where models.h points
    assert 0 < len(pairs) <= TRAIN_ROWS and pairs["id"].is_unique
    assert foreign_setup["broken"] not in set(pairs["id"])
    per_class = pairs["label"].value_counts()          # stratified by label (the missing
    assert sorted(per_class.index) == list(range(N_CLASSES))   # image may cost class 0 one)
    assert per_class.max() == TRAIN_ROWS // N_CLASSES and per_class.min() >= per_class.max() - 1
    h_params = run["client"].get_run(run["h_version"].run_id).data.params
    assert h_params["class_term"] == "prototypes"
    assert h_params["new_model_version"] == "models:/product_embedder/1"
    # 64 pairs are too few to hold some out for the benefit head: h's own sigma orders
    assert h_params["order_head_fitted"] == "sigma" and h_params["n_pairs_held_out"] == "0"


def test_rank_plans_all_but_the_pairs_and_quarantines_the_broken_row(foreign_setup, run):
    plan, pairs, at_rank = run["plan"], run["pairs"], run["at_rank"]
    # pairs are new at batch 0 and not in the plan; the broken row is quarantined
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
    # the sampled items were never embedded again: still batch 0, the pairs' very vectors
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


def test_evaluate_finds_the_uncertainty_order_beats_random_on_map_auc(run, random_run):
    client, cfg = run["client"], run["cfg"]
    experiment = client.get_experiment_by_name(cfg.get_path("mlflow.experiment")).experiment_id
    aucs = {}
    for policy in ("uncertainty", "random"):
        runs = client.search_runs([experiment],
                                  filter_string=f"tags.`fastfill.run` = 'products_{policy}'")
        aucs[policy] = runs[0].data.metrics["mAP_auc"]
    assert aucs["uncertainty"] > aucs["random"] + 0.005, aucs
