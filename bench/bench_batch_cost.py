"""Per-batch cost of a backfill: the Delta MERGE of a batch's new embeddings into
gallery_features, and the evaluation step after it, versus batch size.

    .venv/bin/python bench/bench_batch_cost.py [--gallery 100000] [--dim 64]
        [--batch-sizes 1000,5000,20000] [--merges 3] [--deletion-vectors]
        [--eval-gallery 10000] [--eval-batch-sizes 500,1000,3000] [--eval-steps 3]

Part A, MERGE (images are not needed: the new embeddings of each batch are precomputed,
persisted and counted before the clock starts). A synthetic ``gallery_features`` Delta table of
--gallery rows (id, embedding array<float> of --dim, source, batch_id, updated_at), generated in
Spark. Batches take the ids of a seeded random permutation in turn (a ranked plan is unrelated to
the id order, so a batch touches every data file), and batch sizes are interleaved round by round.
The timed statement is the backfill's MERGE (``f.id = n.id``, whenMatchedUpdate of embedding,
source, batch_id, updated_at). With --deletion-vectors the same batches are also merged into a
copy with ``delta.enableDeletionVectors = true`` (a MERGE then writes only the changed rows
instead of rewriting every touched file).

Part B, evaluation step (the project's ``evaluate.RunEvaluator``): gallery = queries =
--eval-gallery items in 10 classes (leave-one-out, with the pipeline's two subgroups), features
written to Delta. Per eval batch size, a fresh run: step 0 (full faiss build), then --eval-steps
batches, each = MERGE of the batch + ``evaluate_step`` (read gallery_features at the committed
version, the changed rows to pandas, faiss upsert, then exact mAP / top-k over the full ranking,
overall and per subgroup). Reported: the index-update part and the metrics part separately.

Target (BENCHMARKS.md): a 10k x 10k leave-one-out evaluation step in about a second.
Results: bench/results/batch_cost.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import WORK, machine_info, median, timed, write_json  # noqa: E402

TARGET_EVAL_S = 1.0


def _sizes(text: str) -> list[int]:
    out = [int(float(x)) for x in text.replace("_", "").split(",") if x.strip()]
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"need positive sizes, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", type=int, default=100_000, help="rows of gallery_features (part A)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch-sizes", type=_sizes, default=_sizes("1000,5000,20000"))
    ap.add_argument("--merges", type=int, default=3, help="MERGEs per batch size (part A)")
    ap.add_argument("--deletion-vectors", action="store_true",
                    help="also MERGE into a copy with delta.enableDeletionVectors=true")
    ap.add_argument("--eval-gallery", type=int, default=10_000, help="gallery = queries (part B)")
    ap.add_argument("--eval-batch-sizes", type=_sizes, default=_sizes("500,1000,3000"))
    ap.add_argument("--eval-steps", type=int, default=3, help="batches evaluated per batch size")
    ap.add_argument("--skip-merge", action="store_true", help="only part B")
    ap.add_argument("--skip-eval", action="store_true", help="only part A")
    ap.add_argument("--master", default=f"local[{os.cpu_count()}]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="batch_cost.json")
    return ap


def _log(msg: str) -> None:
    print(f"[batch-cost {time.strftime('%H:%M:%S')}] {msg}", flush=True)


FEATURES_SCHEMA = ("id string, embedding array<float>, source string, batch_id int, "
                   "updated_at timestamp")


def _features_df(spark, n: int, dim: int, seed: int, parts: int):
    from pyspark.sql import functions as F

    return spark.range(0, n, 1, numPartitions=parts).select(
        F.format_string("g%010d", F.col("id")).alias("id"),
        F.array(*[F.randn(seed * 100_003 + j).cast("float") for j in range(dim)]).alias("embedding"),
        F.lit("transformed").alias("source"), F.lit(None).cast("int").alias("batch_id"),
        F.current_timestamp().alias("updated_at"))


def _batch_df(spark, ids: np.ndarray, dim: int, seed: int):
    """New embeddings for `ids`, persisted and materialised (not part of any timing)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(str(i),) for i in ids], "id string").select(
        "id", F.array(*[F.randn(seed + j).cast("float") for j in range(dim)]).alias("embedding"))
    df = df.repartition(max(1, spark.sparkContext.defaultParallelism)).persist(StorageLevel.MEMORY_ONLY)
    df.count()
    return df


