"""The Spark pipeline end to end on a 300-item Fashion-MNIST gallery with tiny trained models:
ingest -> rank_gallery -> backfill (+ MLflow evaluation), resumability after crashes, reruns,
the --max-batches budget, and agreement of the Spark UDFs / logged metrics with the in-process
computations."""
from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest

from fastfill_udfs import policies
from fastfill_udfs.spark.delta_io import (latest_version, quarantine_count, read_table,
                                          table_paths)

from .conftest import BATCH_SIZE, N_BATCHES, N_GALLERY

CURVE_KEYS = ("mAP", "top1", "top5", "backfill_fraction")


# ----------------------------------------------------------------------------- helpers
def _client(cfg):
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.tracking import configure_mlflow

    configure_mlflow(cfg)
    return MlflowClient()


def _history(client, run_id: str, key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in client.get_metric_history(run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return out


def _single_valued(client, run_id: str, key: str) -> dict[int, float]:
    hist = _history(client, run_id, key)
    assert all(len(v) == 1 for v in hist.values()), f"{key} logged twice at a step: {hist}"
    return {step: v[0] for step, v in hist.items()}


def _metric_entry_counts(client, run_id: str) -> dict[str, int]:
    keys = client.get_run(run_id).data.metrics.keys()
    return {k: len(client.get_metric_history(run_id, k)) for k in keys}


def _log(spark, paths) -> pd.DataFrame:
    return read_table(spark, paths.backfill_log).toPandas().sort_values("batch_id").reset_index(
        drop=True)


def _features(spark, paths, version=None) -> pd.DataFrame:
    return read_table(spark, paths.gallery_features, version=version).toPandas()


def _plan(spark, paths) -> pd.DataFrame:
    return read_table(spark, paths.backfill_plan).toPandas().sort_values("rank").reset_index(
        drop=True)


def _versions(spark, paths) -> dict[str, int]:
    return {name: latest_version(spark, getattr(paths, name))
            for name in ("gallery_features", "backfill_log", "backfill_plan", "quarantine")}


# ----------------------------------------------------------------------------- 1. end to end
def test_end_to_end_tables_log_and_mlflow_run(spark, pipeline_env, e2e_run):
    cfg, run = e2e_run["cfg"], e2e_run["run"]
    paths = table_paths(cfg, run)
    assert pipeline_env.ingest_counts["gallery"] == N_GALLERY
    assert pipeline_env.ingest_counts["quarantine"] == 0
    assert e2e_run["ranked"]["skipped"] is False
    assert e2e_run["backfilled"]["committed_now"] == list(range(1, N_BATCHES + 1))

    # row counts reconcile across gallery, plan, features and quarantine
    n_gallery = read_table(spark, paths.gallery).count()
    n_quarantined = quarantine_count(spark, paths.quarantine, "rank", run)
    plan, feats = _plan(spark, paths), _features(spark, paths)
    assert n_gallery == N_GALLERY and n_quarantined == 0
    assert len(plan) + n_quarantined == n_gallery == len(feats)
    assert feats["id"].is_unique and set(feats["id"]) == set(plan["id"])

    # fully backfilled: every row 'new', tagged with the batch the plan put it in
    assert (feats["source"] == "new").all()
    joined = feats.merge(plan, on="id", suffixes=("_f", "_p"))
    assert (joined["batch_id_f"] == joined["batch_id_p"]).all()
    assert feats["updated_at"].notna().all()
    assert plan.groupby("batch_id").size().to_dict() == {b: BATCH_SIZE
                                                         for b in range(1, N_BATCHES + 1)}

    # the log: batch 0 (all transformed) then one row per batch, versions increasing
    log = _log(spark, paths)
    assert log["batch_id"].tolist() == list(range(N_BATCHES + 1))
    assert log["n_items"].tolist() == [0] + [BATCH_SIZE] * N_BATCHES   # batch 0: none new yet
    versions = log["table_version"].tolist()
    assert all(a < b for a, b in zip(versions, versions[1:])), versions
    assert versions[-1] == latest_version(spark, paths.gallery_features)
    assert (log["started_at"] <= log["finished_at"]).all()

    # the plan is partitioned by batch_id and carries the images; the features by planned batch
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{paths.backfill_plan}`").first()
    assert list(detail["partitionColumns"]) == ["batch_id"]
    assert "image" in plan.columns
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{paths.gallery_features}`").first()
    assert list(detail["partitionColumns"]) == ["planned_batch_id"]
    assert (joined["planned_batch_id"] == joined["batch_id_p"]).all()
    # every vector names the model that made it: all new, all by the registered new model
    assert set(feats["model_version"]) == {"models:/fastfill_new/1"}

    # MLflow: curve metrics at steps 0..B, AUCs, curve artifacts and the tables' paths
    client = _client(cfg)
    run_id = e2e_run["backfilled"]["mlflow_run_id"]
    curve = {k: _single_valued(client, run_id, k) for k in CURVE_KEYS}
    for key, by_step in curve.items():
        assert sorted(by_step) == list(range(N_BATCHES + 1)), key
    fractions = [curve["backfill_fraction"][s] for s in range(N_BATCHES + 1)]
    assert fractions == pytest.approx(np.arange(N_BATCHES + 1) / N_BATCHES, abs=1e-12)

    logged = client.get_run(run_id).data
    aucs = e2e_run["backfilled"]["aucs"]
    assert aucs["mAP_auc"] == pytest.approx(logged.metrics["mAP_auc"], abs=1e-12)
    assert aucs["top1_auc"] == pytest.approx(logged.metrics["top1_auc"], abs=1e-12)
    maps = [curve["mAP"][s] for s in range(N_BATCHES + 1)]
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    assert logged.metrics["mAP_auc"] == pytest.approx(trapezoid(maps, fractions), abs=1e-9)
    # all backfilled: the gallery holds exactly the new model's embeddings -> new/new
    assert curve["mAP"][N_BATCHES] == pytest.approx(logged.metrics["new_new_mAP"], abs=1e-6)
    assert curve["top1"][N_BATCHES] == pytest.approx(logged.metrics["new_new_top1"], abs=1e-6)

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"curve.csv", "curve.png"} <= artifacts
    csv = pd.read_csv(client.download_artifacts(run_id, "curve.csv",
                                                str(pipeline_env.root / "dl")))
    assert csv["step"].tolist() == list(range(N_BATCHES + 1))
    assert csv["mAP"].tolist() == pytest.approx(maps, abs=1e-12)

    params = logged.params
    assert params["policy"] == "uncertainty" and params["run"] == run
    assert params["gallery_table"] == paths.gallery
    assert params["query_features_table"] == paths.query_features
    assert params["features_table"] == paths.gallery_features
    assert params["log_table"] == paths.backfill_log
    assert params["plan_table"] == paths.backfill_plan
    assert params["backfill_batch_size"] == str(BATCH_SIZE)
    assert params["n_gallery"] == str(N_GALLERY)
    assert params["model_new"] == "models:/fastfill_new/1"
    assert params["model_new_uri"] == "models:/fastfill_new@current"
    assert params["model_h"] == "models:/fastfill_h/1"


# ----------------------------------------------------------------------------- 2. UDF == in-process
def test_rank_udf_matches_in_process_transform_and_batching(spark, e2e_run):
    from fastfill_udfs.model_loading import load_configured_model
    from fastfill_udfs.training import transform

    cfg, run = e2e_run["cfg"], e2e_run["run"]
    paths = table_paths(cfg, run)
    h = load_configured_model(cfg, "h").model
    gallery = read_table(spark, paths.gallery).select("id", "old_embedding").toPandas()
    gallery = gallery.sort_values("id").reset_index(drop=True)
    old = np.stack(gallery["old_embedding"]).astype(np.float32)
    expected_emb, expected_sigma = transform(h, old)

    v0 = int(_log(spark, paths).loc[0, "table_version"])
    feats0 = _features(spark, paths, version=v0).set_index("id").loc[gallery["id"]]
    assert (feats0["source"] == "transformed").all() and feats0["batch_id"].isna().all()
    assert set(feats0["model_version"]) == {"models:/fastfill_h/1"}
    np.testing.assert_allclose(np.stack(feats0["embedding"]), expected_emb, rtol=1e-5, atol=1e-5)

    plan = _plan(spark, paths)
    by_id = plan.set_index("id").loc[gallery["id"]]
    np.testing.assert_allclose(by_id["score"].to_numpy(), expected_sigma, rtol=1e-5, atol=1e-7)
    assert np.all(expected_sigma > 0) and np.ptp(expected_sigma) > 0   # a real uncertainty order

    # ranks 0..N-1 in (score desc, id asc) order, batches as policies cuts them
    assert plan["rank"].tolist() == list(range(N_GALLERY))
    order = policies.rank_order(plan["score"].to_numpy(), plan["id"].to_numpy(dtype=str))
    assert order.tolist() == list(range(N_GALLERY))
    assert (np.diff(plan["score"].to_numpy()) <= 0).all()
    np.testing.assert_array_equal(plan["batch_id"].to_numpy(),
                                  policies.assign_batches(N_GALLERY, batch_size=BATCH_SIZE))


# ----------------------------------------------------------------------------- 7. metrics traceable
def test_logged_metrics_recompute_from_delta_time_travel(spark, e2e_run):
    """Each logged step is reproducible from gallery_features as of the version the log
    recorded, by evaluation.distance: exactly (1e-9) from the float32 vectors as the
    evaluator's faiss shards hold them (for cosine L2-normalised in float32) (the evaluation searches the shards and certifies its
    mAP within evaluation.ap_tolerance of float64), and to the design's 1e-6 from the raw
    float32 vectors with a float64 normalisation (near-ties ~1e-7 apart may order
    differently)."""
    import faiss

    from fastfill_udfs.metrics import retrieval_metrics

    cfg, run = e2e_run["cfg"], e2e_run["run"]
    distance = cfg.get_path("evaluation.distance")   # l2 (raw float32 vectors) or cosine
    paths = table_paths(cfg, run)
    client = _client(cfg)
    run_id = e2e_run["backfilled"]["mlflow_run_id"]
    labels = read_table(spark, paths.gallery).select("id", "label").toPandas().set_index("id")
    queries = read_table(spark, paths.query_features).toPandas().sort_values("id")
    q_emb = np.stack(queries["embedding"]).astype(np.float32)
    q_lab, q_ids = queries["label"].to_numpy(), queries["id"].to_numpy()
    footwear = queries["subgroup"].to_numpy() == "footwear"
    assert 0 < footwear.sum() < len(queries)
    plan = _plan(spark, paths).set_index("id")
    log = _log(spark, paths)
    curve = {k: _single_valued(client, run_id, k) for k in CURVE_KEYS + ("mAP_footwear",)}
    for step in (0, 1, N_BATCHES):
        version = int(log.loc[log["batch_id"] == step, "table_version"].iloc[0])
        feats = _features(spark, paths, version=version)
        # the logged version holds exactly batches 1..step as 'new'
        new_ids = set(feats.loc[feats["source"] == "new", "id"])
        assert new_ids == set(plan.index[plan["batch_id"] <= step])
        assert curve["backfill_fraction"][step] == pytest.approx(len(new_ids) / len(feats),
                                                                 abs=1e-12)
        raw = np.stack(feats["embedding"]).astype(np.float32)
        stored = raw.copy()
        if distance == "cosine":
            faiss.normalize_L2(stored)
        g_lab, g_ids = labels.loc[feats["id"], "label"].to_numpy(), feats["id"].to_numpy()
        for g_emb, tol in ((stored, 1e-9), (raw, 1e-6)):
            m = retrieval_metrics(q_emb, q_lab, g_emb, g_lab, query_ids=q_ids, gallery_ids=g_ids,
                                  topk=(1, 5), distance=distance)
            for key in ("mAP", "top1", "top5"):
                assert curve[key][step] == pytest.approx(m[key], abs=tol), (step, key, tol)
            sub = retrieval_metrics(q_emb[footwear], q_lab[footwear], g_emb, g_lab,
                                    query_ids=q_ids[footwear], gallery_ids=g_ids, topk=(1, 5),
                                    distance=distance)
            assert curve["mAP_footwear"][step] == pytest.approx(sub["mAP"], abs=tol), (step, tol)


def test_evaluation_steps_incremental_equal_full_builds_and_reconcile(spark, e2e_run):
    """A step evaluated after its predecessor (shards updated with the batch's rows, read from
    its MERGE commit) gives the same metrics as the step evaluated alone (shards built from the
    table at that version); a count of new items that disagrees with the log stops the step."""
    from fastfill_udfs.spark.evaluate import RunEvaluator, run_log
    from fastfill_udfs.spark.validation import ReconciliationError

    cfg, run = e2e_run["cfg"], e2e_run["run"]
    log = run_log(spark, cfg, run)
    chained = RunEvaluator(spark, cfg, run)
    for row in log.itertuples():
        step = chained.evaluate_step(int(row.batch_id), int(row.table_version),
                                     int(row.n_backfilled))
        alone = RunEvaluator(spark, cfg, run, queries=chained.queries).evaluate_step(
            int(row.batch_id), int(row.table_version), int(row.n_backfilled))
        assert step == pytest.approx(alone, abs=1e-12), row.batch_id
        assert chained.index.ntotal == N_GALLERY
    served = chained.servable()
    assert served.info["batch_id"] == N_BATCHES and set(served.items["source"]) == {"new"}
    last = log.iloc[-1]
    with pytest.raises(ReconciliationError, match=rf"holds {N_GALLERY} new items, "
                                                  rf"backfill_log says {N_GALLERY - 1}"):
        RunEvaluator(spark, cfg, run, queries=chained.queries).evaluate_step(
            int(last["batch_id"]), int(last["table_version"]), N_GALLERY - 1)


def test_subgroup_gap_and_shortfall_are_logged_per_step(e2e_run):
    """gap = majority minus minority (as named in data.subgroups); shortfall = a subgroup's own
    new/new level minus its current value, for top1 and mAP, at every step."""
    client = _client(e2e_run["cfg"])
    run_id = e2e_run["backfilled"]["mlflow_run_id"]
    for metric in ("top1", "mAP"):
        value = {g: _single_valued(client, run_id, f"{metric}_{g}") for g in ("footwear", "rest")}
        gap = _single_valued(client, run_id, f"{metric}_gap")
        assert sorted(gap) == list(range(N_BATCHES + 1))
        for step in gap:
            assert gap[step] == pytest.approx(value["rest"][step] - value["footwear"][step],
                                              abs=1e-12)
        for g in ("footwear", "rest"):
            level = _single_valued(client, run_id, f"new_new_{metric}_{g}")[0]
            shortfall = _single_valued(client, run_id, f"{metric}_shortfall_{g}")
            assert {s: level - value[g][s] for s in value[g]} == pytest.approx(shortfall,
                                                                               abs=1e-12)


def test_compare_writes_the_subgroup_report_from_the_logged_curves(spark, e2e_run, tmp_path):
    from fastfill_udfs.compare import compare_runs
    from fastfill_udfs.subgroups import fraction_to_close

    cfg, run = e2e_run["cfg"], e2e_run["run"]
    client = _client(cfg)
    run_id = e2e_run["backfilled"]["mlflow_run_id"]
    table, _ = compare_runs(cfg, run_prefix="e2e", out_dir=tmp_path)
    assert (tmp_path / "subgroups.png").stat().st_size > 0
    assert "footwear_share_first_10pct" in (tmp_path / "subgroups.md").read_text()
    report = pd.read_csv(tmp_path / "subgroups.csv").set_index("run")
    row = report.loc[run]
    assert row["policy"] == "uncertainty"
    fraction = _single_valued(client, run_id, "backfill_fraction")
    shortfall = _single_valued(client, run_id, "top1_shortfall_footwear")
    steps = sorted(fraction)
    expected = fraction_to_close([fraction[s] for s in steps], [shortfall[s] for s in steps])
    if expected is None:
        assert pd.isna(row["fraction_to_close_1pt_top1"])
    else:
        assert row["fraction_to_close_1pt_top1"] == pytest.approx(expected)
    # the minority's share of the first 10% of the plan, from the Delta tables
    paths = table_paths(cfg, run)
    plan = _plan(spark, paths).sort_values("rank")
    subgroup = read_table(spark, paths.gallery).select("id", "subgroup").toPandas().set_index("id")
    head = plan["id"].iloc[:max(1, round(0.1 * len(plan)))]
    share = float((subgroup.loc[head, "subgroup"] == "footwear").mean())
    assert row["footwear_share_first_10pct"] == pytest.approx(share)


def test_forced_rerank_starts_a_fresh_mlflow_run_and_a_crash_leaves_it_unranked(
        spark, pipeline_env, monkeypatch):
    """rank --force resets the run: its backfill starts over from batch 1 and logs into a new
    MLflow run (the old curve belonged to the old plan); a re-rank that dies half-way leaves
    the run unranked, so a plain rerun ranks it afresh."""
    from fastfill_udfs.compare import find_runs
    from fastfill_udfs.spark import rank as rank_mod
    from fastfill_udfs.spark.jobs import backfill_job, rank_job

    cfg = pipeline_env.make_cfg("rerank")
    paths = table_paths(cfg, "rerank_random")
    client = _client(cfg)
    rank_job(cfg, policy="random")
    first = backfill_job(cfg, policy="random", evaluate=True)
    assert first["committed_now"] == list(range(1, N_BATCHES + 1))

    @contextlib.contextmanager
    def dies(_):
        raise RuntimeError("killed while ranking")
        yield  # pragma: no cover

    monkeypatch.setattr(rank_mod, "assign_ranks", dies)
    with pytest.raises(RuntimeError, match="killed while ranking"):
        rank_job(cfg, policy="random", force=True)
    monkeypatch.undo()
    assert not rank_mod.is_ranked(spark, cfg, "rerank_random")
    assert rank_job(cfg, policy="random")["skipped"] is False    # no --force needed now
    assert _log(spark, paths)["batch_id"].tolist() == [0]

    second = backfill_job(cfg, policy="random", evaluate=True)
    assert second["committed_now"] == list(range(1, N_BATCHES + 1))
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    assert sorted(_single_valued(client, second["mlflow_run_id"], "mAP")) == \
        list(range(N_BATCHES + 1))                                  # each step logged once
    runs = find_runs(cfg, run_prefix="rerank")
    assert runs["run"].tolist() == ["rerank_random"]
    assert runs["mlflow_run_id"].tolist() == [second["mlflow_run_id"]]


# ----------------------------------------------------------------------------- 4. rerun is a no-op
def test_rerun_of_completed_run_changes_nothing(spark, e2e_run):
    from fastfill_udfs.spark.jobs import backfill_job, evaluate_job, rank_job

    cfg, run = e2e_run["cfg"], e2e_run["run"]
    paths = table_paths(cfg, run)
    client = _client(cfg)
    run_id = e2e_run["backfilled"]["mlflow_run_id"]
    versions = _versions(spark, paths)
    entries = _metric_entry_counts(client, run_id)
    artifacts = {a.path: a.file_size for a in client.list_artifacts(run_id)}

    assert rank_job(cfg, policy="uncertainty") == {"skipped": True}
    again = backfill_job(cfg, policy="uncertainty", evaluate=True)
    assert again["committed_now"] == [] and again["mlflow_run_id"] == run_id
    assert again["aucs"]["mAP_auc"] == pytest.approx(e2e_run["backfilled"]["aucs"]["mAP_auc"],
                                                     abs=1e-12)
    assert evaluate_job(cfg, policy="uncertainty")["steps_evaluated"] == 0

    assert _versions(spark, paths) == versions
    assert _metric_entry_counts(client, run_id) == entries
    assert {a.path: a.file_size for a in client.list_artifacts(run_id)} == artifacts


# ----------------------------------------------------------------------------- 3. crashes
def test_budget_crashes_and_resume_match_uninterrupted_run(spark, pipeline_env, e2e_run,
                                                           monkeypatch):
    """One run through everything that interrupts a backfill: a --max-batches budget, a worker
    crash inside batch 2's inference, a driver crash between batch 2's MERGE and its log row,
    then resumption (with and without a budget) to the same curve as the uninterrupted run."""
    from fastfill_udfs.spark import backfill as backfill_mod
    from fastfill_udfs.spark.jobs import backfill_job, rank_job

    cfg = pipeline_env.make_cfg("crash")
    run = "crash_uncertainty"
    paths = table_paths(cfg, run)
    rank_job(cfg, policy="uncertainty")
    plan = _plan(spark, paths)
    batch_ids = {b: set(plan.loc[plan["batch_id"] == b, "id"]) for b in range(1, N_BATCHES + 1)}

    def new_ids():
        feats = _features(spark, paths)
        return set(feats.loc[feats["source"] == "new", "id"])

    # (1) a budget of one batch commits exactly batch 1
    first = backfill_job(cfg, policy="uncertainty", max_batches=1, evaluate=True)
    assert first["committed_now"] == [1] and first["aucs"] is None   # incomplete: no AUC yet
    assert _log(spark, paths)["batch_id"].tolist() == [0, 1]
    assert new_ids() == batch_ids[1]

    # (2) a worker fails while embedding batch 2: nothing of batch 2 is committed
    real_embed = backfill_mod.embed_images

    doomed = frozenset(batch_ids[2])

    def crash_on_doomed_ids(batches):  # runs on the workers (pickled by value)
        for batch in batches:
            if doomed.intersection(batch.column("id").to_pylist()):
                raise RuntimeError("simulated inference crash")
            yield batch

    def crashing_embed(spark_, df, model, cfg_, keep):
        out = real_embed(spark_, df, model, cfg_, keep)
        return out.mapInArrow(crash_on_doomed_ids, out.schema)

    monkeypatch.setattr(backfill_mod, "embed_images", crashing_embed)
    version_before = latest_version(spark, paths.gallery_features)
    with pytest.raises(Exception, match="simulated inference crash"):
        backfill_job(cfg, policy="uncertainty", evaluate=False)
    monkeypatch.undo()
    assert _log(spark, paths)["batch_id"].tolist() == [0, 1]
    assert latest_version(spark, paths.gallery_features) == version_before
    assert new_ids() == batch_ids[1]
    assert not (_features(spark, paths)["batch_id"] == 2).any()

    # (3) the driver dies after batch 2's MERGE, before its log row: the log lacks batch 2
    real_append = backfill_mod.append_log_row

    def crash_on_2(spark_, path, batch_id, *args):
        if batch_id == 2:
            raise RuntimeError("simulated crash after merge")
        return real_append(spark_, path, batch_id, *args)

    monkeypatch.setattr(backfill_mod, "append_log_row", crash_on_2)
    with pytest.raises(RuntimeError, match="simulated crash after merge"):
        backfill_job(cfg, policy="uncertainty", evaluate=False)
    monkeypatch.undo()
    log = _log(spark, paths)
    assert log["batch_id"].tolist() == [0, 1]
    merged_at = latest_version(spark, paths.gallery_features)
    assert merged_at > log["table_version"].max()
    assert new_ids() == batch_ids[1] | batch_ids[2]          # merged, but not logged

    # (4) resume with the budget from the config: logs batch 2 as merged, without merging again
    again = backfill_job(pipeline_env.make_cfg("crash", "backfill.max_batches=1"),
                         policy="uncertainty", evaluate=True)
    assert again["committed_now"] == [2]
    log = _log(spark, paths)
    assert log["batch_id"].tolist() == [0, 1, 2]
    assert log["table_version"].iloc[-1] == merged_at == latest_version(
        spark, paths.gallery_features)

    # (5) resume without a budget: finishes
    done = backfill_job(cfg, policy="uncertainty", evaluate=True)
    assert done["committed_now"] == [3]
    log = _log(spark, paths)
    assert log["batch_id"].tolist() == list(range(N_BATCHES + 1))
    assert log["table_version"].is_monotonic_increasing and log["table_version"].is_unique
    feats = _features(spark, paths)
    assert len(feats) == N_GALLERY and feats["id"].is_unique
    assert (feats["source"] == "new").all()
    joined = feats.merge(plan, on="id", suffixes=("_f", "_p"))
    assert (joined["batch_id_f"] == joined["batch_id_p"]).all()

    # same curve and AUCs as the uninterrupted run with the same policy, one entry per step
    client = _client(cfg)
    reference = e2e_run["backfilled"]
    assert done["mlflow_run_id"] == first["mlflow_run_id"] != reference["mlflow_run_id"]
    for key in ("mAP", "top1", "backfill_fraction"):
        got = _single_valued(client, done["mlflow_run_id"], key)
        want = _single_valued(client, reference["mlflow_run_id"], key)
        assert sorted(got) == list(range(N_BATCHES + 1))
        assert got == pytest.approx(want, abs=1e-9), key
    assert done["aucs"]["mAP_auc"] == pytest.approx(reference["aucs"]["mAP_auc"], abs=1e-9)
    assert done["aucs"]["top1_auc"] == pytest.approx(reference["aucs"]["top1_auc"], abs=1e-9)
