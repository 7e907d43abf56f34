"""Issue 10, items 3-5 on the VALIDATION split only (the test split is never looked at here).

The validation split (carved from the train split before any training; no CNN or h saw it)
is cut in two halves A and B. `h` is trained on the rest of the train split. Whatever needs
fitting beyond h (calibration, a cross-fitted uncertainty head) is fitted on A and the
backfilling curves are computed on B as the gallery (and, with --swap, the other way round).

    python bench/curve_select.py --scenario new_classes --seed 0 --distance l2

Prints one table per calibration: mAP AUC, closure against FCT-random, the fraction to get
within 0.5 mAP points of new/new, top-1 AUC and the worst top-1 difference to random order.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from curve_lib import (CACHE, apply_h, classifier, curve, load_with_h, random_curves, ref,
                       scenario_parser, softmax, summarise)

from fastfill_udfs.calibration import fit_calibration, identity_calibration, item_correction
from fastfill_udfs.policies import (fit_prototypes, order_scores, prototype_distances,
                                    prototype_margin, rank_order)
from fastfill_udfs.reachability import item_map_benefit, item_top1_benefit
from fastfill_udfs.training import fit_benefit_head, fit_uncertainty_head



def class_features(d, t, protos) -> dict:
    """Per item: the new classifier's sorted softmax and the sorted distances to the class
    prototypes, both of h's output (what a margin-aware order could use)."""
    W, b = d["W"].astype(np.float64), d["b"].astype(np.float64)
    p = np.sort(softmax(t @ W.T + b), axis=1)
    return {"cls_sorted": p, "proto_sorted": np.sort(prototype_distances(t, protos), axis=1)}


def rank01(x) -> np.ndarray:
    return (np.argsort(np.argsort(x, kind="stable"), kind="stable") + 0.5) / len(x)


def fit_feature_head(feats_A: np.ndarray, benefit_A: np.ndarray, seed: int = 0):
    """A benefit head on arbitrary per-item features (the experiment behind a margin-aware
    head): returns a function features -> predicted benefit rank."""
    import torch

    from fastfill_udfs.training import fit_head, seed_everything

    gen = seed_everything(seed)
    ranks = rank01(benefit_A)
    target = torch.from_numpy(6.0 * ranks - 3.0).float()
    x = torch.from_numpy(feats_A).float()
    head = fit_head(x, lambda s: (s - target).pow(2).mean(), x.shape[1], 64, 0.0, 300, 1e-2,
                    1e-4, gen)

    def predict(feats):
        with torch.no_grad():
            return head(torch.from_numpy(feats).float()).squeeze(1).double().numpy()
    return predict


def scores_for(d, rows, t, sigma, extra):
    """Order scores computable from h's output (plus small fitted tables)."""
    W, b = d["W"].astype(np.float64), d["b"].astype(np.float64)
    p = softmax(t @ W.T + b)
    ps = np.sort(p, axis=1)
    out = {"sigma": sigma, "cls_entropy": -(p * np.log(p + 1e-12)).sum(1),
           "cls_margin": -(ps[:, -1] - ps[:, -2])}
    for name, protos in extra.get("prototypes", {}).items():
        out[name] = order_scores("prototype", transformed=t, prototypes=protos)
        out[f"{name}_margin"] = -prototype_margin(t, protos)
    for name, s in extra.get("sigmas", {}).items():
        out[name] = s
    return out


