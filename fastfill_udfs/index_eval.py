"""Evaluation through the sharded index: exact mAP over the full ranking, CMC top-k from the
sharded search, and the approximate index's recall@k (no Spark).

Per block of queries (blocks run on ``threads`` worker threads):

1. **Sharded search.** The block is searched on every shard's exact (flat) store and the
   results merged by score: each query's top candidates, as a serving system returns them.
   With an approximate index (ivf / hnsw) the block is also searched on the approximate shards.
2. **Exact scores.** One float64 matmul of the block (the raw query embeddings) against every
   stored vector (the shards' own storage), both normalised in float64 as
   :func:`fastfill_udfs.metrics.retrieval_metrics` does: the reference the search results are
   checked against. The vectors carry one extra
   coordinate each so that the product comes out as ``c * (score - lowest score) + margin``, a
   positive affine map of the score onto [0, 2**32) (monotone, so the ranking and its ties are
   the float64 ranking's).
3. **CMC top-k** comes from the candidates, re-scored in float64. A query's candidates are
   complete for its best relevant item when that item scores above the last candidate's float32
   score plus the float32 rounding bound (:meth:`VectorSpace.score_error_bound`); then the
   number of items scoring strictly above it is counted among the candidates, exactly as the
   metric defines top-k (ties at the k-th place count in the query's favour). Where the
   candidates cannot decide (a relevant item at the candidate cut), the query's full row of
   scores decides. So top-k equals ``retrieval_metrics`` on the same vectors.
4. **mAP** over the full ranking: each row's mapped scores are truncated to uint32 sort keys
   (truncation is monotone, so items in different keys are ordered as in float64), the
   relevance bit is packed into the key's lowest bit, and the rows are sorted (a 32-bit sort is
   about twice as fast as a float64 one, the cost that dominates). Items whose keys collide
   (scores within ~1e-9 of each other) may be ordered differently in float64; for every
   such group holding a relevant item the AP of the row is bounded above and below over all
   orders the group could take in float64. A row whose bound exceeds ``tolerance`` is scored
   again from its float64 scores (packed and sorted like ``retrieval_metrics``). The result:
   every query's AP is within ``tolerance`` of the float64 AP (``EvalResult.ap_error_bound``
   holds the certified bound per query, 0 for rows scored in float64), and so is any mean of
   them (mAP overall and per subgroup).
5. **recall@k** of the approximate search: the share of its top-k results whose exact score is
   at least the exact k-th best score (ties count in the query's favour, as for CMC), overall and
   per source of the gallery items (``new`` / ``transformed``): what the index loses on a mixed
   gallery.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import faiss
import numpy as np
import pandas as pd

from fastfill_udfs.arrays import check_pos_int, check_pos_ints, check_topk, to_numpy
from fastfill_udfs.faiss_index import (ShardedGalleryIndex, as_keys, first_few, gallery_labels,
                                       lookup)
from fastfill_udfs.metrics import pack_sort, unique_rows

__all__ = ["EvalResult", "evaluate_index", "DEFAULT_TOLERANCE"]

DEFAULT_TOLERANCE = 1e-7        # certified |AP - float64 AP| per query
_MAX_BLOCK_ELEMENTS = 1 << 22   # scores held per block and worker at most (14 bytes each)
_CACHE_BLOCK_ELEMENTS = 1 << 20  # ... preferably: a block's keys stay in a core's L2 cache
_CANDIDATE_MARGIN = 3           # candidates searched beyond the largest k (+1 for the query)
_FAISS_BLAS_FROM = 20           # queries per search from which faiss uses BLAS (its old default)
_SENTINEL64 = -1.0e300             # the query's own item (leave-one-out): below every score
_KEY_RANGE = float(2 ** 32 - 2 ** 12)  # mapped scores stay inside [0, 2**32)


@dataclass
class EvalResult:
    """Per-query outcome of :func:`evaluate_index`; :meth:`metrics` averages it.

    ``n_relevant`` relevant gallery items per query (0: the query is not counted);
    ``ap`` average precision (NaN where not counted); ``n_greater`` items scoring strictly
    above the query's best relevant item (CMC: a hit at k when < k); ``ap_error_bound`` the
    certified bound on |ap - float64 AP|; ``recall_found[k]`` / ``recall_expected[k]`` per
    query and ``recall_by_source[k][source]`` = (found, expected) summed over queries."""

    topk: tuple
    n_relevant: np.ndarray
    ap: np.ndarray
    n_greater: np.ndarray
    ap_error_bound: np.ndarray
    rows_scored_float64: int = 0
    rows_cmc_full: int = 0
    recall_at: tuple = ()
    recall_found: dict = field(default_factory=dict)
    recall_expected: dict = field(default_factory=dict)
    recall_by_source: dict = field(default_factory=dict)

    def metrics(self, rows=None) -> dict:
        """``{"mAP", "top1", ..., "n_queries"}`` over the counted queries (restricted to the
        boolean mask ``rows`` when given, e.g. a subgroup); NaN metrics when none is counted."""
        counted = self.n_relevant > 0
        if rows is not None:
            rows = np.asarray(rows, dtype=bool)
            if rows.shape != counted.shape:
                raise ValueError(f"rows mask has shape {rows.shape}, expected {counted.shape}")
            counted = counted & rows
        n = int(counted.sum())
        out = {"mAP": float(self.ap[counted].mean()) if n else float("nan")}
        for k in self.topk:
            out[f"top{k}"] = float(np.mean(self.n_greater[counted] < k)) if n else float("nan")
        out["n_queries"] = n
        return out

    def recall_metrics(self) -> dict:
        """``recall_at_<k>`` (mean over queries of found / k) and ``recall_at_<k>_<source>``
        (found / expected among the exact top-k items of that source); {} without an
        approximate index."""
        out = {}
        for k in self.recall_at:
            expected = self.recall_expected[k]
            used = expected > 0
            out[f"recall_at_{k}"] = (float(np.mean(self.recall_found[k][used] / k))
                                     if used.any() else float("nan"))
            for source, (found, want) in sorted(self.recall_by_source.get(k, {}).items()):
                if want:
                    out[f"recall_at_{k}_{source}"] = float(found / want)
        return out


# ----------------------------------------------------------------------------- sorted stats
def _ap_sorted(c: np.ndarray, m: np.ndarray, with_bound: bool, packed: bool = False):
    """Per row of ascending sort keys ``c`` (equal keys tie, sklearn style) with relevance
    ``m``: (sum of precisions over relevant items, relevant count, bound). ``bound`` (when
    asked) bounds |sum - the sum under any order of the tied items| (see the module docstring).
    Entries to ignore sit at the front of their row below every other key, not relevant.
    ``packed``: integer keys still carry the relevance bit (compared without it)."""
    b, n = c.shape
    flat = c.reshape(-1)

    def key(i):                                    # sparse reads, without the relevance bit
        return flat[i] >> 1 if packed else flat[i]
    zeros = np.zeros(b)
    pos = np.flatnonzero(m)                        # relevant entries, row-major ascending
    if not pos.size:
        return zeros, np.zeros(b, np.int64), zeros
    n_seen = np.count_nonzero(m, axis=1)
    rows = np.repeat(np.arange(b, dtype=np.int64), n_seen)
    off = np.zeros(b, np.int64)
    np.cumsum(n_seen[:-1], out=off[1:])
    cols = pos - rows * n
    rank_in_row = np.arange(pos.size, dtype=np.int64) - off[rows]
    v = key(pos)
    # ties are rare: find the entries equal to their neighbour, then walk those sparsely
    down = np.flatnonzero((key(pos - 1) == v) & (cols > 0))
    lo, below = cols, rank_in_row                  # tie group start; relevant items below it
    if down.size:
        lo = cols.copy()
        act = down
        while act.size:
            lo[act] -= 1
            act = act[lo[act] > 0]
            act = act[key(rows[act] * n + lo[act] - 1) == v[act]]
        below = rank_in_row.copy()
        below[down] = np.searchsorted(pos, rows[down] * n + lo[down]) - off[rows[down]]
    prec = (n_seen[rows] - below) / (n - lo).astype(np.float64)
    filled = n_seen > 0
    ap_sum = zeros.copy()
    ap_sum[filled] = np.add.reduceat(prec, off[filled])
    if not with_bound:
        return ap_sum, n_seen, zeros
    last = flat.size - 1
    up = np.flatnonzero((key(np.minimum(pos + 1, last)) == v) & (cols < n - 1))
    hi = cols
    if up.size:
        hi = cols.copy()
        act = up
        while act.size:
            hi[act] += 1
            act = act[hi[act] < n - 1]
            act = act[key(rows[act] * n + hi[act] + 1) == v[act]]
    # one entry per tie group holding a relevant item: its lowest relevant member
    grouped = np.union1d(down, up)
    first = grouped[below[grouped] == rank_in_row[grouped]]
    if not first.size:
        return ap_sum, n_seen, zeros
    gr, g_hi = rows[first], hi[first]
    rho = np.searchsorted(pos, gr * n + g_hi, side="right") - off[gr] - below[first]
    size = (g_hi - lo[first] + 1).astype(np.float64)
    ntop = (n - 1 - g_hi).astype(np.float64)       # items above the group
    above = (n_seen[gr] - below[first] - rho).astype(np.float64)   # relevant above it
    rf = rho.astype(np.float64)
    computed = rf * (above + rf) / (ntop + size)   # what the tie semantics gave the group
    upper = rf * (above + rf) / (ntop + rf)        # relevant items tied at the group's top
    rep = np.repeat(np.arange(first.size), rho)    # non-relevant items first: the minimum
    j = (np.arange(rep.size) - np.repeat(np.cumsum(rho) - rho, rho) + 1).astype(np.float64)
    lower = np.bincount(rep, weights=(above[rep] + j) / (ntop[rep] + size[rep] - rf[rep] + j),
                        minlength=first.size)
    bound = np.maximum(upper - computed, computed - lower)
    return ap_sum, n_seen, np.bincount(gr, weights=np.maximum(bound, 0.0), minlength=b)


def _pack_sort_keys(keys: np.ndarray, match: np.ndarray):
    """:func:`metrics.pack_sort` for uint32 keys (in place), leaving the bit in the sorted keys
    (:func:`_ap_sorted` with ``packed=True`` reads them without it)."""
    np.bitwise_and(keys, np.uint32(0xFFFFFFFE), out=keys)
    np.bitwise_or(keys, match, out=keys, casting="unsafe")
    keys.sort(axis=1)
    m = np.empty(keys.shape, dtype=np.uint8)
    np.bitwise_and(keys, 1, out=m, casting="unsafe")
    return keys, m.view(bool)


# ----------------------------------------------------------------------------- evaluation
class _Gallery:
    """The stored vectors in column order, with each column's key, label code and source."""

    def __init__(self, index: ShardedGalleryIndex, gallery_key_labels, key_sources,
                 query_vectors: np.ndarray):
        parts = index.stored_vectors()
        self.keys = (np.concatenate([p[0] for p in parts]) if parts
                     else np.zeros(0, dtype=np.int64))
        stored = (np.concatenate([p[1] for p in parts]) if parts
                  else np.zeros((0, index.index_dim), np.float32))
        self.n = len(self.keys)
        self.stored = stored
        lowest, highest = index.space.score_bounds(query_vectors, stored)
        span = (highest - lowest) * (1 + 2.0 ** -10)
        self.scale = _KEY_RANGE / span             # mapped = scale * (score + shift) in (0, 2**32)
        self.shift = -lowest + (highest - lowest) * 2.0 ** -11
        exact = index.space.exact_vectors(stored)
        self.unique, self.inverse = unique_rows(
            np.hstack([exact, np.full((self.n, 1), self.shift)]))
        if self.keys.size and self.keys.max() < 4 * self.n + 1024:
            self.col_table = np.full(int(self.keys.max()) + 1, -1, dtype=np.int64)
            self.col_table[self.keys] = np.arange(self.n)
            self.sorted_keys = None
        else:
            self.col_table = None
            order = np.argsort(self.keys, kind="stable")
            self.sorted_keys, self.sorted_cols = self.keys[order], order.astype(np.int64)
        gkeys, glabels = gallery_labels(gallery_key_labels)
        at = lookup(gkeys, self.keys)
        if np.any(at < 0):
            raise ValueError(f"gallery_key_labels has no label for indexed keys "
                             f"{first_few(np.sort(self.keys[at < 0]))}")
        self.labels = glabels[at] if self.n else np.zeros(0, dtype=object)
        self.source_names: list = []
        self.source_codes = np.zeros(self.n, dtype=np.int64)
        if key_sources is not None:
            skeys, svalues = gallery_labels(key_sources)
            sat = lookup(skeys, self.keys)
            if np.any(sat < 0):
                raise ValueError(f"gallery_key_sources has no source for indexed keys "
                                 f"{first_few(np.sort(self.keys[sat < 0]))}")
            codes, names = pd.factorize(pd.Series(svalues[sat], dtype=object))
            self.source_codes, self.source_names = codes.astype(np.int64), list(names)

    def cols(self, keys: np.ndarray) -> np.ndarray:
        """Column of each key (-1 for -1 / unknown keys), any shape."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.col_table is not None:
            ok = (keys >= 0) & (keys < len(self.col_table))
            return np.where(ok, self.col_table[np.where(ok, keys, 0)], -1)
        at = lookup(self.sorted_keys, keys)
        return np.where(at >= 0, self.sorted_cols[np.maximum(at, 0)], -1)


def evaluate_index(index: ShardedGalleryIndex, query_emb, query_labels, gallery_key_labels, *,
                   query_keys=None, topk: Sequence[int] = (1, 5), recall_at: Sequence[int] = (),
                   gallery_key_sources=None, block_size: int = 512, threads: int = 1,
                   tolerance: float = DEFAULT_TOLERANCE) -> EvalResult:
    """Score ``query_emb`` against everything in ``index`` (see the module docstring).

    Args: ``query_emb`` (nq x dim) raw query embeddings (the index's space prepares them);
    ``query_labels`` (nq,) any hashable values (None/NaN = missing: the query is not counted);
    ``gallery_key_labels`` the label of every indexed key (mapping / Series key -> label, or a
    (keys, labels) pair; extra keys are ignored; a missing label matches nothing);
    ``query_keys`` (nq,) for leave-one-out (a query's own key is removed from its ranking;
    keys not in the index are fine); ``topk`` CMC cut-offs; ``recall_at`` the k of the
    approximate index's recall (ignored for a flat index); ``gallery_key_sources`` the source
    of every indexed key (same forms as the labels) for recall per source; ``block_size``
    queries per block (capped by :func:`_block_rows`); ``threads`` worker
    threads (faiss and torch run one thread each inside them); ``tolerance`` the certified
    per-query bound on |AP - float64 AP| (0 scores every row in float64).
    Raises ValueError on a dim mismatch or NaN/inf queries (naming the rows), length
    mismatches, bad ``topk``/``recall_at``/``block_size``/``threads``/``tolerance``, or indexed
    keys without a label or source (naming them).
    """
    if not isinstance(index, ShardedGalleryIndex):
        raise ValueError(f"index must be a ShardedGalleryIndex, got {type(index).__name__}")
    ks = check_topk(topk)
    recall_ks = (check_pos_ints(recall_at, "recall_at", allow_empty=True)
                 if index.spec.approximate else ())
    block_size = check_pos_int(block_size, "block_size")
    threads = check_pos_int(threads, "threads")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    q = index.check_queries(query_emb, "query_emb")
    nq = q.shape[0]
    ql = to_numpy(query_labels)
    if ql.ndim != 1 or len(ql) != nq:
        raise ValueError(f"query_labels must be 1-D with {nq} entries (query_emb rows), got "
                         f"shape {ql.shape}")
    qk = None
    if query_keys is not None:
        qk = as_keys(query_keys, "query_keys")
        if len(qk) != nq:
            raise ValueError(f"query_keys has {len(qk)} entries, query_emb has {nq} rows")

    gal = _Gallery(index, gallery_key_labels, gallery_key_sources,
                   index.space.exact_query_vectors(q))
    n = gal.n
    both = pd.Series(np.concatenate([ql.astype(object), gal.labels.astype(object)]), dtype=object)
    codes, _ = pd.factorize(both, use_na_sentinel=True)
    qlab = codes[:nq].astype(np.int64)             # -1: missing -> no relevant item
    glab = codes[nq:].astype(np.int64)
    glab[glab < 0] = -2                            # a missing gallery label matches nothing
    counts = np.bincount(glab[glab >= 0], minlength=int(codes.max(initial=-1)) + 1)
    n_rel = np.where(qlab >= 0, counts[np.maximum(qlab, 0)] if counts.size else 0, 0)
    own = gal.cols(qk) if qk is not None else np.full(nq, -1, dtype=np.int64)
    own_match = (own >= 0) & (glab[np.maximum(own, 0)] == qlab) if n else np.zeros(nq, bool)
    n_rel = (n_rel - own_match).astype(np.int64)

    result = EvalResult(topk=ks, n_relevant=n_rel, ap=np.full(nq, np.nan),
                        n_greater=np.full(nq, np.iinfo(np.int64).max, dtype=np.int64),
                        ap_error_bound=np.zeros(nq), recall_at=recall_ks)
    for k in recall_ks:
        result.recall_found[k] = np.zeros(nq, dtype=np.int64)
        result.recall_expected[k] = np.zeros(nq, dtype=np.int64)
        result.recall_by_source[k] = {}
    if nq == 0 or n == 0:
        return result

    qv = index.space.query_vectors(q)            # what faiss searches with (float32)
    q_exact = index.space.exact_query_vectors(q)   # what the exact scores use (float64)
    # faiss's score vs the exact one: float32 rounding, plus the float32 query's direction
    drift = np.sqrt(np.einsum("ij,ij->i", qv - q_exact, qv - q_exact)) if qv.shape == \
        q_exact.shape else np.zeros(nq)
    gmax = float(np.sqrt(np.einsum("ij,ij->i", gal.stored.astype(np.float64),
                                   gal.stored.astype(np.float64))).max(initial=0.0))
    delta = index.space.score_error_bound(qv, gal.stored) + 2.0 * drift * gmax
    kc = min(n, max(ks + recall_ks) + 1 + _CANDIDATE_MARGIN)
    step = _block_rows(block_size, n)
    state = _BlockScorer(index, gal, qv, q_exact, qlab, glab, own, n_rel, delta, kc, ks,
                         recall_ks, tolerance, result, step)
    starts = list(range(0, nq, step))
    import torch

    # faiss and torch run one thread each: OpenMP pools spin against each other (and against
    # the workers) on a busy machine; the worker threads are the parallelism.
    faiss_before, torch_before = faiss.omp_get_max_threads(), torch.get_num_threads()
    blas_before = faiss.cvar.distance_compute_blas_threshold
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    # faiss 1.15 searches a flat index by BLAS only from 128,000 queries on; for the query
    # blocks here its BLAS path is about twice as fast as the per-pair one (bench_eval_step)
    faiss.cvar.distance_compute_blas_threshold = _FAISS_BLAS_FROM
    try:
        if threads == 1 or len(starts) == 1:
            for lo in starts:
                state.run(lo)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(state.run, starts))
    finally:
        faiss.omp_set_num_threads(faiss_before)
        torch.set_num_threads(torch_before)
        faiss.cvar.distance_compute_blas_threshold = blas_before
    result.rows_scored_float64 = state.rows_float64
    result.rows_cmc_full = state.rows_cmc_full
    for k in recall_ks:
        result.recall_by_source[k] = {
            gal.source_names[s] if gal.source_names else "all": tuple(int(v) for v in fe)
            for s, fe in sorted(state.by_source[k].items())}
    return result


def _block_rows(block_size: int, n: int) -> int:
    """Queries per block: about 2**20 scores (10% less CPU than 2**22 at 10k x 10k,
    bench/bench_eval_step.py), but at least the rows from which faiss searches by BLAS while
    2**22 scores allow it; never more than ``block_size``."""
    n = max(n, 1)
    rows = max(_CACHE_BLOCK_ELEMENTS // n, min(_FAISS_BLAS_FROM, _MAX_BLOCK_ELEMENTS // n))
    return max(1, min(block_size, rows))


class _BlockScorer:
    """Scores blocks of queries into ``result`` (thread-safe: each block writes its own rows;
    buffers are per thread)."""

    def __init__(self, index, gal, qv, q_exact, qlab, glab, own, n_rel, delta, kc, ks, recall_ks,
                 tolerance, result, step):
        import torch

        self.index, self.gal, self.qv, self.qlab, self.glab = index, gal, qv, qlab, glab
        self.q_exact = q_exact
        self.own, self.n_rel, self.delta, self.kc = own, n_rel, delta, kc
        self.ks, self.recall_ks, self.tolerance, self.result, self.step = (
            ks, recall_ks, tolerance, result, step)
        self.g_t = torch.from_numpy(gal.unique)
        self.local = threading.local()
        self.lock = threading.Lock()
        self.rows_float64 = 0
        self.rows_cmc_full = 0
        self.by_source = {k: {} for k in recall_ks}

    def _buffers(self):
        buf = getattr(self.local, "buf", None)
        if buf is None:
            n, nu = self.gal.n, len(self.gal.unique)
            buf = self.local.buf = {"S": np.empty((self.step, n)),
                                    "R": np.empty((self.step, nu)) if nu != n else None,
                                    "K": np.empty((self.step, n), dtype=np.uint32),
                                    "M": np.empty((self.step, n), dtype=bool)}
        return buf

    def _scores(self, q64: np.ndarray, buf) -> np.ndarray:
        import torch

        b = len(q64)
        S = buf["S"][:b]
        if self.gal.inverse is None:
            torch.mm(torch.from_numpy(q64), self.g_t.T, out=torch.from_numpy(S))
        else:                                      # duplicates score once: they tie exactly
            R = buf["R"][:b]
            torch.mm(torch.from_numpy(q64), self.g_t.T, out=torch.from_numpy(R))
            np.take(R, self.gal.inverse, axis=1, out=S)
        return S

    def run(self, lo: int) -> None:
        gal, res = self.gal, self.result
        hi = min(lo + self.step, len(self.qv))
        b, n = hi - lo, gal.n
        buf = self._buffers()
        qb = self.qv[lo:hi]
        cand_s, cand_k = self.index.search_prepared(qb, self.kc, exact=True)
        q_aug = np.hstack([self.q_exact[lo:hi] * gal.scale, np.full((b, 1), gal.scale)])
        S = self._scores(q_aug, buf)                # scale * (score + shift), float64
        qlab, own, n_rel = self.qlab[lo:hi], self.own[lo:hi], self.n_rel[lo:hi]
        counted = n_rel > 0
        r_own = np.flatnonzero(own >= 0)

        # mAP: uint32 keys of the mapped scores, relevance packed in, sorted per row
        K, M = buf["K"][:b], buf["M"][:b]
        np.copyto(K, S, casting="unsafe")          # truncation of positive values: floor
        np.equal(self.glab[None, :], qlab[:, None], out=M)
        K[r_own, own[r_own]] = 0                   # below every mapped score
        M[r_own, own[r_own]] = False
        keys, m = _pack_sort_keys(K, M)
        ap_sum, n_seen, bound = _ap_sorted(keys, m, with_bound=True, packed=True)
        if np.any(n_seen != n_rel):                # the counts must reconcile
            raise AssertionError("relevant items in the ranking differ from the label counts")
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = np.where(counted, ap_sum / np.maximum(n_rel, 1), np.nan)
            bound = np.where(counted, bound / np.maximum(n_rel, 1), 0.0)
        redo = np.flatnonzero(counted & (bound > self.tolerance))
        if redo.size:                              # float64 ranking for these rows
            T = np.array(S[redo])
            Mr = self.glab[None, :] == qlab[redo, None]
            ro = np.flatnonzero(own[redo] >= 0)
            T[ro, own[redo][ro]] = _SENTINEL64
            Mr[ro, own[redo][ro]] = False
            t_keys, t_m = pack_sort(T, Mr)
            t_sum, _, _ = _ap_sorted(t_keys, t_m, with_bound=False)
            ap[redo] = t_sum / n_rel[redo]
            bound[redo] = 0.0
        res.ap[lo:hi], res.ap_error_bound[lo:hi] = ap, bound

        # CMC from the sharded search's candidates, re-scored in float64
        rows = np.arange(b)[:, None]
        ccols = gal.cols(cand_k)
        valid = (ccols >= 0) & (ccols != own[:, None])
        s64 = np.where(valid, S[rows, np.maximum(ccols, 0)], -np.inf)
        rel = valid & (self.glab[np.maximum(ccols, 0)] == qlab[:, None])
        complete = (cand_k[:, -1] < 0) | (self.kc >= n)
        cut = np.where(complete, -np.inf, gal.scale * (cand_s[:, -1].astype(np.float64)
                                                     + self.delta[lo:hi] + gal.shift))
        best = np.where(rel, s64, -np.inf).max(axis=1)
        greater = (s64 > best[:, None]).sum(axis=1)
        above_cut = (s64 > cut[:, None]).sum(axis=1)
        decided = best > cut
        n_greater = np.where(decided, greater, above_cut)
        full = np.flatnonzero(counted & ~decided & (above_cut < max(self.ks)))
        for r in full:                             # a relevant item at the cut: use the row
            row = S[r].copy()
            if own[r] >= 0:
                row[own[r]] = -np.inf
            relevant = self.glab == qlab[r]
            best_r = row[relevant & np.isfinite(row)].max(initial=-np.inf)
            n_greater[r] = int((row > best_r).sum())
        res.n_greater[lo:hi] = n_greater

        # recall of the approximate search vs the exact ranking
        by_source = {}
        src = gal.source_codes
        if self.recall_ks:
            s_sorted = -np.sort(-s64, axis=1)
        for k in self.recall_ks:                   # one search per k, as a user would ask
            acols = gal.cols(self.index.search_prepared(qb, k + 1, exact=False)[1])
            acols = np.where(acols == own[:, None], -1, acols)     # the query itself: dropped
            take = (acols >= 0) & (np.cumsum(acols >= 0, axis=1) <= k)   # its k best
            a64 = np.where(take, S[rows, np.maximum(acols, 0)], -np.inf)
            kth = s_sorted[:, k - 1] if s_sorted.shape[1] >= k else np.full(b, -np.inf)
            for r in np.flatnonzero(~(kth > cut)):   # the candidates cannot say: the full row
                row = S[r].copy()
                if own[r] >= 0:
                    row[own[r]] = -np.inf
                finite = np.sort(row[np.isfinite(row)])
                kth[r] = finite[max(finite.size - k, 0)] if finite.size else -np.inf
                top_cols = np.flatnonzero(row >= kth[r])
                expected = np.bincount(src[top_cols], minlength=len(gal.source_names) or 1)
                for s, e in enumerate(expected):
                    by_source.setdefault((k, s), [0, 0])[1] += int(e)
                res.recall_expected[k][lo + r] = len(top_cols)
            known = kth > cut
            in_top = valid & (s64 >= kth[:, None]) & known[:, None]
            found = take & (a64 >= kth[:, None])
            res.recall_found[k][lo:hi] = found.sum(axis=1)
            res.recall_expected[k][lo:hi] = np.where(known, in_top.sum(axis=1),
                                                     res.recall_expected[k][lo:hi])
            n_src = len(gal.source_names) or 1
            exp_src = np.bincount(src[ccols[in_top]], minlength=n_src)
            found_src = np.bincount(src[acols[found]], minlength=n_src)
            for s in range(n_src):
                acc = by_source.setdefault((k, s), [0, 0])
                acc[0] += int(found_src[s])
                acc[1] += int(exp_src[s])
        with self.lock:
            self.rows_float64 += int(redo.size)
            self.rows_cmc_full += int(full.size)
            for (k, s), (f, e) in by_source.items():
                acc = self.by_source[k].setdefault(s, [0, 0])
                acc[0] += f
                acc[1] += e
