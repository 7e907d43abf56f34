"""Nothing dropped silently: non-finite outputs of h are quarantined under every policy, a gallery
whose rows are all quarantined is refused with the count, the new/new reference is computed on
the gallery the curve ranks (so t=1 reaches it with a row quarantined), another new model or an
output of another dimension is refused before any MERGE, a MERGE that does not update exactly
the batch fails, and images of another size or mode are resized or quarantined, never a crash."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pyspark.sql import functions as F

from fastfill_udfs.spark.delta_io import (is_delta_table, latest_version, read_table,
                                          table_paths, write_table)


@pytest.fixture(scope="module")
def models(pipeline_env):
    from fastfill_udfs.model_loading import load_configured_model

    cfg = pipeline_env.make_cfg()
    return load_configured_model(cfg, "h"), load_configured_model(cfg, "new")


def _warehouse_copy(spark, pipeline_env, name: str, transform=lambda df: df, *sets):
    """A fresh warehouse `name` holding transform(the ingested gallery) and the query tables."""
    cfg = pipeline_env.make_cfg(name, *sets, warehouse=pipeline_env.root / name)
    src, dst = table_paths(pipeline_env.make_cfg()), table_paths(cfg)
    write_table(transform(read_table(spark, src.gallery)), dst.gallery)
    for table in ("queries", "query_features"):
        write_table(read_table(spark, getattr(src, table)), getattr(dst, table))
    return cfg


def _quarantine(spark, cfg, stage: str, run: str):
    q = read_table(spark, table_paths(cfg).quarantine).toPandas()
    return q[(q["stage"] == stage) & (q["run"] == run)].set_index("id")["reason"].to_dict()


@pytest.mark.parametrize("policy", ["uncertainty", "random"])
def test_non_finite_outputs_of_h_are_quarantined_under_every_policy(spark, pipeline_env, models,
                                                                    policy):
    from fastfill_udfs.spark.rank import rank_gallery

    h, new = models
    ids = sorted(r["id"] for r in read_table(spark, table_paths(pipeline_env.make_cfg()).gallery)
                 .select("id").limit(10).collect())
    huge = ids[4]                      # finite input, but h's output overflows float32

    def overflow(df):
        return df.withColumn("old_embedding", F.when(
            F.col("id") == huge, F.expr("transform(old_embedding, x -> CAST(3e38 AS FLOAT))"))
            .otherwise(F.col("old_embedding")))

    cfg = _warehouse_copy(spark, pipeline_env, f"overflow_{policy}", overflow)
    run = f"overflow_{policy}_{policy}"
    result = rank_gallery(spark, cfg, h, new, policy, run)
    reasons = _quarantine(spark, cfg, "rank", run)
    assert list(reasons) == [huge] and "h output" in reasons[huge] and "NaN or inf" in reasons[huge]
    assert result["quarantine"] == 1
    feats = read_table(spark, table_paths(cfg, run).gallery_features).toPandas()
    assert huge not in set(feats["id"]) and np.isfinite(np.stack(feats["embedding"])).all()


def test_a_gallery_all_quarantined_is_refused_with_the_count(spark, pipeline_env, models):
    from fastfill_udfs.spark.rank import rank_gallery

    h, new = models
    cfg = _warehouse_copy(spark, pipeline_env, "allbad", lambda df: df.withColumn(
        "old_embedding", F.lit(None).cast("array<float>")))
    n = read_table(spark, table_paths(cfg).gallery).count()
    with pytest.raises(ValueError, match=rf"all {n} rows of the gallery .* were quarantined at "
                                         rf"rank .*{n} x embedding is null"):
        rank_gallery(spark, cfg, h, new, "uncertainty", "allbad_uncertainty")
    assert len(_quarantine(spark, cfg, "rank", "allbad_uncertainty")) == n   # kept, to look at
    paths = table_paths(cfg, "allbad_uncertainty")
    assert not is_delta_table(spark, paths.backfill_log)
    assert not is_delta_table(spark, paths.gallery_features)


def test_new_new_reference_is_the_gallery_the_curve_ranks(spark, pipeline_env, models):
    """With a row quarantined at rank, t=1 is exactly new/new (the reference leaves it out)."""
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.spark.jobs import backfill_job, rank_job
    from fastfill_udfs.tracking import configure_mlflow

    first = read_table(spark, table_paths(pipeline_env.make_cfg()).gallery).orderBy("id").first()
    cfg = _warehouse_copy(spark, pipeline_env, "oneout", lambda df: df.withColumn(
        "old_embedding", F.when(F.col("id") == first["id"], F.lit(None).cast("array<float>"))
        .otherwise(F.col("old_embedding"))))
    rank_job(cfg, policy="random")
    done = backfill_job(cfg, policy="random", evaluate=True)
    configure_mlflow(cfg)
    run = MlflowClient().get_run(done["mlflow_run_id"])
    n_features = read_table(spark, table_paths(cfg, "oneout_random").gallery_features).count()
    n_gallery = read_table(spark, table_paths(cfg).gallery).count()
    assert n_features == n_gallery - 1 and run.data.params["n_gallery"] == str(n_features)
    history = {m.step: m.value for m in MlflowClient().get_metric_history(run.info.run_id, "mAP")}
    assert history[max(history)] == pytest.approx(run.data.metrics["new_new_mAP"], abs=1e-9)
    fraction = MlflowClient().get_metric_history(run.info.run_id, "backfill_fraction")
    assert max(m.value for m in fraction) == pytest.approx(1.0, abs=1e-12)


def test_another_new_model_or_dimension_is_refused_before_any_merge(spark, pipeline_env, models):
    from fastfill_udfs.demo.cnn import EmbeddingCNN
    from fastfill_udfs.model_loading import ModelRef
    from fastfill_udfs.spark.backfill import ModelMismatchError, run_backfill
    from fastfill_udfs.spark.rank import rank_gallery

    h, new = models
    cfg = _warehouse_copy(spark, pipeline_env, "models")
    paths = table_paths(cfg, "models_random")
    rank_gallery(spark, cfg, h, new, "random", "models_random")
    before = latest_version(spark, paths.gallery_features)
    other = ModelRef.from_module(EmbeddingCNN([4], h.model.new_dim, 10), "other-model")
    with pytest.raises(ModelMismatchError, match=r"planned for the new model models:/fastfill_new/1"
                                                 r".*but models.new is other-model:"):
        run_backfill(spark, cfg, other, "models_random")
    # a plan made for a model whose output is not h's dimension: refused at its first batch
    narrow = ModelRef.from_module(EmbeddingCNN([4], h.model.new_dim - 4, 10), "narrow-model")
    rank_gallery(spark, cfg, h, narrow, "random", "models_narrow")
    with pytest.raises(ModelMismatchError, match=rf"outputs {h.model.new_dim - 4}-d embeddings, "
                                                 rf"but run 'models_narrow' .* is "
                                                 rf"{h.model.new_dim}-d; nothing was merged"):
        run_backfill(spark, cfg, narrow, "models_narrow")
    assert latest_version(spark, paths.gallery_features) == before
    narrow_paths = table_paths(cfg, "models_narrow")
    assert read_table(spark, narrow_paths.backfill_log).count() == 1     # batch 0 only


def test_a_merge_that_misses_rows_fails_the_reconciliation(spark, pipeline_env, models,
                                                          monkeypatch):
    from fastfill_udfs.spark import backfill as backfill_mod
    from fastfill_udfs.spark.rank import rank_gallery
    from fastfill_udfs.spark.validation import ReconciliationError

    h, new = models
    cfg = _warehouse_copy(spark, pipeline_env, "lossy")
    rank_gallery(spark, cfg, h, new, "random", "lossy_random")
    real = backfill_mod._merge_batch

    def drops_one(spark_, features, good, *args):
        return real(spark_, features, good.orderBy("id").offset(1), *args)

    monkeypatch.setattr(backfill_mod, "_merge_batch", drops_one)
    with pytest.raises(ReconciliationError, match=r"batch 1 .* the MERGE updated \d+ rows .* but "
                                                  r"\d+ items were embedded"):
        backfill_mod.run_backfill(spark, cfg, new, "lossy_random")
    log = read_table(spark, table_paths(cfg, "lossy_random").backfill_log).toPandas()
    assert log["batch_id"].tolist() == [0]                     # the batch was not logged


def _png(shape, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8),
                    mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_images_of_another_size_or_mode_are_resized_or_quarantined(spark, pipeline_env, models):
    from fastfill_udfs.spark.ingest import embed_images

    _, new = models
    rows = [("gray28", _png((28, 28), "L")), ("rgb40", _png((40, 40, 3), "RGB")),
            ("gray9", _png((9, 13), "L")), ("broken", b"not an image")]
    df = spark.createDataFrame(rows, "id string, image binary")
    resized = {r["id"]: r for r in embed_images(spark, df, new, pipeline_env.make_cfg(), ["id"])
               .collect()}                                     # config: 28 x 28, grayscale
    for item in ("gray28", "rgb40", "gray9"):
        assert resized[item]["reason"] is None and len(resized[item]["embedding"]) == 24, item
    assert "cannot decode" in resized["broken"]["reason"] and resized["broken"]["embedding"] is None

    # kept at their own size: an image the model cannot take (too small for its two 2x2
    # poolings) is quarantined with the reason, the others in its batch are embedded
    cfg = pipeline_env.make_cfg("sizes", "models.preprocess.size=[]")
    mixed = spark.createDataFrame([("ok28", _png((28, 28), "L")), ("ok40", _png((40, 40), "L")),
                                   ("tiny", _png((1, 1), "L"))], "id string, image binary")
    got = {r["id"]: r for r in embed_images(spark, mixed.coalesce(1), new, cfg, ["id"]).collect()}
    assert got["ok28"]["reason"] is None and got["ok40"]["reason"] is None
    assert "cannot embed an image of shape [1, 1, 1]" in got["tiny"]["reason"]
    assert got["tiny"]["embedding"] is None
