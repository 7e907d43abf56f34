"""`pipelines/check_environment.py`: prove the stack works on this machine or cluster."""
from __future__ import annotations

import logging
import sys
from importlib.metadata import version

from fastfill_udfs.config import Config

log = logging.getLogger(__name__)


def check_environment(cfg: Config, master: str | None = None) -> dict:
    """Write, MERGE and time-travel a tiny Delta table under `<warehouse>/_environment_check`,
    touch the MLflow store, and report package versions, the torch device and the Python
    interpreters of the driver and the workers."""
    import faiss
    import mlflow
    import numpy as np
    import torch
    from delta.tables import DeltaTable

    from fastfill_udfs.spark.delta_io import read_table, write_table
    from fastfill_udfs.spark.session import get_spark
    from fastfill_udfs.tracking import configure_mlflow

    spark = get_spark(cfg["spark"], master=master)
    path = cfg.resolve_path("paths.warehouse").rstrip("/") + "/_environment_check"
    write_table(spark.range(10).selectExpr("id", "id * 2 AS value"), path)
    updates = spark.range(5, 15).selectExpr("id", "id * 3 AS value")
    (DeltaTable.forPath(spark, path).alias("t")
     .merge(updates.alias("u"), "t.id = u.id")
     .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())
    rows_now = read_table(spark, path).count()
    rows_v0 = read_table(spark, path, version=0).count()
    if (rows_now, rows_v0) != (15, 10):
        raise RuntimeError(f"Delta round trip at {path} gave {rows_now}/{rows_v0} rows, expected 15/10")

    configure_mlflow(cfg)
    mlflow.search_experiments(max_results=1)
    def interpreter(batches):  # runs on the workers
        import sys as worker_sys

        for batch in batches:
            yield batch.assign(python=worker_sys.executable)[["python"]]

    workers = sorted({row["python"] for row in spark.range(2).mapInPandas(
        interpreter, "python string").collect()})
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype="float32"))
    report = {
        "spark": spark.version, "master": spark.sparkContext.master,
        "delta-spark": version("delta-spark"), "mlflow": mlflow.__version__,
        "mlflow_tracking_uri": mlflow.get_tracking_uri(), "torch": torch.__version__,
        "torch_device": "cuda" if torch.cuda.is_available() else "cpu",
        "faiss": faiss.__version__, "delta_check_table": path,
        "python_driver": sys.executable, "python_workers": ", ".join(workers),
    }
    for key, value in report.items():
        print(f"{key:>20}: {value}")
    print("environment OK")
    return report
