"""Issue 10, item 1: what any backfill order could reach on the demo protocol.

For one scenario and seed (cached embeddings, bench/curve_cache.py) and both distances:
similarity statistics per gallery source, the t=0 deficit per class, and the backfilling curves
of random / sigma / oracle orders and of the greedy realised-benefit ceiling (which uses the
test gallery's new embeddings: analysis only). Reports the fraction of the gallery each order
needs to get within 0.5 mAP points of new/new.

    python bench/curve_reach.py --scenario new_classes --seed 0

Writes .cache/curve/results/reach_<scenario>_s<seed>.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from curve_lib import (CACHE, H_DEFAULT, apply_h, curve, get_h, load, ref,
                       summarise)

from fastfill_udfs.policies import order_scores, rank_order
from fastfill_udfs.reachability import greedy_order, per_class_map, similarity_stats

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distances", default="cosine,l2")
    p.add_argument("--greedy-queries", type=int, default=0, help="0 = all queries")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    d = load(a.scenario, a.seed)
    hf = get_h(d, "fastfill", d["fit_idx"], seed=2, **H_DEFAULT)
    hc = get_h(d, "fct", d["fit_idx"], seed=2, **H_DEFAULT)
    tf, sf = apply_h(hf, d["old_test"])
    tc, _ = apply_h(hc, d["old_test"])
    n = d["new_test"].astype(np.float64)
    o = d["old_test"].astype(np.float64)
    y, ids = d["y_test"], d["test_ids"]
    out = {"scenario": a.scenario, "seed": a.seed, "meta": d["meta"], "distances": {}}
    for dist in a.distances.split(","):
        t0 = time.time()
        r = {"refs": {"old/old": ref(o, y, o, y, ids, dist), "new/new": ref(n, y, n, y, ids, dist),
                      "t0_fastfill": ref(n, y, tf, y, ids, dist),
                      "t0_fct": ref(n, y, tc, y, ids, dist)}}
        nn = r["refs"]["new/new"]["mAP"]
        st = similarity_stats(n, y, n, tf, y, query_ids=ids, gallery_ids=ids, distance=dist)
        r["similarity_stats"] = st.to_dict("records")
        pc0 = per_class_map(n, y, tf, y, query_ids=ids, gallery_ids=ids, distance=dist)
        pc1 = per_class_map(n, y, n, y, query_ids=ids, gallery_ids=ids, distance=dist)
        r["per_class"] = pd.DataFrame({"t0": pc0, "new_new": pc1,
                                       "deficit": pc1 - pc0}).reset_index(names="cls").to_dict("records")
        orders = {}
        for name, pol, t in (("fct_random", "random", tc), ("fastfill_random", "random", tf),
                             ("fastfill_uncertainty", "uncertainty", tf),
                             ("fastfill_oracle", "oracle", tf)):
            orders[name] = (rank_order(order_scores(pol, sigma=sf, transformed=t, new=n, ids=ids,
                                                    seed=a.seed), ids), t)
        qsel = np.arange(len(y)) if not a.greedy_queries else \
            np.sort(np.random.default_rng(0).permutation(len(y))[:a.greedy_queries])
        g0 = time.time()
        orders["greedy_ceiling"] = (greedy_order(n[qsel], y[qsel], tf, n, y, batch_size=len(y) // 20,
                                                 query_ids=ids[qsel], gallery_ids=ids,
                                                 distance=dist), tf)
        r["greedy_seconds"] = time.time() - g0
        curves, summ = [], {}
        for name, (order, t) in orders.items():
            c = curve(order, t, n, y, ids, distance=dist)
            c.insert(0, "policy", name)
            curves.append(c)
            summ[name] = summarise(c, nn, summ.get("fct_random", {}).get("mAP_auc"))
            # the t=0 deficit that the first 20% of this order covers, per class
            first = order[: len(order) // 5]
            summ[name]["first20pct_classes"] = np.bincount(y[first], minlength=10).tolist()
        r["summary"] = summ
        r["curves"] = pd.concat(curves).to_dict("records")
        out["distances"][dist] = r
        print(f"\n## {a.scenario} seed {a.seed} distance {dist} ({time.time() - t0:.0f} s)")
        print({k: round(v["mAP"], 4) for k, v in r["refs"].items()})
        print(st.round(4).to_string())
        print(pd.DataFrame(r["per_class"]).round(4).to_string())
        print(pd.DataFrame(summ).T.drop(columns="first20pct_classes").round(4).to_string())
        for k, v in summ.items():
            print(k, "classes in the first 20%:", v["first20pct_classes"])
    res = CACHE / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / f"reach_{a.scenario}_s{a.seed}.json").write_text(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
