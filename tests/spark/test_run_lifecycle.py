"""The MLflow status of a backfill run follows the jobs on it (`spark/run_status.py`), on the
300-item pipeline: RUNNING only while a job works on it (checked from inside the job), SCHEDULED
after a `--max-batches` budget, FINISHED once the plan is fully backfilled, FAILED when the job
fails, KILLED on SIGINT and on SIGTERM (a real spark-submit), a refused job leaves the status it
found, a later job reopens the run, and after a `kill -9` (nothing can mark the run) the next job
records the job that is gone before reopening it."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fastfill_udfs.spark.delta_io import read_table, table_paths
from fastfill_udfs.spark.lease import _pid_alive

from tests.submit import SPARK_SUBMIT, submit_env

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def _client(cfg):
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.tracking import configure_mlflow

    configure_mlflow(cfg)
    return MlflowClient()


def _status(cfg, mlflow_run_id):
    run = _client(cfg).get_run(mlflow_run_id)
    return run.info.status, run.data.tags


def _mlflow_run_of(cfg, run):
    from fastfill_udfs.tracking import find_backfill_run

    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.get_path("mlflow.experiment")).experiment_id
    return find_backfill_run(client, exp, run)


@pytest.fixture
def seen_while_running(monkeypatch):
    """Records (MLflow status, job tag) after each committed batch, from inside the job."""
    from fastfill_udfs.spark.evaluate import BackfillTracker

    seen = []
    original = BackfillTracker.on_committed

    def spy(self, batch_id, version):
        original(self, batch_id, version)
        run = _client(self.cfg).get_run(self.run_id)
        seen.append((batch_id, run.info.status, run.data.tags.get("fastfill.job")))

    monkeypatch.setattr(BackfillTracker, "on_committed", spy)
    return seen


def test_budget_leaves_it_scheduled_and_the_full_plan_finished(pipeline_env, seen_while_running):
    from fastfill_udfs.spark.jobs import backfill_job, evaluate_job, rank_job

    cfg = pipeline_env.make_cfg("life")
    rank_job(cfg, policy="random")
    first = backfill_job(cfg, policy="random", max_batches=1, evaluate=True)
    run_id = first["mlflow_run_id"]
    status, tags = _status(cfg, run_id)
    assert status == "SCHEDULED", tags.get("fastfill.state")
    assert tags["fastfill.state"].startswith("SCHEDULED: 1 of 3 batches committed")
    assert tags["fastfill.job"] == ""
    # while the job worked on it: RUNNING, held by the job that holds the lease
    assert [(b, s) for b, s, _ in seen_while_running] == [(1, "RUNNING")]
    owner = seen_while_running[0][2]
    assert owner and owner.split(":")[1] == str(os.getpid())

    # the rest without evaluation: the plan is fully backfilled, so FINISHED
    second = backfill_job(cfg, policy="random", evaluate=False)
    assert second["committed_now"] == [2, 3]
    status, tags = _status(cfg, run_id)
    assert status == "FINISHED", tags["fastfill.state"]
    # evaluation after the fact reopens it and closes it again, now with the AUCs
    assert evaluate_job(cfg, policy="random")["steps_evaluated"] == 2
    status, tags = _status(cfg, run_id)
    assert status == "FINISHED" and "mAP_auc" in _client(cfg).get_run(run_id).data.metrics
    history = tags["fastfill.history"].splitlines()
    assert [line.split(" UTC ")[1].split(":")[0] for line in history] == [
        "RUNNING", "SCHEDULED", "RUNNING", "FINISHED", "RUNNING", "FINISHED"]
    assert "(was SCHEDULED)" in history[2] and "(was FINISHED)" in history[4]
    # the experiment's "Backfill curves" view lists this run's curve first
    exp = _client(cfg).get_run(run_id).info.experiment_id
    assert "mlflow.sharedViewState.fastfill-curves" in _client(cfg).get_experiment(exp).tags


def test_a_failing_job_marks_it_failed_and_a_resume_reopens_it(pipeline_env, monkeypatch):
    from fastfill_udfs.spark.evaluate import BackfillTracker
    from fastfill_udfs.spark.jobs import backfill_job, rank_job

    cfg = pipeline_env.make_cfg("lifefail")
    rank_job(cfg, policy="random")
    original = BackfillTracker.on_committed

    def fails_at_2(self, batch_id, version):
        if batch_id == 2:
            raise RuntimeError("disk full while evaluating batch 2")
        original(self, batch_id, version)

    monkeypatch.setattr(BackfillTracker, "on_committed", fails_at_2)
    with pytest.raises(RuntimeError, match="disk full"):
        backfill_job(cfg, policy="random", evaluate=True)
    monkeypatch.undo()
    found = _mlflow_run_of(cfg, "lifefail_random")
    assert found.info.status == "FAILED"
    assert "RuntimeError: disk full while evaluating batch 2" in found.data.tags["fastfill.state"]
    done = backfill_job(cfg, policy="random", evaluate=True)
    assert done["mlflow_run_id"] == found.info.run_id and done["committed_now"] == [3]
    status, tags = _status(cfg, found.info.run_id)
    assert status == "FINISHED"
    assert "(was FAILED)" in tags["fastfill.history"]


def test_sigint_marks_it_killed_and_a_refused_job_keeps_the_status(pipeline_env, monkeypatch):
    from fastfill_udfs.spark.backfill import ModelMismatchError
    from fastfill_udfs.spark.evaluate import BackfillTracker
    from fastfill_udfs.spark.jobs import backfill_job, rank_job

    cfg = pipeline_env.make_cfg("lifeint")
    rank_job(cfg, policy="random")

    def ctrl_c(self, batch_id, version):
        os.kill(os.getpid(), signal.SIGINT)  # Python's SIGINT handler: KeyboardInterrupt
        time.sleep(5)

    monkeypatch.setattr(BackfillTracker, "on_committed", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        backfill_job(cfg, policy="random", evaluate=True)
    monkeypatch.undo()
    found = _mlflow_run_of(cfg, "lifeint_random")
    assert found.info.status == "KILLED"
    assert "interrupted (SIGINT)" in found.data.tags["fastfill.state"]
    # a job refused before it changes anything (another new model) leaves KILLED as it was
    other = pipeline_env.make_cfg("lifeint", "models.new=models:/fastfill_old@current")
    with pytest.raises(ModelMismatchError):
        backfill_job(other, policy="random", evaluate=False)
    status, tags = _status(cfg, found.info.run_id)
    assert status == "KILLED" and "refused" in tags["fastfill.state"]
    backfill_job(cfg, policy="random", evaluate=True)
    assert _status(cfg, found.info.run_id)[0] == "FINISHED"


# ------------------------------------------------------------- real processes, real signals
def _submit(pipeline_env, run_name: str, log: Path) -> subprocess.Popen:
    root = pipeline_env.root
    sets = [f"paths.warehouse={root / 'warehouse'}", f"paths.outputs={root / 'outputs'}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", *TINY,
            f"run_name={run_name}"]
    cmd = [str(SPARK_SUBMIT), "pipelines/backfill.py", "--config", "conf/test.yaml",
           "--policy", "random"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env=submit_env(), start_new_session=True)


def _wait_until_working(cfg, run: str, proc, log: Path, not_job: str | None = None,
                        timeout: float = 600):
    """The job's MLflow run once it is RUNNING under the job (a job other than `not_job`) and
    has logged a step."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the job ended first:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the job never started working"
        found = _mlflow_run_of(cfg, run)
        if (found is not None and found.info.status == "RUNNING"
                and found.data.tags.get("fastfill.job") not in ("", None, not_job)
                and "mAP" in found.data.metrics):
            return found
        time.sleep(0.2)


