"""Search a run mid-backfill through Spark and Delta time travel: the hits equal an exact ranking
computed from the Delta tables, with each hit's source and model version; batch 0 when nothing
is committed; servable indexes exported to the warehouse and MLflow, loaded back and refused
for another run or version; image queries with the run's new model; the CLI and the notebook."""
from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fastfill_udfs.search import IndexMismatchError, QueryModelMismatchError, ServableIndex
from fastfill_udfs.spark.delta_io import read_table, table_paths

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "tests" / "data" / "image_folder" / "trouser" / "t10k_00002.png"


@pytest.fixture(scope="module")
def mid_run(pipeline_env):
    """Run `srch_uncertainty`: ranked, one batch of three committed (no evaluation)."""
    from fastfill_udfs.spark.jobs import backfill_job, rank_job

    cfg = pipeline_env.make_cfg("srch")
    rank_job(cfg, policy="uncertainty")
    done = backfill_job(cfg, policy="uncertainty", max_batches=1, evaluate=False)
    assert done["committed_now"] == [1]
    return cfg, "srch_uncertainty"


def _log(spark, cfg, run) -> pd.DataFrame:
    return read_table(spark, table_paths(cfg, run).backfill_log).toPandas().sort_values("batch_id")


def _exact_scores(q: np.ndarray, g: np.ndarray, distance: str) -> np.ndarray:
    """float64 scores (queries x gallery) the search reports for `evaluation.distance`:
    cosine, or for l2 `|q|^2 - |q - g|^2 = 2 q.g - |g|^2` (the L2 ranking of each query)."""
    q, g = np.atleast_2d(np.asarray(q, np.float64)), np.asarray(g, np.float64)
    if distance == "cosine":
        return (q / np.linalg.norm(q, axis=1, keepdims=True)) @ \
            (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    return 2.0 * q @ g.T - np.einsum("ij,ij->i", g, g)[None, :]


def _exact_hits(spark, cfg, run, version, query, k, exclude=None) -> pd.DataFrame:
    """Our own exact ranking from the Delta tables: float64 scores (evaluation.distance)
    against gallery_features as of `version`, with each row's source and model version."""
    feats = read_table(spark, table_paths(cfg, run).gallery_features, version=version).toPandas()
    if exclude is not None:
        feats = feats[feats["id"] != exclude]
    scores = _exact_scores(query, np.stack(feats["embedding"]),
                           cfg.get_path("evaluation.distance"))[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return feats.iloc[order].assign(score=scores[order]).reset_index(drop=True)


def _query(spark, cfg, item_id):
    q = read_table(spark, table_paths(cfg).query_features).where(f"id = '{item_id}'").toPandas()
    return np.asarray(q["embedding"].iloc[0], dtype=np.float64)


def test_search_mid_backfill_equals_an_exact_ranking_from_delta(spark, mid_run):
    from fastfill_udfs.spark.search import search_job

    cfg, run = mid_run
    log = _log(spark, cfg, run)
    assert log["batch_id"].tolist() == [0, 1]
    version = int(log["table_version"].iloc[-1])
    plan = read_table(spark, table_paths(cfg, run).backfill_plan).toPandas()
    item = sorted(plan.loc[plan["batch_id"] == 2, "id"])[0]       # still transformed at batch 1
    printed = []
    result = search_job(cfg, policy="uncertainty", item_id=item, k=10, out=printed.append)
    hits = result["hits"]
    assert (result["batch_id"], result["features_version"]) == (1, version)
    want = _exact_hits(spark, cfg, run, version, _query(spark, cfg, item), 10, exclude=item)
    assert hits["id"].tolist() == want["id"].tolist()
    np.testing.assert_allclose(hits["score"], want["score"], rtol=1e-5, atol=1e-5)
    assert hits["source"].tolist() == want["source"].tolist()
    assert hits["model_version"].tolist() == want["model_version"].tolist()
    assert set(want["source"]) <= {"new", "transformed"}
    assert item not in set(hits["id"])                            # search.exclude_self
    # both models answer mid-backfill, and the printout says which made each hit
    assert set(read_table(spark, table_paths(cfg, run).gallery_features, version=version)
               .toPandas()["model_version"]) == {"models:/fastfill_new/1", "models:/fastfill_h/1"}
    text = "\n".join(printed)
    assert "run srch_uncertainty at batch 1" in text and f"query: item {item!r}" in text
    assert all(h in text for h in hits["id"])

    # an earlier batch by Delta time travel: batch 0, the gallery as ranked
    early = search_job(cfg, policy="uncertainty", item_id=item, k=10, batch=0, out=lambda s: None)
    v0 = int(log["table_version"].iloc[0])
    want0 = _exact_hits(spark, cfg, run, v0, _query(spark, cfg, item), 10, exclude=item)
    assert early["hits"]["id"].tolist() == want0["id"].tolist()
    assert set(early["hits"]["source"]) == {"transformed"}
    assert set(early["hits"]["model_version"]) == {"models:/fastfill_h/1"}


def test_search_by_embedding_and_by_image_with_the_runs_new_model(spark, pipeline_env, mid_run):
    from fastfill_udfs.spark.search import search_job

    cfg, run = mid_run
    q = _query(spark, cfg, read_table(spark, table_paths(cfg).query_features)
               .select("id").orderBy("id").first()["id"])
    by_vec = search_job(cfg, policy="uncertainty", embedding=",".join(map(str, q)), k=5,
                        out=lambda s: None)
    version = by_vec["features_version"]
    assert by_vec["hits"]["id"].tolist() == _exact_hits(spark, cfg, run, version, q, 5)["id"].tolist()

    by_image = search_job(cfg, policy="uncertainty", image=str(IMAGE), k=5, out=lambda s: None)
    from fastfill_udfs.model_loading import load_configured_model
    from fastfill_udfs.preprocess import Preprocess
    from fastfill_udfs.search import embed_image_file

    vec = embed_image_file(IMAGE, load_configured_model(cfg, "new"),
                           Preprocess.from_config(cfg.get_path("models.preprocess")))
    assert by_image["hits"]["id"].tolist() == _exact_hits(spark, cfg, run, version, vec[0],
                                                          5)["id"].tolist()
    other = pipeline_env.make_cfg("srch", "models.new=models:/fastfill_old@current")
    with pytest.raises(QueryModelMismatchError, match=r"models:/fastfill_new/1.*but models.new "
                                                      r"is models:/fastfill_old/1"):
        search_job(other, policy="uncertainty", image=str(IMAGE), out=lambda s: None)


def test_bad_queries_name_what_is_wrong(spark, mid_run):
    from fastfill_udfs.spark.search import search_job

    cfg, run = mid_run
    with pytest.raises(ValueError, match=r"query embedding has dimension 3, but the run's "
                                         r"embeddings .* are 24-d"):
        search_job(cfg, policy="uncertainty", embedding="1,2,3", out=lambda s: None)
    with pytest.raises(ValueError, match="query embedding contains NaN"):
        search_job(cfg, policy="uncertainty", embedding=",".join(["1"] * 23 + ["nan"]),
                   out=lambda s: None)
    with pytest.raises(ValueError, match=r"batch 3 of run 'srch_uncertainty' is not committed; "
                                         r"committed batches: 0, 1"):
        search_job(cfg, policy="uncertainty", embedding="1", batch=3, out=lambda s: None)
    with pytest.raises(ValueError, match="item 'no-such-item' is in neither query_features"):
        search_job(cfg, policy="uncertainty", item_id="no-such-item", out=lambda s: None)
    with pytest.raises(ValueError, match="exactly one query"):
        search_job(cfg, policy="uncertainty", item_id="a", embedding="1", out=lambda s: None)


def test_a_run_without_committed_batches_is_searched_at_batch_0_and_says_so(spark, pipeline_env):
    from fastfill_udfs.spark.jobs import rank_job
    from fastfill_udfs.spark.search import search_job

    cfg = pipeline_env.make_cfg("srch0")
    rank_job(cfg, policy="random")
    printed = []
    result = search_job(cfg, policy="random", embedding=",".join(["0.1"] * 24), k=3,
                        out=printed.append)
    assert result["batch_id"] == 0
    assert any("has no committed backfill batch yet: searching batch 0" in n
               for n in result["notes"])
    assert any("searching batch 0" in line for line in printed)
    assert set(result["hits"]["source"]) == {"transformed"}


def test_export_to_warehouse_and_mlflow_then_load_without_spark(spark, mid_run, tmp_path):
    from fastfill_udfs.spark.search import load_servable, search_job

    cfg, run = mid_run
    built = search_job(cfg, policy="uncertainty", embedding=",".join(["0.2"] * 24), k=6,
                       export="warehouse", out=lambda s: None)
    location = built["location"]
    assert location.endswith(f"runs/{run}/servable_index/batch_0001_v{built['features_version']}")
    served = ServableIndex.load(location, run=run, batch_id=1,
                                features_version=built["features_version"])
    q = np.full(24, 0.2)
    pd.testing.assert_frame_equal(served.search(q, 6).drop(columns="query"),
                                  built["hits"].drop(columns="query"))
    assert served.info["new_model"]["version"] == "models:/fastfill_new/1"
    with pytest.raises(IndexMismatchError, match="run 'srch_uncertainty', not 'srch_random'"):
        ServableIndex.load(location, run="srch_random")
    # the CLI path with a saved index: asked for batch 0, the folder holds batch 1
    with pytest.raises(IndexMismatchError, match="batch_id 1, not 0"):
        search_job(cfg, policy="uncertainty", embedding=",".join(["0.2"] * 24), index=location,
                   batch=0, out=lambda s: None)
    again = search_job(cfg, policy="uncertainty", embedding=",".join(["0.2"] * 24), k=6,
                       index=location, out=lambda s: None)            # latest = batch 1: fine
    assert again["hits"]["id"].tolist() == built["hits"]["id"].tolist()

    to_mlflow = search_job(cfg, policy="uncertainty", embedding=",".join(["0.2"] * 24), k=6,
                           export="mlflow", out=lambda s: None)
    uri = to_mlflow["location"]
    assert uri.startswith("runs:/") and uri.endswith("servable_index/batch_0001_v"
                                                     f"{built['features_version']}")
    from_mlflow = load_servable(None, cfg, uri, run=run, batch_id=1)
    assert from_mlflow.search(q, 6)["id"].tolist() == built["hits"]["id"].tolist()
    with pytest.raises(IndexMismatchError, match="features_version"):
        load_servable(None, cfg, uri, run=run, features_version=0)


def test_cli_exit_codes_and_output(spark, pipeline_env, mid_run, capsys, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "pipelines"))        # its `import _bootstrap`
    spec = importlib.util.spec_from_file_location("search_cli", ROOT / "pipelines" / "search.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    root = pipeline_env.root
    from tests.spark.conftest import TINY

    base = ["--config", "conf/test.yaml", "--set", f"paths.warehouse={root / 'warehouse'}",
            "--set", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            *[a for s in TINY for a in ("--set", s)], "--set", "run_name=srch",
            "--policy", "uncertainty"]
    assert cli.main(base + ["--embedding", ",".join(["0.3"] * 24), "--k", "4"]) == 0
    out = capsys.readouterr().out
    assert "run srch_uncertainty at batch 1" in out and "top-4:" in out
    assert cli.main(base + ["--embedding", "1,2"]) == 2
    assert "error: query embedding has dimension 2" in capsys.readouterr().err
    assert cli.main(base + ["--embedding", "1", "--set", "evaluation.index=annoy"]) == 2
    assert "config error: config key 'evaluation.index' must be one of" in capsys.readouterr().err
    assert cli.main(base + ["--image", str(IMAGE), "--set",
                            "models.new=models:/fastfill_old@current"]) == 4
    assert "refused:" in capsys.readouterr().err


def test_notebook_04_searches_locally(spark, pipeline_env, mid_run, monkeypatch):
    root = pipeline_env.root
    from tests.spark.conftest import TINY

    monkeypatch.setenv("FASTFILL_CONFIG", "conf/test.yaml")
    monkeypatch.setenv("FASTFILL_SET", ";".join([
        f"paths.warehouse={root / 'warehouse'}", f"paths.outputs={root / 'outputs'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", *TINY, "run_name=srch",
        "backfill.policy=uncertainty", "search.topk=4"]))
    monkeypatch.setenv("FASTFILL_SEARCH_BATCH", "1")
    monkeypatch.chdir(ROOT)
    text = (ROOT / "notebooks" / "04_search.py").read_text()
    assert text.startswith("# Databricks notebook source\n") and "notebook_config(" in text
    done = runpy.run_path(str(ROOT / "notebooks" / "04_search.py"), run_name="__main__")
    assert done["result"]["batch_id"] == 1 and len(done["hits"]) == 4
    assert set(done["hits"]["source"]) <= {"new", "transformed"}


def test_batch_rows_read_from_the_merge_commit_equal_delta_time_travel(spark, mid_run):
    from fastfill_udfs.spark.evaluate import _batch_files, read_batch_rows

    cfg, run = mid_run
    path = table_paths(cfg, run).gallery_features
    log = _log(spark, cfg, run)
    v0, v1 = (int(v) for v in log["table_version"])
    files = _batch_files(spark, path, v1, 1)
    assert files and all("planned_batch_id=1" in f for f in files)
    fast, fast_emb = read_batch_rows(spark, path, v1, 1)
    delta = (read_table(spark, path, version=v1).where("planned_batch_id = 1 AND batch_id = 1")
             .toPandas().set_index("id").loc[fast["id"]])
    assert len(fast) == int(log["n_items"].iloc[1]) > 0
    np.testing.assert_array_equal(fast_emb, np.stack(delta["embedding"]).astype(np.float32))
    assert (fast["model_version"].to_numpy() == delta["model_version"].to_numpy()).all()
    # another commit than the batch's MERGE: read through Delta instead (and nothing is new)
    assert _batch_files(spark, path, v0, 1) is None
    slow, slow_emb = read_batch_rows(spark, path, v0, 1)
    assert len(slow) == 0 and slow_emb.shape[0] == 0


def test_approximate_index_logs_recall_per_step_equal_to_our_own_count(spark, pipeline_env):
    """An ivf index probing one list: at every step the logged recall_at_10 equals the share of
    the exported index's approximate top-10 (query excluded) whose exact score, computed here
    from the Delta tables, reaches the exact 10th best (ties in the query's favour)."""
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.spark.jobs import backfill_job, rank_job
    from fastfill_udfs.spark.search import warehouse_location
    from fastfill_udfs.tracking import configure_mlflow

    cfg = pipeline_env.make_cfg("ann", "evaluation.index=ivf", "evaluation.ivf.nlist=6",
                                "evaluation.ivf.nprobe=1", "evaluation.export_index=warehouse")
    run = "ann_uncertainty"
    rank_job(cfg, policy="uncertainty")
    done = backfill_job(cfg, policy="uncertainty", evaluate=True)
    configure_mlflow(cfg)
    client = MlflowClient()
    logged = {m.step: m.value for m in client.get_metric_history(done["mlflow_run_id"],
                                                                 "recall_at_10")}
    log = _log(spark, cfg, run)
    assert sorted(logged) == log["batch_id"].tolist()
    queries = read_table(spark, table_paths(cfg).query_features).toPandas()
    q = np.stack(queries["embedding"]).astype(np.float64)
    recalls = []
    for batch, version in zip(log["batch_id"], log["table_version"]):
        served = ServableIndex.load(warehouse_location(cfg, run, int(batch), int(version)),
                                    run=run, batch_id=int(batch), features_version=int(version))
        feats = read_table(spark, table_paths(cfg, run).gallery_features,
                           version=int(version)).toPandas().set_index("id")
        exact = pd.DataFrame(_exact_scores(q, np.stack(feats["embedding"]),
                                           cfg.get_path("evaluation.distance")),
                             index=queries["id"], columns=feats.index)
        _, keys = served.index.search(np.stack(queries["embedding"]), 11)   # approximate
        ids = served.items["id"].to_numpy(dtype=object)
        per_query = []
        for r, qid in enumerate(queries["id"]):
            row = exact.loc[qid].drop(qid)
            kth = np.sort(row.to_numpy())[::-1][9]
            hits = [ids[k] for k in keys[r] if k >= 0 and ids[k] != qid][:10]
            per_query.append(sum(row[h] >= kth for h in hits) / 10)
        recalls.append(float(np.mean(per_query)))
        assert logged[int(batch)] == pytest.approx(recalls[-1], abs=1e-12), batch
    assert min(recalls) < 1.0                         # one list of six: the index loses hits
    history = client.get_run(done["mlflow_run_id"]).data.metrics
    assert {"recall_at_10_new", "recall_at_10_transformed"} <= set(history)
