"""Backfill ordering policies and batching (pure numpy, no Spark).

A policy turns per-item inputs into a score; higher score = backfilled earlier:

* ``uncertainty`` -- FastFill: the predicted sigma of each item.
* ``random``      -- the FCT baseline: seeded uniform random scores.
* ``oracle``      -- ``||normalise(h(o)) - normalise(n)||`` (cosine; ``||h(o) - n||`` for l2):
  the true error of the transformed embedding; needs the new embeddings, so analysis only.
* ``auto``        -- the order the forecast chose on held-out pairs (:mod:`fastfill_udfs.forecast`),
  stored in `h` as ``auto_order``: its priority per item (:func:`auto_scores`), or random
  scores when no order beat random there.
* ``prototype``   -- classifier-free: the distance of the transformed embedding h(o) to the
  nearest class prototype (the class means of the new model's training embeddings, fitted
  with `h` by :func:`fit_prototypes` and stored with it; lambda-orthogonality, NeurIPS 2025).
  Atypical items first. Needs only h's output and the small prototype table, so a Spark
  worker computes it per item like sigma.

:func:`rank_order` turns scores into a reproducible order, :func:`batch_id_for_rank` maps ranks
to 1-based batch ids (vectorised, usable per partition in a Spark job).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fastfill_udfs.arrays import l2_normalise, to_numpy
from fastfill_udfs.metrics import check_distance

__all__ = ["POLICIES", "order_scores", "fit_prototypes", "prototype_distances", "prototype_scores", "prototype_margin", "random_scores_for_ids", "rank_order",
           "batch_id_for_rank", "assign_batches", "batch_sizes"]

POLICIES = ("auto", "uncertainty", "random", "oracle", "prototype")
RUN_POLICIES = tuple(p for p in POLICIES if p != "oracle")   # what a backfill run can rank by
PROTOTYPES_VERSION = 1


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def random_scores_for_ids(ids, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) scores that depend only on (id, seed), not on row order or partitioning.

    Args: ``ids`` 1-D array-like of ids (strings or ints); ``seed`` int.
    For a Spark job this gives the same random order whichever way the gallery is split.
    Raises ValueError for a non-int seed or ids that are not 1-D.
    """
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    arr = to_numpy(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    key = f"{int(seed) & 0xFFFFFFFFFFFFFFFF:016x}"     # hash_key must be 16 bytes
    h = pd.util.hash_pandas_object(pd.Series(arr.astype(str), dtype=object), index=False,
                                   hash_key=key).to_numpy(dtype=np.uint64)
    return (h >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def _finite_2d(x, name: str) -> np.ndarray:
    arr = to_numpy(x).astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (items x dim), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def fit_prototypes(new_embeddings, labels, *, distance: str = "cosine") -> dict:
    """Class prototypes in the new model's space for the ``prototype`` policy: per class the
    mean of the new-model training embeddings (cosine: of the L2-normalised ones, normalised
    again). Returns a JSON-able dict ``{"version", "distance", "classes", "prototypes"}`` to
    store with `h`. Raises ValueError for bad shapes, NaN, a bad distance or missing labels."""
    check_distance(distance)
    x = _finite_2d(new_embeddings, "new_embeddings")
    y = to_numpy(labels)
    if y.shape != (len(x),):
        raise ValueError(f"labels must have one entry per embedding ({len(x)}), got {y.shape}")
    if len(x) == 0:
        raise ValueError("new_embeddings is empty")
    if pd.isna(pd.Series(y, dtype=object)).any():
        raise ValueError("labels contains missing values")
    if distance == "cosine":
        x = l2_normalise(x)
    classes = pd.unique(y)
    try:
        classes = np.sort(classes)
    except TypeError:
        pass
    protos = np.stack([x[y == c].mean(axis=0) for c in classes])
    if distance == "cosine":
        protos = l2_normalise(protos)
    return {"version": PROTOTYPES_VERSION, "distance": distance,
            "classes": [c.item() if hasattr(c, "item") else c for c in classes],
            "prototypes": protos.tolist()}


def prototype_distances(transformed, prototypes: dict) -> np.ndarray:
    """Items x classes distances of the transformed embeddings to the prototypes (float64;
    cosine ``1 - cos``, l2 ``||.||``). Raises ValueError as :func:`prototype_scores`."""
    if not isinstance(prototypes, dict) or prototypes.get("version") != PROTOTYPES_VERSION:
        raise ValueError("prototypes must be a dict from fit_prototypes (version "
                         f"{PROTOTYPES_VERSION})")
    check_distance(prototypes.get("distance"), "prototypes distance")
    p = _finite_2d(np.asarray(prototypes.get("prototypes"), dtype=np.float64), "prototypes")
    t = _finite_2d(transformed, "transformed")
    if t.shape[1] != p.shape[1]:
        raise ValueError(f"transformed dim {t.shape[1]} != prototypes dim {p.shape[1]}")
    if prototypes["distance"] == "cosine":
        return 1.0 - l2_normalise(t) @ p.T
    sq = (np.einsum("ij,ij->i", t, t)[:, None] - 2.0 * t @ p.T
          + np.einsum("ij,ij->i", p, p)[None, :])
    return np.sqrt(np.maximum(sq, 0.0))


def prototype_scores(transformed, prototypes: dict) -> np.ndarray:
    """Distance of each transformed embedding to its nearest prototype (float64): cosine
    ``1 - max_c cos(h(o), p_c)``, l2 ``min_c ||h(o) - p_c||``. Raises ValueError for bad
    parameters (naming the key) or inputs."""
    return prototype_distances(transformed, prototypes).min(axis=1)


def prototype_margin(transformed, prototypes: dict) -> np.ndarray:
    """Per item, the distance to the second-nearest prototype minus the distance to the
    nearest (float64, >= 0; 0 with a single class): small = between two classes. Raises
    ValueError as :func:`prototype_scores`."""
    d = prototype_distances(transformed, prototypes)
    if d.shape[1] < 2:
        return np.zeros(len(d))
    two = np.partition(d, 1, axis=1)[:, :2]
    return two[:, 1] - two[:, 0]


def order_scores(policy: str, *, sigma=None, transformed=None, new=None, n=None, ids=None,
                 seed: int = 0, prototypes: dict | None = None,
                 distance: str = "cosine") -> np.ndarray:
    """Float64 scores for ``policy`` (higher = backfilled earlier).

    ``uncertainty`` needs ``sigma`` (1-D); ``random`` needs ``n`` (item count; inferred from
    ``sigma``/``transformed``/``new`` when those are given) or ``ids`` (then the scores come from
    :func:`random_scores_for_ids` and do not depend on row order), seeded by ``seed``;
    ``oracle`` needs ``transformed`` and ``new`` (2-D, same shape; rows L2-normalised first
    when ``distance`` is cosine, raw for l2); ``prototype`` needs ``transformed`` and
    ``prototypes`` (:func:`fit_prototypes`).
    Raises ValueError for an unknown policy (naming the allowed ones), a missing or malformed
    input (naming the argument), or NaN/inf inputs.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; allowed policies: {', '.join(POLICIES)}")
    check_distance(distance)
    if policy == "auto":
        raise ValueError("policy 'auto' is scored by auto_scores(h, old, ids, seed): it needs h")
    if policy == "prototype":
        if transformed is None:
            raise ValueError("policy 'prototype' needs transformed (h(old) embeddings)")
        if prototypes is None:
            raise ValueError("policy 'prototype' needs prototypes (fit_prototypes, stored with h)")
        return prototype_scores(transformed, prototypes)
    if policy == "uncertainty":
        if sigma is None:
            raise ValueError("policy 'uncertainty' needs sigma (per-item predicted uncertainty)")
        s = to_numpy(sigma).astype(np.float64)
        if s.ndim != 1:
            raise ValueError(f"sigma must be 1-D, got shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError("sigma contains NaN or infinite values")
        return s
    if policy == "random":
        if not _is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if ids is not None:
            return random_scores_for_ids(ids, seed)
        if n is None:
            for other in (sigma, transformed, new):
                if other is not None:
                    n = len(other)
                    break
        if n is None:
            raise ValueError("policy 'random' needs n (number of items) or ids")
        if not _is_int(n) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        return np.random.default_rng(int(seed)).random(int(n))
    # oracle
    if transformed is None:
        raise ValueError("policy 'oracle' needs transformed (h(old) embeddings)")
    if new is None:
        raise ValueError("policy 'oracle' needs new (new-model embeddings)")
    t = to_numpy(transformed).astype(np.float64)
    nw = to_numpy(new).astype(np.float64)
    if t.ndim != 2:
        raise ValueError(f"transformed must be 2-D (items x dim), got shape {t.shape}")
    if nw.shape != t.shape:
        raise ValueError(f"new shape {nw.shape} != transformed shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("transformed contains NaN or infinite values")
    if not np.all(np.isfinite(nw)):
        raise ValueError("new contains NaN or infinite values")
    if distance == "l2":
        return np.linalg.norm(t - nw, axis=1)
    return np.linalg.norm(l2_normalise(t) - l2_normalise(nw), axis=1)


def auto_scores(h, old, ids, seed: int = 0) -> np.ndarray:
    """Float64 scores of the ``auto`` policy for items with old embeddings ``old`` (N x d) and
    ``ids``: h's forecast choice (``h.auto_order``) as priorities, or, when the forecast chose
    random order, :func:`random_scores_for_ids` with ``seed``. Raises ValueError when h has no
    forecast choice (naming what to run)."""
    import torch

    spec = getattr(h, "auto_order", None)
    if spec is None:
        raise ValueError("policy 'auto' needs h trained with a forecast (forecast.enabled=true in "
                         "pipelines/train_transformation.py); this h has none: retrain it, or "
                         "choose --policy uncertainty or random")
    if spec.get("random"):
        return random_scores_for_ids(ids, seed)
    with torch.inference_mode():
        _, priority = h.auto_priority(torch.from_numpy(np.require(old, np.float32,
                                                                  requirements="C")))
    return priority.numpy().astype(np.float64)


def rank_order(scores, ids=None) -> np.ndarray:
    """Indices of ``scores`` by descending score; ties broken by ascending id, else by index.

    Args: ``scores`` 1-D finite numbers; ``ids`` optional 1-D ids of the same length (compared
    as strings when they are not all numeric). Exactly reproducible (no unstable sort).
    Raises ValueError for NaN scores, wrong shapes or duplicate ids.
    """
    s = to_numpy(scores).astype(np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contains NaN")
    if ids is None:
        tie = np.arange(len(s))
    else:
        tie = to_numpy(ids)
        if tie.ndim != 1 or len(tie) != len(s):
            raise ValueError(f"ids must be 1-D with {len(s)} entries, got shape {tie.shape}")
        if not (np.issubdtype(tie.dtype, np.number) or tie.dtype.kind in "US"):
            tie = tie.astype(str)
        if len(np.unique(tie)) != len(tie):
            raise ValueError("ids must be unique")
    # lexsort sorts by the last key first; -s puts high scores first (+0.0 == -0.0 ties)
    return np.lexsort((tie, -s)).astype(np.int64)


def _check_batching(n_items, batch_size, num_batches) -> None:
    if not _is_int(n_items) or n_items < 0:
        raise ValueError(f"n_items must be a non-negative int, got {n_items!r}")
    if (batch_size is None) == (num_batches is None):
        raise ValueError("give exactly one of batch_size or num_batches")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_batches is not None:
        if not _is_int(num_batches) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
        if num_batches > max(n_items, 1):
            raise ValueError(f"num_batches ({num_batches}) exceeds n_items ({n_items}); "
                             "batches would be empty")


def batch_id_for_rank(rank, n_items: int, batch_size: int | None = None,
                      num_batches: int | None = None):
    """1-based batch id of ``rank`` (scalar or numpy array of ints in [0, n_items)).

    By rows (``batch_size``): ``rank // batch_size + 1``; the last batch may be smaller.
    By count (``num_batches``): nearly equal batches, the first ``n_items % num_batches``
    batches one item larger (like ``numpy.array_split``).
    Exactly one of ``batch_size``/``num_batches``. Returns an int for a scalar rank, an int64
    array otherwise. Raises ValueError naming the bad argument (ranks out of range included).
    """
    _check_batching(n_items, batch_size, num_batches)
    scalar = np.ndim(rank) == 0
    r = np.asarray(rank)
    if r.size and not (np.issubdtype(r.dtype, np.integer) and r.dtype != np.bool_):
        raise ValueError(f"rank must be integer, got dtype {r.dtype}")
    r = r.astype(np.int64)
    if r.size and (r.min() < 0 or r.max() >= n_items):
        raise ValueError(f"rank must lie in [0, {n_items}), got values in [{r.min()}, {r.max()}]")
    if batch_size is not None:
        out = r // batch_size + 1
    else:
        q, big = divmod(n_items, num_batches)          # `big` batches of q + 1, the rest of q
        cut = big * (q + 1)
        out = np.where(r < cut, r // (q + 1), big + (r - cut) // max(q, 1)) + 1
    return int(out) if scalar else out.astype(np.int64)


def assign_batches(n_items: int, *, batch_size: int | None = None,
                   num_batches: int | None = None) -> np.ndarray:
    """Batch id (1-based, int64) for ranks ``0..n_items-1``; see :func:`batch_id_for_rank`."""
    _check_batching(n_items, batch_size, num_batches)
    return batch_id_for_rank(np.arange(n_items, dtype=np.int64), n_items, batch_size, num_batches)


def batch_sizes(n_items: int, *, batch_size: int | None = None,
                num_batches: int | None = None) -> np.ndarray:
    """Number of items in batches 1..B (int64), without materialising the ranks."""
    _check_batching(n_items, batch_size, num_batches)
    if n_items == 0:
        return np.zeros(0, dtype=np.int64)
    if batch_size is not None:
        full, rest = divmod(n_items, batch_size)
        return np.array([batch_size] * full + ([rest] if rest else []), dtype=np.int64)
    q, big = divmod(n_items, num_batches)
    return np.array([q + 1] * big + [q] * (num_batches - big), dtype=np.int64)


def batching_from_config(backfill_cfg) -> dict:
    """``{"num_batches": K}`` when the config's ``backfill.num_batches`` > 0, else
    ``{"batch_size": backfill.batch_size}``: the keyword arguments of the batching functions."""
    num = int(backfill_cfg["num_batches"])
    return {"num_batches": num} if num > 0 else {"batch_size": int(backfill_cfg["batch_size"])}
