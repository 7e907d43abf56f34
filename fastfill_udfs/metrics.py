"""Exact retrieval metrics over the full ranking: mAP and CMC top-k (no Spark).

Definitions (shared by :func:`retrieval_metrics` and :func:`ranked_metrics`):

* Similarity (``distance``): ``"cosine"`` (default): queries and gallery are L2-normalised
  first (an all-zero vector gets similarity 0 to everything); ``"l2"``: the negated squared
  Euclidean distance ``-||q - g||^2`` on the raw vectors (the official FastFill evaluation).
  Without a score correction the per-query constant ``||q||^2`` is dropped (``2 q.g - ||g||^2``
  ranks the row identically and loses less precision).
* Optional per-gallery-item score correction (a calibrated mixed gallery, see
  :mod:`fastfill_udfs.calibration`): ``score'(q, j) = gallery_scale[j] * score(q, j) +
  gallery_bias[j]`` with ``score`` the similarity above (for ``l2`` the full ``-||q - g||^2``).
* Average precision of one query, with tied scores grouped exactly like
  ``sklearn.metrics.average_precision_score``::

      AP = 1/R * sum over relevant items j of  #(relevant with score >= s_j) / #(items with score >= s_j)

  where R is the number of relevant (same-label) gallery items of that query.
* Queries with no relevant gallery item (R = 0) are left out of mAP (sklearn's AP is undefined
  there) and out of top-k; ``n_queries`` counts the queries that remain. A missing label
  (None/NaN) on a query leaves the query out; on a gallery item it makes the item relevant to
  no query. With no query left the metrics are NaN and ``n_queries`` is 0.
* top-k (CMC): a query is a hit at k if some relevant item scores ``>=`` the k-th highest score,
  i.e. fewer than k items score strictly higher than its best relevant item. Ties at the k-th
  place therefore count in the query's favour; the result never depends on the gallery order.
* Leave-one-out: with ``query_ids``/``gallery_ids``, a gallery item whose id equals the query's
  id is removed from that query's ranking entirely (it is neither relevant nor counted).

Implementation of :func:`retrieval_metrics`: per block of queries, one similarity matmul
(float64 by default) and one SIMD value sort per row; ties and ranks come from sparse passes
over the sorted rows. Identical gallery vectors are scored once and copied, so they always tie
exactly (BLAS gives identical columns slightly different results otherwise). The relevance bit
is packed into the lowest mantissa bit of each score before sorting (no argsort/gather), so two
scores that differ only in that bit (~1e-16 relative in float64) count as tied.
:func:`ranked_metrics` uses the scores it is given exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from fastfill_udfs.arrays import check_pos_int, check_topk, l2_normalise, to_numpy

__all__ = ["retrieval_metrics", "ranked_metrics", "similarity_scores", "DISTANCES",
           "check_distance", "unique_rows", "pack_sort"]

DISTANCES = ("cosine", "l2")

# Upper bound on the similarities held per block (caps the block size for large galleries).
_MAX_BLOCK_ELEMENTS = 1 << 24
# Score given to excluded (leave-one-out) entries: below every similarity of either distance.
_EXCLUDED = -np.inf


# ----------------------------------------------------------------------------- checks
def check_distance(distance, name: str = "distance") -> str:
    """`distance` when it is one of DISTANCES, else ValueError naming `name`."""
    if distance not in DISTANCES:
        raise ValueError(f"{name} must be one of {DISTANCES}, got {distance!r}")
    return distance


def _item_vector(x, n: int, name: str) -> np.ndarray | None:
    """A per-gallery-item float vector (scalar broadcast), finite; None stays None."""
    if x is None:
        return None
    arr = to_numpy(x).astype(np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or 1-D with one entry per gallery item ({n}), "
                         f"got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_1d(x, name: str, rows: int | None = None, of: str = "") -> np.ndarray:
    """`x` as a 1-D array; with `rows`, one entry per row of the array named `of`."""
    arr = to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if rows is not None and len(arr) != rows:
        raise ValueError(f"{name} has {len(arr)} entries, {of} has {rows} rows")
    return arr


def _as_2d_float(x, name: str) -> np.ndarray:
    arr = to_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (items x dim), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _float_dtype(dtype) -> np.dtype:
    name = str(dtype).replace("torch.", "")
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return np.dtype(name)


def _codes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for two label/id arrays over a shared vocabulary; missing -> -1."""
    both = pd.Series(np.concatenate([a.astype(object), b.astype(object)]), dtype=object)
    codes, _ = pd.factorize(both, use_na_sentinel=True)
    return codes[: len(a)].astype(np.int64), codes[len(a):].astype(np.int64)


