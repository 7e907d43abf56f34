"""Helpers of the backfilling-curve analysis on cached embeddings (bench/curve_cache.py).

Nothing here is timed; it is the scratch-pad of issue 10's analysis: train `h` on the cached
old/new train embeddings (cached too), compute curves for orders, distances and corrections.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastfill_udfs.metrics import retrieval_metrics  # noqa: E402
from fastfill_udfs.models import Transformation  # noqa: E402
from fastfill_udfs.policies import order_scores, rank_order  # noqa: E402
from fastfill_udfs.simulate import backfill_curve, curve_auc, curve_mean, fraction_to_reach  # noqa: E402
from fastfill_udfs.training import train_transformation, transform  # noqa: E402

CACHE = ROOT / ".cache" / "curve"
FRACTIONS = np.round(np.linspace(0, 1, 21), 10)
# the h of the analysis scripts (the study's own h settings live in conf/)
H_DEFAULT = dict(hidden_dim=512, num_hidden_layers=2, epochs=20, batch_size=1024, lr=5e-4,
                 warmup_epochs=3, freeze_bn_after=0.5, label_smoothing=0.1)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def scenario_parser(description: str) -> argparse.ArgumentParser:
    """--scenario, --seed, --distance and --h (JSON overrides of H_DEFAULT)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scenario", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distance", default="l2")
    p.add_argument("--h", default="{}", help="JSON overrides of h's settings")
    return p


def load_with_h(args, threads: int = 1) -> tuple[dict, Transformation, Transformation]:
    """The cached scenario of `args` and its FastFill and FCT h (trained once, then cached)."""
    torch.set_num_threads(threads)
    d = load(args.scenario, args.seed)
    hk = {**H_DEFAULT, **json.loads(args.h)}
    t0 = time.time()
    hf = get_h(d, "fastfill", d["fit_idx"], seed=2, **hk)
    hc = get_h(d, "fct", d["fit_idx"], seed=2, **hk)
    print(f"h ready in {time.time() - t0:.0f} s ({hk})")
    return d, hf, hc


def load(scenario: str, seed: int, tag: str = "") -> dict:
    z = np.load(CACHE / f"emb_{scenario}_s{seed}{tag}.npz")
    d = {k: z[k] for k in z.files if k != "meta"}
    d["meta"] = json.loads(str(z["meta"]))
    n = len(d["y_train"])
    d["fit_idx"] = np.setdiff1d(np.arange(n), d["val_idx"])
    # the validation split in two halves (stratified by order of index): A fits, B selects
    rng = np.random.default_rng(1000 + seed)
    v = rng.permutation(d["val_idx"])
    d["valA"], d["valB"] = np.sort(v[: len(v) // 2]), np.sort(v[len(v) // 2:])
    d["test_ids"] = np.array([f"test-{i:06d}" for i in range(len(d["y_test"]))])
    d["train_ids"] = np.array([f"train-{i:06d}" for i in range(n)])
    return d


def classifier(d) -> torch.nn.Linear:
    lin = torch.nn.Linear(d["W"].shape[1], d["W"].shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(d["W"]))
        lin.bias.copy_(torch.from_numpy(d["b"]))
    return lin


def get_h(d, objective: str, rows, *, seed: int, tag: str = "", **kw) -> Transformation:
    """Train (or load) h on `rows` of the train split; cached by scenario, seed and settings."""
    key = json.dumps({"scn": d["meta"]["scenario"], "seed": d["meta"]["seed"], "obj": objective,
                      "rows": hashlib.md5(np.asarray(rows).tobytes()).hexdigest()[:10],
                      "hseed": seed, "tag": tag, **kw}, sort_keys=True)
    name = hashlib.md5(key.encode()).hexdigest()[:16]
    path = CACHE / "h" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    hk = {k: kw[k] for k in ("hidden_dim", "num_hidden_layers") if k in kw}
    if path.exists():
        h = Transformation(d["old_train"].shape[1], d["new_train"].shape[1],
                           uncertainty=(objective == "fastfill"), **hk)
        h.load_state_dict(torch.load(path, weights_only=True))
        return h.eval()
    h, _ = train_transformation(d["old_train"][rows], d["new_train"][rows], d["y_train"][rows],
                                objective=objective, new_classifier=classifier(d), seed=seed,
                                **kw)
    torch.save(h.state_dict(), path)
    (CACHE / "h" / f"{name}.json").write_text(key)
    return h


def apply_h(h, old):
    t, s = transform(h, old)
    return t.astype(np.float64), s


def curve(order, t, n, labels, ids, *, distance="cosine", scale=None, bias=None,
          fractions=FRACTIONS, dtype="float32"):
    return backfill_curve(order, t, n, n, labels, labels, fractions=fractions, query_ids=ids,
                          gallery_ids=ids, topk=(1,), distance=distance,
                          transformed_scale=scale, transformed_bias=bias, dtype=dtype)


def random_curves(t, n, labels, ids, seeds, **curve_kw) -> list:
    """The curves of random backfill orders, one per seed (how far random order itself moves)."""
    return [curve(rank_order(order_scores("random", ids=ids, seed=seed), ids), t, n, labels,
                  ids, **curve_kw) for seed in seeds]


def summarise(df, newnew_map: float, fct_auc: float | None = None) -> dict:
    x = df.backfill_fraction.to_numpy()
    out = {"mAP_auc": curve_auc(x, df.mAP), "top1_auc": curve_auc(x, df.top1),
           "mAP_mean": curve_mean(df.mAP), "top1_mean": curve_mean(df.top1),
           "mAP_t0": float(df.mAP.iloc[0]),
           "reach_0.5pt": fraction_to_reach(x, df.mAP.to_numpy(), newnew_map, 0.005)}
    if fct_auc is not None:
        out["closure"] = (out["mAP_auc"] - fct_auc) / (newnew_map - fct_auc)
    return out


def ref(q, ql, g, gl, ids, distance="cosine", **kw):
    return retrieval_metrics(q, ql, g, gl, query_ids=ids, gallery_ids=ids, distance=distance,
                             topk=(1,), **kw)
