"""MLflow tracking-store selection: config vs MLFLOW_TRACKING_URI, one process, many configs."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from fastfill_udfs.config import load_config


def _config(tmp_path, name):
    return load_config(["conf/test.yaml"], [f"mlflow.tracking_uri=sqlite:///{tmp_path / name}",
                                            "mlflow.experiment=tracking-test"])


def _run_names(db):
    with sqlite3.connect(db) as con:
        return sorted(r[0] for r in con.execute("select name from runs"))


@pytest.fixture
def no_user_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_each_config_gets_its_own_store_in_one_process(tmp_path, no_user_uri):
    import mlflow

    from fastfill_udfs.tracking import configure_mlflow

    for name in ("a.db", "b.db"):
        configure_mlflow(_config(tmp_path, name))
        with mlflow.start_run(run_name=f"run-{name}"):
            pass
    assert _run_names(tmp_path / "a.db") == ["run-a.db"]
    assert _run_names(tmp_path / "b.db") == ["run-b.db"]
    # the config's store does not leak into the environment (and so into subprocesses)
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_subprocess_after_configure_uses_its_own_config(tmp_path, no_user_uri):
    from fastfill_udfs.tracking import configure_mlflow

    configure_mlflow(_config(tmp_path, "parent.db"))
    code = ("from fastfill_udfs.config import load_config\n"
            "from fastfill_udfs.tracking import tracking_uri_for\n"
            f"print(tracking_uri_for(load_config(['conf/test.yaml'], "
            f"['mlflow.tracking_uri=sqlite:///{tmp_path / 'child.db'}'])))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ)).stdout.strip()
    assert out == f"sqlite:///{tmp_path / 'child.db'}"


def test_user_environment_wins_over_config(tmp_path, monkeypatch):
    import mlflow

    from fastfill_udfs.tracking import configure_mlflow

    user = f"sqlite:///{tmp_path / 'user.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user)
    configure_mlflow(_config(tmp_path, "config.db"))
    assert mlflow.get_tracking_uri() == user
    assert os.environ["MLFLOW_TRACKING_URI"] == user
    assert not (tmp_path / "config.db").exists()


def test_relative_sqlite_path_is_taken_from_project_root():
    from fastfill_udfs.config import PROJECT_ROOT
    from fastfill_udfs.tracking import resolve_tracking_uri

    assert resolve_tracking_uri("sqlite:///mlruns.db") == f"sqlite:///{PROJECT_ROOT / 'mlruns.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("databricks") == "databricks"
