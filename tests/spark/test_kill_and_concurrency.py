"""Crashes as they really happen, and two jobs at once, on the session's own gallery (the
README's commands made it, in their default `auto` policy): `spark-submit pipelines/backfill.py`
is started as a process group and killed with SIGKILL (a) during new-model inference, (b) right after a batch's MERGE commit
appears in `_delta_log`, before its log row, (c) after a batch is logged, before its evaluation
reaches MLflow (one run, killed three times in a row). A fresh process then finishes the run:
exactly one feature row per id, every planned batch once in `backfill_log` and once in the MERGE
history, the missing image quarantined once, MLflow steps without duplicates, and the curve of
the README's uninterrupted run (1e-9). Two jobs started together on one run, overlapping for
sure: one works, the other stops."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.submit import SPARK_SUBMIT

from .own_gallery_data import submit_env

ROOT = Path(__file__).resolve().parents[2]
CURVE = ("mAP", "top1", "top5", "backfill_fraction")


@pytest.fixture(scope="module")
def kill_env(spark, own_gallery):
    """The session's own gallery (README commands: ingested, h trained) with its README run
    `products_auto` as the uninterrupted reference: same gallery, h, policy (auto: the order
    h's forecast chose) and batches (four, one item of the plan with a missing image)."""
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.tracking import configure_mlflow, find_backfill_run

    cfg = own_gallery["make_cfg"]()
    configure_mlflow(cfg)
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.get_path("mlflow.experiment")).experiment_id
    reference = find_backfill_run(client, exp, "products_auto")
    assert reference is not None and reference.info.status == "FINISHED"
    return {**own_gallery, "reference": {
        "mlflow_run_id": reference.info.run_id,
        "aucs": {"mAP_auc": reference.data.metrics["mAP_auc"]}}}


def _start(env_, run_name: str, log: Path, **extra_env) -> subprocess.Popen:
    """The README's backfill command on run `<run_name>_auto`, without the rate measurement
    before batch 1 (backfill.throughput_sample=0): the first new-model inference is batch 1's,
    where the tests kill or hold a job; the curve is the same."""
    cmd = [str(SPARK_SUBMIT), "pipelines/backfill.py", "--config", str(env_["conf"])]
    for o in env_["overrides"] + [f"run_name={run_name}", "backfill.throughput_sample=0"]:
        cmd += ["--set", o]
    out = open(log, "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=submit_env(**extra_env), start_new_session=True)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """Wait until `ready()`, the job still running then."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL the whole process group (driver JVM, Python driver, workers) once `ready()`."""
    _wait_for(proc, ready, what, timeout)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _commits(path: str) -> list[dict]:
    """The commitInfo of every commit in a Delta log, in order."""
    out = []
    for f in sorted(Path(path, "_delta_log").glob("*.json")):
        for line in f.read_text().splitlines():
            action = json.loads(line)
            if "commitInfo" in action:
                out.append(action["commitInfo"])
    return out


def _tagged_merges(path: str) -> list[int]:
    tags = []
    for info in _commits(path):
        meta = info.get("userMetadata")
        if info.get("operation") == "MERGE" and meta and "fastfill_batch" in meta:
            tags.append(json.loads(meta)["fastfill_batch"])
    return tags


def _finish_and_check(spark, kill_env, run_name: str, rerun: Path | None) -> None:
    """Rerun in a fresh process to completion (logging to `rerun`; None: no rerun); then
    exactly one of everything, and the curve of the uninterrupted run."""
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.spark.backfill import planned_batches
    from fastfill_udfs.spark.delta_io import read_table, table_paths
    from fastfill_udfs.tracking import configure_mlflow

    if rerun is not None:
        proc = _start(kill_env, run_name, rerun)
        assert proc.wait(timeout=900) == 0, rerun.read_text()[-4000:]
    cfg = kill_env["make_cfg"](run_name)
    run = f"{run_name}_auto"
    paths = table_paths(cfg, run)
    n_batches = len(planned_batches(spark, cfg, run))
    feats = read_table(spark, paths.gallery_features).toPandas()
    missing = kill_env["setup"]["missing"]          # its image is gone: never new, quarantined
    assert feats["id"].is_unique and set(feats.loc[feats["source"] != "new", "id"]) == {missing}
    quarantine = read_table(spark, paths.quarantine).toPandas()
    at_backfill = quarantine[(quarantine["run"] == run) & (quarantine["stage"] == "backfill")]
    assert at_backfill["id"].tolist() == [missing]  # once, however many jobs took its batch
    batches = read_table(spark, paths.backfill_log).toPandas()["batch_id"]
    assert sorted(batches) == list(range(n_batches + 1))
    assert sorted(_tagged_merges(paths.gallery_features)) == list(range(1, n_batches + 1))
    configure_mlflow(cfg)
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.get_path("mlflow.experiment")).experiment_id
    mine = client.search_runs([exp], filter_string=f"tags.`fastfill.run` = '{run}'")
    assert len(mine) == 1
    ref_id = kill_env["reference"]["mlflow_run_id"]
    for key in CURVE:
        got = [(m.step, m.value) for m in client.get_metric_history(mine[0].info.run_id, key)]
        want = {m.step: m.value for m in client.get_metric_history(ref_id, key)}
        assert sorted(s for s, _ in got) == list(range(n_batches + 1)), key  # no duplicates
        assert dict(got) == pytest.approx(want, abs=1e-9), key
    assert mine[0].data.metrics["mAP_auc"] == pytest.approx(
        kill_env["reference"]["aucs"]["mAP_auc"], abs=1e-9)


