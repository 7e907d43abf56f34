"""Subgroup analysis (the biased-update claim): per-subgroup retrieval metrics, the gap between
subgroups, each subgroup's shortfall against its own new/new level, and the report numbers:
the backfill fraction at which the minority's shortfall closes, and the minority's share of the
first part of the backfill order. Pure numpy/pandas."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from fastfill_udfs.metrics import retrieval_metrics


def subgroup_metrics(query_emb, query_labels, query_subgroups, gallery_emb, gallery_labels, *,
                     query_ids=None, gallery_ids=None, topk: Sequence[int] = (1, 5),
                     block_size: int = 1024, **metric_kwargs) -> dict[str, dict]:
    """{subgroup: metrics} with queries restricted to each subgroup (the gallery stays whole);
    `metric_kwargs` (distance, dtype, ...) go to `metrics.retrieval_metrics`.

    Raises ValueError when `query_subgroups` does not have one entry per query."""
    subs = np.asarray(query_subgroups, dtype=object)
    if len(subs) != len(query_labels):
        raise ValueError(f"query_subgroups has {len(subs)} entries for {len(query_labels)} queries")
    q = np.asarray(query_emb)
    out = {}
    for name in sorted({s for s in subs if s not in (None, "")}):
        mask = subs == name
        out[name] = retrieval_metrics(
            q[mask], np.asarray(query_labels)[mask], gallery_emb, gallery_labels,
            query_ids=None if query_ids is None else np.asarray(query_ids, dtype=object)[mask],
            gallery_ids=gallery_ids, topk=topk, block_size=block_size, **metric_kwargs)
    return out


def combine_metrics(parts) -> dict:
    """Metrics of the union of disjoint query sets from each set's metrics: every metric is a
    mean over counted queries, so the union's is the `n_queries`-weighted mean (exact)."""
    parts = [p for p in parts if p["n_queries"] > 0]
    total = sum(p["n_queries"] for p in parts)
    if total == 0:
        return {"n_queries": 0}
    keys = [k for k in parts[0] if k != "n_queries"]
    out = {k: float(sum(p[k] * p["n_queries"] for p in parts) / total) for k in keys}
    out["n_queries"] = total
    return out


def fraction_to_close(fractions, shortfall, threshold: float = 0.01) -> float | None:
    """The first backfill fraction at which `shortfall` (new/new level minus current, as a
    fraction, e.g. 0.01 = 1 point) falls below `threshold`; None if it never does."""
    f, s = np.asarray(fractions, dtype=float), np.asarray(shortfall, dtype=float)
    if f.shape != s.shape:
        raise ValueError(f"fractions {f.shape} and shortfall {s.shape} differ in shape")
    order = np.argsort(f, kind="stable")
    hit = np.flatnonzero(s[order] < threshold)
    return float(f[order][hit[0]]) if len(hit) else None


def share_in_first(ranked_subgroups, subgroup: str, fraction: float = 0.1) -> float:
    """Share of `subgroup` among the first `fraction` of a backfill order (subgroups listed in
    rank order)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ranked = np.asarray(ranked_subgroups, dtype=object)
    head = ranked[: max(1, int(round(fraction * len(ranked))))]
    return float(np.mean(head == subgroup)) if len(ranked) else float("nan")


def subgroup_report(curves: pd.DataFrame, minority: str, shares: dict[str, float],
                    threshold: float = 0.01) -> pd.DataFrame:
    """One row per run: the minority's shortfall at t=0 and the fraction of the gallery
    backfilled when it first falls below `threshold` (top-1, and mAP when logged), and the
    minority's share of the first 10% of the order.

    `curves`: long table with run, policy, backfill_fraction, top1_shortfall_<minority> (and
    optionally mAP_shortfall_<minority>). Raises ValueError when the top-1 column is missing."""
    col = f"top1_shortfall_{minority}"
    if col not in curves.columns:
        raise ValueError(f"curves have no column {col}: was evaluation run with subgroups?")
    metrics = [m for m in ("top1", "mAP") if f"{m}_shortfall_{minority}" in curves.columns]
    rows = []
    for run, group in curves.groupby("run", sort=False):
        group = group.sort_values("backfill_fraction")
        row = {"run": run, "policy": group["policy"].iloc[0]}
        for m in metrics:
            shortfall = group[f"{m}_shortfall_{minority}"]
            row[f"{minority}_{m}_shortfall_at_t0"] = float(shortfall.iloc[0])
            row[f"fraction_to_close_1pt_{m}"] = fraction_to_close(group["backfill_fraction"],
                                                                  shortfall, threshold)
        row[f"{minority}_share_first_10pct"] = shares.get(run, float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)