def merge_batch(spark, path: str, batch_df, batch_id: int) -> None:
    """The backfill's MERGE statement (fastfill_udfs/spark/backfill.py)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    (DeltaTable.forPath(spark, path).alias("f")
     .merge(batch_df.alias("n"), "f.id = n.id")
     .whenMatchedUpdate(set={"embedding": "n.embedding", "source": "'new'",
                             "batch_id": F.lit(batch_id), "updated_at": F.current_timestamp()})
     .execute())


def part_merge(spark, args) -> dict:
    from fastfill_udfs.spark.delta_io import write_table

    root = WORK / "batch_cost" / f"merge_n{args.gallery}_d{args.dim}"
    variants = {"plain": str(root / "gallery_features")}
    if args.deletion_vectors:
        variants["deletion_vectors"] = str(root / "gallery_features_dv")
    parts = max(2, args.gallery // 25_000)
    for name, path in variants.items():
        t, _ = timed(lambda: write_table(_features_df(spark, args.gallery, args.dim, args.seed,
                                                      parts), path))
        if name == "deletion_vectors":
            spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES "
                      "('delta.enableDeletionVectors' = 'true')")
        _log(f"MERGE target {name}: {args.gallery:,} rows in {parts} files written in {t:.1f} s")
    perm = np.random.default_rng(args.seed).permutation(args.gallery)
    ids = np.array([f"g{i:010d}" for i in perm])
    times = {name: {b: [] for b in args.batch_sizes} for name in variants}
    cursor, batch_id = 0, 0
    for r in range(args.merges):
        for b in args.batch_sizes:
            batch_id += 1
            df = _batch_df(spark, ids[cursor:cursor + b], args.dim, args.seed + batch_id)
            cursor += b
            for name, path in (variants.items() if r % 2 == 0 else reversed(variants.items())):
                t, _ = timed(lambda: merge_batch(spark, path, df, batch_id))
                times[name][b].append(t)
                _log(f"round {r + 1}: MERGE {b:>6,} rows into {name}: {t:.2f} s")
            df.unpersist()
    rows = []
    for name in variants:
        for b in args.batch_sizes:
            med = median(times[name][b])
            rows.append({"variant": name, "batch_size": b, "merge_s": med,
                         "rows_per_s": b / med, "runs_s": times[name][b]})
    return {"gallery_rows": args.gallery, "files": parts, "rows": rows}


def _eval_tables(spark, cfg, n: int, dim: int, seed: int):
    """gallery (id, label, subgroup), query_features (new-model embeddings) and the arrays
    used for a run's features: transformed (noisy) and new vectors per item."""
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