def test_killed_three_ways_then_finished_by_a_fresh_process(spark, kill_env, tmp_path):
    """One run, killed (a) during batch 1's inference, then (b) right after batch 1's MERGE
    commit, then (c) after batch 2's log row, before its evaluation; a fresh process finishes
    it. Each kill leaves exactly what it should, and the end is the uninterrupted run."""
    from fastfill_udfs.spark.delta_io import latest_version, read_table, table_paths
    from fastfill_udfs.spark.jobs import rank_job

    cfg = kill_env["make_cfg"]("kill")
    rank_job(cfg)                                      # auto, as the README's run
    paths = table_paths(cfg, "kill_auto")
    ranked_at = latest_version(spark, paths.gallery_features)

    def logged() -> list[int]:
        return sorted(read_table(spark, paths.backfill_log).toPandas()["batch_id"])

    # (a) during new-model inference: nothing of batch 1 anywhere
    marker = tmp_path / "inference-started"
    proc = _start(kill_env, "kill", tmp_path / "a.log", SLOW_MODEL_DELAY="5",
                  SLOW_MODEL_MARKER=str(marker))
    _kill_when(proc, marker.exists, "new-model inference")
    assert logged() == [0]
    assert latest_version(spark, paths.gallery_features) == ranked_at   # nothing partial

    # (b) right after batch 1's MERGE commit: merged, not logged
    proc = _start(kill_env, "kill", tmp_path / "b.log")
    _kill_when(proc, lambda: 1 in _tagged_merges(paths.gallery_features),
               "batch 1's MERGE commit")
    assert logged() == [0] and _tagged_merges(paths.gallery_features) == [1]

    # (c) after batch 2's log row, before its evaluation reached MLflow
    n_log_commits = len(_commits(paths.backfill_log))
    proc = _start(kill_env, "kill", tmp_path / "c.log")
    _kill_when(proc, lambda: len(_commits(paths.backfill_log)) >= n_log_commits + 2,
               "batch 2's log row")                  # batch 1 logged by (c), then batch 2
    assert logged() == [0, 1, 2]
    assert _tagged_merges(paths.gallery_features) == [1, 2]    # batch 1 was not merged again
    _finish_and_check(spark, kill_env, "kill", tmp_path / "rerun.log")


def test_two_jobs_on_one_run_commit_each_batch_once(spark, kill_env, tmp_path):
    """Started together (a double-clicked job), and overlapping for sure (a checked
    precondition): the one holding the run waits in its first new-model inference until the
    other has ended. That other one stops with exit 3, naming the job that holds the run, while
    that job is alive; the holder then finishes. Every batch is merged and logged once, MLflow
    has one run with each step once."""
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.spark.jobs import rank_job
    from fastfill_udfs.tracking import configure_mlflow, find_backfill_run

    cfg = kill_env["make_cfg"]("twin")
    rank_job(cfg)
    marker, hold = tmp_path / "inference-started", tmp_path / "go-on"
    logs = [tmp_path / "one.log", tmp_path / "two.log"]
    procs = [_start(kill_env, "twin", log, SLOW_MODEL_MARKER=str(marker),
                    SLOW_MODEL_HOLD=str(hold)) for log in logs]
    try:
        deadline = time.monotonic() + 600
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither job ended: none was refused"
            time.sleep(0.05)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        holder = procs[1 - loser]
        outputs = [log.read_text() for log in logs]
        assert holder.poll() is None, f"both jobs ended: they never overlapped\n{outputs}"
        assert procs[loser].returncode == 3, outputs[loser][-3000:]
        _wait_for(holder, marker.exists, "the holder's new-model inference")
        configure_mlflow(cfg)
        client = MlflowClient()
        exp = client.get_experiment_by_name(cfg.get_path("mlflow.experiment")).experiment_id
        running = find_backfill_run(client, exp, "twin_auto")
        job = running.data.tags["fastfill.job"]
        assert running.info.status == "RUNNING" and job
        assert f"is already being backfilled by {job}" in outputs[loser]
        assert "Not starting it twice" in outputs[loser]
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        hold.touch()
    assert holder.wait(timeout=600) == 0, logs[1 - loser].read_text()[-3000:]
    _finish_and_check(spark, kill_env, "twin", rerun=None)
