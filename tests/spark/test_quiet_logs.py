"""spark-submit prints the job's own lines: the log4j2.properties setup installs puts Spark at
WARN, and `--set spark.log_level=INFO` brings Spark's INFO lines back. Each case is a real
`spark-submit pipelines/check_environment.py` (Delta write, MERGE, time travel) with its own
Spark conf folder (SPARK_CONF_DIR), as setup writes it into the venv's SPARK_HOME."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fastfill_udfs.spark import jars

ROOT = Path(__file__).resolve().parents[2]
SPARK_INFO = re.compile(r"\bINFO [A-Z][A-Za-z0-9$]*: ")   # log4j's "INFO SparkContext: ..."


def _conf_dir(tmp_path: Path, quiet: bool) -> Path:
    conf = tmp_path / ("quiet" if quiet else "default")
    conf.mkdir()
    (conf / "spark-defaults.conf").write_text("".join(
        f"{k}  {v}\n" for k, v in jars.delta_spark_conf().items()))
    if quiet:
        assert jars.write_log4j2(conf) == conf / "log4j2.properties"
    return conf


def _submit(conf: Path, tmp_path: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "pipelines/check_environment.py",
           "--config", "conf/test.yaml", "--set", f"paths.warehouse={tmp_path / 'wh'}",
           "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "SPARK_CONF_DIR": str(conf), "PYSPARK_PYTHON": sys.executable}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "environment OK" in proc.stdout
    return proc


def test_spark_is_quiet_and_its_chatter_comes_back_on_request(tmp_path):
    conf = _conf_dir(tmp_path, quiet=True)
    quiet = _submit(conf, tmp_path)
    quiet_text = quiet.stdout + quiet.stderr
    assert not SPARK_INFO.findall(quiet_text), SPARK_INFO.findall(quiet_text)[:5]
    assert "Using Spark's default log4j profile" not in quiet_text
    assert "delta_check_table" in quiet.stdout            # the job's own report is there
    loud = _submit(conf, tmp_path, "spark.log_level=INFO")
    loud_text = loud.stdout + loud.stderr
    assert len(SPARK_INFO.findall(loud_text)) > 20        # Spark's INFO lines are back
    assert len(loud_text) > 2 * len(quiet_text)


def test_a_log4j2_file_of_the_users_own_is_kept(tmp_path):
    own = tmp_path / "log4j2.properties"
    own.write_text("rootLogger.level = debug\n")
    assert jars.write_log4j2(tmp_path) is None
    assert own.read_text() == "rootLogger.level = debug\n"
    ours = tmp_path / "ours"
    path = jars.write_log4j2(ours)
    assert path.read_text().startswith(jars.LOG4J2_MARKER)
    assert jars.write_log4j2(ours) == path          # ours is refreshed on the next setup
