"""The pipelines' command lines: help works without a session, config errors exit 2 naming
the key before Spark starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.submit import SPARK_SUBMIT, submit_env

ROOT = Path(__file__).resolve().parents[2]


def test_rank_gallery_help_through_spark_submit():
    proc = subprocess.run([str(SPARK_SUBMIT), str(ROOT / "pipelines" / "rank_gallery.py"),
                           "--help"], capture_output=True, text=True, timeout=300,
                          env=submit_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--policy" in proc.stdout and "--config" in proc.stdout and "--set" in proc.stdout


@pytest.mark.parametrize("script,override,key", [
    ("backfill.py", "backfill.batch_size=x", "backfill.batch_size"),
    ("rank_gallery.py", "backfill.no_such_key=1", "backfill.no_such_key"),
])
def test_config_error_exits_2_naming_the_key(tmp_path, script, override, key):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / script), "--set", override],
                          capture_output=True, text=True, timeout=120, env=submit_env(),
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "spark-warehouse").exists() and not (tmp_path / "metastore_db").exists()