def unique_rows(x: np.ndarray):
    """(unique rows, inverse index) of a 2-D array, or (x, None) when all rows are distinct."""
    if len(x) < 2:
        return x, None
    rows = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    if len(first) == len(x):
        return x, None
    return x[first], inverse.ravel()


def _result(ap: np.ndarray, hits: dict, ks: tuple) -> dict:
    out = {"mAP": float(ap.mean()) if len(ap) else float("nan")}
    for k in ks:
        out[f"top{k}"] = float(np.mean(hits[k])) if len(ap) else float("nan")
    out["n_queries"] = int(len(ap))
    return out


# ----------------------------------------------------------------------------- core
def _sorted_stats(c: np.ndarray, m: np.ndarray, ignore: np.ndarray | None = None):
    """Per-row AP numerators and top-k ranks for rows sorted ascending.

    ``c`` (B x n) scores ascending per row (equal values = tie); ``m`` bool (B x n): relevant.
    Entries to ignore either sit at the front of the row with values below every other entry
    (and ``m`` False), or are flagged in ``ignore`` (bool, B x n; they keep their sorted place).
    Returns ``(ap_sum, n_seen, n_greater)``: the sum over relevant items of
    #relevant>=s / #items>=s, the number of relevant items, and the number of items scoring
    strictly above the best relevant item (n where a row has none).
    """
    b, n = c.shape
    keys = np.flatnonzero(m)                      # flat positions, ascending (row-major)
    rows = keys // n
    cols = keys - rows * n
    n_seen = np.bincount(rows, minlength=b)
    offsets = np.zeros(b, dtype=np.int64)
    np.cumsum(n_seen[:-1], out=offsets[1:])
    start = cols.astype(np.int64)                 # first index of each match's tie group
    before = np.arange(len(rows), dtype=np.int64) - offsets[rows]   # matches before it
    has = n_seen > 0
    best_end = np.full(b, n - 1, dtype=np.int64)  # last index of the best match's tie group
    best_end[has] = cols[offsets[has] + n_seen[has] - 1]

    # ties: runs of equal neighbours, found sparsely (ties are rare in real data)
    tf = np.flatnonzero(c[:, 1:] == c[:, :-1])    # c[tr, tc] == c[tr, tc + 1]
    tr = tf // (n - 1) if n > 1 else tf
    tc = tf - tr * (n - 1)
    if tr.size:
        new_run = np.ones(tr.size, dtype=bool)
        new_run[1:] = (tr[1:] != tr[:-1]) | (tc[1:] != tc[:-1] + 1)
        first = np.flatnonzero(new_run)
        last = np.append(first[1:], tr.size) - 1
        run_row = tr[first].astype(np.int64)
        run_lo = run_row * n + tc[first]          # flat position of the group's first item
        run_hi = run_row * n + tc[last] + 1       # ... and of its last item
        lo = np.searchsorted(keys, run_lo, side="left")
        hi = np.searchsorted(keys, run_hi, side="right")
        cnt = hi - lo
        if cnt.sum():
            run_of = np.repeat(np.arange(first.size), cnt)          # run of each tied match
            idx = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(lo, cnt)
            start[idx] = tc[first][run_of]
            before[idx] = lo[run_of] - offsets[run_row[run_of]]
        # best match inside a tie group: the group's end bounds the items above it
        rb = np.flatnonzero(has)
        bkey = rb * n + best_end[rb]
        j = np.searchsorted(run_lo, bkey, side="right") - 1
        inside = (j >= 0) & (bkey <= run_hi[np.maximum(j, 0)])
        best_end[rb[inside]] = run_hi[j[inside]] - rb[inside] * n

    n_ge = n - start                               # items with score >= s, per match
    n_gt = n - 1 - best_end                        # items above the best match, per row
    if ignore is not None:
        ign = np.flatnonzero(ignore)               # sparse: few ignored entries per row
        if ign.size:
            row_end = np.searchsorted(ign, (np.arange(b, dtype=np.int64) + 1) * n)
            n_ge = n_ge - (row_end[rows] - np.searchsorted(ign, keys - cols + start))
            n_gt = n_gt - (row_end - np.searchsorted(
                ign, np.arange(b, dtype=np.int64) * n + best_end, side="right"))
    prec = (n_seen[rows] - before) / n_ge.astype(np.float64)
    ap_sum = np.bincount(rows, weights=prec, minlength=b)
    n_greater = np.where(has, n_gt, n)
    return ap_sum, n_seen, n_greater


