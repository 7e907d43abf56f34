"""Issue 10, item 1: what any backfill order could reach on the demo protocol.

For one scenario and seed (cached embeddings, bench/curve_cache.py) and both distances:
similarity statistics per gallery source, the t=0 deficit per class, and the backfilling curves
of random / sigma / oracle orders, of the default order (benefit head with the margin blend,
fitted on the validation split), of the exact static benefit (each test item's own benefit of
being backfilled alone at t=0, mAP only and with the default top-1 weight: what a perfect
predictor of the head's target would reach) and of the greedy realised-benefit ceiling
(recomputed after every batch). The last two use the test gallery's new embeddings: analysis
only. Reports the fraction of the gallery each order needs to get within 0.5 mAP points of
new/new, and each order's rank correlation with the exact static benefit (how much of it an
order reads from the old embedding).

    python bench/curve_reach.py --scenario bigger_model --seed 0 --distances l2 \
        --h '{"hidden_dim": 1024, "epochs": 40}'

Writes .cache/curve/results/reach_<scenario>_s<seed>.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from curve_lib import (CACHE, H_DEFAULT, apply_h, curve, get_h, load, ref,
                       summarise)

from fastfill_udfs.config import load_config
from fastfill_udfs.order_fitting import fit_h_extras
from fastfill_udfs.policies import order_scores, rank_order
from fastfill_udfs.reachability import (greedy_order, item_map_benefit, item_top1_benefit,
                                        per_class_map, similarity_stats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distances", default="cosine,l2")
    p.add_argument("--greedy-queries", type=int, default=0, help="0 = all queries")
    p.add_argument("--h", default="{}", help="JSON overrides of h's settings, e.g. the "
                   "report's '{\"hidden_dim\": 1024, \"epochs\": 40}'")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    base = load_config()  # the default order's weights, as a user run gets them
    top1_w = base.get_path("transformation.order_top1_weight")
    margin_w = base.get_path("transformation.order_margin_weight")
    d = load(a.scenario, a.seed)
    hk = {**H_DEFAULT, **json.loads(a.h)}
    hf = get_h(d, "fastfill", d["fit_idx"], seed=2, **hk)
    hc = get_h(d, "fct", d["fit_idx"], seed=2, **hk)
    tf, sf = apply_h(hf, d["old_test"])
    tc, _ = apply_h(hc, d["old_test"])
    n = d["new_test"].astype(np.float64)
    o = d["old_test"].astype(np.float64)
    y, ids = d["y_test"], d["test_ids"]
    out = {"scenario": a.scenario, "seed": a.seed, "meta": d["meta"], "h": hk, "distances": {}}
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
        V = d["val_idx"]
        h_default = fit_h_extras(hf, d["old_train"][V], d["new_train"][V], d["y_train"][V],
                                 distance=dist, top1_weight=top1_w, margin_weight=margin_w,
                                 prototype_new=d["new_train"][d["fit_idx"]],
                                 prototype_labels=d["y_train"][d["fit_idx"]])
        # each test item's exact benefit of being backfilled alone (the head's target)
        kw = dict(query_ids=ids, gallery_ids=ids, distance=dist)
        exact_map = item_map_benefit(n, y, tf, n, y, **kw)
        exact = exact_map + top1_w * item_top1_benefit(n, y, tf, n, y, **kw)
        # fct_random first: summarise() measures every closure against it
        scores = {name: order_scores(pol, sigma=sf, transformed=tf, new=n, ids=ids, seed=a.seed)
                  for name, pol in (("fct_random", "random"), ("fastfill_random", "random"),
                                    ("fastfill_uncertainty", "uncertainty"),
                                    ("fastfill_oracle", "oracle"))}
        scores.update({"fastfill_default": apply_h(h_default, d["old_test"])[1],
                       "exact_static_map": exact_map,
                       f"exact_static_top1x{top1_w:g}": exact})
        orders = {name: (rank_order(sc, ids), tc if name == "fct_random" else tf)
                  for name, sc in scores.items()}
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
            if name in scores and name != "fct_random":
                summ[name]["rho_exact"] = float(spearmanr(scores[name], exact)[0])
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
    tag = "" if hk == H_DEFAULT else \
        "_h" + hashlib.md5(json.dumps(hk, sort_keys=True).encode()).hexdigest()[:6]
    (res / f"reach_{a.scenario}_s{a.seed}{tag}.json").write_text(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
