"""Starting the project's jobs in a fresh process, as a user does: the venv's `spark-submit`
and the environment a child job gets from a test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"


def submit_env(**extra: str) -> dict[str, str]:
    """os.environ for a child job (spark-submit or python), with `extra` on top: its workers
    on this interpreter (PYSPARK_PYTHON), and without what this test process may have exported
    for itself: the py4j gateway of its own JVM (PYSPARK_GATEWAY_PORT; pyspark would attach
    the child to it) and an MLflow store (MLFLOW_TRACKING_URI; it would win over the job's
    configured `mlflow.tracking_uri`)."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env
