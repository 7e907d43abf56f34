"""A batch costs what the batch holds: per-batch cost of the real jobs vs the gallery's size.

    .venv/bin/python bench/bench_scaling.py [--sizes 100000,1000000,10000000] [--batch 10000]
        [--measure-batches 3] [--whole 1000000] [--before-sizes 100000,1000000]
        [--images distinct|pool] [--reuse]

Per gallery size N, in a fresh child process (so one size's caches and JVM state do not carry
into the next):
1. A synthetic gallery Delta table (`id`, `label`, `image` = a tiny 8x8 grey image,
   `old_embedding` 64-d) is generated in Spark under `.cache/bench/scaling/n<N>[_distinct]/`
   and reused by later runs. --images distinct (default): every row its own image (a PGM whose
   64 pixels are the SHA-256 of its id, made in Spark SQL), so the new embeddings are as
   distinct as real ones and the features table compresses like real data; pool: one of 64
   PNGs (the first measurements; the new embeddings then compress ~8x).
2. `rank.rank_gallery` with a random `h` (64 -> 64, hidden 256) and batches of --batch items:
   its wall time and the bytes it wrote (Delta `operationMetrics.numOutputBytes`).
3. --measure-batches backfill batches through `backfill.run_backfill` (no evaluation) with a tiny
   new model (the demo's CNN on 8x8 images, 64-d): per batch the wall time, the MERGE's
   `numTargetRowsUpdated` / `numTargetRowsCopied` / bytes added and removed, and the bytes read
   (input + shuffle read of the Spark stages that ran during the batch, from the Spark UI's REST
   API).
4. "Before" (--before-sizes): the same MERGE of a batch into an unpartitioned copy of the
   features table, as the pipeline did before (a batch's ids are spread over every file).
5. At N = --whole: the rest of the backfill, every batch; total bytes written by all MERGEs
   against the final features table's size.
Results: bench/results/scaling.json (or --out); BENCHMARKS.md via bench/run_all.py.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, WORK, machine_info, median, timed, write_json  # noqa: E402

DIM, NEW_DIM, IMG = 64, 64, 8


def _log(msg: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--measure-batches", type=int, default=3)
    p.add_argument("--whole", type=int, default=1_000_000,
                   help="backfill the whole gallery of this size (0: none)")
    p.add_argument("--before-sizes", default="100000,1000000")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="8g")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", choices=("distinct", "pool"), default="distinct",
                   help="one image per row (default) or 64 shared ones")
    p.add_argument("--out", default="scaling.json")
    p.add_argument("--reuse", action="store_true",
                   help="take a size's result from an earlier run of this script when there is one "
                        "(.cache/bench/scaling/result_n<N>.json), run only the missing sizes")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    return p


# ============================================================================ child
def _png_pool(n: int = 64) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (IMG, IMG), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _images_suffix(images: str) -> str:
    """Folder / result name suffix: "" for the pooled images (the first runs' names)."""
    return "" if images == "pool" else f"_{images}"


def _distinct_image(id_col):
    """An 8x8 8-bit PGM per row: its 64 pixels are SHA-256 of the id and of the id + "/2"."""
    from pyspark.sql import functions as F

    header = F.lit(f"P5\n{IMG} {IMG}\n255\n".encode())
    return F.concat(header, F.unhex(F.sha2(id_col, 256)),
                    F.unhex(F.sha2(F.concat(id_col, F.lit("/2")), 256)))


def ensure_gallery(spark, path: str, marker: Path, n: int, seed: int,
                   images: str = "distinct") -> bool:
    from pyspark.sql import functions as F

    from fastfill_udfs.spark.delta_io import is_delta_table, write_table

    want = {"rows": n, "dim": DIM, "seed": seed, "img": IMG, "pool": 64}
    if images == "distinct":
        want = {**want, "pool": 0, "images": "distinct"}
    if marker.is_file() and json.loads(marker.read_text()) == want and is_delta_table(spark, path):
        return False
    ids = F.format_string("g%010d", F.col("id"))
    image = (_distinct_image(ids) if images == "distinct" else F.element_at(
        F.array(*[F.lit(b) for b in _png_pool()]), (F.col("id") % 64 + 1).cast("int")))
    df = spark.range(0, n, 1, numPartitions=max(2, n // 250_000)).select(
        ids.alias("id"),
        (F.col("id") % 10).cast("int").alias("label"),
        image.alias("image"),
        F.array(*[F.randn(seed * 100_003 + j).cast("float") for j in range(DIM)])
        .alias("old_embedding"))
    write_table(df, path)
    marker.write_text(json.dumps(want))
    return True


class StageBytes:
    """Bytes read (input + shuffle read) by the Spark stages completed since `mark()`, from the
    Spark UI's REST API."""

    def __init__(self, spark):
        sc = spark.sparkContext
        self.url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/stages?status=complete"
        self.seen: set = set()
        self.mark()

    def _stages(self) -> list[dict]:
        with urllib.request.urlopen(self.url, timeout=30) as resp:
            return json.loads(resp.read())

    def mark(self) -> None:
        self.seen = {(s["stageId"], s["attemptId"]) for s in self._stages()}

    def since_mark(self) -> dict:
        new = [s for s in self._stages() if (s["stageId"], s["attemptId"]) not in self.seen]
        return {"input_bytes": sum(s.get("inputBytes", 0) for s in new),
                "shuffle_read_bytes": sum(s.get("shuffleReadBytes", 0) for s in new),
                "stages": len(new)}


def _history(spark, path: str, n: int = 1) -> list[dict]:
    from delta.tables import DeltaTable

    rows = DeltaTable.forPath(spark, path).history(n).select(
        "version", "operation", "operationMetrics").collect()
    return [{"version": r["version"], "operation": r["operation"],
             "metrics": {k: int(v) for k, v in (r["operationMetrics"] or {}).items()
                         if str(v).isdigit()}} for r in rows]


def _table_bytes(spark, path: str) -> int:
    return int(spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()["sizeInBytes"])


def run_child(args) -> dict:
    import torch

    from fastfill_udfs.config import load_config
    from fastfill_udfs.demo.cnn import EmbeddingCNN
    from fastfill_udfs.model_loading import ModelRef
    from fastfill_udfs.models import Transformation
    from fastfill_udfs.spark.backfill import backfill_batch, run_backfill
    from fastfill_udfs.spark.delta_io import table_paths
    from fastfill_udfs.spark.rank import plan_metadata, rank_gallery
    from fastfill_udfs.spark.session import get_spark

    n = args.child
    base = WORK / "scaling" / f"n{n}{_images_suffix(args.images)}"
    base.mkdir(parents=True, exist_ok=True)
    cfg = load_config([], [
        f"paths.warehouse={base / 'warehouse'}", f"paths.outputs={base / 'outputs'}",
        f"spark.master={args.master}", f"spark.driver_memory={args.driver_memory}",
        f"backfill.batch_size={args.batch}", "backfill.num_batches=0", "backfill.device=cpu",
        "backfill.inference_batch_size=1024", f"models.preprocess.size=[{IMG}, {IMG}]",
        "run_name=bench", f"seed={args.seed}", "spark.shuffle_partitions=8"])
    spark = get_spark(cfg["spark"])
    spark.sparkContext.setLogLevel("WARN")
    paths = table_paths(cfg, "bench_uncertainty")
    out: dict = {"rows": n, "batch": args.batch, "images": args.images}
    t, made = timed(lambda: ensure_gallery(spark, paths.gallery, base / "gallery.json", n,
                                           args.seed, args.images))
    if made:
        out["generate_s"] = t
        _log(f"n={n}: generated the gallery in {t:.0f} s")
    out["gallery_bytes"] = _table_bytes(spark, paths.gallery)

    torch.manual_seed(args.seed)
    h = ModelRef.from_module(Transformation(DIM, NEW_DIM, 256, 2), "bench-h")
    new = ModelRef.from_module(EmbeddingCNN([8], NEW_DIM, 10), "bench-new")
    t, res = timed(lambda: rank_gallery(spark, cfg, h, new, "uncertainty", "bench_uncertainty",
                                        force=True))
    written = sum(c["metrics"].get("numOutputBytes", 0)
                  for p in (paths.backfill_plan, paths.gallery_features)
                  for c in _history(spark, p, 1))
    out["rank"] = {"seconds": t, "bytes_written": written, **{k: v for k, v in res.items()
                                                               if isinstance(v, int)}}
    _log(f"n={n}: rank_gallery {t:.0f} s, wrote {written / 2**20:.0f} MiB")
    features_bytes = _table_bytes(spark, paths.gallery_features)
    out["features_bytes_after_rank"] = features_bytes

    meta = plan_metadata(spark, cfg, "bench_uncertainty")
    meta["last_version"] = _history(spark, paths.gallery_features)[0]["version"]
    probe = StageBytes(spark)
    batches = []
    for batch_id in range(1, args.measure_batches + 1):
        probe.mark()
        t, (n_items, version) = timed(lambda: backfill_batch(spark, cfg, new, "bench_uncertainty",
                                                             batch_id, meta))
        meta["last_version"] = version
        merge = _history(spark, paths.gallery_features)[0]["metrics"]
        read = probe.since_mark()
        batches.append({"batch_id": batch_id, "seconds": t, "items": n_items,
                        "rows_updated": merge.get("numTargetRowsUpdated"),
                        "rows_copied": merge.get("numTargetRowsCopied"),
                        "bytes_added": merge.get("numTargetBytesAdded"),
                        "bytes_removed": merge.get("numTargetBytesRemoved"),
                        "files_added": merge.get("numTargetFilesAdded"),
                        "files_removed": merge.get("numTargetFilesRemoved"), **read})
        _log(f"n={n} batch {batch_id}: {t:.1f} s, rows copied {merge.get('numTargetRowsCopied')}, "
             f"written {merge.get('numTargetBytesAdded', 0) / 2**20:.1f} MiB, read "
             f"{(read['input_bytes'] + read['shuffle_read_bytes']) / 2**20:.1f} MiB")
        # log it, so that run_backfill (whole gallery) continues after it
        from datetime import datetime, timezone

        from fastfill_udfs.spark.backfill import append_log_row
        append_log_row(spark, paths.backfill_log, batch_id, n_items, version,
                       datetime.now(timezone.utc))
    out["batches"] = batches

    if n in args.before_sizes:
        out["before"] = before_layout(spark, cfg, paths, args, probe)

    if n == args.whole:
        merges_before = len(batches)
        t, done = timed(lambda: run_backfill(spark, cfg, new, "bench_uncertainty"))
        hist = _history(spark, paths.gallery_features, len(done) + merges_before + 1)
        merges = [c for c in hist if c["operation"] == "MERGE"]
        total = sum(c["metrics"].get("numTargetBytesAdded", 0) for c in merges)
        final = _table_bytes(spark, paths.gallery_features)
        out["whole"] = {"seconds_rest": t, "batches_rest": len(done),
                        "batches_total": len(done) + merges_before,
                        "merge_bytes_written": total, "rank_features_bytes": features_bytes,
                        "final_features_bytes": final,
                        "written_over_final": (total + features_bytes) / final}
        _log(f"n={n}: whole backfill: {len(done)} more batches in {t:.0f} s; MERGEs wrote "
             f"{total / 2**20:.0f} MiB (+ rank {features_bytes / 2**20:.0f} MiB) for a "
             f"{final / 2**20:.0f} MiB table")
    spark.stop()
    return out


def before_layout(spark, cfg, paths, args, probe) -> dict:
    """The MERGE of one batch into an unpartitioned features table (the layout before)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from fastfill_udfs.spark.delta_io import read_table, write_table

    flat = paths.gallery_features + "_unpartitioned"
    write_table(read_table(spark, paths.gallery_features).drop("planned_batch_id")
                .repartition(max(2, args.child // 250_000)), flat)
    batch_id = args.measure_batches + 1
    ids = read_table(spark, paths.backfill_plan).where(F.col("batch_id") == batch_id).select("id")
    update = ids.withColumn("embedding", F.array(*[F.lit(0.5).cast("float")] * NEW_DIM))
    probe.mark()
    t, _ = timed(lambda: DeltaTable.forPath(spark, flat).alias("f")
                 .merge(update.alias("n"), "f.id = n.id")
                 .whenMatchedUpdate(set={"embedding": "n.embedding", "source": "'new'"})
                 .execute())
    merge = _history(spark, flat)[0]["metrics"]
    read = probe.since_mark()
    _log(f"n={args.child} before (unpartitioned): MERGE {t:.1f} s, rows copied "
         f"{merge.get('numTargetRowsCopied')}")
    return {"seconds_merge_only": t, "rows_updated": merge.get("numTargetRowsUpdated"),
            "rows_copied": merge.get("numTargetRowsCopied"),
            "bytes_added": merge.get("numTargetBytesAdded"),
            "bytes_removed": merge.get("numTargetBytesRemoved"), **read}


# ============================================================================ parent
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.before_sizes = [int(x) for x in args.before_sizes.split(",") if x]
    if args.child:
        result = run_child(args)
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    sizes = [int(x) for x in args.sizes.split(",") if x]
    results = []
    for n in sizes:
        tmp = WORK / "scaling" / f"result_n{n}{_images_suffix(args.images)}.json"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--child", str(n), "--child-out", str(tmp),
               "--batch", str(args.batch), "--measure-batches", str(args.measure_batches),
               "--whole", str(args.whole),
               "--before-sizes=" + ",".join(map(str, args.before_sizes)), "--master", args.master,
               "--driver-memory", args.driver_memory, "--seed", str(args.seed),
               "--images", args.images]
        if args.reuse and tmp.is_file():
            _log(f"n={n}: reusing {tmp}")
        else:
            _log(f"n={n}: {' '.join(cmd[1:])}")
            subprocess.run(cmd, cwd=ROOT, check=True)
        results.append(json.loads(tmp.read_text()))
    summary = summarise(results, args.batch)
    payload = {"command": "bench/bench_scaling.py " + " ".join(argv or sys.argv[1:]),
               "machine": machine_info(), "sizes": results, "summary": summary}
    write_json(args.out, payload)
    print(json.dumps(summary, indent=2))
    return 0


def summarise(results: list[dict], batch: int) -> dict:
    rows = []
    for r in results:
        b = r["batches"]
        rows.append({"rows": r["rows"], "batch_s": median([x["seconds"] for x in b]),
                     "rows_copied": median([x["rows_copied"] or 0 for x in b]),
                     "rows_rewritten": median([(x["rows_copied"] or 0) + (x["rows_updated"] or 0)
                                               for x in b]),
                     "bytes_written": median([x["bytes_added"] or 0 for x in b]),
                     "bytes_read": median([x["input_bytes"] + x["shuffle_read_bytes"] for x in b]),
                     "rank_s": r["rank"]["seconds"]})
    out: dict = {"per_size": rows}
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        out["flatness"] = {k: hi[k] / lo[k] if lo[k] else None
                           for k in ("batch_s", "bytes_written", "bytes_read")}
        out["flat_target_met"] = all(v is not None and v <= 1.5 for v in out["flatness"].values())
    out["rows_rewritten_over_batch_max"] = max(r["rows_rewritten"] for r in rows) / batch
    whole = [r["whole"] for r in results if "whole" in r]
    if whole:
        out["written_over_final"] = whole[0]["written_over_final"]
    return out


if __name__ == "__main__":
    sys.exit(main())
