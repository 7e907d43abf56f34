"""Calibrating a mixed gallery: a per-source affine score correction (beyond the FastFill paper).

During a backfill the gallery mixes new-model vectors and transformed ones h(old). New-vs-new
similarities run higher than new-vs-transformed ones, so a freshly backfilled item of the wrong
class can outrank a still-transformed item of the right class. The correction puts both sources
on one scale: a transformed item ``j`` is scored

    score'(q, j) = scale * score(q, j) + bias + sigma_weight * log(sigma_j)

and a new item keeps ``score(q, j)`` (``score`` = cosine or ``-||q - g||^2``, as in
:mod:`fastfill_udfs.metrics`). The parameters come from two logistic regressions of "same
class" on the score, one per source, fitted on held-out training pairs (items `h` was not trained on):
``logit P(same | s, new) = a_n s + c_n`` and ``logit P(same | s, transformed) = a_t s + c_t
(+ w log sigma)``; dividing by ``a_n`` gives ``scale = a_t / a_n``, ``bias = (c_t - c_n) / a_n``,
``sigma_weight = w / a_n``: both sources ranked by the same posterior. With no transformed item
left (t = 1) nothing changes; at t = 0 the ranking changes only through the sigma term (a
positive scale and a constant bias keep every ranking).

Parameters are a small JSON-able dict (stored with `h`). Use them:
* for metrics: :func:`item_correction` -> ``gallery_scale``/``gallery_bias`` of
  :func:`fastfill_udfs.metrics.retrieval_metrics` (or :func:`calibrated_scores` on a score
  matrix);
* for an exact inner-product index (faiss ``IndexFlatIP``): :func:`augment_queries` and
  :func:`augment_gallery` give vectors whose inner product is exactly the calibrated score
  (one extra coordinate for cosine, two for l2), so the index ranks exactly like the
  calibrated scores.
"""
from __future__ import annotations

import numpy as np

from fastfill_udfs.arrays import l2_normalise, to_numpy
from fastfill_udfs.metrics import check_distance, similarity_scores

__all__ = ["CALIBRATIONS", "CALIBRATION_VERSION", "identity_calibration", "fit_calibration", "check_calibration",
           "item_correction", "calibrated_scores", "augment_queries", "augment_gallery",
           "augmented_dim"]

CALIBRATIONS = ("none", "affine", "affine_sigma")  # transformation.calibration (order_fitting)
CALIBRATION_VERSION = 1
_KEYS = ("version", "distance", "scale", "bias", "sigma_weight")


def identity_calibration(distance: str = "cosine") -> dict:
    """Parameters that change nothing (scale 1, bias 0, no sigma term)."""
    check_distance(distance)
    return {"version": CALIBRATION_VERSION, "distance": distance, "scale": 1.0, "bias": 0.0,
            "sigma_weight": 0.0}


def check_calibration(params) -> dict:
    """Validate a parameter dict (keys, types, finite values, scale > 0); returns a clean copy.
    Raises ValueError naming the bad key."""
    if not isinstance(params, dict):
        raise ValueError(f"calibration params must be a dict, got {type(params).__name__}")
    missing = [k for k in _KEYS if k not in params]
    if missing:
        raise ValueError(f"calibration params lack {missing}")
    if params["version"] != CALIBRATION_VERSION:
        raise ValueError(f"calibration params version {params['version']!r} is not "
                         f"{CALIBRATION_VERSION}")
    check_distance(params["distance"], "calibration params distance")
    out = dict(params)
    for k in ("scale", "bias", "sigma_weight"):
        v = params[k]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not np.isfinite(v):
            raise ValueError(f"calibration params {k} must be a finite number, got {v!r}")
        out[k] = float(v)
    if out["scale"] <= 0:
        raise ValueError(f"calibration params scale must be > 0, got {out['scale']}")
    return out


def _is_transformed(is_transformed, n: int) -> np.ndarray:
    t = to_numpy(is_transformed)
    if t.ndim == 0:
        t = np.full(n, bool(t))
    if t.shape != (n,) or t.dtype != np.bool_:
        raise ValueError(f"is_transformed must be a bool scalar or bool array of {n} entries, "
                         f"got dtype {t.dtype} shape {t.shape}")
    return t


