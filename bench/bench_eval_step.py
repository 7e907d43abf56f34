"""The evaluation step at 10,000 x 10,000 leave-one-out: the path before issue 13 ("today") vs the
sharded search, side by side in one run (no asserts).

    .venv/bin/python bench/bench_eval_step.py [--n 10000] [--dim 64] [--batch-sizes 500,3000]
        [--steps 3] [--threads 0] [--out eval_step.json]

Data: n items in 10 Gaussian classes; queries = gallery (leave-one-out) with the pipeline's two
subgroups; new-model embeddings and noisier transformed ones. Two identical runs, one per path,
so neither profits from the other's Delta caches: `gallery_features` partitioned by
`planned_batch_id` as rank_gallery writes it, batches merged by the backfill's tagged MERGE
statement (untimed, into both tables). Per batch size: step 0 (full build), then --steps
batches; after each MERGE both paths evaluate the committed version, in alternating order:

* today: read gallery_features at the version (Delta time travel, the batch's partition and
  batch_id) + toPandas, faiss upsert, ``reconstruct_all``, then the exact float64 metrics
  (``metrics.retrieval_metrics`` per subgroup, combined): the evaluator before this change;
* new: ``RunEvaluator.evaluate_step`` (the batch's rows from its MERGE commit's files, faiss
  upsert, each query block searched on every shard for CMC, exact mAP through the shards).

Both report their index-update and scoring parts, and the scoring's CPU seconds (summed over
threads: the work, which a loaded machine does not inflate the way it inflates wall time). Checked (untimed): the new path's mAP / top1
/ top5 against today's and against ``retrieval_metrics`` on the raw vectors read from Delta, to
1e-6. Target (BENCHMARKS.md): about 1 s per step on 2 cores.
Results: bench/results/eval_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import WORK, machine_info, median, write_json  # noqa: E402

TARGET_S = 1.0
TODAY_IDLE_S = 2.46        # the step on an idle machine before this change (BENCHMARKS.md)
FEATURES_SCHEMA = ("id string, embedding array<float>, source string, batch_id int, "
                   "updated_at timestamp, model_version string, planned_batch_id int")


def _sizes(text: str) -> list[int]:
    out = [int(float(x)) for x in text.replace("_", "").split(",") if x.strip()]
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"need positive sizes, got {text!r}")
    return out


def _log(msg: str) -> None:
    print(f"[eval-step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _tables(spark, cfg, n: int, dim: int, seed: int):
    """gallery and query_features; returns (ids, transformed, new) arrays."""
    import pandas as pd

    from fastfill_udfs.spark.delta_io import table_paths, write_table

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    centers = rng.normal(size=(10, dim)).astype(np.float32)
    new = (centers[labels] + 2.0 * rng.normal(size=(n, dim))).astype(np.float32)
    transformed = (new + 2.0 * rng.normal(size=(n, dim))).astype(np.float32)
    ids = np.array([f"q{i:07d}" for i in range(n)])
    subgroup = np.where(np.isin(labels, [5, 7, 9]), "footwear", "rest")
    paths = table_paths(cfg)
    base = pd.DataFrame({"id": ids, "label": labels, "subgroup": subgroup})
    write_table(spark.createDataFrame(base, "id string, label int, subgroup string"), paths.gallery)
    write_table(spark.createDataFrame(base.assign(embedding=list(new)),
                                      "id string, label int, subgroup string, embedding array<float>"),
                paths.query_features)
    return ids, transformed, new


def _write_features(spark, path: str, ids, transformed, planned) -> None:
    import pandas as pd

    from fastfill_udfs.spark.delta_io import write_table

    pdf = pd.DataFrame({"id": ids, "embedding": list(transformed), "source": "transformed",
                        "batch_id": None, "updated_at": pd.Timestamp.now(tz="UTC"),
                        "model_version": "models:/bench_h/1", "planned_batch_id": planned})
    write_table(spark.createDataFrame(pdf, FEATURES_SCHEMA).repartition("planned_batch_id"),
                path, partition_by=["planned_batch_id"])


def _merge(spark, path: str, batch_df, batch_id: int, run: str) -> int:
    """The backfill's MERGE of one batch (backfill._merge_batch): one commit tagged with the
    batch, only rows still transformed, in the batch's partition. Returns the new version."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from fastfill_udfs.spark.backfill import BATCH_TAG
    from fastfill_udfs.spark.delta_io import latest_version

    key = "spark.databricks.delta.commitInfo.userMetadata"
    spark.conf.set(key, json.dumps({BATCH_TAG: batch_id, "run": run}))
    try:
        (DeltaTable.forPath(spark, path).alias("f")
         .merge(batch_df.alias("n"), f"f.planned_batch_id = {batch_id} AND f.id = n.id")
         .whenMatchedUpdate(condition="f.batch_id IS NULL", set={
             "embedding": "n.embedding", "source": "'new'", "batch_id": F.lit(batch_id),
             "updated_at": F.current_timestamp(), "model_version": F.lit("models:/bench_new/1")})
         .execute())
    finally:
        spark.conf.unset(key)
    return latest_version(spark, path)


