"""Bad input: broken embeddings are quarantined with a reason and counts reconcile; duplicate
ids, an empty gallery, a mismatched h, an undecodable image, a bad policy and an unranked run
fail with errors that say what is wrong."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from fastfill_udfs import policies
from fastfill_udfs.spark.delta_io import (TableNotFoundError, is_delta_table, read_table,
                                          table_paths, write_table)

from .conftest import BATCH_SIZE, N_GALLERY

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def h_model(pipeline_env):
    from fastfill_udfs.model_loading import load_configured_model

    return load_configured_model(pipeline_env.make_cfg(), "h")


@pytest.fixture(scope="module")
def new_model(pipeline_env):
    from fastfill_udfs.model_loading import load_configured_model

    return load_configured_model(pipeline_env.make_cfg(), "new")


def _gallery_copy(spark, pipeline_env, name: str, transform):
    """Write transform(ingested gallery) as the gallery of a fresh warehouse `name`."""
    warehouse = pipeline_env.root / name
    cfg = pipeline_env.make_cfg(name, warehouse=warehouse)
    source = read_table(spark, table_paths(pipeline_env.make_cfg()).gallery)
    write_table(transform(source), table_paths(cfg).gallery)
    return cfg


def test_broken_embeddings_are_quarantined_and_counts_reconcile(spark, pipeline_env, h_model,
                                                                new_model):
    from fastfill_udfs.spark.rank import rank_gallery

    ids = sorted(r["id"] for r in read_table(spark, table_paths(pipeline_env.make_cfg()).gallery)
                 .select("id").limit(40).collect())
    nan_id, inf_id, short_id, long_id, null_id = ids[3], ids[11], ids[17], ids[23], ids[31]
    dim = h_model.model.old_dim

    def corrupt(df):
        emb = F.col("old_embedding")
        nan = "transform(old_embedding, (x, i) -> IF(i = 2, CAST('NaN' AS FLOAT), x))"
        inf = "transform(old_embedding, (x, i) -> IF(i = 0, CAST('-Infinity' AS FLOAT), x))"
        bad = (F.when(F.col("id") == nan_id, F.expr(nan))
               .when(F.col("id") == inf_id, F.expr(inf))
               .when(F.col("id") == short_id, F.slice(emb, 1, dim - 3))
               .when(F.col("id") == long_id, F.concat(emb, F.array(F.lit(1.0).cast("float"))))
               .when(F.col("id") == null_id, F.lit(None).cast("array<float>"))
               .otherwise(emb))
        return df.withColumn("old_embedding", bad)

    cfg = _gallery_copy(spark, pipeline_env, "badrows", corrupt)
    run = "badrows_random"
    paths = table_paths(cfg, run)
    result = rank_gallery(spark, cfg, h_model, new_model, "random", run)

    quarantine = read_table(spark, paths.quarantine).toPandas().set_index("id")
    assert sorted(quarantine.index) == sorted([nan_id, inf_id, short_id, long_id, null_id])
    assert (quarantine["stage"] == "rank").all() and (quarantine["run"] == run).all()
    assert quarantine["detected_at"].notna().all()
    reasons = quarantine["reason"]
    assert "NaN or inf" in reasons[nan_id] and "NaN or inf" in reasons[inf_id]
    assert f"dimension {dim - 3}" in reasons[short_id] and f"expected {dim}" in reasons[short_id]
    assert f"dimension {dim + 1}" in reasons[long_id]
    assert "null" in reasons[null_id]

    plan = read_table(spark, paths.backfill_plan).toPandas()
    feats = read_table(spark, paths.gallery_features).toPandas()
    bad = set(quarantine.index)
    assert not bad & set(plan["id"]) and not bad & set(feats["id"])
    n_good = N_GALLERY - len(bad)
    assert result["gallery"] == N_GALLERY and result["quarantine"] == len(bad)
    assert len(plan) == len(feats) == result["backfill_plan"] == n_good
    assert sorted(plan["rank"]) == list(range(n_good))
    assert np.isfinite(np.stack(feats["embedding"])).all()
    # random policy: scores depend only on (id, seed), not on the partitioning
    np.testing.assert_array_equal(
        plan["score"].to_numpy(),
        policies.random_scores_for_ids(plan["id"].to_numpy(dtype=str), cfg.get_path("seed")))
    sizes = plan.groupby("batch_id").size()
    assert sizes.to_dict() == {1: BATCH_SIZE, 2: BATCH_SIZE, 3: n_good - 2 * BATCH_SIZE}
    log = read_table(spark, paths.backfill_log).toPandas()
    assert log["batch_id"].tolist() == [0] and log["n_items"].tolist() == [0]  # none new yet


def test_duplicate_ids_are_named(spark, pipeline_env, h_model, new_model):
    from fastfill_udfs.spark.rank import rank_gallery

    gallery = read_table(spark, table_paths(pipeline_env.make_cfg()).gallery)
    dupe = gallery.orderBy("id").first()["id"]
    cfg = _gallery_copy(spark, pipeline_env, "dupes",
                        lambda df: df.unionByName(df.where(F.col("id") == dupe)))
    run = "dupes_uncertainty"
    with pytest.raises(ValueError, match=f"duplicated ids.*{dupe}"):
        rank_gallery(spark, cfg, h_model, new_model, "uncertainty", run)
    assert not is_delta_table(spark, table_paths(cfg, run).backfill_log)


def test_empty_gallery_is_an_error(spark, pipeline_env, h_model, new_model):
    from fastfill_udfs.spark.rank import rank_gallery

    cfg = _gallery_copy(spark, pipeline_env, "empty", lambda df: df.limit(0))
    run = "empty_uncertainty"
    with pytest.raises(ValueError, match="empty"):
        rank_gallery(spark, cfg, h_model, new_model, "uncertainty", run)
    assert not is_delta_table(spark, table_paths(cfg, run).backfill_plan)


def test_h_with_other_old_dim_names_both_dims(spark, pipeline_env, h_model, new_model):
    from fastfill_udfs.models import Transformation
    from fastfill_udfs.spark.rank import rank_gallery

    from fastfill_udfs.model_loading import ModelRef

    h = h_model.model
    wrong = ModelRef.from_module(Transformation(old_dim=h.old_dim + 5, new_dim=h.new_dim,
                                                hidden_dim=8))
    cfg = pipeline_env.make_cfg("dimcheck")
    with pytest.raises(ValueError) as err:
        rank_gallery(spark, cfg, wrong, new_model, "uncertainty", "dimcheck_uncertainty")
    msg = str(err.value)
    assert f"dimension {h.old_dim + 5}" in msg and f"dimension {h.old_dim} " in msg
    assert not is_delta_table(spark, table_paths(cfg, "dimcheck_uncertainty").backfill_log)


def test_bad_policies_and_unranked_run(spark, pipeline_env, h_model, new_model):
    from fastfill_udfs.spark.backfill import run_backfill
    from fastfill_udfs.spark.jobs import backfill_job
    from fastfill_udfs.spark.rank import rank_gallery

    cfg = pipeline_env.make_cfg("policies")
    with pytest.raises(ValueError, match="oracle"):
        rank_gallery(spark, cfg, h_model, new_model, "oracle", "policies_oracle")
    with pytest.raises(ValueError, match="bogus"):
        rank_gallery(spark, cfg, h_model, new_model, "bogus", "policies_bogus")
    from fastfill_udfs.model_loading import ModelRef
    from fastfill_udfs.models import Transformation

    fct = ModelRef.from_module(Transformation(h_model.model.old_dim, h_model.model.new_dim,
                                              hidden_dim=8, uncertainty=False))
    with pytest.raises(ValueError, match="uncertainty"):
        rank_gallery(spark, cfg, fct, new_model, "uncertainty", "policies_uncertainty")

    with pytest.raises(TableNotFoundError, match="rank_gallery"):
        run_backfill(spark, cfg, new_model, "never_ranked")
    with pytest.raises(TableNotFoundError, match="rank_gallery"):
        backfill_job(cfg, policy="random", evaluate=False)
    for name in ("backfill_plan", "gallery_features", "backfill_log"):
        for run in ("policies_oracle", "policies_bogus", "policies_uncertainty", "policies_random"):
            assert not is_delta_table(spark, getattr(table_paths(cfg, run), name))


def test_undecodable_image_quarantined_at_ingest(spark, pipeline_env):
    from fastfill_udfs.spark.jobs import ingest_job

    warehouse = pipeline_env.root / "imgfolder"
    cfg = pipeline_env.make_cfg("imgfolder", "data.dataset=image_folder",
                                f"data.image_folder={ROOT / 'tests' / 'data' / 'image_folder'}",
                                "data.train_fraction=0", warehouse=warehouse)
    counts = ingest_job(cfg)
    assert counts == {"source": 5, "gallery": 4, "quarantine": 1, "query_source": 4,
                      "queries": 4, "query_features": 4, "query_quarantine": 0}
    paths = table_paths(cfg)
    quarantine = read_table(spark, paths.quarantine).toPandas()
    assert quarantine["id"].tolist() == ["trouser/corrupt.png"]
    assert quarantine["stage"].tolist() == ["ingest"] and quarantine["run"].isna().all()
    assert "decode" in quarantine["reason"].iloc[0]
    gallery = read_table(spark, paths.gallery).toPandas()
    assert sorted(gallery["id"]) == ["ankle_boot/t10k_00000.png", "ankle_boot/t10k_00023.png",
                                     "trouser/t10k_00002.png", "trouser/t10k_00003.png"]
    assert gallery.set_index("id")["label"].to_dict()["trouser/t10k_00002.png"] == 1
    dims = {len(e) for e in gallery["old_embedding"]}
    assert dims == {16}
    feats = read_table(spark, paths.query_features).toPandas()
    assert {len(e) for e in feats["embedding"]} == {24}
    assert set(feats["id"]) == set(gallery["id"])


def test_stale_ranking_after_a_new_ingest_or_another_h_is_refused(spark, pipeline_env, h_model,
                                                                  new_model):
    """A plan ranked on gallery version v with h k is stale once the gallery is rewritten (a new
    ingest) or h changes: rank (without --force) and backfill refuse it and name the versions."""
    from fastfill_udfs.model_loading import ModelRef
    from fastfill_udfs.models import Transformation
    from fastfill_udfs.spark.backfill import run_backfill
    from fastfill_udfs.spark.jobs import _tracker
    from fastfill_udfs.spark.rank import StaleRankingError, rank_gallery

    cfg = _gallery_copy(spark, pipeline_env, "stale", lambda df: df)
    run = "stale_random"
    assert rank_gallery(spark, cfg, h_model, new_model, "random", run)["skipped"] is False
    assert rank_gallery(spark, cfg, h_model, new_model, "random", run) == {"skipped": True}

    other_h = ModelRef.from_module(Transformation(h_model.model.old_dim, h_model.model.new_dim,
                                                  hidden_dim=8, num_hidden_layers=1))
    with pytest.raises(StaleRankingError, match=r"models.h is in-memory:\w+ \(weights \w+\), "
                                                r"the plan was ranked with models:/fastfill_h/1"):
        rank_gallery(spark, cfg, other_h, new_model, "random", run)

    gallery = table_paths(cfg).gallery
    write_table(read_table(spark, gallery), gallery)           # a re-ingest: version 0 -> 1
    with pytest.raises(StaleRankingError, match="gallery table is at version 1, the plan was "
                                                "ranked on version 0.*--force"):
        rank_gallery(spark, cfg, h_model, new_model, "random", run)
    with pytest.raises(StaleRankingError, match="version 1"):
        run_backfill(spark, cfg, new_model, run)
    with pytest.raises(StaleRankingError, match="version 1"):
        _tracker(spark, cfg, "random")                         # evaluation refuses it too
    assert rank_gallery(spark, cfg, h_model, new_model, "random", run, force=True)["skipped"] is False
    assert rank_gallery(spark, cfg, h_model, new_model, "random", run) == {"skipped": True}
