"""The pipeline on a real standalone Spark cluster (a master and two workers on 127.0.0.1, started
with scripts/cluster/start_cluster.sh): ingest -> rank_gallery -> backfill -> evaluate through
spark-submit --master spark://..., the package shipped to the executors with --py-files, with
the models the test session's study registered (a copy of its MLflow store) on the gallery
the session ingested (a copy of its gallery, query and quarantine tables): rank_gallery and
backfill (evaluating every batch) run on the cluster.

Skipped, with the reason printed, only when Java is missing; a master or worker that fails to
start is a failure. The cluster is always stopped afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "cluster"
PYTHON = ROOT / ".venv" / "bin" / "python"
PIPELINE_TIMEOUT_S = int(os.environ.get("FASTFILL_CLUSTER_TEST_TIMEOUT", "1500"))


def _free_port(consecutive: int = 1) -> int:
    """A free port p on 127.0.0.1 such that p .. p+consecutive-1 are all free."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + consecutive >= 65535:
            continue
        ok = True
        for p in range(port, port + consecutive):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise OSError("no free ports on 127.0.0.1")


def _skip(reason: str):
    # pytest hides the output of skipped tests: say it on the real stderr as well
    print(f"\n[test_cluster] SKIPPED: {reason}", file=sys.__stderr__, flush=True)
    pytest.skip(reason)


def _marked(output: str, tag: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(tag + " ")]
    assert lines, f"no {tag} line in the output:\n{output[-3000:]}"
    return json.loads(lines[-1][len(tag) + 1:])


@pytest.fixture
def cluster(tmp_path):
    """Start a private cluster (own ports and folder); yield its environment; always stop it."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        _skip("no Java: a standalone Spark cluster needs a JVM")
    assert PYTHON.is_file(), f"no project virtualenv at {PYTHON} (run bash scripts/setup.sh)"
    ports = {"FASTFILL_MASTER_PORT": _free_port(), "FASTFILL_MASTER_WEBUI_PORT": _free_port(),
             "FASTFILL_WORKER_WEBUI_PORT": _free_port(consecutive=2)}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()},
           "FASTFILL_CLUSTER_DIR": str(tmp_path / "cluster"),
           "PYSPARK_PYTHON": str(PYTHON), "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    started = subprocess.run(["bash", str(SCRIPTS / "start_cluster.sh")], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    try:
        if started.returncode != 0:
            why = "a port it needs is in use" if started.returncode == 3 else \
                f"start_cluster.sh exited {started.returncode}"
            pytest.fail(f"standalone cluster did not start ({why}): "
                        + (started.stdout + started.stderr).strip()[-3000:])
        print(started.stdout)
        yield env
    finally:
        stopped = subprocess.run(["bash", str(SCRIPTS / "stop_cluster.sh")], env=env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=180)
        print(stopped.stdout + stopped.stderr)


def test_pipeline_runs_on_standalone_cluster(cluster, pipeline_env, tmp_path):
    from fastfill_udfs.spark.delta_io import table_paths

    env = cluster
    work = tmp_path / "work"
    work.mkdir()
    # the models (fastfill_old/new/h@current) as the session's study registered them, and
    # the gallery and queries as the session ingested them: the script trains none when its
    # work folder holds an MLflow store, and ingests nothing when it holds the gallery
    shutil.copy(pipeline_env.root / "mlflow.db", work / "mlflow.db")
    session = table_paths(pipeline_env.make_cfg())
    for table in (session.gallery, session.queries, session.query_features, session.quarantine):
        if Path(table).is_dir():                     # queries: only for a query source
            shutil.copytree(table, work / "warehouse" / Path(table).name)
    assert (work / "warehouse" / "gallery").is_dir()
    t = time.monotonic()
    # its own process group, so a timeout ends everything it started (and nothing else)
    proc = subprocess.Popen(["bash", str(SCRIPTS / "run_pipeline_on_cluster.sh"), str(work)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=PIPELINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
        pytest.fail(f"the pipeline did not finish within {PIPELINE_TIMEOUT_S} s "
                    f"(FASTFILL_CLUSTER_TEST_TIMEOUT):\n{stdout[-5000:]}")
    out = stdout
    print(out)
    assert "2/6 models from the MLflow store already in" in out and \
        not (work / "run_study.log").exists()
    assert "gallery already ingested in" in out and not (work / "ingest.log").exists()
    print(f"[test_cluster] pipeline on the cluster took {time.monotonic() - t:.0f} s")
    assert proc.returncode == 0, f"run_pipeline_on_cluster.sh failed:\n{out[-5000:]}"

    check = _marked((work / "cluster_check.log").read_text(), "CLUSTER_CHECK")
    assert check["master"].startswith("spark://127.0.0.1:")
    assert check["executors"] == 2, check                     # one executor per worker
    assert len(check["executor_dirs"]) == 2, check            # ... in two different workers
    assert all(str(tmp_path / "cluster") in d for d in check["executor_dirs"]), check
    assert check["package_from_py_files"], check               # shipped as a user would
    assert check["executor_pythons"] == [str(PYTHON)], check
    assert check["delta_merge_ok"], check                      # Delta runs on the executors

    result = json.loads((work / "cluster_result.json").read_text())
    assert result["backfill_log_batches"] == [0, 1, 2], result  # batch 0 + both batches
    assert result["mlflow_run"], result
    assert result["mAP_auc"] is not None and 0.0 < result["mAP_auc"] <= 1.0, result
    assert result["top1_auc"] is not None, result