def pack_sort(sims: np.ndarray, match: np.ndarray):
    """Sort each row of ``sims`` (C-contiguous float) ascending in place, carrying ``match``
    in the lowest mantissa bit.

    Returns (``sims`` sorted, with that bit cleared again; the match bits in sorted order).
    """
    bits = sims.view(np.int64 if sims.dtype.itemsize == 8 else np.int32)
    sims += 0.0                                    # -0.0 -> +0.0 so the two zeros tie
    np.bitwise_and(bits, ~1, out=bits)
    np.bitwise_or(bits, match, out=bits, casting="unsafe")
    sims.sort(axis=1)
    m = np.empty(sims.shape, dtype=np.uint8)
    np.bitwise_and(bits, 1, out=m, casting="unsafe")
    np.bitwise_and(bits, ~1, out=bits)
    return sims, m.view(bool)


def _score_operands(q: np.ndarray, g: np.ndarray, distance: str, scale, bias):
    """(Q, G) with ``Q @ G.T`` = the (corrected) scores of the module docstring, up to a
    per-query constant where there is no correction (one matmul scores a block)."""
    ones = np.ones((len(q), 1))
    if distance == "cosine":
        qa, ga = l2_normalise(q), l2_normalise(g)
        if scale is None and bias is None:
            return qa, ga
        if scale is not None:
            ga = ga * scale[:, None]
        b = np.zeros(len(g)) if bias is None else bias
        return np.hstack([qa, ones]), np.hstack([ga, b[:, None]])
    g_sq = np.einsum("ij,ij->i", g, g)
    if scale is None:
        # -||q - g||^2 + b = 2 q.g - ||g||^2 + b - ||q||^2; the last term is per query
        b = -g_sq if bias is None else bias - g_sq
        return np.hstack([q, ones]), np.hstack([2.0 * g, b[:, None]])
    q_sq = np.einsum("ij,ij->i", q, q)
    b = np.zeros(len(g)) if bias is None else bias
    return (np.hstack([q, ones, q_sq[:, None]]),
            np.hstack([2.0 * scale[:, None] * g, (b - scale * g_sq)[:, None], -scale[:, None]]))


