"""A job launched as plain `python` (a notebook, a script, no spark-submit) runs its Python UDFs
on its own interpreter, not on the first `python3` on PATH, which may lack numpy and torch.
(scripts/spark-submit without an activated venv: test_quiet_logs.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import pandas as pd
from pyspark.sql.functions import pandas_udf
from fastfill_udfs.spark.session import get_spark

spark = get_spark({"master": "local[1]", "shuffle_partitions": 1})

@pandas_udf("string")
def where(x: pd.Series) -> pd.Series:
    import sys
    import numpy
    return pd.Series([sys.executable] * len(x))

print("WORKER", spark.range(2).select(where("id")).first()[0])
"""


def test_workers_use_the_launching_interpreter_without_pyspark_python(tmp_path):
    trap = tmp_path / "bin"
    trap.mkdir()
    for name in ("python3", "python"):          # what PATH would give the workers otherwise
        (trap / name).write_text("#!/bin/sh\necho 'not this python' >&2\nexit 3\n")
        (trap / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYSPARK_GATEWAY_PORT")}
    env["PATH"] = f"{trap}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    worker = proc.stdout.split("WORKER", 1)[1].split()[0]
    assert Path(worker).resolve() == Path(sys.executable).resolve()
