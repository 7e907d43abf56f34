"""In-memory backfilling curve and its area (no Spark).

At backfill fraction t the gallery holds the new-model embedding for the first round(t * N)
items of the backfill order and the transformed embedding h(old) for the rest; queries always
use the new model. The curve is a metric vs t, its trapezoid area over [0, 1] the headline
number ("mAP AUC").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from fastfill_udfs.arrays import to_numpy
from fastfill_udfs.metrics import retrieval_metrics

__all__ = ["backfill_curve", "curve_auc", "curve_mean", "fraction_to_reach", "DEFAULT_FRACTIONS"]

DEFAULT_FRACTIONS = tuple(np.round(np.linspace(0.0, 1.0, 11), 10))


def _item_array(x, n: int, default: float, name: str) -> np.ndarray:
    """A writable float64 array of n entries from None (default), a scalar or a 1-D array."""
    if x is None:
        return np.full(n, default)
    arr = to_numpy(x).astype(np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or 1-D with {n} entries, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr.copy()


def curve_auc(fractions, values) -> float:
    """Trapezoid area under ``values`` over ``fractions`` in [0, 1] (uneven spacing is fine).

    Raises ValueError unless both are 1-D of equal length >= 2, ``fractions`` is
    non-decreasing, starts at 0 and ends at 1, and everything is finite.
    """
    x = to_numpy(fractions).astype(np.float64)
    y = to_numpy(values).astype(np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"fractions must be 1-D with at least 2 points, got shape {x.shape}")
    if y.shape != x.shape:
        raise ValueError(f"values shape {y.shape} != fractions shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("fractions contains NaN or infinite values")
    if not np.all(np.isfinite(y)):
        raise ValueError("values contains NaN or infinite values")
    if np.any(np.diff(x) < 0):
        raise ValueError("fractions must be sorted in ascending order")
    if abs(x[0]) > 1e-9 or abs(x[-1] - 1.0) > 1e-9:
        raise ValueError(f"fractions must start at 0 and end at 1, got [{x[0]}, {x[-1]}]")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def curve_mean(values) -> float:
    """The official FastFill summary of a curve: the plain mean of its points (equal weight per
    point, which equals the trapezoid area only up to the end points' half weight).

    Raises ValueError for an empty or non-finite ``values``."""
    y = to_numpy(values).astype(np.float64)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"values must be 1-D and non-empty, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("values contains NaN or infinite values")
    return float(y.mean())


def fraction_to_reach(fractions, values, target: float, tolerance: float = 0.0) -> float:
    """The first fraction at which ``values`` gets within ``tolerance`` of ``target``
    (``value >= target - tolerance``), NaN when it never does.

    Args: ``fractions`` ascending 1-D; ``values`` same shape; ``target`` e.g. new/new's mAP;
    ``tolerance`` >= 0 (e.g. 0.005 for 0.5 mAP points). Raises ValueError on bad shapes,
    unsorted fractions or a negative tolerance."""
    x = to_numpy(fractions).astype(np.float64)
    y = to_numpy(values).astype(np.float64)
    if x.ndim != 1 or y.shape != x.shape or len(x) == 0:
        raise ValueError(f"fractions {x.shape} and values {y.shape} must be 1-D of equal length")
    if np.any(np.diff(x) < 0):
        raise ValueError("fractions must be sorted in ascending order")
    if not np.isfinite(target):
        raise ValueError(f"target must be finite, got {target}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    hit = np.flatnonzero(y >= target - tolerance)
    return float(x[hit[0]]) if len(hit) else float("nan")


def backfill_curve(order, transformed_gallery, new_gallery, query_emb, query_labels,
                   gallery_labels, *, fractions=None, batch_ids=None, query_ids=None,
                   gallery_ids=None, topk: Sequence[int] = (1, 5), distance: str = "cosine",
                   transformed_scale=None, transformed_bias=None,
                   dtype: str = "float64") -> pd.DataFrame:
    """Retrieval metrics along a backfill of ``order``.

    Args: ``order`` a permutation of gallery row indices (first = backfilled first);
    ``transformed_gallery``/``new_gallery`` (N x d) h(old) and new embeddings of the gallery;
    ``query_emb`` (Q x d) new-model queries; labels 1-D; ``query_ids``/``gallery_ids`` for
    leave-one-out (see :func:`fastfill_udfs.metrics.retrieval_metrics`); ``distance``
    ``"cosine"`` or ``"l2"``; ``transformed_scale``/``transformed_bias`` (scalars or one entry
    per gallery item) a score correction applied to the items that are still transformed
    (a calibrated mixed gallery, :mod:`fastfill_udfs.calibration`; backfilled items are scored
    plainly, so the end point t=1 is new/new whatever the correction); ``dtype`` of the
    similarities (see ``retrieval_metrics``).
    Evaluates either at ``fractions`` (ascending, in [0, 1]; default 0, 0.1, ..., 1; the first
    ``round(t * N)`` items backfilled, halves rounded up) or, with ``batch_ids`` (per-rank batch
    ids, non-decreasing along ``order``), at t = 0 and after each batch; never both.
    Returns a DataFrame with columns ``backfill_fraction, n_backfilled, mAP, top1, top5``
    (one ``top{k}`` per k) and, with ``batch_ids``, ``batch_id`` (0 for the initial state).
    Raises ValueError naming the argument on bad shapes, a non-permutation ``order``, bad
    ``fractions`` or ``batch_ids``.
    """
    t_g = to_numpy(transformed_gallery)
    n_g = to_numpy(new_gallery)
    if t_g.ndim != 2:
        raise ValueError(f"transformed_gallery must be 2-D (items x dim), got shape {t_g.shape}")
    if n_g.shape != t_g.shape:
        raise ValueError(f"new_gallery shape {n_g.shape} != transformed_gallery shape {t_g.shape}")
    n = t_g.shape[0]
    o = to_numpy(order)
    if o.ndim != 1 or len(o) != n or (n and not np.issubdtype(o.dtype, np.integer)):
        raise ValueError(f"order must be a 1-D integer array of length {n}")
    o = o.astype(np.int64)
    if n and not np.array_equal(np.sort(o), np.arange(n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1}")
    if fractions is not None and batch_ids is not None:
        raise ValueError("give fractions or batch_ids, not both")

    batch_col = None
    if batch_ids is not None:
        b = to_numpy(batch_ids)
        if b.ndim != 1 or len(b) != n or (n and not np.issubdtype(b.dtype, np.integer)):
            raise ValueError(f"batch_ids must be a 1-D integer array of length {n} (one per rank)")
        if np.any(np.diff(b) < 0):
            raise ValueError("batch_ids must be non-decreasing along the order")
        ids, first = np.unique(b, return_index=True)
        counts = np.append(first[1:], n)                 # items backfilled after each batch
        n_back = np.concatenate([[0], counts]).astype(np.int64)
        frac = n_back / n if n else np.zeros(len(n_back))
        batch_col = np.concatenate([[0], ids]).astype(np.int64)
    else:
        frac = np.asarray(DEFAULT_FRACTIONS if fractions is None else to_numpy(fractions),
                          dtype=np.float64)
        if frac.ndim != 1 or len(frac) == 0:
            raise ValueError("fractions must be a non-empty 1-D sequence")
        if not np.all(np.isfinite(frac)) or frac.min() < 0 or frac.max() > 1:
            raise ValueError("fractions must lie in [0, 1]")
        if np.any(np.diff(frac) < 0):
            raise ValueError("fractions must be sorted in ascending order")
        n_back = np.floor(frac * n + 0.5).astype(np.int64)

    t_scale = _item_array(transformed_scale, n, 1.0, "transformed_scale")
    t_bias = _item_array(transformed_bias, n, 0.0, "transformed_bias")
    corrected = transformed_scale is not None or transformed_bias is not None
    rows = []
    gallery = t_g.copy()
    done = 0
    for t, k in zip(frac, n_back):
        if k > done:                                     # fractions are ascending: only add
            idx = o[done:k]
            gallery[idx] = n_g[idx]
            t_scale[idx], t_bias[idx] = 1.0, 0.0
            done = k
        m = retrieval_metrics(query_emb, query_labels, gallery, gallery_labels,
                              query_ids=query_ids, gallery_ids=gallery_ids, topk=topk,
                              distance=distance, dtype=dtype,
                              gallery_scale=t_scale if corrected else None,
                              gallery_bias=t_bias if corrected else None)
        row = {"backfill_fraction": float(t), "n_backfilled": int(k), "mAP": m["mAP"]}
        row.update({f"top{kk}": m[f"top{kk}"] for kk in topk})
        rows.append(row)
    df = pd.DataFrame(rows, columns=["backfill_fraction", "n_backfilled", "mAP"]
                      + [f"top{kk}" for kk in topk])
    if batch_col is not None:
        df["batch_id"] = batch_col
    return df