def part_eval(spark, args) -> dict:
    import pandas as pd
    from pyspark.sql import functions as F

    from fastfill_udfs.config import load_config
    from fastfill_udfs.spark.delta_io import latest_version, table_paths, write_table
    from fastfill_udfs.spark.evaluate import QuerySet, RunEvaluator

    n = args.eval_gallery
    root = WORK / "batch_cost" / f"eval_n{n}_d{args.dim}"
    cfg = load_config([], [f"paths.warehouse={root / 'warehouse'}", "evaluation.num_shards=4",
                           "run_name=bench"])
    ids, transformed, new = _eval_tables(spark, cfg, n, args.dim, args.seed)
    t_q, queries = timed(lambda: QuerySet(spark, cfg))
    order = np.random.default_rng(args.seed + 1).permutation(n)
    rows = []
    for b in args.eval_batch_sizes:
        run = f"bench_b{b}"
        paths = table_paths(cfg, run)
        write_table(spark.createDataFrame(
            pd.DataFrame({"id": ids, "embedding": list(transformed), "source": "transformed",
                          "batch_id": None, "updated_at": pd.Timestamp.now(tz="UTC")}),
            FEATURES_SCHEMA), paths.gallery_features)
        t_init, ev = timed(lambda: RunEvaluator(spark, cfg, run, queries=queries))
        index_s: list[float] = []
        inner = ev._update_index

        def timed_update(batch_id, version, _inner=inner):
            t = time.perf_counter()
            _inner(batch_id, version)
            index_s.append(time.perf_counter() - t)
        ev._update_index = timed_update
        t0, m0 = timed(lambda: ev.evaluate_step(0, latest_version(spark, paths.gallery_features), 0))
        step0 = {"step_s": t0, "index_s": index_s[-1], "metrics_s": t0 - index_s[-1]}
        _log(f"eval b={b}: RunEvaluator init {t_init:.1f} s (new/new reference), step 0 (full "
             f"build) {t0:.2f} s = index {step0['index_s']:.2f} + metrics {step0['metrics_s']:.2f}")
        merges, steps = [], []
        for k in range(1, args.eval_steps + 1):
            sel = order[(k - 1) * b:k * b]
            batch = spark.createDataFrame(pd.DataFrame({"id": ids[sel], "embedding": list(new[sel])}),
                                          "id string, embedding array<float>").persist()
            batch.count()
            tm, _ = timed(lambda: merge_batch(spark, paths.gallery_features, batch, k))
            batch.unpersist()
            version = latest_version(spark, paths.gallery_features)
            te, m = timed(lambda: ev.evaluate_step(k, version, k * b))
            merges.append(tm)
            steps.append({"step_s": te, "index_s": index_s[-1], "metrics_s": te - index_s[-1],
                          "mAP": m["mAP"], "backfill_fraction": m["backfill_fraction"]})
            _log(f"eval b={b} step {k}: MERGE {tm:.2f} s; evaluate_step {te:.2f} s = index update "
                 f"{index_s[-1]:.2f} + metrics {te - index_s[-1]:.2f} (mAP {m['mAP']:.4f} at "
                 f"t={m['backfill_fraction']:.2f})")
        rows.append({"batch_size": b, "merge_s": median(merges),
                     "step_s": median([s["step_s"] for s in steps]),
                     "index_update_s": median([s["index_s"] for s in steps]),
                     "metrics_s": median([s["metrics_s"] for s in steps]),
                     "step0_full_build": step0, "evaluator_init_s": t_init, "steps": steps})
    return {"gallery": n, "queries": n, "subgroups": ["footwear", "rest"], "queryset_load_s": t_q,
            "rows": rows}


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.skip_merge and args.merges * sum(args.batch_sizes) > args.gallery:
        ap.error(f"--merges x sum(--batch-sizes) = {args.merges * sum(args.batch_sizes)} exceeds "
                 f"--gallery {args.gallery}")
    if not args.skip_eval and args.eval_steps * max(args.eval_batch_sizes) > args.eval_gallery:
        ap.error("--eval-steps x max(--eval-batch-sizes) exceeds --eval-gallery")
    from fastfill_udfs.spark.session import get_spark

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    start = time.perf_counter()
    spark = get_spark({"master": args.master, "app_name": "bench-batch-cost",
                       "shuffle_partitions": os.cpu_count() or 2, "driver_memory": "3g",
                       "arrow_batch_size": 10000,
                       "conf": {"spark.databricks.delta.snapshotPartitions": "2"}})
    spark.sparkContext.setLogLevel("WARN")
    out = {"benchmark": "per-batch cost: Delta MERGE and evaluation step vs batch size",
           "command": ".venv/bin/python bench/bench_batch_cost.py "
                      + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "settings": vars(args),
           "targets": {"eval_step_10k_s": TARGET_EVAL_S}}
    try:
        if not args.skip_merge:
            out["merge"] = part_merge(spark, args)
        if not args.skip_eval:
            out["eval"] = part_eval(spark, args)
    finally:
        spark.stop()
    out["wall_s"] = time.perf_counter() - start

    if "merge" in out:
        print(f"\nMERGE into gallery_features ({out['merge']['gallery_rows']:,} rows, dim {args.dim}); "
              f"median of {args.merges}")
        print("| variant | batch size | MERGE s | rows/s |")
        print("|---|---|---|---|")
        for r in out["merge"]["rows"]:
            print(f"| {r['variant']} | {r['batch_size']:,} | {r['merge_s']:.2f} | {r['rows_per_s']:,.0f} |")
    if "eval" in out:
        e = out["eval"]
        print(f"\nEvaluation step ({e['gallery']:,} x {e['queries']:,} leave-one-out, overall + 2 "
              f"subgroups); median of {args.eval_steps} steps")
        print("| batch size | MERGE s | evaluate_step s | index update s | metrics s | "
              "step 0 (full build) s |")
        print("|---|---|---|---|---|---|")
        for r in e["rows"]:
            print(f"| {r['batch_size']:,} | {r['merge_s']:.2f} | {r['step_s']:.2f} | "
                  f"{r['index_update_s']:.2f} | {r['metrics_s']:.2f} | "
                  f"{r['step0_full_build']['step_s']:.2f} |")
        worst = max(r["step_s"] for r in e["rows"])
        out["eval_target_met"] = worst <= 1.5 * TARGET_EVAL_S
        print(f"\nevaluation step at {e['gallery']:,} x {e['queries']:,}: up to {worst:.2f} s "
              f"(target about {TARGET_EVAL_S:.0f} s: {'met' if out['eval_target_met'] else 'MISSED'})")
    path = write_json(args.out, out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
