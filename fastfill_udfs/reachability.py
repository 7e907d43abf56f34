"""What any backfill order could reach on a protocol (analysis only: these functions use the
gallery's new embeddings, which a real backfill does not have before it re-embeds an item).

* :func:`item_map_benefit` -- the exact first-order change in mAP if one gallery item alone were
  backfilled now (its current, possibly corrected, transformed score replaced by its new-model
  score), for every item at once.
* :func:`item_top1_benefit` -- the same for top-1 (CMC at 1).
* :func:`greedy_order` -- the realised-benefit ceiling: backfill, batch after batch, the items
  with the largest current benefit (recomputed after every batch).
* :func:`similarity_stats` -- score statistics per gallery source (query vs new, query vs
  transformed; positives and negatives) and how often a new-model negative outranks a positive
  of each source: the mixed-gallery penalty.
* :func:`per_class_map` -- mAP per query class, e.g. the t=0 deficit per class against new/new.

Scores follow :mod:`fastfill_udfs.metrics` (``distance`` cosine or l2, optional per-item
correction); queries leave themselves out when ids are given. Ties between continuous scores
are treated as absent in :func:`item_map_benefit` (exact for distinct scores).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fastfill_udfs.arrays import to_numpy
from fastfill_udfs.metrics import check_distance, retrieval_metrics, similarity_scores

__all__ = ["item_map_benefit", "item_top1_benefit", "greedy_order", "similarity_stats",
           "per_class_map"]


def _check_inputs(query_emb, query_labels, gallery_labels, galleries: dict, query_ids,
                  gallery_ids, distance):
    check_distance(distance)
    q = to_numpy(query_emb)
    if q.ndim != 2:
        raise ValueError(f"query_emb must be 2-D, got shape {q.shape}")
    ql, gl = to_numpy(query_labels), to_numpy(gallery_labels)
    if ql.shape != (len(q),):
        raise ValueError(f"query_labels must have {len(q)} entries, got shape {ql.shape}")
    shape = None
    for name, g in galleries.items():
        g = to_numpy(g)
        if g.ndim != 2 or g.shape[1] != q.shape[1]:
            raise ValueError(f"{name} must be 2-D with {q.shape[1]} columns, got shape {g.shape}")
        if shape is not None and g.shape != shape:
            raise ValueError(f"{name} shape {g.shape} differs from the other gallery's {shape}")
        shape = g.shape
    if gl.shape != (shape[0],):
        raise ValueError(f"gallery_labels must have {shape[0]} entries, got shape {gl.shape}")
    if (query_ids is None) != (gallery_ids is None):
        raise ValueError("query_ids and gallery_ids must be given together or not at all")
    if query_ids is not None:
        if to_numpy(query_ids).shape != (len(q),):
            raise ValueError(f"query_ids must have {len(q)} entries")
        if to_numpy(gallery_ids).shape != (shape[0],):
            raise ValueError(f"gallery_ids must have {shape[0]} entries")
    return q, ql, gl


def _self_mask(query_ids, gallery_ids, lo, hi, n):
    if query_ids is None:
        return None
    qi = np.asarray(query_ids)[lo:hi].astype(str)
    gi = np.asarray(gallery_ids).astype(str)
    return qi[:, None] == gi[None, :]


def _score_blocks(query_emb, query_labels, gallery_current, gallery_new, gallery_labels,
                  query_ids, gallery_ids, distance, current_scale, current_bias, block_size):
    """Per block of queries: (scores against the current gallery, scores against the new one,
    relevance), leave-one-out pairs at -inf and not relevant. Checks the inputs first."""
    q, ql, gl = _check_inputs(query_emb, query_labels, gallery_labels,
                              {"gallery_current": gallery_current, "gallery_new": gallery_new},
                              query_ids, gallery_ids, distance)
    cur, new = to_numpy(gallery_current), to_numpy(gallery_new)
    for lo in range(0, len(q), block_size):
        hi = min(lo + block_size, len(q))
        s_cur = similarity_scores(q[lo:hi], cur, distance=distance, gallery_scale=current_scale,
                                  gallery_bias=current_bias)
        s_new = similarity_scores(q[lo:hi], new, distance=distance)
        rel = ql[lo:hi, None] == gl[None, :]
        own = _self_mask(query_ids, gallery_ids, lo, hi, len(gl))
        if own is not None:
            s_cur[own], s_new[own], rel = -np.inf, -np.inf, rel & ~own
        yield s_cur, s_new, rel


def item_map_benefit(query_emb, query_labels, gallery_current, gallery_new, gallery_labels, *,
                     query_ids=None, gallery_ids=None, distance: str = "cosine",
                     current_scale=None, current_bias=None, block_size: int = 256) -> np.ndarray:
    """Per gallery item: the change in mAP if that item alone switched from its current vector
    (scored with the optional per-item ``current_scale``/``current_bias`` correction) to its
    new-model vector (scored plainly), all other items unchanged.

    Args: ``query_emb`` (Q x d) new-model queries; labels 1-D; ``gallery_current`` and
    ``gallery_new`` (N x d); ids for leave-one-out (both or neither); ``distance``.
    Returns float64 (N,): the sum over queries of the change in AP, divided by the number of
    queries that count (those with a relevant item). Items already equal to their new vector
    get ~0. Raises ValueError naming a bad argument.
    """
    total, n_valid = np.zeros(len(gallery_labels)), 0
    for s_cur, s_new, rel in _score_blocks(query_emb, query_labels, gallery_current, gallery_new,
                                           gallery_labels, query_ids, gallery_ids, distance,
                                           current_scale, current_bias, block_size):
        for i in range(len(rel)):
            delta = _query_benefit(s_cur[i], s_new[i], rel[i])
            if delta is not None:
                total += delta
                n_valid += 1
    return total / max(n_valid, 1)


def item_top1_benefit(query_emb, query_labels, gallery_current, gallery_new, gallery_labels, *,
                      query_ids=None, gallery_ids=None, distance: str = "cosine",
                      current_scale=None, current_bias=None, block_size: int = 512) -> np.ndarray:
    """Per gallery item: the change in top-1 (the share of queries whose best-scoring item is
    relevant) if that item alone switched to its new-model vector; arguments as
    :func:`item_map_benefit`. Ties at the top are read as the first index winning."""
    total, n_valid = np.zeros(len(gallery_labels)), 0
    for s, s2, rel in _score_blocks(query_emb, query_labels, gallery_current, gallery_new,
                                    gallery_labels, query_ids, gallery_ids, distance,
                                    current_scale, current_bias, block_size):
        ok = rel.any(axis=1)
        s, s2, rel = s[ok], s2[ok], rel[ok]
        n_valid += int(ok.sum())
        rows = np.arange(len(s))
        best = s.argmax(axis=1)
        best_s = s[rows, best]
        hit = rel[rows, best]
        s_wo = s.copy()
        s_wo[rows, best] = -np.inf
        second = s_wo.argmax(axis=1)
        second_s, second_hit = s_wo[rows, second], rel[rows, second]
        # j is not the best: it takes the top when its new score beats the best one
        new_hit = np.where(s2 > best_s[:, None], rel, hit[:, None])
        # j is the best: it keeps the top if its new score still beats the runner-up
        own_best = np.where(s2[rows, best] > second_s, hit, second_hit)
        new_hit[rows, best] = own_best
        total += (new_hit.astype(np.float64) - hit[:, None]).sum(axis=0)
    return total / max(n_valid, 1)


def _query_benefit(s: np.ndarray, s2: np.ndarray, y: np.ndarray):
    """Change in one query's AP when item j moves from score s[j] to s2[j], for every j."""
    n_rel = int(y.sum())
    if n_rel == 0:
        return None
    asc_all = np.sort(s)
    rel_asc = np.sort(s[y])
    rel_desc = rel_asc[::-1]
    n = len(s)
    k = np.arange(1, n_rel + 1, dtype=np.float64)                  # relevant at or above
    r = (n - np.searchsorted(asc_all, rel_desc, side="left")).astype(np.float64)   # rank
    base = k / r
    # contribution changes of relevant item i when one item crosses it
    irr_up = k / (r + 1) - base                                     # an irrelevant item passes above
    irr_down = np.where(r > 1, k / np.maximum(r - 1, 1), 0) - base  # ... falls below
    rel_up = (k + 1) / (r + 1) - base                               # a relevant item passes above
    rel_down = np.where(r > 1, (k - 1) / np.maximum(r - 1, 1), 0) - base
    cums = [np.concatenate([[0.0], np.cumsum(v)]) for v in (irr_up, irr_down, rel_up, rel_down)]

    def n_rel_gt(x):    # relevant items scoring > x  (desc index of the first one <= x)
        return n_rel - np.searchsorted(rel_asc, x, side="right")

    def n_rel_ge(x):
        return n_rel - np.searchsorted(rel_asc, x, side="left")

    up = s2 > s
    lo_s, hi_s = np.where(up, s, s2), np.where(up, s2, s)
    a, b = n_rel_ge(hi_s), n_rel_gt(lo_s)                           # crossed: desc index [a, b)
    b = np.maximum(a, b)
    delta = np.where(y, np.where(up, cums[2][b] - cums[2][a], cums[3][b] - cums[3][a]),
                     np.where(up, cums[0][b] - cums[0][a], cums[1][b] - cums[1][a]))
    # a relevant item's own precision term moves with it
    yj = np.flatnonzero(y)
    if len(yj):
        sj, s2j = s[yj], s2[yj]
        k_old = n_rel_ge(sj).astype(np.float64)
        r_old = (n - np.searchsorted(asc_all, sj, side="left")).astype(np.float64)
        down = s2j < sj                                             # then it is counted above s2
        k_new = n_rel_gt(s2j) - down + 1.0
        r_new = (n - np.searchsorted(asc_all, s2j, side="right")) - down + 1.0
        delta[yj] += k_new / r_new - k_old / r_old
    same = s2 == s
    delta[same] = 0.0
    return delta / n_rel


