"""Issue 10, item 4: how well can an order score computed from the old embedding predict the
realised benefit of backfilling an item? Validation split only (halves A: fit, B: evaluate).

For each predictor: Spearman correlation with the true t=0 benefit on B, and the backfilling
curve on B (mAP AUC, closure against FCT-random, fraction to get within 0.5 points of new/new).
"benefit_true" orders B by its own true t=0 benefit (a static ceiling, analysis only).

    python bench/curve_predictors.py --scenario bigger_model --seed 0 --distance l2
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from curve_lib import (CACHE, apply_h, curve, load_with_h, ref, scenario_parser, softmax,
                       summarise)

from fastfill_udfs.policies import fit_prototypes, order_scores, rank_order
from fastfill_udfs.reachability import item_map_benefit, item_top1_benefit

FRACTIONS11 = np.round(np.linspace(0, 1, 11), 10)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def features(d, old, t, s, protos):
    W, b = d["W"].astype(np.float64), d["b"].astype(np.float64)
    p = softmax(t @ W.T + b)
    ps = np.sort(p, axis=1)[:, ::-1]
    ent = -(p * np.log(p + 1e-12)).sum(1)
    P = np.asarray(protos["prototypes"])
    dist = np.sqrt(np.maximum(((t[:, None, :] - P[None]) ** 2).sum(-1), 0))
    ds = np.sort(dist, axis=1)
    scal = np.stack([ps[:, 0], ps[:, 1], ps[:, 0] - ps[:, 1], ent, np.log(s), ds[:, 0], ds[:, 1],
                     ds[:, 0] - ds[:, 1], np.linalg.norm(t, axis=1), np.linalg.norm(old, axis=1)],
                    axis=1)
    return {"scalars": scal, "full": np.hstack([scal, old, t, p]), "t": t,
            "ot": np.hstack([old, t]), "tp": np.hstack([t, p])}


def fit_mlp(x, y, hidden=64, epochs=400, lr=1e-2, wd=1e-4, seed=0):
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sd).float()
    r = np.argsort(np.argsort(y))
    yt = torch.from_numpy(6.0 * (r + 0.5) / len(y) - 3.0).float()
    m = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                            torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(m.parameters(), lr=lr, weight_decay=wd)
    for _ in range(epochs):
        loss = (m(xt).squeeze(1) - yt).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: m(torch.from_numpy((z - mu) / sd).float()).squeeze(1).detach().numpy()


def main(argv=None):
    ap = scenario_parser(__doc__.splitlines()[0])
    ap.add_argument("--curves", default="sigma,cls_margin,mlp_scalars,mlp_full,gbm_full,benefit_true")
    a = ap.parse_args(argv)
    d, hf, hc = load_with_h(a)
    dist = a.distance
    protos = fit_prototypes(d["new_train"][d["fit_idx"]], d["y_train"][d["fit_idx"]], distance=dist)
    part = {}
    for name, rows in (("A", d["valA"]), ("B", d["valB"])):
        old = d["old_train"][rows].astype(np.float64)
        t, s = apply_h(hf, d["old_train"][rows])
        n = d["new_train"][rows].astype(np.float64)
        y, ids = d["y_train"][rows], d["train_ids"][rows]
        ben = item_map_benefit(n, y, t, n, y, query_ids=ids, gallery_ids=ids, distance=dist)
        ben1 = item_top1_benefit(n, y, t, n, y, query_ids=ids, gallery_ids=ids, distance=dist)
        part[name] = dict(old=old, t=t, s=s, n=n, y=y, ids=ids, ben=ben, ben1=ben1,
                          tc=apply_h(hc, d["old_train"][rows])[0],
                          f=features(d, old, t, s, protos))
    A, B = part["A"], part["B"]
    preds = {"sigma": B["s"], "cls_margin": -B["f"]["scalars"][:, 2],
             "cls_entropy": B["f"]["scalars"][:, 3],
             "prototype": order_scores("prototype", transformed=B["t"], prototypes=protos),
             "oracle": order_scores("oracle", transformed=B["t"], new=B["n"], distance=dist),
             "benefit_true": B["ben"], "benefit_true_both": B["ben"] + B["ben1"]}
    for fs in ("scalars", "full", "t", "ot", "tp"):
        preds[f"mlp_{fs}"] = fit_mlp(A["f"][fs], A["ben"])(B["f"][fs])
        preds[f"mlp_{fs}_both"] = fit_mlp(A["f"][fs], A["ben"] + A["ben1"])(B["f"][fs])
        try:
            from sklearn.ensemble import HistGradientBoostingRegressor
            g = HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, random_state=0)
            g.fit(A["f"][fs], np.argsort(np.argsort(A["ben"])) / len(A["ben"]))
            preds[f"gbm_{fs}"] = g.predict(B["f"][fs])
        except ImportError:
            pass
    print(f"{a.scenario} s{a.seed} {dist}: spearman with the true t=0 benefit on B")
    print({k: round(spearman(v, B["ben"]), 3) for k, v in preds.items()})
    print("spearman with the true t=0 mAP+top1 benefit on B")
    print({k: round(spearman(v, B["ben"] + B["ben1"]), 3) for k, v in preds.items()})
    nn = ref(B["n"], B["y"], B["n"], B["y"], B["ids"], dist)["mAP"]
    rnd = order_scores("random", ids=B["ids"], seed=a.seed)
    fct = summarise(curve(rank_order(rnd, B["ids"]), B["tc"], B["n"], B["y"], B["ids"],
                          distance=dist, fractions=FRACTIONS11), nn)
    rows = [{"order": "fct_random", **fct}]
    rand_top1 = None
    for name in ["random"] + a.curves.split(","):
        sc = rnd if name == "random" else preds[name]
        c = curve(rank_order(sc, B["ids"]), B["t"], B["n"], B["y"], B["ids"], distance=dist,
                  fractions=FRACTIONS11)
        if rand_top1 is None:
            rand_top1 = c.top1.to_numpy()
        rows.append({"order": name, **summarise(c, nn, fct["mAP_auc"]),
                     "top1_min_vs_random": float((c.top1.to_numpy() - rand_top1).min())})
        print(name, "top1", np.round(c.top1.to_numpy(), 4))
    df = pd.DataFrame(rows)
    print(f"new/new {nn:.4f}")
    print(df.round(4).to_string())
    out = CACHE / "results"
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"predictors_{a.scenario}_s{a.seed}_{dist}_{abs(hash(a.h)) % 10**6}.csv",
              index=False)


if __name__ == "__main__":
    main()
