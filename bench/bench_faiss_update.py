"""Full rebuild vs incremental upsert of a backfill batch in ShardedGalleryIndex (no asserts).

    .venv/bin/python bench/bench_faiss_update.py [--n 1000000] [--dim 64] [--batch-frac 0.01]
        [--shards 4] [--repeats 3] [--threads 0] [--per-key-sample 5] [--out FILE]

Data: a synthetic n x dim Gaussian gallery under keys 0..n-1. Each repeat draws a batch of
batch-frac * n existing keys with fresh vectors (what a backfill batch does) and times, in the
same run and on the same index size:

* rebuild: ``ShardedGalleryIndex.build`` of the whole gallery (normalise + add_with_ids);
* upsert inplace: ``upsert(method="inplace")``, vectors of present keys overwritten in place;
* upsert remove_add: ``upsert(method="remove_add")``, one ``remove_ids(IDSelectorBatch)`` per
  shard, then ``add_with_ids``;
* remove per key (extrapolated): one ``IndexIDMap2.remove_ids`` call per key, timed on
  --per-key-sample keys and scaled to the batch size (0 skips it).

Prints the medians, the ratios rebuild/upsert (target >= 5x) and one markdown table row; with
--out also a JSON file (a bare name lands in bench/results/).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fastfill_udfs.faiss_index import ShardedGalleryIndex  # noqa: E402


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=_positive(int), default=1_000_000, help="gallery size")
    ap.add_argument("--dim", type=_positive(int), default=64, help="vector width")
    ap.add_argument("--batch-frac", type=_positive(float), default=0.01,
                    help="backfill batch as a fraction of the gallery (0 < f <= 1)")
    ap.add_argument("--shards", type=_positive(int), default=4)
    ap.add_argument("--repeats", type=_positive(int), default=3)
    ap.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    ap.add_argument("--per-key-sample", type=int, default=5,
                    help="keys timed for the one-remove_ids-per-key variant (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON results (e.g. faiss_update.json)")
    args = ap.parse_args()
    if args.batch_frac > 1:
        ap.error(f"--batch-frac must be in (0, 1], got {args.batch_frac}")
    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    n, dim = args.n, args.dim
    batch = max(1, int(round(args.batch_frac * n)))
    keys = np.arange(n, dtype=np.int64)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    print(f"n={n} dim={dim} shards={args.shards} batch={batch} ({args.batch_frac:g}) "
          f"repeats={args.repeats} faiss threads={faiss.omp_get_max_threads()} cpus={os.cpu_count()}")

    batches = [(np.sort(rng.choice(n, size=batch, replace=False)).astype(np.int64),
                rng.standard_normal((batch, dim), dtype=np.float32)) for _ in range(args.repeats)]

    rebuild, inplace, remove_add = [], [], []
    index = None
    for r in range(args.repeats):
        index = None                                               # free the previous one first
        fresh = ShardedGalleryIndex(dim, num_shards=args.shards)
        rebuild.append(_timed(lambda: fresh.build(keys, x)))
        index = fresh
    for bk, bx in batches:
        inplace.append(_timed(lambda: index.upsert(bk, bx, method="inplace")))
        assert index.ntotal == n
    for bk, bx in batches:
        remove_add.append(_timed(lambda: index.upsert(bk, bx, method="remove_add")))
        assert index.ntotal == n

    per_key = None
    if args.per_key_sample > 0:                                    # one remove_ids per key
        sample = batches[0][0][: args.per_key_sample]
        shard = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        shard.add_with_ids(x[: n // args.shards], keys[: n // args.shards])
        t = _timed(lambda: [shard.remove_ids(np.array([k], dtype=np.int64)) for k in sample])
        per_key = t / len(sample) * batch                          # each call scans a shard

    med = {name: statistics.median(v) for name, v in
           (("rebuild", rebuild), ("inplace", inplace), ("remove_add", remove_add))}
    print(f"rebuild            median {med['rebuild']:8.4f} s   runs {[round(t, 4) for t in rebuild]}")
    print(f"upsert inplace     median {med['inplace']:8.4f} s   runs {[round(t, 4) for t in inplace]}"
          f"   rebuild/upsert = {med['rebuild'] / med['inplace']:.1f}x")
    print(f"upsert remove_add  median {med['remove_add']:8.4f} s   runs "
          f"{[round(t, 4) for t in remove_add]}   rebuild/upsert = {med['rebuild'] / med['remove_add']:.1f}x")
    if per_key is not None:
        print(f"remove per key     ~{per_key:8.2f} s   (extrapolated from {len(sample)} keys on one "
              f"shard of {n // args.shards}; rebuild/upsert = {med['rebuild'] / per_key:.3f}x)")
    ok = med["rebuild"] / med["inplace"] >= 5
    print(f"target rebuild/upsert >= 5x with inplace: {'met' if ok else 'NOT met'}")
    print()
    print("| n | dim | shards | batch | rebuild s | upsert inplace s | ratio | upsert remove_add s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {n} | {dim} | {args.shards} | {batch} | {med['rebuild']:.4f} | {med['inplace']:.4f} | "
          f"{med['rebuild'] / med['inplace']:.1f}x | {med['remove_add']:.4f} | "
          f"{med['rebuild'] / med['remove_add']:.1f}x |")
    if args.out:
        from _common import machine_info, write_json

        path = write_json(args.out, {
            "benchmark": "faiss ShardedGalleryIndex: full rebuild vs incremental upsert",
            "command": ".venv/bin/python bench/bench_faiss_update.py " + " ".join(sys.argv[1:]),
            "machine": machine_info(), "settings": vars(args), "batch": batch,
            "faiss_threads": faiss.omp_get_max_threads(),
            "median_s": med, "runs_s": {"rebuild": rebuild, "inplace": inplace,
                                        "remove_add": remove_add},
            "remove_per_key_extrapolated_s": per_key,
            "rebuild_over_inplace": med["rebuild"] / med["inplace"],
            "rebuild_over_remove_add": med["rebuild"] / med["remove_add"],
            "target_ratio": 5.0, "target_met": bool(ok)})
        print(f"results: {path}")


if __name__ == "__main__":
    main()
