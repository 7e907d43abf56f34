"""Crashes as they really happen, and two jobs at once, on the session's own gallery (the
README's commands made it, in their default `auto` policy). One run, one chain of
`spark-submit pipelines/backfill.py` jobs, each started as a process group:
(a) killed with SIGKILL during batch 1's new-model inference: nothing of batch 1 anywhere;
(twin) two jobs started together, overlapping for sure: one holds the run, the other stops
with exit 3 naming it; the holder then goes on, and is
(b) killed right after batch 1's MERGE commit appears in `_delta_log`, before its log row:
merged, not logged;
(c) a third job logs batch 1 without merging it again, and is killed after batch 2's log row,
before its evaluation reaches MLflow;
then a fresh process finishes the run: exactly one feature row per id, every planned batch once
in `backfill_log` and once in the MERGE history, the missing image quarantined once, one MLflow
run with each step once, and the curve of the README's uninterrupted run (1e-9)."""
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


@pytest.fixture(scope="module")
def chain(spark, kill_env, tmp_path_factory):
    """Rank run `kill_auto`, then the jobs (a), (twin, b), (c) and the fresh one, recording
    what each left; a job that ends before its moment fails the chain. Returns the records."""
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.spark.delta_io import latest_version, read_table, table_paths
    from fastfill_udfs.spark.jobs import rank_job
    from fastfill_udfs.tracking import configure_mlflow, find_backfill_run

    logs = tmp_path_factory.mktemp("kill_chain")
    cfg = kill_env["make_cfg"]("kill")
    rank_job(cfg)                                      # auto, as the README's run
    paths = table_paths(cfg, "kill_auto")
    features = paths.gallery_features
    out = {"cfg": cfg, "paths": paths, "ranked_at": latest_version(spark, features)}

    def logged() -> list[int]:
        return sorted(read_table(spark, paths.backfill_log).toPandas()["batch_id"])

    def state() -> dict:
        return {"logged": logged(), "merges": _tagged_merges(features),
                "version": latest_version(spark, features)}

    procs: list[subprocess.Popen] = []

    def start(log: str, **extra_env) -> subprocess.Popen:
        procs.append(_start(kill_env, "kill", logs / log, **extra_env))
        return procs[-1]

    hold = logs / "hold"             # while it exists, every forward pass waits
    try:
        # (a) during batch 1's new-model inference
        marker = logs / "a-inference-started"
        proc = start("a.log", SLOW_MODEL_DELAY="5", SLOW_MODEL_MARKER=str(marker))
        _kill_when(proc, marker.exists, "new-model inference")
        out["a"] = state()

        # (twin) two jobs at once: the one that holds the run waits in its first inference
        marker = logs / "twin-inference-started"
        hold.touch()
        twins = [start(log, SLOW_MODEL_MARKER=str(marker), SLOW_MODEL_HOLD=str(hold))
                 for log in ("one.log", "two.log")]
        deadline = time.monotonic() + 600
        while all(p.poll() is None for p in twins):
            assert time.monotonic() < deadline, "neither job ended: none was refused"
            time.sleep(0.05)
        loser = next(i for i, p in enumerate(twins) if p.poll() is not None)
        holder = twins[1 - loser]
        twin = {"holder_alive": holder.poll() is None, "loser_code": twins[loser].returncode,
                "loser_output": (logs / ("one.log", "two.log")[loser]).read_text()}
        assert twin["holder_alive"], f"both jobs ended: they never overlapped\n{twin}"
        _wait_for(holder, marker.exists, "the holder's new-model inference")
        configure_mlflow(cfg)
        client = MlflowClient()
        exp = client.get_experiment_by_name(cfg.get_path("mlflow.experiment")).experiment_id
        running = find_backfill_run(client, exp, "kill_auto")
        twin.update(status=running.info.status, job=running.data.tags.get("fastfill.job"))
        out["twin"] = twin

        # (b) the holder goes on; killed right after batch 1's MERGE commit
        hold.unlink()
        _kill_when(holder, lambda: 1 in _tagged_merges(features), "batch 1's MERGE commit")
        out["b"] = state()

        # (c) after batch 2's log row, before its evaluation reached MLflow
        n_log_commits = len(_commits(paths.backfill_log))
        proc = start("c.log")
        _kill_when(proc, lambda: len(_commits(paths.backfill_log)) >= n_log_commits + 2,
                   "batch 2's log row")              # batch 1 logged by (c), then batch 2
        out["c"] = state()

        # a fresh process finishes the run
        proc = start("rerun.log")
        assert proc.wait(timeout=900) == 0, (logs / "rerun.log").read_text()[-4000:]
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        hold.unlink(missing_ok=True)
    return out


def test_killed_during_inference_leaves_nothing_of_the_batch(chain):
    assert chain["a"]["logged"] == [0] and chain["a"]["merges"] == []
    assert chain["a"]["version"] == chain["ranked_at"]          # nothing partial


def test_a_second_job_on_a_held_run_stops_naming_the_job_that_holds_it(chain):
    """Started together (a double-clicked job), and overlapping for sure (a checked
    precondition): the one that holds the run waits in its first new-model inference until the
    other has ended. That other one stopped with exit 3, naming the holder's job, while the
    holder ran; the holder's MLflow run was RUNNING under that job."""
    twin = chain["twin"]
    assert twin["loser_code"] == 3, twin["loser_output"][-3000:]
    assert twin["status"] == "RUNNING" and twin["job"]
    assert f"is already being backfilled by {twin['job']}" in twin["loser_output"]
    assert "Not starting it twice" in twin["loser_output"]


def test_killed_after_the_merge_commit_the_batch_is_merged_not_logged(chain):
    # the holder went on after the refused job ended, and committed batch 1
    assert chain["b"]["logged"] == [0] and chain["b"]["merges"] == [1]


def test_the_next_job_logs_that_batch_without_merging_it_again(chain):
    assert chain["c"]["logged"] == [0, 1, 2]
    assert chain["c"]["merges"] == [1, 2]           # batch 1 was not merged again


def test_a_fresh_process_finishes_the_run_as_the_uninterrupted_run(spark, kill_env, chain):
    """Exactly one of everything, and the curve of the README's uninterrupted run."""
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.spark.backfill import planned_batches
    from fastfill_udfs.spark.delta_io import read_table
    from fastfill_udfs.tracking import configure_mlflow

    cfg, paths, run = chain["cfg"], chain["paths"], "kill_auto"
    n_batches = len(planned_batches(spark, cfg, run))
    assert n_batches >= 3                            # (c) needs a batch after batch 2
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
    assert len(mine) == 1 and mine[0].info.status == "FINISHED"
    ref_id = kill_env["reference"]["mlflow_run_id"]
    for key in CURVE:
        got = [(m.step, m.value) for m in client.get_metric_history(mine[0].info.run_id, key)]
        want = {m.step: m.value for m in client.get_metric_history(ref_id, key)}
        assert sorted(s for s, _ in got) == list(range(n_batches + 1)), key  # no duplicates
        assert dict(got) == pytest.approx(want, abs=1e-9), key
    assert mine[0].data.metrics["mAP_auc"] == pytest.approx(
        kill_env["reference"]["aucs"]["mAP_auc"], abs=1e-9)
