"""A gallery that moves while it is backfilled (docs/moving_gallery.md): one chain of jobs on a
small foreign gallery whose source is a Delta table with Change Data Feed on.

1. Rows are added, changed and deleted after the ranking. A `spark-submit` backfill starts and
   holds in the middle of batch 1's inference; more rows change (two of batch 1's own) and a
   sync runs to its end meanwhile; the batch goes on and is killed with `kill -9` right after
   its MERGE commit.
2. More edits; a `spark-submit` sync in transform mode (added and changed items queued by
   their score) is killed with `kill -9` right after its plan commit; the sync notebook (plain
   Python) brings the run the rest of the way.
3. A backfill finishes the run, evaluating every step (counts reconcile at each).
Then every item of the final source table has exactly one vector, made by the run's new model
from its final image; nothing deleted is in the features, the plan or the published index; the
items a sync made `new` were never embedded again by a batch. Publish, search through the
alias, publish again, search, roll back, search: the hits follow the alias."""
from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .moving_gallery_data import add_rows, change_rows, delete_rows, make_delta_source, source_ids
from .own_gallery_data import COLUMNS, N_CLASSES, sets, submit_env
from .test_kill_and_concurrency import _commits, _kill_when, _tagged_merges

ROOT = Path(__file__).resolve().parents[2]
PER_CLASS, TRAIN_ROWS, BATCH = 4, 8, 8     # 32 items; 8 of them h's pairs, 24 planned: 3 x 8
RUN = "live_uncertainty"


def _submit(script: str, overrides: list[str], log: Path, *args: str, **env) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "spark-submit"), f"pipelines/{script}", *args]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env=submit_env(**env), start_new_session=True)


def _sync_commits(path: str) -> list[int]:
    return [json.loads(c["userMetadata"])["fastfill_sync"] for c in _commits(path)
            if "fastfill_sync" in (c.get("userMetadata") or "")]


def _other(item: str, avoid: set[str]) -> str:
    """Another item, of the same class where one is left, not in `avoid`: an item no edit
    touched yet, so its image and old embedding differ from `item`'s."""
    same = int(item.split("-")[1])
    classes = [same] + [c for c in range(N_CLASSES) if c != same]
    return next(f"item-{c}-{i:03d}" for c in classes for i in range(PER_CLASS)
                if f"item-{c}-{i:03d}" not in avoid | {item})