def _driver_pid(job: str) -> int:
    """The Python driver's pid in a job name (the lease owner, host:pid:token)."""
    return int(job.split(":")[1])


def _logged_batches(spark, cfg, run) -> int:
    """Batches past batch 0 in the run's backfill_log (rank wrote batch 0: the table exists)."""
    return read_table(spark, table_paths(cfg, run).backfill_log).where("batch_id > 0").count()


@pytest.fixture(scope="module")
def signalled(spark, pipeline_env, tmp_path_factory):
    """Run `lifesig_random`, ten 30-item batches, so a job is still at work when it is
    signalled: a spark-submit job on it is stopped with SIGTERM to its Python driver, a second
    one is killed with `kill -9` to its whole process group, then a job in this process
    finishes the run. What each left: exit code, output, MLflow status and tags, batches."""
    from fastfill_udfs.spark.jobs import backfill_job, rank_job

    run, tmp = "lifesig_random", tmp_path_factory.mktemp("lifesig")
    rank_job(pipeline_env.make_cfg("lifesig", "backfill.batch_size=30"), policy="random")
    cfg = pipeline_env.make_cfg("lifesig")
    out = {"cfg": cfg}

    log = tmp / "term.log"
    proc = _submit(pipeline_env, "lifesig", log)
    found = _wait_until_working(cfg, run, proc, log)
    job = found.data.tags["fastfill.job"]
    os.kill(_driver_pid(job), signal.SIGTERM)
    code = proc.wait(timeout=300)
    out["term"] = {"code": code, "output": log.read_text(), "job": job,
                   "mlflow_run_id": found.info.run_id, "logged": _logged_batches(spark, cfg, run),
                   **dict(zip(("status", "tags"), _status(cfg, found.info.run_id)))}

    log = tmp / "kill.log"
    proc = _submit(pipeline_env, "lifesig", log)
    found = _wait_until_working(cfg, run, proc, log, not_job=job)
    gone = found.data.tags["fastfill.job"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    driver = _driver_pid(gone)          # a child of the JVM: it dies apart from it
    deadline = time.monotonic() + 60
    while _pid_alive(driver):           # a zombie counts as gone (CI's PID 1 may not reap)
        assert time.monotonic() < deadline, f"driver {driver} still alive after SIGKILL"
        time.sleep(0.1)
    out["kill"] = {"gone": gone, "mlflow_run_id": found.info.run_id,
                   **dict(zip(("status", "tags"), _status(cfg, found.info.run_id)))}

    done = backfill_job(cfg, policy="random", evaluate=True)
    out["done"] = {"mlflow_run_id": done["mlflow_run_id"],
                   **dict(zip(("status", "tags"), _status(cfg, done["mlflow_run_id"])))}
    return out


def test_sigterm_to_a_spark_submit_job_marks_it_killed(signalled):
    term = signalled["term"]
    assert term["code"] == 128 + signal.SIGTERM, term["output"][-3000:]
    assert "stopped: terminated by SIGTERM" in term["output"]
    assert term["status"] == "KILLED", term["tags"].get("fastfill.state")
    assert "terminated by SIGTERM" in term["tags"]["fastfill.state"]
    assert term["logged"] < 10                                     # it was stopped half-way
    # the next job reopened the same MLflow run, and the last one finished it
    assert signalled["kill"]["mlflow_run_id"] == signalled["done"]["mlflow_run_id"] \
        == term["mlflow_run_id"]
    assert signalled["done"]["status"] == "FINISHED"
    history = signalled["done"]["tags"]["fastfill.history"].splitlines()
    stopped = [i for i, line in enumerate(history) if "terminated by SIGTERM" in line]
    assert len(stopped) == 1 and " UTC KILLED: " in history[stopped[0]]
    assert f"RUNNING: opened by job {signalled['kill']['gone']} (was KILLED)" in \
        history[stopped[0] + 1]


def test_after_kill_9_the_next_job_records_the_job_that_is_gone(signalled):
    kill, done = signalled["kill"], signalled["done"]
    gone = kill["gone"]
    assert gone != signalled["term"]["job"]
    assert kill["status"] == "RUNNING"                  # nothing could mark it
    assert kill["tags"]["fastfill.job"] == gone
    assert done["mlflow_run_id"] == kill["mlflow_run_id"]
    assert done["status"] == "FINISHED"
    history = done["tags"]["fastfill.history"].splitlines()
    recorded = [line for line in history if f"KILLED: job {gone} stopped without closing" in line]
    assert len(recorded) == 1
    i = history.index(recorded[0])
    assert "RUNNING: opened by job" in history[i + 1] and "(was KILLED)" in history[i + 1]
    assert history[-1].split(" UTC ")[1].startswith("FINISHED")
