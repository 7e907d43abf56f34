"""Per-batch cost of a backfill: the Delta MERGE of a batch's new embeddings into
gallery_features, versus batch size. (The evaluation step after it is measured by
bench/bench_eval_step.py, side by side with the path it replaced.)

    .venv/bin/python bench/bench_batch_cost.py [--gallery 100000] [--dim 64]
        [--batch-sizes 1000,5000,20000] [--merges 3] [--deletion-vectors]

MERGE (images are not needed: the new embeddings of each batch are precomputed,
persisted and counted before the clock starts). A synthetic ``gallery_features`` Delta table of
--gallery rows (id, embedding array<float> of --dim, source, batch_id, updated_at), generated in
Spark. Batches take the ids of a seeded random permutation in turn (a ranked plan is unrelated to
the id order, so a batch touches every data file), and batch sizes are interleaved round by round.
The timed statement is the backfill's MERGE (``f.id = n.id``, whenMatchedUpdate of embedding,
source, batch_id, updated_at). With --deletion-vectors the same batches are also merged into a
copy with ``delta.enableDeletionVectors = true`` (a MERGE then writes only the changed rows
instead of rewriting every touched file).

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


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.merges * sum(args.batch_sizes) > args.gallery:
        ap.error(f"--merges x sum(--batch-sizes) = {args.merges * sum(args.batch_sizes)} exceeds "
                 f"--gallery {args.gallery}")
    from fastfill_udfs.spark.session import get_spark

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    start = time.perf_counter()
    spark = get_spark({"master": args.master, "app_name": "bench-batch-cost",
                       "shuffle_partitions": os.cpu_count() or 2, "driver_memory": "3g",
                       "arrow_batch_size": 10000,
                       "conf": {"spark.databricks.delta.snapshotPartitions": "2"}})
    spark.sparkContext.setLogLevel("WARN")
    out = {"benchmark": "per-batch cost: Delta MERGE vs batch size",
           "command": ".venv/bin/python bench/bench_batch_cost.py "
                      + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "settings": vars(args)}
    try:
        out["merge"] = part_merge(spark, args)
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
    path = write_json(args.out, out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