@pytest.fixture(scope="module")
def moving(spark, tmp_path_factory):
    from fastfill_udfs.config import load_config
    from fastfill_udfs.spark.delta_io import read_table, table_paths
    from fastfill_udfs.spark.jobs import (backfill_job, ingest_job, rank_job,
                                          train_transformation_job)
    from fastfill_udfs.spark.sync import sync_job, sync_log_path

    tmp = tmp_path_factory.mktemp("moving")
    setup = make_delta_source(tmp, PER_CLASS, spark=spark)
    src = setup["table"]
    over = sets(setup, transformation__train_rows=TRAIN_ROWS, backfill__batch_size=BATCH,
                data__dataset="gallery_table", models__new="models:/product_embedder@champion",
                models__h="models:/product_embedder_h@champion", models__classifier="",
                transformation__epochs=10)
    over += [f"data.columns.{k}={v}" for k, v in COLUMNS.items()] + ["run_name=live"]
    cfg = load_config([], over)
    ingest_job(cfg)
    train_transformation_job(cfg)
    rank_job(cfg, policy="uncertainty")
    paths = table_paths(cfg, RUN)
    plan = read_table(spark, paths.backfill_plan).toPandas()
    batch = {int(b): sorted(g["id"]) for b, g in plan.groupby("batch_id")}
    pairs = sorted(read_table(spark, paths.gallery_features).where("batch_id = 0")
                   .toPandas()["id"])
    gone: set[str] = set()
    edits = {"added": {}, "changed": {}, "queued": set()}

    def other(item):
        changed = edits["changed"]
        return _other(item, gone | set(changed) | set(changed.values()))

    def edit(add=None, change=None, delete=()):
        if add:
            add_rows(spark, src, add)
            edits["added"].update(add)
        if change:
            change_rows(spark, src, change)
            edits["changed"].update(change)
        if delete:
            delete_rows(spark, src, list(delete))
            gone.update(delete)

    # 1. edits after the ranking; a backfill holds in batch 1's inference while more rows
    # change (two of batch 1's) and a sync runs; then the batch goes on and is killed
    edit(add={"add-a1": batch[3][0], "add-a2": pairs[0]},
         change={batch[2][0]: other(batch[2][0])}, delete=[batch[3][1]])
    hold, marker = tmp / "hold", tmp / "inference-started"
    hold.touch()
    proc = _submit("backfill.py", over, tmp / "backfill.log", "--policy", "uncertainty",
                   "--no-evaluate",
                   SLOW_MODEL_HOLD=str(hold), SLOW_MODEL_MARKER=str(marker))
    try:
        _wait_for(proc, marker.exists, "batch 1's inference", tmp / "backfill.log")
        edit(add={"add-b1": batch[1][2]}, change={batch[1][0]: other(batch[1][0])},
             delete=[batch[1][1]])
        during = sync_job(cfg)                        # in this process, while batch 1 runs
    finally:
        hold.unlink(missing_ok=True)
    _kill_when(proc, lambda: 1 in _tagged_merges(paths.gallery_features), "batch 1's MERGE",
               timeout=1200)
    logged_after_kill = sorted(read_table(spark, paths.backfill_log).toPandas()["batch_id"])

    # 2. more edits, queued by score: a sync killed right after its plan commit, finished by
    # the notebook
    edit(add={"add-c1": batch[2][2], "add-c2": pairs[2]},
         change={pairs[1]: other(pairs[1]), batch[3][2]: other(batch[3][2])},
         delete=[batch[2][1]])
    edits["queued"] = {"add-c1", "add-c2", pairs[1], batch[3][2]}
    over.append("sync.mode=transform")
    proc = _submit("sync_gallery.py", over, tmp / "sync.log")
    _kill_when(proc, lambda: 2 in _sync_commits(paths.backfill_plan), "sync 2's plan commit",
               timeout=1200)
    killed = {"gallery_syncs": _sync_commits(table_paths(cfg).gallery),
              "run_synced": sorted(read_table(spark, sync_log_path(cfg, RUN))
                                   .toPandas()["sync_id"])}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTFILL_CONFIG", "")
        mp.setenv("FASTFILL_SET", ";".join(over))
        mp.chdir(ROOT)
        notebook = runpy.run_path(str(ROOT / "notebooks" / "07_sync_gallery.py"),
                                  run_name="__main__")["result"]

    # 3. a backfill finishes the run, evaluating every step
    finished = backfill_job(cfg, policy="uncertainty", evaluate=True)
    return {"cfg": cfg, "paths": paths, "src": src, "setup": setup, "batch": batch,
            "pairs": pairs, "gone": gone, "edits": edits, "during": during,
            "logged_after_kill": logged_after_kill, "killed": killed, "notebook": notebook,
            "finished": finished}


def _wait_for(proc, ready, what: str, log: Path, timeout: float = 1200) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the job ended before {what}:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_every_item_has_one_vector_from_the_new_model_and_nothing_deleted_remains(spark, moving):
    from fastfill_udfs.model_loading import load_configured_model
    from fastfill_udfs.preprocess import Preprocess
    from fastfill_udfs.search import embed_image_file
    from fastfill_udfs.spark.delta_io import read_table

    cfg, paths = moving["cfg"], moving["paths"]
    final = source_ids(spark, moving["src"])
    assert not final & moving["gone"] and set(moving["edits"]["added"]) <= final
    feats = read_table(spark, paths.gallery_features).toPandas()
    assert feats["id"].is_unique and set(feats["id"]) == final
    new_model = load_configured_model(cfg, "new")
    assert (feats["source"] == "new").all()
    assert set(feats["model_version"]) == {new_model.version}
    plan_ids = set(read_table(spark, paths.backfill_plan).toPandas()["id"])
    assert not plan_ids & moving["gone"] and plan_ids <= final
    # each vector is the new model's embedding of the item's final image (not a stale one)
    images = (spark.read.format("delta").load(moving["src"]).toPandas()
              .set_index("item_id")["image_path"])
    pre = Preprocess.from_config(cfg.get_path("models.preprocess"))
    root = moving["setup"]["images"]
    for row in feats.itertuples():
        want = embed_image_file(root / images[row.id], new_model, pre)[0]
        np.testing.assert_allclose(row.embedding, want, rtol=1e-5, atol=1e-5, err_msg=row.id)
    # what a sync embedded (added or changed, embed mode) no batch embedded again
    by_sync = (set(moving["edits"]["added"]) | set(moving["edits"]["changed"])) - \
        moving["edits"]["queued"]
    made = feats.set_index("id")
    assert (made.loc[sorted(by_sync), "batch_id"] == 0).all()
    # what a sync queued (transform mode) a batch embedded
    assert (made.loc[sorted(moving["edits"]["queued"]), "batch_id"] >= 1).all()
    assert moving["during"]["gallery"]["method"] == "cdf"


