"""A job launched as plain `python` (a notebook, a script, no spark-submit) runs its Python UDFs
on its own interpreter, not on the first `python3` on PATH, which may lack numpy and torch; and
scripts/spark-submit runs the venv's Python without an activated venv."""
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


SUBMITTED = """
import sys
from pyspark.sql import SparkSession
from pyspark.sql.functions import pandas_udf

spark = SparkSession.builder.getOrCreate()

@pandas_udf("string")
def where(x):
    import sys
    import pandas as pd
    return pd.Series([sys.executable] * len(x))

print("DRIVER", sys.executable)
print("WORKER", spark.range(1).select(where("id")).first()[0])
print("DELTA", spark.conf.get("spark.sql.extensions"))
"""


def test_scripts_spark_submit_runs_the_venv_without_activating_it(tmp_path):
    """scripts/spark-submit from a shell whose PATH has only the system Python (no pyspark,
    no SPARK_HOME): driver and workers run the venv's Python and Delta comes from its
    spark-defaults.conf."""
    job = tmp_path / "where.py"
    job.write_text(SUBMITTED)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))}
    if os.environ.get("JAVA_HOME"):
        env["JAVA_HOME"] = os.environ["JAVA_HOME"]
    proc = subprocess.run([str(ROOT / "scripts" / "spark-submit"), str(job)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    venv_python = (ROOT / ".venv" / "bin" / "python").resolve()
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines()
                 if line.split(" ", 1)[0] in ("DRIVER", "WORKER", "DELTA"))
    assert Path(lines["DRIVER"]).resolve() == venv_python
    assert Path(lines["WORKER"]).resolve() == venv_python
    assert "DeltaSparkSessionExtension" in lines["DELTA"]
