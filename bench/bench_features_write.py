"""Writing `gallery_features` to Delta with and without Parquet dictionaries, side by side.

    .venv/bin/python bench/bench_features_write.py [--rows 1000000] [--dim 128] [--batches 20]
        [--rounds 3] [--master local[2]]

The rows have the features table's columns (id, embedding array<float> of --dim, source,
batch_id, updated_at, model_version, planned_batch_id), are generated in Spark, shuffled by
`planned_batch_id` as rank_gallery does and persisted to disk before any clock starts, so the
timed statement is the partitioned Delta write alone (the Parquet encoding and the commit).
After one untimed write of each, rounds alternate the order of the two variants:
`parquet.enable.dictionary` true (Parquet's own default) and false (conf/base.yaml). Per
variant: write seconds, bytes on disk, the columns that kept a dictionary page, and the seconds
to read the table back (`noop` sink), since the backfill and the evaluation read these files.

Results: bench/results/features_write.json (or --out).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import WORK, machine_info, median, write_json  # noqa: E402

VARIANTS = {"dictionary": "true", "no_dictionary": "false"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20, help="planned batches (partitions)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--out", default="features_write.json")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.rows < 1 or args.dim < 1 or args.batches < 1 or args.rounds < 1:
        raise SystemExit("--rows, --dim, --batches and --rounds must be >= 1")
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from fastfill_udfs.config import load_config
    from fastfill_udfs.spark.delta_io import dictionary_columns, local_data_files, read_table
    from fastfill_udfs.spark.session import get_spark

    cfg = load_config([], [f"spark.master={args.master}", "spark.driver_memory=8g"])
    spark = get_spark(cfg["spark"])
    spark.sparkContext.setLogLevel("WARN")
    rows = (spark.range(args.rows).select(
        F.format_string("g%010d", "id").alias("id"),
        F.array(*[F.randn(j).cast("float") for j in range(args.dim)]).alias("embedding"),
        F.lit("transformed").alias("source"), F.lit(None).cast("int").alias("batch_id"),
        F.current_timestamp().alias("updated_at"), F.lit("models:/h/1").alias("model_version"),
        (F.col("id") % args.batches + 1).cast("int").alias("planned_batch_id"))
        .repartition("planned_batch_id").persist(StorageLevel.DISK_ONLY))
    rows.count()
    base = WORK / "features_write"
    out = {"machine": machine_info(), "command": " ".join(["bench/bench_features_write.py", *(argv or sys.argv[1:])]),
           "settings": vars(args), "runs": {v: [] for v in VARIANTS}}
    for r in range(-1, args.rounds):  # round -1: one untimed write of each (JIT, caches)
        order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
        for name in order:
            path = base / name
            shutil.rmtree(path, ignore_errors=True)
            spark.conf.set("parquet.enable.dictionary", VARIANTS[name])  # wins over spark.hadoop.*
            t = time.perf_counter()
            rows.write.format("delta").mode("overwrite").partitionBy("planned_batch_id").save(str(path))
            write_s = time.perf_counter() - t
            t = time.perf_counter()
            read_table(spark, str(path)).write.format("noop").mode("overwrite").save()
            read_s = time.perf_counter() - t
            files = local_data_files(spark, str(path))
            run = {"write_s": write_s, "read_s": read_s, "files": len(files),
                   "mib": sum(os.path.getsize(f) for f in files) / 2**20,
                   "dictionary_columns": sorted(set().union(*map(dictionary_columns, files)))}
            if r >= 0:
                out["runs"][name].append(run)
            print(f"round {r if r >= 0 else 'warm-up'} {name:14s} write {write_s:5.1f} s  read {read_s:4.1f} s  "
                  f"{run['mib']:6.0f} MiB in {len(files)} files; dictionaries: "
                  f"{run['dictionary_columns'] or 'none'}", flush=True)
    spark.conf.unset("parquet.enable.dictionary")
    rows.unpersist()
    summary = {name: {k: median([x[k] for x in runs]) for k in ("write_s", "read_s", "mib")}
               for name, runs in out["runs"].items()}
    summary["write_ratio"] = summary["no_dictionary"]["write_s"] / summary["dictionary"]["write_s"]
    summary["read_ratio"] = summary["no_dictionary"]["read_s"] / summary["dictionary"]["read_s"]
    out["summary"] = summary
    print(f"\n{args.rows:,} x {args.dim} rows, medians of {args.rounds}: write "
          f"{summary['dictionary']['write_s']:.1f} s with dictionaries, "
          f"{summary['no_dictionary']['write_s']:.1f} s without ({summary['write_ratio']:.2f}x); "
          f"read back {summary['read_ratio']:.2f}x; size "
          f"{summary['dictionary']['mib']:.0f} -> {summary['no_dictionary']['mib']:.0f} MiB")
    print(f"results: {write_json(args.out, out)}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
