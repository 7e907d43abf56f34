"""Sharded faiss index over gallery vectors: what the evaluation searches and what users serve.

Design
------
* Vectors enter faiss through one :class:`VectorSpace` (``index_vectors(x, source)`` for the
  gallery, ``query_vectors(q)`` for queries) and its faiss ``metric``: the one place that fixes
  the distance (``evaluation.distance``): ``cosine`` (L2-normalised float32 vectors and inner
  product; an all-zero vector stays zero and scores 0 against everything) or ``l2`` (raw
  features, the official FastFill evaluation: gallery ``[2g, -|g|^2]`` against query ``[q, 1]``
  by inner product scores ``-|q - g|^2 + |q|^2``, the L2 ranking of every query). Scores are
  "higher is better" in every space, so the shard merge and the evaluation never ask which
  distance is in use.
* One exact store per shard, ``IndexIDMap2(IndexFlat)``; an item with int64 key ``k`` lives in
  shard ``k % num_shards``. ``faiss.IndexShards`` is not used: it routes added items to shards in
  contiguous chunks, not by key, so an upsert could not find the shard holding a key. A query
  block is searched on every shard (each returns its ``min(k, shard size)`` best) and the
  results are merged by score: exact, memory ~ one (queries x k) result.
* :meth:`ShardedGalleryIndex.upsert` (what a backfill batch does) keeps, per shard, the keys in
  sorted order with their storage positions. A key already present has its vector overwritten
  in place in the flat index's storage (a numpy view of its codes): O(batch * log(shard size)),
  no pass over the shard. New keys are appended with ``add_with_ids`` plus a sorted insert into
  the lookup. The ``method="remove_add"`` variant (one ``remove_ids`` per shard, then
  ``add_with_ids``) is kept for comparison (``bench/bench_faiss_update.py``).
* Approximate search (:class:`IndexSpec` ``kind="ivf"`` or ``"hnsw"``): each shard also holds an
  ``IndexIVFFlat`` (ids = keys; an upsert removes and re-adds the batch's keys; the coarse
  quantizer is trained on the vectors the shard holds when it is first filled) or an
  ``IndexHNSWFlat`` (HNSW cannot remove: an upserted key's old node stays in the graph as a
  tombstone, masked out of every search by an ``IDSelectorBitmap``, and its new vector is
  inserted as a new node). :meth:`ShardedGalleryIndex.search` is then approximate and
  ``search(..., exact=True)`` searches the flat stores, which stay the ground truth; an
  approximate index therefore holds each vector twice (flat + ANN), the price of measuring
  what the approximation loses (``recall_at_<k>`` in the evaluation).
* :meth:`ShardedGalleryIndex.save` / :meth:`ShardedGalleryIndex.load` write and read the shards
  (faiss's own format) plus the key arrays, in a plain folder: no Spark needed to load it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from fastfill_udfs.arrays import check_pos_int, to_numpy
from fastfill_udfs.metrics import DISTANCES, check_distance  # evaluation.distance

__all__ = ["VectorSpace", "CalibratedSpace", "space_for", "top_k_keys", "IndexSpec", "ShardedGalleryIndex", "DISTANCES", "INDEX_KINDS",
           "as_keys", "lookup", "first_few"]

log = logging.getLogger(__name__)
INDEX_KINDS = ("flat", "ivf", "hnsw")
_SHOW = 5                          # offending keys named in an error message
_FORMAT = "fastfill-shards/1"      # format tag of a saved index folder


# ----------------------------------------------------------------------------- helpers
def first_few(values) -> str:
    """The first few of `values` for an error message, with how many more there are."""
    values = list(values)
    more = f" (and {len(values) - _SHOW} more)" if len(values) > _SHOW else ""
    return str([v.item() if hasattr(v, "item") else v for v in values[:_SHOW]]) + more


def as_keys(keys, name: str) -> np.ndarray:
    """`keys` as a contiguous 1-D int64 array; ValueError naming `name` for another shape or
    a non-integer dtype."""
    arr = to_numpy(keys)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_matrix(x, dim: int, name: str, keys=None) -> np.ndarray:
    """2-D float array of width ``dim``; non-finite rows are named by ``keys`` (or row)."""
    arr = to_numpy(x)
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
        what = f"keys {first_few(keys[bad])}" if keys is not None else f"rows {first_few(bad)}"
        raise ValueError(f"{name} has NaN or infinite values for {what}")
    return arr


def _max_norm(x: np.ndarray | None) -> float:
    """Largest row norm of ``x`` (0 for None or no rows), in float64."""
    if x is None or len(x) == 0:
        return 0.0
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.einsum("ij,ij->i", x, x)).max())


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


# ----------------------------------------------------------------------------- vector space
class VectorSpace:
    """How embeddings enter faiss and meet queries: the one place that fixes the distance.

    ``distance="cosine"``: gallery and query vectors are L2-normalised in float32 and compared
    by inner product, so a score is the cosine similarity. ``distance="l2"`` (raw features):
    faiss stores ``[2g, -|g|^2]`` and searches with ``[q, 1]`` by inner product, so a score is
    ``2 q.g - |g|^2 = |q|^2 - |q - g|^2``: per query the same order as the L2 distance, and an
    exact flat search stays an inner-product search. Every space returns "higher is better"
    scores. ``index_vectors`` receives each row's ``source`` for a per-source calibration.
    Raises ValueError for an unknown ``distance``, naming ``evaluation.distance``.
    """

    def __init__(self, distance: str = "cosine"):
        self.distance = check_distance(distance, "evaluation.distance")
        self.l2 = distance == "l2"

    @classmethod
    def from_config(cls, cfg) -> "VectorSpace":
        """The space of ``evaluation.distance``."""
        return cls(cfg.get_path("evaluation.distance"))

    @property
    def metric(self) -> int:
        """The faiss metric of every index built in this space."""
        return faiss.METRIC_INNER_PRODUCT

    def index_dim(self, dim: int) -> int:
        """Width of the vectors faiss stores for ``dim``-wide embeddings."""
        return int(dim) + (1 if self.l2 else 0)

    def index_vectors(self, embeddings: np.ndarray, source=None) -> np.ndarray:
        """Gallery embeddings (n x dim, checked finite) as faiss stores them: float32,
        C-contiguous, a new array. ``source`` (n,) says which model made each row (unused by
        these spaces)."""
        if not self.l2:
            return _normalise(embeddings)
        g = np.asarray(embeddings, dtype=np.float64)
        out = np.empty((len(g), g.shape[1] + 1), dtype=np.float32)
        out[:, :-1] = 2.0 * g
        out[:, -1] = -np.einsum("ij,ij->i", g, g)
        return out

    def query_vectors(self, queries: np.ndarray) -> np.ndarray:
        """Query embeddings (nq x dim, checked finite) as faiss searches with them."""
        if not self.l2:
            return _normalise(queries)
        q = np.asarray(queries, dtype=np.float64)
        return np.ascontiguousarray(np.hstack([q, np.ones((len(q), 1))]), dtype=np.float32)

    def scores_from_faiss(self, distances: np.ndarray) -> np.ndarray:
        """faiss's search output as "higher is better" scores (identity for inner product)."""
        return distances

    def embeddings(self, stored: np.ndarray) -> np.ndarray:
        """The embeddings behind stored (index-space) vectors, float64: for l2 ``g`` from
        ``[2g, -|g|^2]`` (exact: 2g was stored in float32); for cosine the stored unit vectors
        (what cosine scores are taken on)."""
        x = np.asarray(stored, dtype=np.float64)
        return x[:, :-1] / 2.0 if self.l2 else x

    def exact_vectors(self, stored: np.ndarray) -> np.ndarray:
        """float64 vectors whose inner products with :meth:`exact_query_vectors` are the exact
        scores of stored (index-space) vectors: for cosine the stored float32 vectors
        normalised again in float64, as :func:`fastfill_udfs.metrics.retrieval_metrics`
        normalises its input (zero rows stay zero); for l2 ``[2g, -|g|^2]`` with ``g`` the
        stored float32 embedding and its squared norm taken in float64."""
        x = self.embeddings(stored)
        if self.l2:
            return np.ascontiguousarray(np.hstack([2.0 * x, -np.einsum("ij,ij->i", x, x)[:, None]]))
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0))

    def exact_query_vectors(self, queries: np.ndarray) -> np.ndarray:
        """float64 query vectors for the exact scores, from the raw query embeddings (not the
        float32 ones faiss searches with): for cosine normalised in float64, as
        :func:`fastfill_udfs.metrics.retrieval_metrics` does; for l2 ``[q, 1]``."""
        if self.l2:
            q = np.asarray(queries, dtype=np.float64)
            return np.ascontiguousarray(np.hstack([q, np.ones((len(q), 1))]))
        return self.exact_vectors(queries)

    def score_bounds(self, query_vectors: np.ndarray | None = None,
                     stored: np.ndarray | None = None) -> tuple[float, float]:
        """(lowest, highest) exact score any pair can have: [-1, 1] for cosine; for l2, from
        the largest query and gallery norms, ``[-(2|q||g| + |g|^2), 2|q||g|]``."""
        if not self.l2:
            return -1.0, 1.0
        qmax = _max_norm(None if query_vectors is None else np.asarray(query_vectors)[:, :-1])
        gmax = _max_norm(None if stored is None else np.asarray(stored)[:, :-1] / 2.0)
        reach = 2.0 * qmax * gmax
        return -(reach + gmax * gmax) - 1.0, reach + 1.0

    def score_error_bound(self, query_vectors: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """Per query, a bound on |faiss's float32 score - the exact float64 score| against any
        of the ``stored`` vectors: a float32 dot product of width D errs by at most about
        D * 2**-24 * |q| * |g| (taken twice over), plus the renormalisation of
        :meth:`exact_vectors` (|q||g| - 1 for cosine; the float32 rounding of the stored
        squared norm for l2)."""
        q = np.asarray(query_vectors, dtype=np.float64)
        g = np.asarray(stored, dtype=np.float64)
        qn = np.sqrt(np.einsum("ij,ij->i", q, q))
        gn = np.sqrt(np.einsum("ij,ij->i", g, g))
        gmax = float(gn.max(initial=0.0))
        rounding = 2.0 * (q.shape[1] + 2) * 2.0 ** -24 * qn * gmax
        if self.l2:
            sq = float(np.abs(g[:, -1]).max(initial=0.0)) if g.size else 0.0
            return rounding + 4.0 * 2.0 ** -24 * (sq + 1.0) + 1e-12
        gmin = float(gn[gn > 0].min(initial=gmax)) if gn.size else 0.0
        renorm = np.maximum(np.abs(qn * gmax - 1.0), np.abs(qn * gmin - 1.0)) * (gmax > 0)
        return rounding + np.where(qn > 0, renorm, 0.0) + 1e-12

    def describe(self) -> dict:
        """JSON-able identity (recorded with a saved index)."""
        return {"distance": self.distance}

    @classmethod
    def from_description(cls, description: Mapping) -> "VectorSpace":
        return space_for(description.get("distance", "cosine"), description.get("calibration"))

    def __eq__(self, other) -> bool:
        return isinstance(other, VectorSpace) and self.describe() == other.describe()

    def __repr__(self) -> str:
        return f"VectorSpace(distance={self.distance!r})"


class CalibratedSpace(VectorSpace):
    """A mixed gallery scored through an affine mixed-gallery calibration
    (:mod:`fastfill_udfs.calibration`, no sigma term): a `transformed` row scores
    ``scale * score + bias``, a `new` row (or a row without a source) ``score``, with ``score``
    cosine or ``-|q - g|^2``. faiss stores :func:`calibration.augment_gallery` vectors and
    searches with :func:`calibration.augment_queries` ones, so an exact inner-product search
    ranks by the calibrated score. Exact scores are the float64 inner products of the stored
    float32 vectors. Raises ValueError for parameters of another distance or with a sigma
    term."""

    def __init__(self, distance: str, calibration: dict):
        from fastfill_udfs.calibration import check_calibration

        super().__init__(distance)
        params = check_calibration(calibration)
        if params["distance"] != distance:
            raise ValueError(f"the calibration was fitted for distance {params['distance']!r}, "
                             f"the index scores by {distance!r}")
        if params["sigma_weight"] != 0.0:
            raise ValueError("an index applies affine calibrations only (sigma_weight 0)")
        self.calibration = params

    def index_dim(self, dim: int) -> int:
        return int(dim) + (1 if not self.l2 else 2)

    def index_vectors(self, embeddings: np.ndarray, source=None) -> np.ndarray:
        """Augmented gallery vectors (float32); ``source`` (n,) marks `transformed` rows."""
        from fastfill_udfs.calibration import augment_gallery

        n = len(embeddings)
        transformed = (np.zeros(n, bool) if source is None
                       else np.asarray(source, dtype=object) == "transformed")
        return np.ascontiguousarray(augment_gallery(self.calibration, embeddings, transformed))

    def query_vectors(self, queries: np.ndarray) -> np.ndarray:
        from fastfill_udfs.calibration import augment_queries

        return np.ascontiguousarray(augment_queries(self.calibration, queries))

    def embeddings(self, stored: np.ndarray) -> np.ndarray:
        """The embeddings behind stored vectors: l2 ``g`` from ``[2 s g, b - s|g|^2, -s]``;
        cosine the unit vectors from ``[s g/|g|, b]``."""
        x = np.asarray(stored, dtype=np.float64)
        if self.l2:
            return x[:, :-2] / (-2.0 * x[:, -1:])
        head = x[:, :-1]
        norms = np.linalg.norm(head, axis=1, keepdims=True)
        return head / np.where(norms > 0, norms, 1.0)

    def exact_vectors(self, stored: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(stored, dtype=np.float64))

    def exact_query_vectors(self, queries: np.ndarray) -> np.ndarray:
        """float64 :func:`calibration.augment_queries`."""
        q = np.asarray(queries, dtype=np.float64)
        ones = np.ones((len(q), 1))
        if self.l2:
            return np.ascontiguousarray(np.hstack([q, ones, np.einsum("ij,ij->i", q, q)[:, None]]))
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        return np.ascontiguousarray(np.hstack([q / np.where(norms > 0, norms, 1.0), ones]))

    def score_bounds(self, query_vectors: np.ndarray | None = None,
                     stored: np.ndarray | None = None) -> tuple[float, float]:
        """By Cauchy-Schwarz on the augmented vectors."""
        qmax = _max_norm(None if query_vectors is None else np.asarray(query_vectors))
        gmax = _max_norm(None if stored is None else np.asarray(stored))
        reach = qmax * gmax + 1.0
        return -reach, reach

    def score_error_bound(self, query_vectors: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """A float32 dot product of width D errs by at most about D 2**-24 |q||g| (twice over),
        plus the float32 rounding of the query vector."""
        q = np.asarray(query_vectors, dtype=np.float64)
        g = np.asarray(stored, dtype=np.float64)
        qn = np.sqrt(np.einsum("ij,ij->i", q, q))
        gmax = float(np.sqrt(np.einsum("ij,ij->i", g, g)).max(initial=0.0))
        return 2.0 * (q.shape[1] + 2) * 2.0 ** -24 * qn * gmax * 2.0 + 1e-12

    def describe(self) -> dict:
        return {"distance": self.distance, "calibration": self.calibration}

    def __repr__(self) -> str:
        return (f"CalibratedSpace(distance={self.distance!r}, scale="
                f"{self.calibration['scale']:.4g}, bias={self.calibration['bias']:.4g})")


def space_for(distance: str, calibration: dict | None = None) -> VectorSpace:
    """The vector space of a run: plain, or calibrated when its plan carries a calibration."""
    return CalibratedSpace(distance, calibration) if calibration else VectorSpace(distance)


# ----------------------------------------------------------------------------- index spec
@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index each shard holds (config ``evaluation.index`` and its parameters).

    ``kind``: ``flat`` (exact), ``ivf`` (``IndexIVFFlat``: ``nlist`` inverted lists per shard,
    0 = about 4 * sqrt(shard size); ``nprobe`` lists searched) or ``hnsw`` (``IndexHNSWFlat``:
    ``m`` links per node, ``ef_construction``, ``ef_search``). Raises ValueError naming the
    config key of a bad value."""

    kind: str = "flat"
    num_shards: int = 4
    nlist: int = 0
    nprobe: int = 8
    m: int = 32
    ef_construction: int = 40
    ef_search: int = 64

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"evaluation.index must be one of {INDEX_KINDS}, got {self.kind!r}")
        for name, key, low in (("num_shards", "evaluation.num_shards", 1),
                               ("nlist", "evaluation.ivf.nlist", 0),
                               ("nprobe", "evaluation.ivf.nprobe", 1),
                               ("m", "evaluation.hnsw.m", 2),
                               ("ef_construction", "evaluation.hnsw.ef_construction", 1),
                               ("ef_search", "evaluation.hnsw.ef_search", 1)):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                    or value < low:
                raise ValueError(f"{key} must be an int >= {low}, got {value!r}")

    @property
    def approximate(self) -> bool:
        return self.kind != "flat"

    @classmethod
    def from_config(cls, cfg) -> "IndexSpec":
        """From a Config's ``evaluation`` section (``cfg.get_path`` keys)."""
        return cls(kind=cfg.get_path("evaluation.index"),
                   num_shards=cfg.get_path("evaluation.num_shards"),
                   nlist=cfg.get_path("evaluation.ivf.nlist"),
                   nprobe=cfg.get_path("evaluation.ivf.nprobe"),
                   m=cfg.get_path("evaluation.hnsw.m"),
                   ef_construction=cfg.get_path("evaluation.hnsw.ef_construction"),
                   ef_search=cfg.get_path("evaluation.hnsw.ef_search"))

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for logs and printouts."""
        if self.kind == "ivf":
            return (f"ivf (nlist {self.nlist or 'auto'}, nprobe {self.nprobe}) x "
                    f"{self.num_shards} shards")
        if self.kind == "hnsw":
            return (f"hnsw (M {self.m}, efConstruction {self.ef_construction}, efSearch "
                    f"{self.ef_search}) x {self.num_shards} shards")
        return f"flat (exact) x {self.num_shards} shards"


# ----------------------------------------------------------------------------- approximate parts
class _IvfAnn:
    """``IndexIVFFlat`` over one shard's keys (faiss ids = keys): an upsert removes the batch's
    keys and adds them again. The coarse quantizer is trained on the first vectors added (the
    gallery as built), so it reflects the gallery at that time."""

    def __init__(self, dim: int, metric: int, spec: IndexSpec):
        self.dim, self.metric, self.spec = dim, metric, spec
        self.index = None
        self.quantizer = None                      # kept referenced while the index lives

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def nlist(self) -> int:
        return 0 if self.index is None else int(self.index.nlist)

    def _create(self, x: np.ndarray) -> None:
        n = len(x)
        if self.spec.nlist:
            nlist = min(self.spec.nlist, n)
            if nlist < self.spec.nlist:
                log.warning("evaluation.ivf.nlist=%d exceeds the %d vectors of a shard: using %d "
                            "lists", self.spec.nlist, n, nlist)
        else:                                      # ~4 sqrt(n), at least 39 points per list
            nlist = max(1, min(int(round(4 * np.sqrt(n))), n // 39))
        self.quantizer = faiss.IndexFlat(self.dim, self.metric)
        index = faiss.IndexIVFFlat(self.quantizer, self.dim, nlist, self.metric)
        index.cp.min_points_per_centroid = 1       # small shards: no "too few points" warning
        index.train(x)
        self.index = index

    def add(self, keys: np.ndarray, x: np.ndarray) -> None:
        if not len(keys):
            return
        if self.index is None:
            self._create(x)
        self.index.add_with_ids(x, keys)

    def upsert(self, keys: np.ndarray, x: np.ndarray, present: np.ndarray) -> None:
        if self.index is not None and present.any():
            self.index.remove_ids(faiss.IDSelectorBatch(keys[present]))
        self.add(keys, x)

    def search(self, q: np.ndarray, k: int):
        if self.ntotal == 0:
            return (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
        params = faiss.SearchParametersIVF(nprobe=min(self.spec.nprobe, self.nlist))
        return self.index.search(q, k, params=params)

    def save(self, base: Path) -> dict:
        if self.index is None:
            return {}
        faiss.write_index(self.index, str(base) + ".ivf.faiss")
        return {"ivf": base.name + ".ivf.faiss"}

    def load(self, folder: Path, files: Mapping) -> None:
        if files.get("ivf"):
            self.index = faiss.read_index(str(_existing(folder / files["ivf"])))


class _HnswAnn:
    """``IndexHNSWFlat`` over one shard: nodes are numbered in insertion order; ``node_keys``
    maps them to keys. HNSW cannot remove a node, so an upserted key's old node becomes a
    tombstone (``live`` False), masked out of searches, and its new vector a new node."""

    def __init__(self, dim: int, metric: int, spec: IndexSpec):
        self.spec = spec
        self.index = faiss.IndexHNSWFlat(dim, spec.m, metric)
        self.index.hnsw.efConstruction = spec.ef_construction
        self.node_keys = np.zeros(0, np.int64)
        self.live = np.zeros(0, bool)
        self.sorted_keys = np.zeros(0, np.int64)   # key -> its live node, for upserts
        self.sorted_nodes = np.zeros(0, np.int64)

    @property
    def ntotal(self) -> int:
        return int(self.live.sum())

    @property
    def tombstones(self) -> int:
        return int(len(self.live) - self.live.sum())

    def add(self, keys: np.ndarray, x: np.ndarray) -> None:
        if not len(keys):
            return
        start = int(self.index.ntotal)
        self.index.add(x)
        nodes = start + np.arange(len(keys), dtype=np.int64)
        at = lookup(self.sorted_keys, keys)
        old = at >= 0
        self.live = np.concatenate([self.live, np.ones(len(keys), bool)])
        self.live[self.sorted_nodes[at[old]]] = False
        self.sorted_nodes[at[old]] = nodes[old]
        if not old.all():
            nk, nn = keys[~old], nodes[~old]
            order = np.argsort(nk, kind="stable")
            ins = np.searchsorted(self.sorted_keys, nk[order])
            self.sorted_keys = np.insert(self.sorted_keys, ins, nk[order])
            self.sorted_nodes = np.insert(self.sorted_nodes, ins, nn[order])
        self.node_keys = np.concatenate([self.node_keys, keys])

    def upsert(self, keys: np.ndarray, x: np.ndarray, present: np.ndarray) -> None:
        self.add(keys, x)

    def search(self, q: np.ndarray, k: int):
        nq = len(q)
        if not len(self.live) or not self.live.any():
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        bits = sel = None
        if not self.live.all():
            bits = np.packbits(self.live, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(self.live), faiss.swig_ptr(bits))
        params = faiss.SearchParametersHNSW(efSearch=max(self.spec.ef_search, k), sel=sel)
        d, nodes = self.index.search(q, k, params=params)
        del bits, sel                              # alive until the search returned
        return d, np.where(nodes >= 0, self.node_keys[np.maximum(nodes, 0)], -1)

    def save(self, base: Path) -> dict:
        faiss.write_index(self.index, str(base) + ".hnsw.faiss")
        np.savez(str(base) + ".hnsw.npz", node_keys=self.node_keys, live=self.live)
        return {"hnsw": base.name + ".hnsw.faiss", "hnsw_nodes": base.name + ".hnsw.npz"}

    def load(self, folder: Path, files: Mapping) -> None:
        self.index = faiss.read_index(str(_existing(folder / files["hnsw"])))
        with np.load(_existing(folder / files["hnsw_nodes"])) as arrays:
            self.node_keys = arrays["node_keys"].astype(np.int64)
            self.live = arrays["live"].astype(bool)
        nodes = np.flatnonzero(self.live)
        order = np.argsort(self.node_keys[nodes], kind="stable")
        self.sorted_keys = self.node_keys[nodes][order]
        self.sorted_nodes = nodes[order].astype(np.int64)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"saved index is incomplete: {path} is missing")
    return path


class _Shard:
    """One exact store ``IndexIDMap2(IndexFlat)`` with its sorted key -> storage position
    lookup, and the shard's approximate index when the spec asks for one."""

    def __init__(self, dim: int, metric: int = faiss.METRIC_INNER_PRODUCT,
                 spec: IndexSpec | None = None):
        self.dim, self.metric = dim, metric
        self.flat = faiss.IndexFlat(dim, metric)
        self.index = faiss.IndexIDMap2(self.flat)
        self.sorted_keys = np.zeros(0, dtype=np.int64)
        self.sorted_pos = np.zeros(0, dtype=np.int64)
        self.lookup_ok = True                      # False after remove_ids moved positions
        spec = spec or IndexSpec()
        self.ann = (_IvfAnn(dim, metric, spec) if spec.kind == "ivf" else
                    _HnswAnn(dim, metric, spec) if spec.kind == "hnsw" else None)

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
        i = lookup(self.sorted_keys, keys)
        out = np.full(len(keys), -1, dtype=np.int64)
        out[i >= 0] = self.sorted_pos[i[i >= 0]]
        return out

    def append(self, keys: np.ndarray, x: np.ndarray) -> None:
        """Append absent ``keys`` with their vectors ``x``; the lookup is updated by a sorted
        insert (O(shard size) memmove, no re-sort)."""
        start = self.ntotal
        self.index.add_with_ids(x, keys)
        if self.lookup_ok:
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            at = np.searchsorted(self.sorted_keys, sk)
            self.sorted_keys = np.insert(self.sorted_keys, at, sk)
            self.sorted_pos = np.insert(self.sorted_pos, at, start + order.astype(np.int64))

    def search(self, q: np.ndarray, k: int):
        """Exact top-``min(k, ntotal)`` of (index-space) queries ``q``: (scores, keys)."""
        return self.index.search(q, min(k, self.ntotal))

    def search_approximate(self, q: np.ndarray, k: int):
        return self.ann.search(q, min(k, self.ann.ntotal) or 1)

    def save(self, folder: Path, s: int) -> dict:
        base = folder / f"shard_{s}"
        faiss.write_index(self.index, str(base) + ".flat.faiss")
        files = {"flat": base.name + ".flat.faiss"}
        if self.ann is not None:
            files.update(self.ann.save(base))
        return files

    def load(self, folder: Path, files: Mapping) -> None:
        index = faiss.read_index(str(_existing(folder / files["flat"])))
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{folder / files['flat']} is not an IndexIDMap2 shard")
        self.index = index
        self.flat = faiss.downcast_index(index.index)
        self.lookup_ok = False                     # rebuilt from the id map on first use
        if self.ann is not None:
            self.ann.load(folder, files)


# ----------------------------------------------------------------------------- index
class ShardedGalleryIndex:
    """Gallery vectors under int64 keys, sharded by ``key % num_shards``, searched by score.

    Args: ``dim`` the embedding width (before the space's transform); ``num_shards`` (kept for
    the old call form; overrides ``spec.num_shards`` when given); ``spec`` an
    :class:`IndexSpec` (flat by default); ``space`` the :class:`VectorSpace` (cosine by default).
    Keys must be non-negative int64 (faiss uses -1 for "no result"). Raises ValueError on a
    non-positive ``dim`` or ``num_shards``.
    """

    def __init__(self, dim: int, num_shards: int | None = None, *, spec: IndexSpec | None = None,
                 space: VectorSpace | None = None):
        self.dim = check_pos_int(dim, "dim")
        spec = spec or IndexSpec()
        if num_shards is not None:
            spec = IndexSpec(**{**spec.as_dict(), "num_shards": check_pos_int(num_shards,
                                                                               "num_shards")})
        self.spec = spec
        self.num_shards = spec.num_shards
        self.space = space or VectorSpace()
        self.index_dim = self.space.index_dim(self.dim)
        self._shards = self._new_shards()

    def _new_shards(self) -> list:
        return [_Shard(self.index_dim, self.space.metric, self.spec) for _ in range(self.num_shards)]

    # -- checks
    def _check_items(self, keys, vectors, sources, what: str):
        k = as_keys(keys, "keys")
        x = to_numpy(vectors)
        if x.ndim == 2 and x.shape[0] != len(k):
            raise ValueError(f"{what}: keys has {len(k)} entries, vectors has {x.shape[0]} rows")
        x = _as_matrix(x, self.dim, "vectors", keys=k)
        if np.any(k < 0):
            raise ValueError(f"{what}: keys must be >= 0, got {first_few(k[k < 0])}")
        sk = np.sort(k)
        dup = np.unique(sk[1:][sk[1:] == sk[:-1]])
        if dup.size:
            raise ValueError(f"{what}: duplicate keys in one call: {first_few(dup)}")
        if sources is not None:
            sources = np.asarray(sources, dtype=object)
            if sources.shape != (len(k),):
                raise ValueError(f"{what}: sources has shape {sources.shape}, expected "
                                 f"({len(k)},) (one per key)")
        return k, x, sources

    # -- updates
    def build(self, keys, vectors, sources=None) -> "ShardedGalleryIndex":
        """Full rebuild: drop everything, then index ``vectors`` (n x dim) under ``keys`` (n,);
        ``sources`` (n,) tells the space which model made each row (optional).

        Raises ValueError on a dim mismatch, NaN/inf vectors (naming their keys), duplicate or
        negative keys, or a keys/vectors length mismatch; the index is unchanged then.
        """
        k, x, sources = self._check_items(keys, vectors, sources, "build")
        xs = self.space.index_vectors(x, sources)
        shard_of = k % self.num_shards
        shards = self._new_shards()
        for s, shard in enumerate(shards):               # each shard stored in key order
            sel = np.flatnonzero(shard_of == s)
            sel = sel[np.argsort(k[sel], kind="stable")]
            if sel.size:
                part = np.ascontiguousarray(xs[sel])
                shard.index.add_with_ids(part, k[sel])
                if shard.ann is not None:
                    shard.ann.add(k[sel], part)
            shard.sorted_keys = k[sel]
            shard.sorted_pos = np.arange(sel.size, dtype=np.int64)
        self._shards = shards
        return self

    def upsert(self, keys, vectors, sources=None, *, method: str = "inplace"
               ) -> "ShardedGalleryIndex":
        """Insert or replace: after the call each key in ``keys`` maps to its row of ``vectors``.

        ``method="inplace"`` (default) overwrites present keys' vectors in the shard storage and
        appends the new ones (O(batch)); ``"remove_add"`` removes present keys with one
        ``remove_ids`` per shard and re-adds the whole batch (O(shard size)). An approximate
        index is updated too (see the module docstring). Raises ValueError as :meth:`build`
        does, or on an unknown ``method``; the index is unchanged then.
        """
        if method not in ("inplace", "remove_add"):
            raise ValueError(f"method must be 'inplace' or 'remove_add', got {method!r}")
        k, x, sources = self._check_items(keys, vectors, sources, "upsert")
        if not len(k):
            return self
        x = self.space.index_vectors(x, sources)
        shard_of = k % self.num_shards
        for s, shard in enumerate(self._shards):
            sel = np.flatnonzero(shard_of == s)
            if not sel.size:
                continue
            ks, xs = k[sel], np.ascontiguousarray(x[sel])
            pos = shard.positions(ks)
            present = pos >= 0
            if shard.ann is not None:
                shard.ann.upsert(ks, xs, present)
            if method == "remove_add":
                if present.any():
                    shard.index.remove_ids(faiss.IDSelectorBatch(ks[present]))
                shard.index.add_with_ids(xs, ks)
                shard.lookup_ok = False
                continue
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

    def check_queries(self, queries, name: str = "queries") -> np.ndarray:
        """``queries`` as a float (nq x dim) array; raises ValueError naming ``name`` for a
        wrong shape or dimension and naming the rows with NaN or infinite values."""
        return _as_matrix(queries, self.dim, name)

    def search(self, queries, k: int, *, exact: bool | None = None):
        """Top-``k`` of ``queries`` (nq x dim, raw embeddings: the space prepares them) over all
        shards, merged by score.

        ``exact``: search the flat stores (default for a flat index) or the approximate index
        (default for ivf / hnsw). Returns ``(scores, keys)``: float32 (nq, k) in descending
        order per row and int64 (nq, k); where fewer than ``k`` items are found the tail is
        padded with score ``-inf`` and key -1. Ties are returned in arbitrary order. Raises
        ValueError on a dim mismatch, NaN/inf queries or a non-positive ``k``.
        """
        k = check_pos_int(k, "k")
        q = self.space.query_vectors(self.check_queries(queries))
        return self.search_prepared(q, k, exact=exact)

    def search_prepared(self, q: np.ndarray, k: int, *, exact: bool | None = None):
        """:meth:`search` for queries already in the index space (``space.query_vectors``)."""
        exact = not self.spec.approximate if exact is None else bool(exact)
        if not exact and not self.spec.approximate:
            raise ValueError("this index is flat: there is no approximate search")
        nq = q.shape[0]
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        keys = np.full((nq, k), -1, dtype=np.int64)
        live = [s for s in self._shards if (s.ntotal if exact else s.ann.ntotal)]
        if nq == 0 or not live:
            return scores, keys
        parts = [s.search(q, k) if exact else s.search_approximate(q, k) for s in live]
        d = np.concatenate([p[0] for p in parts], axis=1)
        i = np.concatenate([p[1] for p in parts], axis=1)
        del parts
        d = np.where(i >= 0, self.space.scores_from_faiss(d), -np.inf).astype(np.float32)
        kr = min(k, d.shape[1])
        if d.shape[1] > kr:                        # keep the kr best (ties at the cut: any)
            part = np.argpartition(-d, kr - 1, axis=1)[:, :kr]
            d, i = np.take_along_axis(d, part, axis=1), np.take_along_axis(i, part, axis=1)
        order = np.argsort(-d, axis=1, kind="stable")
        scores[:, :kr] = np.take_along_axis(d, order, axis=1)
        keys[:, :kr] = np.take_along_axis(i, order, axis=1)
        keys[np.isneginf(scores)] = -1
        return scores, keys

    def stored_vectors(self):
        """Per non-empty shard, ``(keys, vectors)``: the keys in storage order and a read-only
        float32 view of the stored (index-space) vectors; valid until the next update."""
        out = []
        for s in self._shards:
            if s.ntotal:
                view = s.storage()
                view.flags.writeable = False
                out.append((s.keys_by_pos(), view))
        return out

    def reconstruct_all(self):
        """All items as ``(keys, vectors)``: int64 (n,) ascending and the stored (index-space)
        float32 vectors (n x index_dim), copied."""
        parts = self.stored_vectors()
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.index_dim), dtype=np.float32)
        keys = np.concatenate([p[0] for p in parts])
        vecs = np.concatenate([p[1] for p in parts])
        order = np.argsort(keys, kind="stable")
        return keys[order], vecs[order]

    def approximate_stats(self) -> dict:
        """What the approximate part holds: kind, lists (ivf) or tombstones (hnsw)."""
        out = {"kind": self.spec.kind}
        if self.spec.kind == "ivf":
            out["nlist_per_shard"] = [s.ann.nlist for s in self._shards]
        elif self.spec.kind == "hnsw":
            out["tombstones"] = sum(s.ann.tombstones for s in self._shards)
        return out

    # -- persistence
    def save(self, folder) -> Path:
        """Write the shards to the (new or empty) local folder ``folder``; returns it.
        Raises FileExistsError when the folder holds files already."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty: save an index into a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        files = [shard.save(folder, s) for s, shard in enumerate(self._shards)]
        manifest = {"format": _FORMAT, "dim": self.dim, "index_dim": self.index_dim,
                    "spec": self.spec.as_dict(), "space": self.space.describe(),
                    "shard_sizes": self.shard_sizes(), "files": files}
        (folder / "shards.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder) -> "ShardedGalleryIndex":
        """Read an index written by :meth:`save` (no Spark needed). Raises FileNotFoundError
        naming a missing file, ValueError for another format or shard sizes that disagree with
        the manifest."""
        folder = Path(folder)
        manifest = json.loads(_existing(folder / "shards.json").read_text())
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"{folder} holds index format {manifest.get('format')!r}, this "
                             f"version reads {_FORMAT!r}")
        index = cls(manifest["dim"], spec=IndexSpec(**manifest["spec"]),
                    space=VectorSpace.from_description(manifest["space"]))
        for shard, files in zip(index._shards, manifest["files"]):
            shard.load(folder, files)
        if index.shard_sizes() != manifest["shard_sizes"]:
            raise ValueError(f"{folder}: shard sizes {index.shard_sizes()} differ from the "
                             f"manifest's {manifest['shard_sizes']}")
        return index

    def __repr__(self) -> str:
        return (f"ShardedGalleryIndex(dim={self.dim}, {self.spec.describe()}, "
                f"space={self.space.distance}, ntotal={self.ntotal})")


# ----------------------------------------------------------------------------- lookups
def gallery_labels(gallery_key_labels):
    """(keys, labels) arrays sorted by key from a mapping / pandas Series (key -> label) or a
    (keys, labels) pair. Raises ValueError for another type, a length mismatch or duplicate
    keys (naming them)."""
    if isinstance(gallery_key_labels, pd.Series):
        keys, labels = gallery_key_labels.index.to_numpy(), gallery_key_labels.to_numpy()
    elif isinstance(gallery_key_labels, Mapping):
        keys = np.fromiter(gallery_key_labels.keys(), dtype=np.int64, count=len(gallery_key_labels))
        labels = np.asarray(list(gallery_key_labels.values()), dtype=object)
    elif isinstance(gallery_key_labels, tuple) and len(gallery_key_labels) == 2:
        keys, labels = (to_numpy(a) for a in gallery_key_labels)
    else:
        raise ValueError("gallery_key_labels must be a mapping or pandas Series (key -> label) or "
                         f"a (keys, labels) pair, got {type(gallery_key_labels).__name__}")
    keys = as_keys(keys, "gallery_key_labels keys")
    if labels.ndim != 1 or len(labels) != len(keys):
        raise ValueError(f"gallery_key_labels has {len(keys)} keys but labels of shape {labels.shape}")
    order = np.argsort(keys, kind="stable")
    keys, labels = keys[order], labels[order]
    dup = np.unique(keys[1:][keys[1:] == keys[:-1]])
    if dup.size:
        raise ValueError(f"gallery_key_labels has duplicate keys: {first_few(dup)}")
    return keys, labels


def lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each of ``keys`` in ``sorted_keys``, -1 where absent."""
    if not len(sorted_keys):
        return np.full(np.shape(keys), -1, dtype=np.int64)
    i = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[i] == keys, i, -1)


def top_k_keys(space: VectorSpace, gallery: np.ndarray, queries: np.ndarray, k: int,
               own: np.ndarray | None = None, sources=None) -> np.ndarray:
    """Rows of `gallery` (n x d) that are each query's `k` best by `space`'s scores (exact
    flat search; Q x k), leaving out each query's `own` row (-1: none). Rows past the gallery
    (k too large) are -1."""
    x = space.index_vectors(np.asarray(gallery, np.float64), sources)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(space.query_vectors(np.asarray(queries, np.float64)), k + 1)
    if own is None:
        return found[:, :k]
    drop = found == np.asarray(own)[:, None]
    first = np.argsort(drop, axis=1, kind="stable")      # kept entries first, in rank order
    return np.take_along_axis(found, first, axis=1)[:, :k]