# ----------------------------------------------------------------------------- public
def retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, *,
                      query_ids=None, gallery_ids=None, topk: Sequence[int] = (1, 5),
                      block_size: int = 1024, device=None, dtype="float64",
                      distance: str = "cosine", gallery_scale=None, gallery_bias=None,
                      per_query: bool = False) -> dict:
    """mAP and CMC top-k of ``query_emb`` against ``gallery_emb`` by ``distance``.

    Args: embeddings as 2-D numpy arrays or torch tensors (same dim); labels 1-D (any hashable
    values, None/NaN = missing); optional ``query_ids``/``gallery_ids`` (both or neither) for
    leave-one-out; ``topk`` the CMC cut-offs; ``block_size`` queries per block (capped so one
    block holds at most 2**24 similarities); ``device`` a torch device for the similarity
    matmul (default: CPU numpy, or the query tensor's device when it is not on the CPU);
    ``dtype`` of the similarities, ``"float64"`` (default; ties and near-ties as in a float64
    reference) or ``"float32"`` (about twice as fast; scores within ~1e-7 may tie, for ``l2``
    within ~1e-7 of the squared norms); ``distance`` ``"cosine"`` or ``"l2"``;
    ``gallery_scale``/``gallery_bias`` optional per-gallery-item score correction (scalars or
    1-D, one entry per gallery item; see the module docstring).
    Returns ``{"mAP", "top1", "top5", ..., "n_queries"}`` (see the module docstring); with
    ``per_query`` also ``"query_index"`` (int64, the queries that count, ascending), ``"ap"``
    (their AP) and ``"hit1"``, ``"hit5"``, ... (bool per counted query), for bootstraps.
    Raises ValueError on mismatched shapes/lengths, non-finite embeddings, bad ``topk``,
    ``block_size``, ``dtype``, ``distance``, ``gallery_scale``/``gallery_bias``, or only one of
    the id arrays.
    """
    ks = check_topk(topk)
    block_size = check_pos_int(block_size, "block_size")
    fdt = _float_dtype(dtype)
    distance = check_distance(distance)
    if (query_ids is None) != (gallery_ids is None):
        raise ValueError("query_ids and gallery_ids must be given together (leave-one-out) or not at all")
    if device is None and hasattr(query_emb, "device") and str(query_emb.device) != "cpu":
        device = query_emb.device
    q = _as_2d_float(query_emb, "query_emb")
    g = _as_2d_float(gallery_emb, "gallery_emb")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_emb dim {q.shape[1]} != gallery_emb dim {g.shape[1]}")
    nq, ng = q.shape[0], g.shape[0]
    ql = _as_1d(query_labels, "query_labels", nq, "query_emb")
    gl = _as_1d(gallery_labels, "gallery_labels", ng, "gallery_emb")
    qlab, glab = _codes(ql, gl)
    glab[glab < 0] = -2                            # a missing gallery label matches nothing

    # leave-one-out: gallery position to exclude per query (-1: none), or a full id compare
    excl_pos = excl_q = excl_g = None
    if query_ids is not None:
        qi = _as_1d(query_ids, "query_ids", nq, "query_emb")
        gi = _as_1d(gallery_ids, "gallery_ids", ng, "gallery_emb")
        qic, gic = _codes(qi, gi)
        valid_g = gic[gic >= 0]
        if len(np.unique(valid_g)) == len(valid_g):
            pos_of = np.full(max(int(qic.max(initial=-1)), int(gic.max(initial=-1))) + 2, -1, dtype=np.int64)
            pos_of[valid_g] = np.flatnonzero(gic >= 0)
            excl_pos = np.where(qic >= 0, pos_of[qic], -1)
        else:
            excl_q = qic
            excl_g = np.where(gic >= 0, gic, -2)

    scale = _item_vector(gallery_scale, ng, "gallery_scale")
    bias = _item_vector(gallery_bias, ng, "gallery_bias")
    if nq == 0 or ng == 0:
        return _per_query(_result(np.zeros(0), {k: np.zeros(0, dtype=bool) for k in ks}, ks),
                          np.zeros(0), {k: np.zeros(0, dtype=bool) for k in ks},
                          np.zeros(0, np.int64), per_query)
    qn, gn = _score_operands(q, g, distance, scale, bias)
    qn, gn = qn.astype(fdt), gn.astype(fdt)
    step = max(1, min(block_size, _MAX_BLOCK_ELEMENTS // ng))
    buf = np.empty((min(step, nq), ng), dtype=fdt)   # reused: avoids page faults per block
    # BLAS does not promise bit-identical results for identical columns, so duplicated
    # gallery vectors are scored once and copied: identical items always tie exactly.
    gu, inverse = unique_rows(gn)
    if device is not None:
        import torch
        tq = torch.from_numpy(qn).to(device)
        tg = torch.from_numpy(gu).to(device)

        def raw(lo, hi):
            return (tq[lo:hi] @ tg.T).cpu().numpy()
    else:
        gt = gu.T

        def raw(lo, hi):
            return qn[lo:hi] @ gt if inverse is not None else np.matmul(qn[lo:hi], gt, out=buf[: hi - lo])

    def similarities(lo, hi):
        out = buf[: hi - lo]
        r = raw(lo, hi)
        if inverse is not None:
            np.take(r, inverse, axis=1, out=out)
        elif r is not out:
            out[...] = r
        return out

    aps, greater, counted = [], [], []
    for lo in range(0, nq, step):
        hi = min(lo + step, nq)
        sims = similarities(lo, hi)
        match = qlab[lo:hi, None] == glab[None, :]
        if excl_pos is not None:
            r = np.flatnonzero(excl_pos[lo:hi] >= 0)
            sims[r, excl_pos[lo:hi][r]] = _EXCLUDED
            match[r, excl_pos[lo:hi][r]] = False
        elif excl_q is not None:
            excl = excl_q[lo:hi, None] == excl_g[None, :]
            sims[excl] = _EXCLUDED
            match &= ~excl
        keep = match.any(axis=1)                   # queries with no relevant item do not count
        if not keep.any():
            continue
        counted.append(lo + np.flatnonzero(keep))
        if not keep.all():
            sims, match = sims[keep], match[keep]
        c, m = pack_sort(sims, match)
        ap_sum, n_seen, n_greater = _sorted_stats(c, m)
        aps.append(ap_sum / n_seen)
        greater.append(n_greater)
    ap = np.concatenate(aps) if aps else np.zeros(0)
    ng_arr = np.concatenate(greater) if greater else np.zeros(0, dtype=np.int64)
    hits = {k: ng_arr < k for k in ks}
    index = np.concatenate(counted).astype(np.int64) if counted else np.zeros(0, np.int64)
    return _per_query(_result(ap, hits, ks), ap, hits, index, per_query)


def _per_query(out: dict, ap: np.ndarray, hits: dict, index: np.ndarray, wanted: bool) -> dict:
    if wanted:
        out.update(query_index=index, ap=ap, **{f"hit{k}": v for k, v in hits.items()})
    return out


def similarity_scores(query_emb, gallery_emb, *, distance: str = "cosine", gallery_scale=None,
                      gallery_bias=None) -> np.ndarray:
    """The (queries x gallery) float64 score matrix that :func:`retrieval_metrics` ranks by:
    cosine or ``-||q - g||^2`` (``distance``), then ``gallery_scale[j] * score + gallery_bias[j]``
    when given. Dense: for blocks of queries (analysis, calibration fits, tests).
    Raises ValueError on bad shapes, non-finite values or a bad ``distance``."""
    distance = check_distance(distance)
    q = _as_2d_float(query_emb, "query_emb")
    g = _as_2d_float(gallery_emb, "gallery_emb")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_emb dim {q.shape[1]} != gallery_emb dim {g.shape[1]}")
    scale = _item_vector(gallery_scale, len(g), "gallery_scale")
    bias = _item_vector(gallery_bias, len(g), "gallery_bias")
    if distance == "l2" and scale is None:
        scale = np.ones(len(g))                    # the full -||q - g||^2, query norm included
    qa, ga = _score_operands(q, g, distance, scale, bias)
    return qa @ ga.T


def ranked_metrics(sorted_scores, sorted_match, n_relevant, topk: Sequence[int] = (1, 5), *,
                   valid=None, block_size: int = 1024) -> dict:
    """The same metrics for rankings already sorted by a search engine (e.g. faiss ``D, I``).

    Args: ``sorted_scores`` (queries x k) in descending order in every row; ``sorted_match``
    bool, same shape, True where the ranked item shares the query's label; ``n_relevant``
    (queries,) the number of relevant gallery items of each query (leave-one-out: not
    counting the query itself); optional ``valid`` bool mask, False for entries to ignore (the
    query itself, faiss's ``-1`` padding); ignored entries keep their sorted place (the whole
    row must be descending) and count as neither items nor relevant. Numpy arrays or tensors.
    With k = gallery size the result equals :func:`retrieval_metrics` on the same scores.
    With a truncated ranking, relevant items beyond it add zero precision (AP is still divided
    by ``n_relevant``) and ties are grouped only within the returned ranking.
    Raises ValueError on shape mismatch, scores not descending or NaN, bad
    ``topk``/``block_size``, a negative ``n_relevant`` or one smaller than the relevant items
    in the ranking.
    """
    ks = check_topk(topk)
    block_size = check_pos_int(block_size, "block_size")
    s = to_numpy(sorted_scores)
    if s.ndim != 2:
        raise ValueError(f"sorted_scores must be 2-D (queries x k), got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    m = to_numpy(sorted_match).astype(bool)
    if m.shape != s.shape:
        raise ValueError(f"sorted_match shape {m.shape} != sorted_scores shape {s.shape}")
    v = None
    if valid is not None:
        v = to_numpy(valid).astype(bool)
        if v.shape != s.shape:
            raise ValueError(f"valid shape {v.shape} != sorted_scores shape {s.shape}")
    nr = _as_1d(n_relevant, "n_relevant", s.shape[0], "sorted_scores")
    if not np.issubdtype(nr.dtype, np.integer):
        if not (np.issubdtype(nr.dtype, np.floating) and np.all(nr == np.round(nr))):
            raise ValueError("n_relevant must hold integers")
    nr = nr.astype(np.int64)
    if np.any(nr < 0):
        raise ValueError("n_relevant must be >= 0")

    if np.isnan(s).any():
        raise ValueError("sorted_scores contains NaN")
    if s.shape[1] > 1 and np.any(s[:, 1:] > s[:, :-1]):
        raise ValueError("sorted_scores must be sorted in descending order in every row "
                         "(ignored entries included)")

    nq, n = s.shape
    step = max(1, min(block_size, _MAX_BLOCK_ELEMENTS // max(n, 1)))
    aps, greater = [], []
    for lo in range(0, nq, step):
        hi = min(lo + step, nq)
        keep = nr[lo:hi] > 0
        if not keep.any():
            continue
        c = np.ascontiguousarray(s[lo:hi][keep][:, ::-1])     # ascending
        mb = np.ascontiguousarray(m[lo:hi][keep][:, ::-1])
        nr_b = nr[lo:hi][keep]
        ign = None
        if v is not None:
            ign = ~v[lo:hi][keep][:, ::-1]
            mb &= ~ign
        if n == 0:
            ap_sum = np.zeros(len(nr_b))
            n_seen = np.zeros(len(nr_b), dtype=np.int64)
            n_greater = np.full(len(nr_b), np.iinfo(np.int64).max)
        else:
            ap_sum, n_seen, n_greater = _sorted_stats(c, mb, ign)
            n_greater = np.where(n_seen > 0, n_greater, np.iinfo(np.int64).max)
        if np.any(n_seen > nr_b):
            raise ValueError("n_relevant is smaller than the number of relevant items in the ranking")
        aps.append(ap_sum / nr_b)
        greater.append(n_greater)
    ap = np.concatenate(aps) if aps else np.zeros(0)
    ng_arr = np.concatenate(greater) if greater else np.zeros(0, dtype=np.int64)
    return _result(ap, {k: ng_arr < k for k in ks}, ks)
