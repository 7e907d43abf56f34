"""spark-submit as a user runs it: `scripts/spark-submit pipelines/check_environment.py` (Delta
write, MERGE, time travel) from a shell with no venv activated, no --config and no flag but the
test's `--set`s. The venv's spark-defaults.conf that setup writes supplies Delta and runs the
driver and the workers on the venv's Python; the log4j2.properties setup installs puts Spark at
WARN, so the job's own lines are what it prints, and `--set spark.log_level=INFO` brings Spark's
INFO lines back. (One job serves the Delta, interpreter and quiet-log checks: each
spark-submit is a JVM start.)"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from fastfill_udfs.spark import jars

ROOT = Path(__file__).resolve().parents[2]
SPARK_INFO = re.compile(r"\bINFO [A-Z][A-Za-z0-9$]*: ")   # log4j's "INFO SparkContext: ..."
VENV_PYTHON = (ROOT / ".venv" / "bin" / "python").resolve()


def _bare_submit(work: Path, *sets: str) -> subprocess.CompletedProcess:
    """scripts/spark-submit from a shell whose PATH has only the system Python (no pyspark,
    no SPARK_HOME, no PYSPARK_PYTHON), run in `work` (outside the checkout), its warehouse and
    MLflow store there."""
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(work))}
    if os.environ.get("JAVA_HOME"):
        env["JAVA_HOME"] = os.environ["JAVA_HOME"]
    cmd = [str(ROOT / "scripts" / "spark-submit"), str(ROOT / "pipelines" / "check_environment.py"),
           "--set", f"paths.warehouse={work / 'wh'}",
           "--set", f"mlflow.tracking_uri=sqlite:///{work / 'm.db'}",
           "--set", "spark.master=local[1]"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=work, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "environment OK" in proc.stdout
    return proc


def _report(stdout: str) -> dict[str, str]:
    """check_environment's `key: value` report lines."""
    return dict(line.strip().split(": ", 1) for line in stdout.splitlines()
                if re.match(r"^ *[a-z_-]+: ", line))


def test_plain_spark_submit_writes_delta_on_the_venvs_python_and_spark_is_quiet(tmp_path):
    log4j2 = jars.spark_home() / "conf" / "log4j2.properties"
    assert log4j2.read_text().startswith(jars.LOG4J2_MARKER), \
        f"{log4j2} is not the one scripts/setup.sh writes (rerun it)"
    quiet = _bare_submit(tmp_path / "quiet")
    report = _report(quiet.stdout)
    # Delta from setup's spark-defaults.conf: the job's table is a Delta table
    table = tmp_path / "quiet" / "wh" / "_environment_check"
    assert report["delta_check_table"] == str(table) and (table / "_delta_log").is_dir()
    # the driver and the workers on the venv's Python, though the shell has none of it
    assert Path(report["python_driver"]).resolve() == VENV_PYTHON
    assert [Path(p).resolve() for p in report["python_workers"].split(", ")] == [VENV_PYTHON]
    # Spark at WARN: no INFO line, no notice of log4j's default profile
    quiet_text = quiet.stdout + quiet.stderr
    assert not SPARK_INFO.findall(quiet_text), SPARK_INFO.findall(quiet_text)[:5]
    assert "Using Spark's default log4j profile" not in quiet_text

    loud = _bare_submit(tmp_path / "loud", "spark.log_level=INFO")
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
