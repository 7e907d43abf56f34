"""Timing of the exact retrieval metrics vs a per-query sklearn loop (manual check, no asserts).

    .venv/bin/python bench/bench_metrics.py [--n 10000] [--dim 128] [--subset 200] [--out FILE]

Data: n items in 10 Gaussian classes, queries = gallery, leave-one-out. Prints the best of
--repeat runs of retrieval_metrics (float64 and float32), faiss search + ranked_metrics, and a
per-query sklearn.metrics.average_precision_score loop on --subset queries extrapolated to n,
plus the agreement of the two on that subset. With --out, the figures also go to a JSON file
(a bare name lands in bench/results/).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fastfill_udfs.metrics import ranked_metrics, retrieval_metrics  # noqa: E402


def best_of(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--subset", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON results (e.g. metrics.json)")
    args = ap.parse_args()
    result = {"benchmark": "exact retrieval metrics vs per-query sklearn loop",
              "command": ".venv/bin/python bench/bench_metrics.py " + " ".join(sys.argv[1:]),
              "settings": vars(args)}

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, args.n)
    x = (rng.normal(size=(10, args.dim))[labels] * 0.5 + rng.normal(size=(args.n, args.dim)))
    x = x.astype(np.float32)
    ids = np.arange(args.n)
    print(f"n={args.n} dim={args.dim} leave-one-out, CPU threads={os.cpu_count()}")

    t64, r64 = best_of(lambda: retrieval_metrics(x, labels, x, labels, query_ids=ids,
                                                 gallery_ids=ids), args.repeat)
    print(f"retrieval_metrics float64: {t64:7.2f} s  {r64}")
    t32, r32 = best_of(lambda: retrieval_metrics(x, labels, x, labels, query_ids=ids,
                                                 gallery_ids=ids, dtype="float32"), args.repeat)
    print(f"retrieval_metrics float32: {t32:7.2f} s  {r32}")

    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(args.dim)
        index.add(xn)
        t = time.perf_counter()
        d, i = index.search(xn, args.n)
        t_search = time.perf_counter() - t
        match = labels[i] == labels[:, None]
        valid = i != ids[:, None]
        n_rel = np.bincount(labels)[labels] - 1
        t_rank, rr = best_of(lambda: ranked_metrics(d, match, n_rel, valid=valid), 1)
        print(f"faiss search (k=n): {t_search:6.2f} s + ranked_metrics {t_rank:6.2f} s  {rr}")
        result.update(faiss_search_s=t_search, ranked_metrics_s=t_rank)

    from sklearn.metrics import average_precision_score
    sub = np.sort(rng.choice(args.n, args.subset, replace=False))
    xn64 = x.astype(np.float64)
    xn64 /= np.linalg.norm(xn64, axis=1, keepdims=True)
    t = time.perf_counter()
    aps = []
    for qi in sub:
        s = xn64 @ xn64[qi]
        keep = ids != qi
        aps.append(average_precision_score(labels[keep] == labels[qi], s[keep]))
    t_sk = (time.perf_counter() - t) / args.subset * args.n
    ours = retrieval_metrics(x[sub], labels[sub], x, labels, query_ids=ids[sub], gallery_ids=ids)
    print(f"sklearn per-query loop: {t_sk:7.2f} s extrapolated from {args.subset} queries; "
          f"subset mAP sklearn {np.mean(aps):.9f} vs ours {ours['mAP']:.9f} "
          f"(|diff| {abs(np.mean(aps) - ours['mAP']):.1e})")
    print(f"speed-up vs sklearn: float64 {t_sk / t64:.0f}x, float32 {t_sk / t32:.0f}x")
    if args.out:
        from _common import machine_info, write_json

        result.update(machine=machine_info(), ours_float64_s=t64, ours_float32_s=t32,
                      sklearn_extrapolated_s=t_sk, speedup_float64=t_sk / t64,
                      speedup_float32=t_sk / t32, subset=args.subset,
                      subset_abs_diff=float(abs(np.mean(aps) - ours["mAP"])),
                      mAP=float(r64["mAP"]))
        print(f"results: {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