def greedy_order(query_emb, query_labels, gallery_transformed, gallery_new, gallery_labels, *,
                 batch_size: int, query_ids=None, gallery_ids=None, distance: str = "cosine",
                 transformed_scale=None, transformed_bias=None, block_size: int = 256,
                 progress=None) -> np.ndarray:
    """The realised-benefit ceiling order: per batch of ``batch_size`` items, backfill those
    with the largest :func:`item_map_benefit` in the current mixed gallery (items still
    transformed keep the optional correction). Analysis only (needs the new embeddings).

    Returns a permutation of gallery row indices (first = backfilled first). ``progress`` an
    optional callable(batch_index, n_batches). Raises ValueError naming a bad argument.
    """
    t, nw = to_numpy(gallery_transformed), to_numpy(gallery_new)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(t)
    scale = np.ones(n) if transformed_scale is None else \
        np.broadcast_to(np.asarray(transformed_scale, np.float64), (n,)).copy()
    bias = np.zeros(n) if transformed_bias is None else \
        np.broadcast_to(np.asarray(transformed_bias, np.float64), (n,)).copy()
    done = np.zeros(n, bool)
    order = []
    n_batches = -(-n // batch_size)
    for b in range(n_batches):
        cur = np.where(done[:, None], nw, t)
        sc, bi = np.where(done, 1.0, scale), np.where(done, 0.0, bias)
        left = np.flatnonzero(~done)
        if len(left) <= batch_size:
            benefit = item_map_benefit(query_emb, query_labels, cur, nw, gallery_labels,
                                       query_ids=query_ids, gallery_ids=gallery_ids,
                                       distance=distance, current_scale=sc, current_bias=bi,
                                       block_size=block_size) if len(left) > 1 else np.zeros(n)
            pick = left[np.argsort(-benefit[left], kind="stable")]
        else:
            benefit = item_map_benefit(query_emb, query_labels, cur, nw, gallery_labels,
                                       query_ids=query_ids, gallery_ids=gallery_ids,
                                       distance=distance, current_scale=sc, current_bias=bi,
                                       block_size=block_size)
            pick = left[np.argsort(-benefit[left], kind="stable")[:batch_size]]
        order.append(pick)
        done[pick] = True
        if progress is not None:
            progress(b + 1, n_batches)
    return np.concatenate(order).astype(np.int64)


def similarity_stats(query_emb, query_labels, gallery_new, gallery_transformed, gallery_labels,
                     *, query_ids=None, gallery_ids=None, distance: str = "cosine",
                     transformed_scale=None, transformed_bias=None, max_queries: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """Score statistics of new-model queries against each gallery source.

    Returns one row per (source, relevance) with ``source`` in {new, transformed},
    ``pairs`` in {positive, negative}: mean, std, quantiles 10/50/90/99; plus the columns
    ``auc_vs_new_negatives`` (positives: the probability that a positive of this source
    outscores a negative of the new source for the same query -- below the new/new value for
    transformed positives is the mixed-gallery penalty) and ``auc_vs_same_source_negatives``.
    At most ``max_queries`` queries (a seeded sample). Raises ValueError naming a bad argument.
    """
    q, ql, gl = _check_inputs(query_emb, query_labels, gallery_labels,
                              {"gallery_new": gallery_new,
                               "gallery_transformed": gallery_transformed},
                              query_ids, gallery_ids, distance)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(q))[:max_queries])
    qids = None if query_ids is None else np.asarray(query_ids)[pick]
    qs = q[pick]
    s = {"new": similarity_scores(qs, to_numpy(gallery_new), distance=distance),
         "transformed": similarity_scores(qs, to_numpy(gallery_transformed), distance=distance,
                                          gallery_scale=transformed_scale,
                                          gallery_bias=transformed_bias)}
    rel = ql[pick, None] == gl[None, :]
    valid = np.ones_like(rel) if qids is None else \
        (qids.astype(str)[:, None] != np.asarray(gallery_ids).astype(str)[None, :])
    rows = []
    for source, sc in s.items():
        for pairs, mask in (("positive", rel & valid), ("negative", ~rel & valid)):
            v = sc[mask]
            row = {"source": source, "pairs": pairs, "mean": v.mean(), "std": v.std()}
            row.update({f"q{p}": np.percentile(v, p) for p in (10, 50, 90, 99)})
            if pairs == "positive":
                row["auc_vs_new_negatives"] = _pair_auc(sc, s["new"], rel, valid)
                row["auc_vs_same_source_negatives"] = _pair_auc(sc, sc, rel, valid)
            rows.append(row)
    return pd.DataFrame(rows)