def main(argv=None):
    ap = scenario_parser(__doc__.splitlines()[0])
    ap.add_argument("--swap", action="store_true", help="fit on B, evaluate on A")
    ap.add_argument("--orders", default="")
    ap.add_argument("--calibrations", default="none,affine,affine_sigma")
    ap.add_argument("--top1-weights", default="",
                    help="also benefit heads fitted to mAP + w * top-1 benefit, e.g. 0.5,1,2")
    ap.add_argument("--margin-leads", action="store_true",
                    help="also orders that use the class margins: prototype margin, benefit "
                         "heads with margin features, rank blends of the head and a margin")
    ap.add_argument("--random-seeds", type=int, default=1,
                    help="random orders to compare top-1 with (the worst point is taken "
                         "against each and against their mean)")
    a = ap.parse_args(argv)
    d, hf, hc = load_with_h(a)
    A, B = (d["valB"], d["valA"]) if a.swap else (d["valA"], d["valB"])
    dist = a.distance
    # held-out fit set A
    tA, sA = apply_h(hf, d["old_train"][A])
    nA = d["new_train"][A].astype(np.float64)
    yA, idA = d["y_train"][A], d["train_ids"][A]
    h_cross = fit_uncertainty_head(hf, d["old_train"][A], d["new_train"][A], yA,
                                   new_classifier=classifier(d))
    t1 = time.time()
    benefit_A = item_map_benefit(nA, yA, tA, nA, yA, query_ids=idA, gallery_ids=idA,
                                 distance=a.distance)
    h_benefit = fit_benefit_head(hf, d["old_train"][A], benefit_A)
    h_benefit_lin = fit_benefit_head(hf, d["old_train"][A], benefit_A, head_hidden_dim=0)
    weights = [float(w) for w in a.top1_weights.split(",") if w]
    top1_A = (item_top1_benefit(nA, yA, tA, nA, yA, query_ids=idA, gallery_ids=idA,
                                distance=a.distance) if weights else None)
    h_top1 = {w: fit_benefit_head(hf, d["old_train"][A], benefit_A + w * top1_A)
              for w in weights}
    print(f"benefit heads fitted in {time.time() - t1:.0f} s")
    protos_fit = fit_prototypes(d["new_train"][d["fit_idx"]], d["y_train"][d["fit_idx"]],
                                distance=dist)
    if a.margin_leads:  # heads that see the class margins beside h's output
        target_A = benefit_A + 0.5 * (top1_A if top1_A is not None else item_top1_benefit(
            nA, yA, tA, nA, yA, query_ids=idA, gallery_ids=idA, distance=a.distance))
        fA = class_features(d, tA, protos_fit)
        feat_heads = {
            "head_t_cls": (lambda f, t: np.hstack([t, f["cls_sorted"][:, -3:]])),
            "head_t_proto": (lambda f, t: np.hstack([t, f["proto_sorted"][:, :3]])),
            "head_cls_proto": (lambda f, t: np.hstack([f["cls_sorted"][:, -3:],
                                                       f["proto_sorted"][:, :3]])),
        }
        feat_heads = {k: (fn, fit_feature_head(fn(fA, tA), target_A, seed=a.seed))
                      for k, fn in feat_heads.items()}
    # gallery B
    tB, sB = apply_h(hf, d["old_train"][B])
    tcB, _ = apply_h(hc, d["old_train"][B])
    _, s_cross = apply_h(h_cross, d["old_train"][B])
    _, s_crossA = apply_h(h_cross, d["old_train"][A])
    nB = d["new_train"][B].astype(np.float64)
    yB, idB = d["y_train"][B], d["train_ids"][B]
    extra = {"prototypes": {"prototype": protos_fit},
             "sigmas": {"sigma_crossfit": s_cross,
                        "benefit_mlp": apply_h(h_benefit, d["old_train"][B])[1],
                        "benefit_linear": apply_h(h_benefit_lin, d["old_train"][B])[1],
                        **{f"benefit_mlp_top1x{w:g}": apply_h(h, d["old_train"][B])[1]
                           for w, h in h_top1.items()}}}
    sc = scores_for(d, B, tB, sB, extra)
    if a.margin_leads:
        fB = class_features(d, tB, protos_fit)
        for k, (fn, predict) in feat_heads.items():
            sc[k] = predict(fn(fB, tB))
        head = sc.get("benefit_mlp_top1x0.5", sc["benefit_mlp"])
        for m in ("cls_margin", "prototype_margin"):
            for alpha in (0.25, 0.5):
                sc[f"blend_{m}_{alpha:g}"] = (1 - alpha) * rank01(head) + alpha * rank01(sc[m])
    sc["oracle"] = order_scores("oracle", transformed=tB, new=nB, distance=dist)
    rnd = order_scores("random", ids=idB, seed=a.seed)
    nn = ref(nB, yB, nB, yB, idB, dist)["mAP"]
    print(f"{a.scenario} seed {a.seed} {dist}: new/new {nn:.4f}, t0 ff "
          f"{ref(nB, yB, tB, yB, idB, dist)['mAP']:.4f}, t0 fct "
          f"{ref(nB, yB, tcB, yB, idB, dist)['mAP']:.4f}")
    fct = curve(rank_order(rnd, idB), tcB, nB, yB, idB, distance=dist)
    base = summarise(fct, nn)
    cals = {"none": identity_calibration(dist)}
    names = a.calibrations.split(",")
    if "affine" in names:
        cals["affine"] = fit_calibration(nA, yA, nA, tA, yA, distance=dist, query_ids=idA,
                                         gallery_ids=idA)
    if "affine_sigma" in names:
        cals["affine_sigma"] = fit_calibration(nA, yA, nA, tA, yA, distance=dist, query_ids=idA,
                                               gallery_ids=idA, sigma=s_crossA, use_sigma=True)
    orders = ["random"] + (a.orders.split(",") if a.orders else list(sc))
    rows = []
    for cname, cal in cals.items():
        if cname not in names:
            continue
        print(cname, {k: round(v, 4) if isinstance(v, float) else v for k, v in cal.items()})
        sig = s_cross if cal["sigma_weight"] else None
        scale, bias = item_correction(cal, np.ones(len(yB), bool), sigma=sig)
        # FastFill-random under several permutations (the first is the "random" order's,
        # seeded as rnd): how far random order's own top-1 moves
        rand = random_curves(tB, nB, yB, idB, range(a.seed, a.seed + a.random_seeds),
                             distance=dist, scale=scale, bias=bias)
        rand_top1 = np.array([c.top1.to_numpy() for c in rand])
        for o in orders:
            c = rand[0] if o == "random" else curve(rank_order(sc[o], idB), tB, nB, yB, idB,
                                                    distance=dist, scale=scale, bias=bias)
            s = summarise(c, nn, base["mAP_auc"])
            top1 = c.top1.to_numpy()
            s["top1_min_vs_random"] = float((top1 - rand_top1[0]).min())
            s["top1_min_vs_random_worst_seed"] = float((top1 - rand_top1).min())
            s["top1_min_vs_random_mean"] = float((top1 - rand_top1.mean(0)).min())
            s["top1_min_vs_fct"] = float((top1 - fct.top1.to_numpy()).min())
            rows.append({"calibration": cname, "order": o, **s})
    df = pd.DataFrame(rows)
    print(f"FCT-random: mAP AUC {base['mAP_auc']:.4f}, top1 AUC {base['top1_auc']:.4f}")
    print(df.round(4).to_string())
    out = CACHE / "results"
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{a.scenario}_s{a.seed}_{dist}{'_swap' if a.swap else ''}"
    df.assign(fct_auc=base["mAP_auc"], newnew=nn).to_csv(out / f"select_{tag}.csv", index=False)


if __name__ == "__main__":
    main()
