"""A foreign user's setup, from scratch, through the README's "Your own gallery" config and
commands (plain spark-submit): PNG files on disk referenced by relative path, old embeddings
made by a torch module that only this test knows, a new model defined in a test module and
logged by the test as an MLflow pytorch model. ingest -> train_transformation -> rank_gallery
-> backfill -> evaluate: counts reconcile, the sampled items are never embedded again, a
missing image and a broken old embedding are quarantined, and the uncertainty order beats the
random order on mAP AUC."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from .own_gallery_data import N_CLASSES, make_gallery, sets, submit_env

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SECTION = README.split("## Your own gallery", 1)[1].split("\n## ", 1)[0]   # to the next heading
PER_CLASS = 40
TRAIN_ROWS, BATCH = 64, 40


def readme_config() -> dict:
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", SECTION, re.S).group(1))


def readme_commands() -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", SECTION, re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines()]


@pytest.fixture(scope="module")
def foreign_setup(tmp_path_factory):
    """Images, the user's gallery table and the user's registered new model."""
    return make_gallery(tmp_path_factory.mktemp("own_gallery"), PER_CLASS, broken=7, missing=11)


def overrides(setup: dict) -> list[str]:
    """Where this machine's copy of the README's bucket lives, and sizes fit for a test."""
    return sets(setup, transformation__train_rows=TRAIN_ROWS, backfill__batch_size=BATCH)


def submit(args: list[str], setup: dict, conf: Path) -> subprocess.CompletedProcess:
    assert args[0] == "spark-submit"
    cmd = [str(Path(sys.executable).parent / "spark-submit")] + [
        str(conf) if a == "conf/my_gallery.yaml" else a for a in args[1:]]
    for o in overrides(setup):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=submit_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, " ".join(args) + "\n" + proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def pipeline_run(spark, foreign_setup):
    conf = foreign_setup["root"] / "my_gallery.yaml"
    conf.write_text(yaml.safe_dump(readme_config()))
    commands = readme_commands()
    assert [c[1] for c in commands] == [
        "pipelines/ingest.py", "pipelines/train_transformation.py", "pipelines/rank_gallery.py",
        "pipelines/backfill.py", "pipelines/evaluate.py"]
    outputs = {}
    for args in commands:
        outputs[args[1]] = submit(args, foreign_setup, conf).stdout
    # the same gallery in random order, for comparison (in this process: quicker)
    from fastfill_udfs.config import load_config
    from fastfill_udfs.spark.jobs import backfill_job, rank_job

    cfg = load_config([str(conf)], overrides(foreign_setup))
    rank_job(cfg, policy="random")
    backfill_job(cfg, policy="random", evaluate=True)
    return {"conf": conf, "outputs": outputs}


def test_readme_config_is_valid_and_the_commands_name_real_jobs():
    from fastfill_udfs.config import load_config

    cfg = readme_config()
    assert cfg["data"]["dataset"] == "gallery_table" and cfg["models"]["new"].startswith("models:/")
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        yaml.safe_dump(cfg, fh)
        load_config([fh.name])
    for args in readme_commands():
        assert (ROOT / args[1]).is_file(), args[1]


def test_own_gallery_end_to_end(spark, foreign_setup, pipeline_run):
    from fastfill_udfs.config import load_config
    from fastfill_udfs.spark.delta_io import (dictionary_columns, local_data_files, read_table,
                                              table_paths)
    from fastfill_udfs.tracking import configure_mlflow

    cfg = load_config([str(pipeline_run["conf"])], overrides(foreign_setup))
    paths = table_paths(cfg, "products_uncertainty")
    n_source = len(foreign_setup["ids"])

    # ingest: the user's table as the contract's gallery, extra column carried along
    gallery = read_table(spark, paths.gallery).toPandas().set_index("id")
    assert len(gallery) == n_source and "shop" in gallery.columns and "image_uri" in gallery
    assert gallery.loc["item-3-005", "label"] == 3
    assert gallery.loc["item-3-005", "image_uri"] == "cls3/img_005.png"

    # train_transformation: the sample's pairs, and h registered where models.h points
    pairs = read_table(spark, paths.train_pairs).toPandas()
    assert 0 < len(pairs) <= TRAIN_ROWS and pairs["id"].is_unique
    assert foreign_setup["broken"] not in set(pairs["id"])
    per_class = pairs["label"].value_counts()          # stratified by label (the missing
    assert sorted(per_class.index) == list(range(N_CLASSES))   # image may cost class 0 one)
    assert per_class.max() == TRAIN_ROWS // N_CLASSES and per_class.min() >= per_class.max() - 1
    configure_mlflow(cfg)
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    h_version = client.get_model_version_by_alias("product_embedder_h", "champion")
    h_params = client.get_run(h_version.run_id).data.params
    assert h_params["class_term"] == "prototypes"
    assert h_params["new_model_version"] == "models:/product_embedder/1"
    # 64 pairs are too few to hold some out for the benefit head: h's own sigma orders
    assert h_params["order_head_fitted"] == "sigma" and h_params["n_pairs_held_out"] == "0"

    # rank: pairs are new at batch 0 and not in the plan; the broken row is quarantined
    plan = read_table(spark, paths.backfill_plan).toPandas()
    quarantine = read_table(spark, paths.quarantine).toPandas()
    run = "products_uncertainty"
    at_rank = quarantine[(quarantine["stage"] == "rank") & (quarantine["run"] == run)]
    assert at_rank["id"].tolist() == [foreign_setup["broken"]]
    assert not set(pairs["id"]) & set(plan["id"])
    assert len(plan) + len(pairs) + len(at_rank) == n_source

    # backfill: every planned item new but the missing image, quarantined with its path
    feats = read_table(spark, paths.gallery_features).toPandas().set_index("id")
    at_backfill = quarantine[(quarantine["stage"] == "backfill") & (quarantine["run"] == run)]
    assert at_backfill["id"].tolist() == [foreign_setup["missing"]]
    assert "cls0/gone.png" in at_backfill["reason"].iloc[0]
    assert feats.loc[foreign_setup["missing"], "source"] == "transformed"
    assert (feats.drop(index=foreign_setup["missing"])["source"] == "new").all()
    assert set(feats["model_version"]) == {"models:/product_embedder/1",
                                           f"models:/product_embedder_h/{h_version.version}"}
    # the sampled items were never embedded again: still batch 0, the pairs' very vectors
    sampled = feats.loc[pairs["id"]]
    assert (sampled["batch_id"] == 0).all()
    np.testing.assert_array_equal(np.stack(sampled["embedding"]), np.stack(pairs["new_embedding"]))
    # rank's and backfill's writes follow conf/base.yaml: no Parquet dictionaries (Spark's
    # default would give the constant `source` and `model_version` columns one)
    files = local_data_files(spark, paths.gallery_features)
    assert files and {f: dictionary_columns(f) for f in files} == {f: set() for f in files}
    log = read_table(spark, paths.backfill_log).toPandas().sort_values("batch_id")
    assert log["n_items"].iloc[0] == len(pairs)
    assert log["n_items"].sum() == (feats["source"] == "new").sum()
    assert log["n_items"].iloc[1:].sum() + len(at_backfill) == len(plan)

    # evaluate: the uncertainty order beats the random order on mAP AUC
    aucs = {}
    for policy in ("uncertainty", "random"):
        runs = client.search_runs(
            [client.get_experiment_by_name(cfg.get_path("mlflow.experiment")).experiment_id],
            filter_string=f"tags.`fastfill.run` = 'products_{policy}'")
        aucs[policy] = runs[0].data.metrics["mAP_auc"]
    assert aucs["uncertainty"] > aucs["random"] + 0.005, aucs
