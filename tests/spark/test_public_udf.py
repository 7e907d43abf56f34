"""The public UDFs for notebooks and SQL: `transformation_udf` (iterator-of-Series pandas UDF,
registered with spark.udf.register) and `mlflow.pyfunc.spark_udf` on the logged h agree with h
applied in-process; bad rows give null, not a failed query."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def h_logged(tmp_path_factory):
    import mlflow

    from fastfill_udfs.model_loading import register_logged_model
    from fastfill_udfs.model_store import log_model
    from fastfill_udfs.models import Transformation

    root = tmp_path_factory.mktemp("udf")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri exports it to later tests
    mlflow.set_experiment("udf")
    torch.manual_seed(0)
    h = Transformation(5, 3, hidden_dim=16).eval()
    with mlflow.start_run():
        uri = log_model(h, "h")
    register_logged_model(uri, "models:/udf_h@prod", "h")
    return h, "models:/udf_h@prod"


@pytest.fixture(scope="module")
def old_rows(spark):
    rng = np.random.default_rng(0)
    old = rng.standard_normal((40, 5)).astype(np.float32)
    rows = [(f"i{i}", [float(v) for v in old[i]]) for i in range(len(old))]
    rows += [("null", None), ("short", [1.0, 2.0]), ("nan", [float("nan")] * 5)]
    return old, spark.createDataFrame(rows, "id string, old_embedding array<double>")


def test_transformation_udf_in_sql_matches_h(spark, h_logged, old_rows):
    from fastfill_udfs.spark.udfs import transformation_udf
    from fastfill_udfs.training import transform

    h, uri = h_logged
    old, df = old_rows
    spark.udf.register("fastfill_transform", transformation_udf(uri))
    df.createOrReplaceTempView("gallery_rows")
    out = spark.sql("SELECT id, fastfill_transform(old_embedding) AS t FROM gallery_rows")
    got = {r["id"]: r["t"] for r in out.collect()}
    want_emb, want_sigma = transform(h, old)
    for i in range(len(old)):
        t = got[f"i{i}"]
        np.testing.assert_allclose(t["transformed"], want_emb[i], rtol=1e-5, atol=1e-6)
        assert t["sigma"] == pytest.approx(want_sigma[i], rel=1e-5)
    for bad in ("null", "short", "nan"):
        assert got[bad]["transformed"] is None and got[bad]["sigma"] is None, bad


def test_mlflow_spark_udf_on_the_logged_h(spark, h_logged, old_rows):
    import mlflow.pyfunc

    from fastfill_udfs.training import transform

    h, uri = h_logged
    old, df = old_rows
    predict = mlflow.pyfunc.spark_udf(spark, uri, result_type="array<float>", env_manager="local")
    good = df.where("id LIKE 'i%'")
    got = {r["id"]: r["p"] for r in good.select("id", predict("old_embedding").alias("p")).collect()}
    want_emb, want_sigma = transform(h, old)
    for i in range(len(old)):
        row = np.asarray(got[f"i{i}"])
        np.testing.assert_allclose(row[:-1], want_emb[i], rtol=1e-5, atol=1e-6)
        assert row[-1] == pytest.approx(want_sigma[i], rel=1e-5)   # sigma is the last element