class TodayPath:
    """The evaluation step before this change, kept here as the baseline."""

    def __init__(self, spark, cfg, run, queries):
        import pandas as pd

        from fastfill_udfs.spark.delta_io import read_table, table_paths

        self.spark, self.cfg, self.paths, self.queries = spark, cfg, table_paths(cfg, run), queries
        gallery = read_table(spark, self.paths.gallery).select("id", "label", "subgroup").toPandas()
        self.gallery = gallery.sort_values("id", kind="stable").reset_index(drop=True)
        self.key_of = pd.Series(np.arange(len(self.gallery), dtype=np.int64),
                                index=self.gallery["id"])
        self.index = None
        self.indexed_batch = None

    def step(self, batch_id: int, version: int) -> dict:
        from pyspark.sql import functions as F

        from fastfill_udfs.faiss_index import ShardedGalleryIndex, VectorSpace
        from fastfill_udfs.metrics import retrieval_metrics
        from fastfill_udfs.spark.delta_io import read_table
        from fastfill_udfs.subgroups import combine_metrics, subgroup_metrics

        t0 = time.perf_counter()
        features = read_table(self.spark, self.paths.gallery_features, version=version)
        if self.index is not None and self.indexed_batch == batch_id - 1:
            pdf = (features.where((F.col("planned_batch_id") == batch_id)
                                  & (F.col("batch_id") == batch_id))
                   .select("id", "embedding").toPandas())
            self.index.upsert(self.key_of[pdf["id"]].to_numpy(),
                              np.stack(pdf["embedding"].to_numpy()).astype(np.float32))
        else:
            pdf = features.select("id", "embedding").toPandas()
            vectors = np.stack(pdf["embedding"].to_numpy()).astype(np.float32)
            self.index = ShardedGalleryIndex(vectors.shape[1],
                                             self.cfg.get_path("evaluation.num_shards"),
                                             space=VectorSpace.from_config(self.cfg))
            self.index.build(self.key_of[pdf["id"]].to_numpy(), vectors)
        self.indexed_batch = batch_id
        t1, c1 = time.perf_counter(), time.process_time()
        keys, stored = self.index.reconstruct_all()
        vectors = self.index.space.embeddings(stored)
        q = self.queries
        kwargs = dict(query_ids=q.ids, gallery_ids=self.gallery["id"].to_numpy(dtype=object)[keys],
                      topk=(1, 5), block_size=self.cfg.get_path("evaluation.query_block_size"),
                      distance=self.cfg.get_path("evaluation.distance"))
        labels = self.gallery["label"].to_numpy()[keys]
        per_group = subgroup_metrics(q.embeddings, q.labels, q.subgroups, vectors, labels, **kwargs)
        overall = (combine_metrics(per_group.values()) if (q.subgroups != "").all() else
                   retrieval_metrics(q.embeddings, q.labels, vectors, labels, **kwargs))
        t2, c2 = time.perf_counter(), time.process_time()
        return {"metrics": {m: overall[m] for m in ("mAP", "top1", "top5")},
                "index_update_s": t1 - t0, "scoring_s": t2 - t1, "step_s": t2 - t0,
                "scoring_cpu_s": c2 - c1}