def _log_sigma(sigma, n: int, params: dict) -> np.ndarray:
    if params["sigma_weight"] == 0.0:
        return np.zeros(n)
    if sigma is None:
        raise ValueError("these calibration params weigh sigma (sigma_weight != 0): pass sigma")
    s = to_numpy(sigma).astype(np.float64)
    if s.shape != (n,):
        raise ValueError(f"sigma must have {n} entries, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("sigma must be finite and > 0")
    return np.log(s)


def item_correction(params: dict, is_transformed, sigma=None, n: int | None = None):
    """Per-gallery-item ``(scale, bias)`` float64 arrays: ``(params.scale, params.bias +
    params.sigma_weight * log sigma)`` for transformed items, ``(1, 0)`` for new ones.

    Args: ``params`` from :func:`fit_calibration`; ``is_transformed`` bool array (or a bool
    scalar with ``n``); ``sigma`` per item (needed when ``sigma_weight != 0``; entries of new
    items are ignored but must be positive). Raises ValueError naming a bad argument."""
    p = check_calibration(params)
    t = to_numpy(is_transformed)
    if t.ndim == 0:
        if n is None:
            raise ValueError("n is needed when is_transformed is a scalar")
        t = np.full(int(n), bool(t))
    t = _is_transformed(t, len(t))
    ls = _log_sigma(sigma, len(t), p)
    scale = np.where(t, p["scale"], 1.0)
    bias = np.where(t, p["bias"] + p["sigma_weight"] * ls, 0.0)
    return scale, bias


def calibrated_scores(params: dict, scores, is_transformed, sigma=None) -> np.ndarray:
    """Apply the correction to a raw (queries x gallery) score matrix (columns = items)."""
    s = to_numpy(scores).astype(np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (queries x gallery), got shape {s.shape}")
    scale, bias = item_correction(params, _is_transformed(is_transformed, s.shape[1]), sigma)
    return s * scale + bias


# ----------------------------------------------------------------------------- fitting
def _logistic_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float = 1e-6,
                  iters: int = 50) -> np.ndarray:
    """Weighted logistic regression by Newton's method on standardised features (+ intercept).
    Returns coefficients for the raw features, intercept last."""
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    beta = np.zeros(z.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -35, 35)))
        g = z.T @ (w * (p - y)) + ridge * beta
        hess = (z * (w * p * (1 - p))[:, None]).T @ z + ridge * np.eye(len(beta))
        step = np.linalg.solve(hess, g)
        beta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    coef = beta[:-1] / sd
    return np.append(coef, beta[-1] - np.sum(coef * mu))


def fit_calibration(query_emb, query_labels, gallery_new, gallery_transformed, gallery_labels,
                    *, distance: str = "cosine", sigma=None, use_sigma: bool = False,
                    neighbourhood: float = 1.0,
                    query_ids=None, gallery_ids=None, max_queries: int = 2000,
                    negative_fraction: float = 0.25, seed: int = 0) -> dict:
    """Fit the per-source correction on held-out pairs: one logistic regression of "same
    class" on the score per source (for transformed items with ``log sigma`` as a second
    feature when ``use_sigma``); the ratio of the two puts both sources on the posterior's
    scale.

    Args: ``query_emb`` (Q x d) new-model embeddings of held-out items; ``gallery_new`` and
    ``gallery_transformed`` (N x d) new and h(old) embeddings of the same held-out items (h
    must not have been trained on them); labels; ids for leave-one-out (both or neither);
    ``distance``; ``sigma`` (N,) h's predicted sigma of the gallery items; ``neighbourhood``
    < 1 keeps, per query and source, only the pairs in the top fraction of that source's
    scores (where rankings are decided); at most ``max_queries`` queries (seeded sample) and a
    seeded ``negative_fraction`` of the negative pairs (the same for both sources, so the
    relative bias is unaffected). Returns the JSON-able parameter dict.
    Raises ValueError naming a bad argument, or when a fit is degenerate (a source without
    positive or negative pairs, or whose score does not raise the odds of a positive).
    """
    if not 0 < neighbourhood <= 1:
        raise ValueError(f"neighbourhood must be in (0, 1], got {neighbourhood}")
    check_distance(distance)
    if not 0 < negative_fraction <= 1:
        raise ValueError(f"negative_fraction must be in (0, 1], got {negative_fraction}")
    q = to_numpy(query_emb).astype(np.float64)
    gn, gt = to_numpy(gallery_new), to_numpy(gallery_transformed)
    ql, gl = to_numpy(query_labels), to_numpy(gallery_labels)
    if q.ndim != 2 or gn.ndim != 2 or gt.shape != gn.shape or gn.shape[1] != q.shape[1]:
        raise ValueError(f"query_emb {q.shape}, gallery_new {gn.shape} and gallery_transformed "
                         f"{gt.shape} must be 2-D with one dim, the galleries of one shape")
    if ql.shape != (len(q),) or gl.shape != (len(gn),):
        raise ValueError("query_labels / gallery_labels must have one entry per row")
    if (query_ids is None) != (gallery_ids is None):
        raise ValueError("query_ids and gallery_ids must be given together or not at all")
    if use_sigma:
        if sigma is None:
            raise ValueError("use_sigma needs sigma")
        ls = np.log(to_numpy(sigma).astype(np.float64))
        if ls.shape != (len(gn),) or not np.all(np.isfinite(ls)):
            raise ValueError(f"sigma must be finite, > 0, with {len(gn)} entries")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(q))[:max_queries])
    rel = ql[pick, None] == gl[None, :]
    valid = np.ones_like(rel) if query_ids is None else (
        np.asarray(query_ids).astype(str)[pick][:, None]
        != np.asarray(gallery_ids).astype(str)[None, :])
    sampled = valid & (rel | (rng.random(rel.shape) < negative_fraction))
    fits = {}
    for source, g in (("new", gn), ("transformed", gt)):
        s_all = similarity_scores(q[pick], g, distance=distance)
        keep = sampled & _top_fraction(s_all, valid, neighbourhood)
        y = rel[keep].astype(np.float64)
        w = np.where(rel[keep], 1.0, 1.0 / negative_fraction)
        if len(y) == 0 or y.min() == y.max():
            raise ValueError(f"source {source}: need positive and negative pairs to fit")
        feats = [s_all[keep]]
        if source == "transformed" and use_sigma:
            feats.append(np.broadcast_to(ls[None, :], rel.shape)[keep])
        fits[source] = _logistic_fit(np.stack(feats, axis=1), y, w)
    a_n, c_n = fits["new"]
    if not a_n > 0 or not fits["transformed"][0] > 0:
        raise ValueError("the score does not increase the odds of a positive pair for some "
                         "source; cannot calibrate")
    a_t, c_t = fits["transformed"][0], fits["transformed"][-1]
    sw = fits["transformed"][1] / a_n if use_sigma else 0.0
    return check_calibration({"version": CALIBRATION_VERSION, "distance": distance,
                              "scale": float(a_t / a_n), "bias": float((c_t - c_n) / a_n),
                              "sigma_weight": float(sw)})