def test_a_batch_running_during_a_sync_merges_only_what_is_still_pending(spark, moving):
    from fastfill_udfs.spark.delta_io import read_table

    paths = moving["paths"]
    # the sync ran while batch 1 was embedding: it took two of batch 1's items (one changed,
    # made new by the sync; one deleted); the batch merged the other six, once
    assert moving["logged_after_kill"] == [0]           # killed after the MERGE, before its log
    log = read_table(spark, paths.backfill_log).toPandas().set_index("batch_id")
    assert log.loc[1, "n_items"] == BATCH - 2
    assert sorted(_tagged_merges(paths.gallery_features)) == sorted(set(log.index) - {0})
    run = moving["during"]["runs"][0]
    assert (run["added"], run["changed"], run["deleted"]) == (3, 2, 2)


def test_a_killed_sync_is_finished_by_the_next(spark, moving):
    from fastfill_udfs.spark.delta_io import read_table
    from fastfill_udfs.spark.sync import sync_log_path

    killed = moving["killed"]
    assert 2 in killed["gallery_syncs"] and 2 not in killed["run_synced"]
    caught_up = moving["notebook"]["runs"][0]      # all of the killed sync's work, again
    assert caught_up["run"] == RUN
    assert (caught_up["added"], caught_up["changed"], caught_up["deleted"]) == (2, 2, 1)
    assert (caught_up["queued"], caught_up["new"]) == (4, 0)
    synced = read_table(spark, sync_log_path(moving["cfg"], RUN)).toPandas()
    assert sorted(synced["sync_id"]) == [1, 3]


def test_evaluation_reconciles_every_step_and_compare_shows_the_syncs(spark, moving):
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.compare import compare

    cfg = moving["cfg"]
    run_id = moving["finished"]["mlflow_run_id"]
    client = MlflowClient()
    fraction = {m.step: m.value for m in client.get_metric_history(run_id, "backfill_fraction")}
    steps = sorted(fraction)
    assert steps == list(range(len(steps))) and fraction[steps[-1]] == 1.0
    n_final = len(source_ids(spark, moving["src"]))
    n_gallery = {m.step: m.value for m in client.get_metric_history(run_id, "n_gallery")}
    assert n_gallery[steps[-1]] == n_final
    assert "mAP_auc" in client.get_run(run_id).data.metrics
    found = compare(cfg, spark=spark)
    row = found.table.set_index("run").loc[RUN]
    added = len(moving["edits"]["added"])
    assert row["synced"].startswith(f"+{added} ") and row["n_gallery"] == n_final


def test_publish_search_roll_back_the_hits_follow_the_alias(spark, moving):
    from fastfill_udfs.spark.delta_io import read_table
    from fastfill_udfs.spark.search import search_job
    from fastfill_udfs.spark.serving import publish_job

    cfg = moving["cfg"]
    query = read_table(spark, moving["paths"].gallery_features).where(
        f"id = '{moving['batch'][1][3]}'").first()["embedding"]

    def search():
        return search_job(cfg, embedding=list(query), serving=True, k=8, out=lambda *_: None)

    first = publish_job(cfg, policy="uncertainty", batch=1, out=lambda *_: None)
    at_1 = search()
    latest = publish_job(cfg, policy="uncertainty", out=lambda *_: None)
    at_end = search()
    back = publish_job(cfg, do_rollback=True, out=lambda *_: None)
    again = search()
    assert (at_1["batch_id"], at_end["batch_id"], again["batch_id"]) == (
        1, latest["after"]["batch_id"], 1)
    assert latest["before"]["state_id"] == first["after"]["state_id"]
    assert back["after"]["location"] == first["after"]["location"]
    assert at_1["hits"].equals(again["hits"]) and not at_1["hits"].equals(at_end["hits"])
    assert (at_end["hits"]["source"] == "new").all()
    # the published index of the finished run holds exactly the final source's items
    from fastfill_udfs.search import ServableIndex

    served = ServableIndex.load(latest["after"]["location"], run=RUN)
    assert set(served.items["id"]) == source_ids(spark, moving["src"])