def _exact(spark, cfg, run, version, queries) -> dict:
    """retrieval_metrics on the raw vectors read from Delta at `version` (float64)."""
    from fastfill_udfs.metrics import retrieval_metrics
    from fastfill_udfs.spark.delta_io import read_table, table_paths

    pdf = read_table(spark, table_paths(cfg, run).gallery_features, version=version).select(
        "id", "embedding").toPandas()
    gallery = read_table(spark, table_paths(cfg).gallery).select("id", "label").toPandas()
    labels = gallery.set_index("id")["label"].loc[pdf["id"]].to_numpy()
    g = np.stack(pdf["embedding"].to_numpy()).astype(np.float32)
    return retrieval_metrics(queries.embeddings, queries.labels, g, labels, query_ids=queries.ids,
                             gallery_ids=pdf["id"].to_numpy(dtype=object), topk=(1, 5),
                             distance=cfg.get_path("evaluation.distance"))


def run_bench(spark, args) -> dict:
    import pandas as pd

    from fastfill_udfs.config import load_config
    from fastfill_udfs.spark.delta_io import latest_version, table_paths
    from fastfill_udfs.spark.evaluate import QuerySet, RunEvaluator

    root = WORK / "eval_step" / f"n{args.n}_d{args.dim}"
    cfg = load_config([], [f"paths.warehouse={root / 'warehouse'}", "evaluation.num_shards=4",
                           f"evaluation.threads={args.threads}", "run_name=bench"])
    ids, transformed, new = _tables(spark, cfg, args.n, args.dim, args.seed)
    queries = QuerySet(spark, cfg)
    order = np.random.default_rng(args.seed + 1).permutation(args.n)
    out_rows = []
    for b in args.batch_sizes:
        planned = np.zeros(args.n, dtype=np.int32)
        for k in range(1, -(-args.n // b) + 1):
            planned[order[(k - 1) * b:k * b]] = k
        runs = {"today": f"today_b{b}", "new": f"new_b{b}"}
        for run in runs.values():
            _write_features(spark, table_paths(cfg, run).gallery_features, ids, transformed, planned)
        today = TodayPath(spark, cfg, runs["today"], queries)
        fresh = RunEvaluator(spark, cfg, runs["new"], queries=queries)
        steps = []
        for k in range(0, args.steps + 1):
            versions = {}
            if k == 0:
                versions = {p: latest_version(spark, table_paths(cfg, r).gallery_features)
                            for p, r in runs.items()}
            else:
                sel = order[(k - 1) * b:k * b]
                batch = spark.createDataFrame(
                    pd.DataFrame({"id": ids[sel], "embedding": list(new[sel])}),
                    "id string, embedding array<float>").persist()
                batch.count()
                for p, r in runs.items():
                    versions[p] = _merge(spark, table_paths(cfg, r).gallery_features, batch, k, r)
                batch.unpersist()
            n_new = min(k * b, args.n)
            first = ("today", "new") if k % 2 == 0 else ("new", "today")
            got = {}
            for path in first:
                if path == "today":
                    got["today"] = today.step(k, versions["today"])
                else:
                    t = time.perf_counter()
                    metrics = fresh.evaluate_step(k, versions["new"], n_new)
                    total = time.perf_counter() - t
                    timing = fresh.last_timing
                    got["new"] = {"metrics": {m: metrics[m] for m in ("mAP", "top1", "top5")},
                                  "index_update_s": timing["index_update_s"],
                                  "scoring_s": timing["scoring_s"], "step_s": total,
                                  "scoring_cpu_s": timing["scoring_cpu_s"],
                                  "rows_float64": timing["rows_float64"],
                                  "map_error_bound": timing["map_error_bound"]}
            exact = _exact(spark, cfg, runs["new"], versions["new"], queries)
            diff_today = max(abs(got["new"]["metrics"][m] - got["today"]["metrics"][m])
                             for m in ("mAP", "top1", "top5"))
            diff_exact = max(abs(got["new"]["metrics"][m] - exact[m]) for m in ("mAP", "top1", "top5"))
            steps.append({"step": k, "today": got["today"], "new": got["new"],
                          "max_abs_diff_vs_today": diff_today,
                          "max_abs_diff_vs_float64_raw": diff_exact})
            _log(f"b={b} step {k}: today {got['today']['step_s']:.2f} s (index "
                 f"{got['today']['index_update_s']:.2f} + metrics {got['today']['scoring_s']:.2f}, "
                 f"cpu {got['today']['scoring_cpu_s']:.2f}) | new {got['new']['step_s']:.2f} s "
                 f"(index {got['new']['index_update_s']:.2f} + search/metrics "
                 f"{got['new']['scoring_s']:.2f}, cpu {got['new']['scoring_cpu_s']:.2f}) | ratio "
                 f"{got['new']['step_s'] / got['today']['step_s']:.2f} | mAP {exact['mAP']:.4f}, "
                 f"|new - today| {diff_today:.1e}, |new - float64 raw| {diff_exact:.1e}")
        batch_steps = [s for s in steps if s["step"] > 0]
        row = {"batch_size": b, "steps": steps}
        for path in ("today", "new"):
            for part in ("step_s", "index_update_s", "scoring_s", "scoring_cpu_s"):
                row[f"{path}_{part}"] = median([s[path][part] for s in batch_steps])
            row[f"{path}_step0_s"] = steps[0][path]["step_s"]
        row["ratio_new_over_today"] = median([s["new"]["step_s"] / s["today"]["step_s"]
                                              for s in batch_steps])
        out_rows.append(row)
    return {"rows": out_rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="gallery = queries")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch-sizes", type=_sizes, default=_sizes("500,3000"))
    ap.add_argument("--steps", type=int, default=3, help="batches evaluated per batch size")
    ap.add_argument("--threads", type=int, default=0, help="evaluation.threads (0: CPUs)")
    ap.add_argument("--master", default=f"local[{os.cpu_count()}]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="eval_step.json")
    args = ap.parse_args(argv)
    if args.steps * max(args.batch_sizes) > args.n:
        ap.error("--steps x max(--batch-sizes) exceeds --n")
    from fastfill_udfs.spark.session import get_spark

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    start = time.perf_counter()
    machine = machine_info()
    spark = get_spark({"master": args.master, "app_name": "bench-eval-step",
                       "shuffle_partitions": os.cpu_count() or 2, "driver_memory": "3g",
                       "arrow_batch_size": 10000,
                       "conf": {"spark.databricks.delta.snapshotPartitions": "2"}})
    spark.sparkContext.setLogLevel("WARN")
    try:
        res = run_bench(spark, args)
    finally:
        spark.stop()
    out = {"benchmark": "evaluation step: today's path vs the sharded search",
           "command": ".venv/bin/python bench/bench_eval_step.py "
                      + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine, "machine_after": machine_info(), "settings": vars(args),
           "target_s": TARGET_S, "today_idle_s": TODAY_IDLE_S,
           "wall_s": time.perf_counter() - start, **res}
    rows = res["rows"]
    worst = max(rows, key=lambda r: r["new_step_s"])
    out["new_worst_step_s"] = worst["new_step_s"]
    out["ratio_new_over_today"] = max(r["ratio_new_over_today"] for r in rows)
    out["max_abs_diff_vs_float64_raw"] = max(s["max_abs_diff_vs_float64_raw"]
                                             for r in rows for s in r["steps"])
    out["max_abs_diff_vs_today"] = max(s["max_abs_diff_vs_today"] for r in rows for s in r["steps"])
    out["target_met"] = worst["new_step_s"] <= 1.5 * TARGET_S
    print(f"\nEvaluation step, {args.n:,} x {args.n:,} leave-one-out (overall + 2 subgroups), "
          f"median of {args.steps} steps")
    print("| batch size | today s (index + metrics) | new s (index + search/metrics) | "
          "new / today | step 0 today / new s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']:,} | {r['today_step_s']:.2f} ({r['today_index_update_s']:.2f} + "
              f"{r['today_scoring_s']:.2f}) | {r['new_step_s']:.2f} ({r['new_index_update_s']:.2f} + "
              f"{r['new_scoring_s']:.2f}) | {r['ratio_new_over_today']:.2f} | "
              f"{r['today_step0_s']:.2f} / {r['new_step0_s']:.2f} |")
    print(f"\nworst new step {worst['new_step_s']:.2f} s; new/today {out['ratio_new_over_today']:.2f} "
          f"(today's path took {TODAY_IDLE_S} s on an idle machine); "
          f"max |new - float64 raw| {out['max_abs_diff_vs_float64_raw']:.1e}")
    print(f"results: {write_json(args.out, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