def _top_fraction(scores, valid, fraction) -> np.ndarray:
    """Per row, the valid entries whose score is in the top `fraction` of the row."""
    if fraction >= 1:
        return valid
    masked = np.where(valid, scores, -np.inf)
    k = max(2, int(round(fraction * valid.sum(axis=1).min())))
    kth = -np.partition(-masked, k - 1, axis=1)[:, k - 1]
    return valid & (scores >= kth[:, None])


# ----------------------------------------------------------------------------- index vectors
def augmented_dim(params: dict, dim: int) -> int:
    """Width of the augmented vectors for embeddings of width ``dim``: dim + 1 (cosine) or
    dim + 2 (l2)."""
    p = check_calibration(params)
    return dim + (1 if p["distance"] == "cosine" else 2)


def augment_queries(params: dict, queries) -> np.ndarray:
    """Query vectors for an inner-product index: cosine ``[q/|q|, 1]``; l2 ``[q, 1, |q|^2]``
    (float32). Their inner product with :func:`augment_gallery` vectors is exactly the
    calibrated score (for l2 the full ``scale_j * -||q - g||^2 + bias_j``)."""
    p = check_calibration(params)
    q = to_numpy(queries).astype(np.float64)
    if q.ndim != 2:
        raise ValueError(f"queries must be 2-D, got shape {q.shape}")
    ones = np.ones((len(q), 1))
    if p["distance"] == "cosine":
        return np.hstack([l2_normalise(q), ones]).astype(np.float32)
    return np.hstack([q, ones, np.einsum("ij,ij->i", q, q)[:, None]]).astype(np.float32)


def augment_gallery(params: dict, vectors, is_transformed, sigma=None) -> np.ndarray:
    """Gallery vectors for an inner-product index (float32), per item by its source:
    cosine ``[scale_j * g/|g|, bias_j]``; l2 ``[2 scale_j g, bias_j - scale_j |g|^2, -scale_j]``
    with ``(scale_j, bias_j)`` from :func:`item_correction` (new items: 1, 0). Inner product
    with :func:`augment_queries` = ``scale_j * score(q, g) + bias_j`` exactly: cosine, or
    ``-||q - g||^2``. Raises ValueError naming a bad argument."""
    p = check_calibration(params)
    g = to_numpy(vectors).astype(np.float64)
    if g.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {g.shape}")
    scale, bias = item_correction(p, _is_transformed(is_transformed, len(g)), sigma)
    if p["distance"] == "cosine":
        return np.hstack([l2_normalise(g) * scale[:, None], bias[:, None]]).astype(np.float32)
    sq = np.einsum("ij,ij->i", g, g)
    return np.hstack([2.0 * scale[:, None] * g, (bias - scale * sq)[:, None],
                      -scale[:, None]]).astype(np.float32)
