"""Shared fixtures: one Delta-enabled SparkSession for the whole test run, small configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Every JVM the tests start (this session's, each spark-submit's) runs a few small jobs and
# ends: the C1 compiler alone and the serial collector spend less CPU on a 2-core machine than
# the C2 compiles and parallel GC threads it would never profit from (a small pipeline in a
# fresh session: 541 and 524 s against 645 and 984 s, alternating, on the busy machine). The
# JIT changes no result. SPARK_SUBMIT_OPTS reaches the driver JVM of pyspark's launcher and
# of spark-submit (client mode); a value the caller set is kept.
os.environ.setdefault("SPARK_SUBMIT_OPTS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")


def _fashion_mnist_dir() -> Path:
    from fastfill_udfs.config import load_config

    return Path(load_config([]).get_path("data.fashion_mnist_dir"))


# Tests that need Fashion-MNIST look where the config says. Under scripts/test.sh (and so in
# CI) FASTFILL_REQUIRE_DATA=1: nothing skips for want of data (or of the Chromium that
# scripts/setup.sh installs for the MLflow UI test), a missing dataset fails them.
FASHION_MNIST_DIR = _fashion_mnist_dir()
FMNIST_INSTALLED = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
REQUIRE_DATA = os.environ.get("FASTFILL_REQUIRE_DATA") == "1"
needs_fashion_mnist = pytest.mark.skipif(
    not FMNIST_INSTALLED and not REQUIRE_DATA,
    reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (data.fashion_mnist_dir; "
    "sudo apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from fastfill_udfs.spark.session import get_spark

    warehouse = tmp_path_factory.mktemp("spark-warehouse")
    session = get_spark({
        "master": "local[2]", "app_name": "fastfill-tests", "shuffle_partitions": 2,
        "arrow_batch_size": 512, "driver_memory": "2g",
        "conf": {"spark.sql.warehouse.dir": str(warehouse),
                 "spark.databricks.delta.snapshotPartitions": "2",
                 "spark.default.parallelism": "2"},
    })
    yield session
    session.stop()


@pytest.fixture
def test_config(tmp_path):
    """The test overlay (small, fast) with a private warehouse, outputs and MLflow store."""
    from fastfill_udfs.config import load_config

    return load_config(["conf/test.yaml"], [
        f"paths.warehouse={tmp_path / 'warehouse'}",
        f"paths.outputs={tmp_path / 'outputs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ])


_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which every later job would take as
    the user's store (tracking_uri_for); a test may not hand its store to the next module."""
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != _USER_TRACKING_URI:
        if _USER_TRACKING_URI is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = _USER_TRACKING_URI


@pytest.fixture(scope="module")
def one_faiss_thread():
    """faiss's OpenMP threads spin against each other on a busy 2-core box: use one."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