def _pair_auc(pos_scores, neg_scores, rel, valid) -> float:
    """Mean over queries of P(positive score > negative score) (ties half)."""
    aucs = []
    for i in range(len(rel)):
        p = pos_scores[i][rel[i] & valid[i]]
        ng = np.sort(neg_scores[i][~rel[i] & valid[i]])
        if len(p) == 0 or len(ng) == 0:
            continue
        below = np.searchsorted(ng, p, side="left")
        ties = np.searchsorted(ng, p, side="right") - below
        aucs.append((below + 0.5 * ties).sum() / (len(p) * len(ng)))
    return float(np.mean(aucs)) if aucs else float("nan")


def per_class_map(query_emb, query_labels, gallery_emb, gallery_labels, *, query_ids=None,
                  gallery_ids=None, distance: str = "cosine", gallery_scale=None,
                  gallery_bias=None) -> pd.Series:
    """mAP of the queries of each class against the whole gallery (index: class label)."""
    q, ql, gl = _check_inputs(query_emb, query_labels, gallery_labels,
                              {"gallery_emb": gallery_emb}, query_ids, gallery_ids, distance)
    out = {}
    for c in pd.unique(ql):
        m = ql == c
        kw = {} if query_ids is None else {"query_ids": np.asarray(query_ids)[m],
                                           "gallery_ids": gallery_ids}
        out[c] = retrieval_metrics(q[m], ql[m], gallery_emb, gl, distance=distance,
                                   gallery_scale=gallery_scale, gallery_bias=gallery_bias,
                                   topk=(1,), **kw)["mAP"]
    return pd.Series(out).sort_index()
