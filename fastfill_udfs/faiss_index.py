"""Exact sharded cosine-similarity index over gallery features, and evaluation through it.

Design
------
* One faiss ``IndexIDMap2(IndexFlatIP)`` per shard; an item with int64 key ``k`` lives in shard
  ``k % num_shards``. Vectors are L2-normalised on the way in and stored as float32 (an
  all-zero vector stays zero and scores 0 against everything), so inner product is
  cosine similarity and the flat index makes every search exact.
* ``faiss.IndexShards`` is not used: it routes added items to shards in contiguous chunks, not by
  key, so an upsert could not find the shard holding a key, and its merge asks every shard for
  all ``k`` results (``num_shards`` times the memory for a full ranking). Here each shard returns
  its ``min(k, shard size)`` best (a full shard ranking is a ``range_search`` below every
  cosine, cheaper than faiss's k-heap), and the concatenation is cut to the ``k`` best and
  sorted with numpy: exact, memory ~ one (queries x k) result.
* :meth:`ShardedGalleryIndex.upsert` (what a backfill batch does) keeps, per shard, the keys in
  sorted order with their storage positions. A key already present has its vector overwritten in
  place in the flat index's storage (a numpy view of its codes): O(batch * log(shard size)), no
  pass over the shard. New keys are appended with ``add_with_ids`` (amortised O(batch)) plus a
  sorted insert into the lookup (a memmove of 16 bytes per shard item). The
  ``method="remove_add"`` variant (one ``remove_ids(IDSelectorBatch)`` per shard, then
  ``add_with_ids``) is kept for comparison: O(shard size) per call, since the flat index compacts
  its storage and ``IndexIDMap2`` rebuilds its reverse hash map (``bench/bench_faiss_update.py``).

:func:`evaluate_index` ranks the whole gallery for each query through the index
(``k = ntotal``) and scores the rankings with :func:`fastfill_udfs.metrics.ranked_metrics`, so it
equals :func:`fastfill_udfs.metrics.retrieval_metrics` on the same vectors up to float32
precision: items with identical normalised vectors (duplicates, positive rescalings) tie exactly
as in the float64 reference, but scores closer than ~1e-7 (cosines equal only in exact
arithmetic, e.g. from coarse integer vectors, and genuine near-ties) are resolved by float32
rounding, so they may tie or order differently than in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import faiss
import numpy as np
import pandas as pd

from fastfill_udfs.metrics import ranked_metrics

__all__ = ["ShardedGalleryIndex", "evaluate_index"]

# Upper bound on ranked entries (queries x gallery) held per evaluation block.
_MAX_BLOCK_ELEMENTS = 1 << 21
# Range-search radius below every cosine similarity (full rankings use range_search).
_BELOW_ALL = -3.0
_SHOW = 5                              # offending keys named in an error message


# ----------------------------------------------------------------------------- helpers
def _first(values) -> str:
    values = list(values)
    more = f" (and {len(values) - _SHOW} more)" if len(values) > _SHOW else ""
    return str([v.item() if hasattr(v, "item") else v for v in values[:_SHOW]]) + more


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):                       # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_pos_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_topk(topk) -> tuple:
    try:
        ks = tuple(topk)
    except TypeError:
        raise ValueError(f"topk must be a sequence of positive ints, got {topk!r}") from None
    if not ks:
        raise ValueError(f"topk must be a non-empty sequence of positive ints, got {topk!r}")
    return tuple(_check_pos_int(k, "topk entry") for k in ks)


def _as_keys(keys, name: str) -> np.ndarray:
    arr = _to_numpy(keys)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_matrix(x, dim: int, name: str, keys=None) -> np.ndarray:
    """2-D float array of width ``dim``; non-finite rows are named by ``keys`` (or row)."""
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (items x dim), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"{name}: expected dim {dim} (the index dim), got {arr.shape[1]}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # one cheap pass, rows checked if needed
        suspect = np.flatnonzero(~np.isfinite(np.add.reduce(arr, axis=1, dtype=np.float64)))
    bad = suspect[~np.isfinite(arr[suspect]).all(axis=1)] if suspect.size else suspect
    if bad.size:
        what = f"keys {_first(keys[bad])}" if keys is not None else f"rows {_first(bad)}"
        raise ValueError(f"{name} has NaN or infinite values for {what}")
    return arr


def _normalise(x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised ``x[rows]`` (all rows by default) as a new C-contiguous float32 array.

    ``faiss.normalize_L2`` in float32 (deterministic per row, so duplicate rows stay identical;
    all-zero rows stay zero); rows it cannot normalise in float32 (norm over- or underflow,
    values beyond the float32 range) are redone from ``x`` in float64 after scaling by their
    largest entry.
    """
    src = x if rows is None else x[rows]           # a gather already copies
    with np.errstate(over="ignore"):
        out = np.array(src, dtype=np.float32, order="C", copy=True if rows is None else None)
    if out.size:
        faiss.normalize_L2(out)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", out, out)
        redo = np.flatnonzero(~(np.abs(sq - 1.0) <= 1e-4))
    if redo.size:
        c = np.asarray(x[redo if rows is None else rows[redo]], dtype=np.float64)
        nonzero = np.any(c != 0, axis=1)           # all-zero rows are fine as they are
        redo, c = redo[nonzero], c[nonzero]
        c /= np.maximum(np.abs(c).max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        norms = np.sqrt(np.einsum("ij,ij->i", c, c))[:, None]
        out[redo] = c / np.where(norms > 0, norms, 1.0)
    return out


class _Shard:
    """One ``IndexIDMap2(IndexFlatIP)`` and its sorted key -> storage position lookup."""

    def __init__(self, dim: int):
        self.dim = dim
        self.flat = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIDMap2(self.flat)
        self.sorted_keys = np.zeros(0, dtype=np.int64)
        self.sorted_pos = np.zeros(0, dtype=np.int64)
        self.lookup_ok = True                      # False after remove_ids moved positions

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def storage(self) -> np.ndarray:
        """Writable (ntotal, dim) view of the flat index's vectors (invalid after an add)."""
        n = self.ntotal
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return faiss.rev_swig_ptr(self.flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def keys_by_pos(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Storage position of each key, -1 where absent."""
        if not self.lookup_ok:                     # rebuild after remove_ids moved positions
            ids = self.keys_by_pos()
            order = np.argsort(ids, kind="stable")
            self.sorted_keys, self.sorted_pos = ids[order], order.astype(np.int64)
            self.lookup_ok = True
        i = _lookup(self.sorted_keys, keys)
        out = np.full(len(keys), -1, dtype=np.int64)
        out[i >= 0] = self.sorted_pos[i[i >= 0]]
        return out

    def append(self, keys: np.ndarray, x: np.ndarray) -> None:
        """Append absent ``keys`` with their normalised vectors ``x``; the lookup is updated by a
        sorted insert (O(shard size) memmove, no re-sort)."""
        start = self.ntotal
        self.index.add_with_ids(x, keys)
        if self.lookup_ok:
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            at = np.searchsorted(self.sorted_keys, sk)
            self.sorted_keys = np.insert(self.sorted_keys, at, sk)
            self.sorted_pos = np.insert(self.sorted_pos, at, start + order.astype(np.int64))

    def search(self, q: np.ndarray, k: int):
        """Exact top-``min(k, ntotal)`` of normalised queries ``q``; rows sorted only when
        ``k < ntotal`` (a full ranking is a range search over all items, left unsorted)."""
        n = self.ntotal
        if k < n:
            return self.index.search(q, k)
        lims, d, i = self.index.range_search(q, _BELOW_ALL)
        if len(d) == q.shape[0] * n and np.all(np.diff(lims) == n):
            return d.reshape(-1, n), i.reshape(-1, n)
        return self.index.search(q, n)           # not expected: some item scored <= radius


# ----------------------------------------------------------------------------- index
class ShardedGalleryIndex:
    """Exact cosine-similarity index over int64-keyed gallery vectors, sharded by ``key % num_shards``.

    Args: ``dim`` the vector width; ``num_shards`` the number of faiss
    ``IndexIDMap2(IndexFlatIP)`` shards. Keys must be non-negative int64 (faiss uses -1 for
    "no result"). Raises ValueError on a non-positive ``dim`` or ``num_shards``.
    """

    def __init__(self, dim: int, num_shards: int = 4):
        self.dim = _check_pos_int(dim, "dim")
        self.num_shards = _check_pos_int(num_shards, "num_shards")
        self._shards = [_Shard(self.dim) for _ in range(self.num_shards)]

    # -- checks
    def _check_items(self, keys, vectors, what: str):
        k = _as_keys(keys, "keys")
        x = _to_numpy(vectors)
        if x.ndim == 2 and x.shape[0] != len(k):
            raise ValueError(f"{what}: keys has {len(k)} entries, vectors has {x.shape[0]} rows")
        x = _as_matrix(x, self.dim, "vectors", keys=k)
        if np.any(k < 0):
            raise ValueError(f"{what}: keys must be >= 0, got {_first(k[k < 0])}")
        sk = np.sort(k)
        dup = np.unique(sk[1:][sk[1:] == sk[:-1]])
        if dup.size:
            raise ValueError(f"{what}: duplicate keys in one call: {_first(dup)}")
        return k, x

    # -- updates
    def build(self, keys, vectors) -> "ShardedGalleryIndex":
        """Full rebuild: drop everything, then index ``vectors`` (n x dim) under ``keys`` (n,).

        Raises ValueError on a dim mismatch, NaN/inf vectors (naming their keys), duplicate or
        negative keys, or a keys/vectors length mismatch; the index is unchanged then.
        """
        k, x = self._check_items(keys, vectors, "build")
        shard_of = k % self.num_shards
        shards = [_Shard(self.dim) for _ in range(self.num_shards)]
        for s, shard in enumerate(shards):               # each shard stored in key order
            sel = np.flatnonzero(shard_of == s)
            sel = sel[np.argsort(k[sel], kind="stable")]
            if sel.size:
                shard.index.add_with_ids(_normalise(x, sel), k[sel])
            shard.sorted_keys = k[sel]
            shard.sorted_pos = np.arange(sel.size, dtype=np.int64)
        self._shards = shards
        return self

    def upsert(self, keys, vectors, *, method: str = "inplace") -> "ShardedGalleryIndex":
        """Insert or replace: after the call each key in ``keys`` maps to its row of ``vectors``.

        ``method="inplace"`` (default) overwrites present keys' vectors in the shard storage and
        appends the new ones (O(batch)); ``"remove_add"`` removes present keys with one
        ``remove_ids`` per shard and re-adds the whole batch (O(shard size)). Raises ValueError
        as :meth:`build` does, or on an unknown ``method``; the index is unchanged then.
        """
        if method not in ("inplace", "remove_add"):
            raise ValueError(f"method must be 'inplace' or 'remove_add', got {method!r}")
        k, x = self._check_items(keys, vectors, "upsert")
        if not len(k):
            return self
        x = _normalise(x)
        shard_of = k % self.num_shards
        for s, shard in enumerate(self._shards):
            sel = np.flatnonzero(shard_of == s)
            if not sel.size:
                continue
            ks, xs = k[sel], x[sel]
            if method == "remove_add":
                if shard.ntotal:
                    shard.index.remove_ids(faiss.IDSelectorBatch(ks))
                shard.index.add_with_ids(xs, ks)
                shard.lookup_ok = False
                continue
            pos = shard.positions(ks)
            present = pos >= 0
            if present.any():
                shard.storage()[pos[present]] = xs[present]
            if not present.all():
                shard.append(ks[~present], np.ascontiguousarray(xs[~present]))
        return self

    # -- queries
    @property
    def ntotal(self) -> int:
        """Number of indexed items."""
        return sum(s.ntotal for s in self._shards)

    def shard_sizes(self) -> list:
        """Items per shard."""
        return [s.ntotal for s in self._shards]

    def shard_keys(self, shard: int) -> np.ndarray:
        """Keys held by shard ``shard`` (0 <= shard < num_shards), sorted ascending."""
        if isinstance(shard, (bool, np.bool_)) or not isinstance(shard, (int, np.integer)) \
                or not 0 <= shard < self.num_shards:
            raise ValueError(f"shard must be an int in [0, {self.num_shards}), got {shard!r}")
        return np.sort(self._shards[shard].keys_by_pos())

    def keys(self) -> np.ndarray:
        """All indexed keys, sorted ascending."""
        parts = [s.keys_by_pos() for s in self._shards if s.ntotal]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def search(self, queries, k: int):
        """Exact top-``k`` cosine search of ``queries`` (nq x dim) over all shards.

        Returns ``(scores, keys)``: float32 (nq, k) in descending order per row and int64
        (nq, k); where ``k`` exceeds ``ntotal`` the tail is padded with score ``-inf`` and key
        -1. Ties are returned in arbitrary order. Raises ValueError on a dim mismatch, NaN/inf
        queries or a non-positive ``k``.
        """
        k = _check_pos_int(k, "k")
        q = _normalise(_as_matrix(queries, self.dim, "queries"))
        nq = q.shape[0]
        kr = min(k, self.ntotal)                   # real results per query
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        keys = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or kr == 0:
            return scores, keys
        parts = [s.search(q, k) for s in self._shards if s.ntotal]
        d = np.concatenate([p[0] for p in parts], axis=1)
        i = np.concatenate([p[1] for p in parts], axis=1)
        del parts
        if d.shape[1] > kr:                        # keep the kr best (ties at the cut: any)
            part = np.argpartition(-d, kr - 1, axis=1)[:, :kr]
            d, i = np.take_along_axis(d, part, axis=1), np.take_along_axis(i, part, axis=1)
        order = np.argsort(-d, axis=1)
        scores[:, :kr] = np.take_along_axis(d, order, axis=1)
        keys[:, :kr] = np.take_along_axis(i, order, axis=1)
        return scores, keys

    def reconstruct_all(self):
        """All items as ``(keys, vectors)``: int64 (n,) ascending and the stored (normalised)
        float32 vectors (n x dim)."""
        parts_k, parts_x = [], []
        for s in self._shards:
            if s.ntotal:
                parts_k.append(s.keys_by_pos())
                parts_x.append(s.storage().copy())
        if not parts_k:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        keys, vecs = np.concatenate(parts_k), np.concatenate(parts_x)
        order = np.argsort(keys, kind="stable")
        return keys[order], vecs[order]

    def __repr__(self) -> str:
        return f"ShardedGalleryIndex(dim={self.dim}, num_shards={self.num_shards}, ntotal={self.ntotal})"


# ----------------------------------------------------------------------------- evaluation
def _gallery_labels(gallery_key_labels):
    """(keys, labels) arrays from a mapping / pandas Series (key -> label) or a (keys, labels) pair."""
    if isinstance(gallery_key_labels, pd.Series):
        keys, labels = gallery_key_labels.index.to_numpy(), gallery_key_labels.to_numpy()
    elif isinstance(gallery_key_labels, Mapping):
        keys = np.fromiter(gallery_key_labels.keys(), dtype=np.int64, count=len(gallery_key_labels))
        labels = np.asarray(list(gallery_key_labels.values()), dtype=object)
    elif isinstance(gallery_key_labels, tuple) and len(gallery_key_labels) == 2:
        keys, labels = (_to_numpy(a) for a in gallery_key_labels)
    else:
        raise ValueError("gallery_key_labels must be a mapping or pandas Series (key -> label) or "
                         f"a (keys, labels) pair, got {type(gallery_key_labels).__name__}")
    keys = _as_keys(keys, "gallery_key_labels keys")
    if labels.ndim != 1 or len(labels) != len(keys):
        raise ValueError(f"gallery_key_labels has {len(keys)} keys but labels of shape {labels.shape}")
    order = np.argsort(keys, kind="stable")
    keys, labels = keys[order], labels[order]
    dup = np.unique(keys[1:][keys[1:] == keys[:-1]])
    if dup.size:
        raise ValueError(f"gallery_key_labels has duplicate keys: {_first(dup)}")
    return keys, labels


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each of ``keys`` in ``sorted_keys``, -1 where absent."""
    if not len(sorted_keys):
        return np.full(keys.shape, -1, dtype=np.int64)
    i = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[i] == keys, i, -1)


def evaluate_index(index: ShardedGalleryIndex, query_emb, query_labels, gallery_key_labels, *,
                   query_keys=None, topk: Sequence[int] = (1, 5), block_size: int = 512) -> dict:
    """mAP (full ranking) and CMC top-k of ``query_emb`` against everything in ``index``.

    Args: ``index`` a :class:`ShardedGalleryIndex`; ``query_emb`` (nq x dim) numpy or torch;
    ``query_labels`` (nq,) any hashable values (None/NaN = missing); ``gallery_key_labels`` the
    label of every indexed key, as a mapping or pandas Series (key -> label) or a (keys, labels)
    pair (extra keys are ignored); ``query_keys`` (nq,) int64 for leave-one-out (the query's own
    key is dropped from its ranking); ``topk`` CMC cut-offs; ``block_size`` queries per search
    (capped so one block ranks at most 2**21 entries). Each block is ranked by
    ``index.search(q, index.ntotal)`` and scored by :func:`fastfill_udfs.metrics.ranked_metrics`,
    with the definitions of :func:`fastfill_udfs.metrics.retrieval_metrics`.
    Returns ``{"mAP", "top1", "top5", ..., "n_queries"}``. On CPU this takes several times as
    long as ``retrieval_metrics`` (ranking by sort instead of a packed value sort); it is the
    check that the index itself ranks right.
    Raises ValueError on a dim mismatch, NaN/inf queries, length mismatches, bad
    ``topk``/``block_size``, or indexed keys missing from ``gallery_key_labels`` (naming them).
    """
    if not isinstance(index, ShardedGalleryIndex):
        raise ValueError(f"index must be a ShardedGalleryIndex, got {type(index).__name__}")
    ks = _check_topk(topk)
    block_size = _check_pos_int(block_size, "block_size")
    q = _as_matrix(query_emb, index.dim, "query_emb")
    nq = q.shape[0]
    ql = _to_numpy(query_labels)
    if ql.ndim != 1 or len(ql) != nq:
        raise ValueError(f"query_labels must be 1-D with {nq} entries (query_emb rows), got shape {ql.shape}")
    qk = None
    if query_keys is not None:
        qk = _as_keys(query_keys, "query_keys")
        if len(qk) != nq:
            raise ValueError(f"query_keys has {len(qk)} entries, query_emb has {nq} rows")

    # label code of every indexed key (sorted), shared vocabulary with the queries
    ikeys = index.keys()
    gkeys, glabels = _gallery_labels(gallery_key_labels)
    at = _lookup(gkeys, ikeys)
    if np.any(at < 0):
        raise ValueError(f"gallery_key_labels has no label for indexed keys {_first(ikeys[at < 0])}")
    both = pd.Series(np.concatenate([ql.astype(object), glabels[at].astype(object)]), dtype=object)
    codes, _ = pd.factorize(both, use_na_sentinel=True)
    qlab = codes[:nq].astype(np.int64)             # -1: missing -> no relevant item
    glab = codes[nq:].astype(np.int64)
    glab[glab < 0] = -2                            # a missing gallery label matches nothing

    counts = np.bincount(glab[glab >= 0], minlength=int(codes.max(initial=-1)) + 1)
    n_rel = np.where(qlab >= 0, counts[np.maximum(qlab, 0)] if counts.size else 0, 0)
    if qk is not None:                             # the query itself is not a relevant item
        own = _lookup(ikeys, qk)
        own_match = (own >= 0) & (glab[np.maximum(own, 0)] == qlab) if len(ikeys) else np.zeros(nq, bool)
        n_rel = n_rel - own_match

    n = index.ntotal
    # label code by key: a dense table when keys are compact, else a sorted lookup
    if len(ikeys) and ikeys[-1] < 4 * len(ikeys) + 1024:
        table = np.full(int(ikeys[-1]) + 1, -2, dtype=np.int64)
        table[ikeys] = glab

        def label_of(k):
            return table[k]
    else:
        def label_of(k):
            return glab[_lookup(ikeys, k)]

    step = max(1, min(block_size, _MAX_BLOCK_ELEMENTS // max(n, 1)))
    total = {"mAP": 0.0, **{f"top{k}": 0.0 for k in ks}}
    n_used = 0
    for lo in range(0, nq, step):
        hi = min(lo + step, nq)
        nr = n_rel[lo:hi]
        if not np.any(nr > 0):
            continue
        scores, keys = index.search(q[lo:hi], n)
        valid = None
        if qk is not None:                         # leave-one-out: drop the query's own key
            valid = keys != qk[lo:hi, None]
            n_own = (~valid).sum(axis=1)
            if np.all(n_own == 1):                 # usual case: every query is in the gallery
                scores = scores[valid].reshape(hi - lo, n - 1)
                keys = keys[valid].reshape(hi - lo, n - 1)
                valid = None
            elif n_own.any():                      # own key to the end of the row, invalid
                back = np.argsort(~valid, axis=1, kind="stable")
                scores = np.take_along_axis(scores, back, axis=1)
                keys = np.take_along_axis(keys, back, axis=1)
                valid = np.take_along_axis(valid, back, axis=1)
                scores[~valid] = -np.inf
            else:
                valid = None
        match = label_of(keys) == qlab[lo:hi, None]
        r = ranked_metrics(scores, match, nr, topk=ks, valid=valid)
        del scores, keys, match, valid
        if r["n_queries"]:
            for name in total:
                total[name] += r[name] * r["n_queries"]
            n_used += r["n_queries"]
    out = {name: (v / n_used if n_used else float("nan")) for name, v in total.items()}
    out["n_queries"] = int(n_used)
    return out

