"""evaluate_index: mAP / CMC through the sharded index equal metrics.retrieval_metrics (the exact
float64 scorer), the certified bound of the fast mAP path, recall@k of approximate indexes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fastfill_udfs.faiss_index import IndexSpec, ShardedGalleryIndex
from fastfill_udfs.index_eval import evaluate_index
from fastfill_udfs.metrics import retrieval_metrics

DIM = 16


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _tied_gallery(n, dim, seed):
    """Rounded vectors drawn with repetition (exact duplicates) and copies rescaled by powers
    of two (exact): many ties, at the top of rankings too."""
    rng = np.random.default_rng(seed)
    pool = np.round(rng.normal(size=(n // 4, dim)), 1)
    x = pool[rng.integers(0, len(pool), n)] * rng.choice([1.0, 2.0, 0.5, 4.0], size=(n, 1))
    labels = rng.integers(0, 12, n).astype(object)
    labels[rng.choice(n, size=n // 50, replace=False)] = None     # some missing labels
    return x, labels


def _clustered(n, dim, seed, classes=10):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    return rng.normal(size=(classes, dim))[labels] + 1.5 * rng.normal(size=(n, dim)), labels


def _stored(index):
    """The index's stored vectors in key order (what faiss holds)."""
    return index.reconstruct_all()


def _assert_same(got: dict, ref: dict, tol: float):
    assert got["n_queries"] == ref["n_queries"]
    for name in ref:
        assert got[name] == pytest.approx(ref[name], abs=tol), (name, got, ref)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("num_shards,threads", [(1, 1), (4, 2)])
def test_equals_retrieval_metrics_leave_one_out_with_ties(num_shards, threads):
    n = 900
    x, labels = _tied_gallery(n, 12, seed=5)
    keys = np.random.default_rng(6).permutation(n).astype(np.int64) * 3 + 1   # sparse keys
    index = ShardedGalleryIndex(12, num_shards=num_shards).build(keys, x)
    got = evaluate_index(index, x, labels, dict(zip(keys.tolist(), labels)), query_keys=keys,
                         topk=(1, 5, 10), block_size=128, threads=threads)
    skeys, stored = _stored(index)
    slabels = pd.Series(labels, index=keys).loc[skeys].to_numpy()
    ref = retrieval_metrics(x, labels, stored, slabels, query_ids=keys, gallery_ids=skeys,
                            topk=(1, 5, 10))
    _assert_same(got.metrics(), ref, 1e-12)             # the same vectors: the same numbers
    raw = retrieval_metrics(x, labels, x, labels, query_ids=keys, gallery_ids=keys,
                            topk=(1, 5, 10))
    _assert_same(got.metrics(), raw, 1e-6)              # float32 storage vs raw float64
    assert 0 < got.metrics()["n_queries"] < n           # missing labels left out
    s, _ = index.search(x[:50], 3)                      # the ties are real
    assert np.mean(s[:, 1] == s[:, 2]) > 0.2


def test_equals_retrieval_metrics_without_leave_one_out_and_for_foreign_queries():
    rng = np.random.default_rng(7)
    xg, lg = _tied_gallery(700, 8, seed=8)
    xq = np.concatenate([xg[:100], np.round(rng.normal(size=(150, 8)), 1)])
    lq = np.concatenate([lg[:100], rng.integers(0, 14, 150).astype(object)])  # 12, 13: no match
    keys = np.arange(700, dtype=np.int64)
    index = ShardedGalleryIndex(8, num_shards=3).build(keys, xg)
    q = xq                                              # raw queries, as the exact scores use
    skeys, stored = _stored(index)
    got = evaluate_index(index, xq, lq, pd.Series(lg, index=keys), block_size=64)
    _assert_same(got.metrics(), retrieval_metrics(q, lq, stored, lg), 1e-12)
    qk = np.concatenate([keys[:100], np.arange(10_000, 10_150)])   # others: unknown keys
    got = evaluate_index(index, xq, lq, (keys, lg), query_keys=qk, block_size=1000)
    _assert_same(got.metrics(), retrieval_metrics(q, lq, stored, lg, query_ids=qk,
                                                  gallery_ids=keys), 1e-12)


def test_after_backfill_upserts_equals_the_mixed_gallery_and_subgroups_are_masks():
    rng = np.random.default_rng(9)
    n = 800
    old, labels = _clustered(n, DIM, seed=10)
    new = old + 0.8 * rng.normal(size=(n, DIM))
    keys = np.arange(n, dtype=np.int64)
    index = ShardedGalleryIndex(DIM, num_shards=4).build(keys, old)
    batch = rng.choice(n, size=200, replace=False)
    index.upsert(keys[batch], new[batch])
    mixed = old.copy()
    mixed[batch] = new[batch]
    got = evaluate_index(index, new, labels, (keys, labels), query_keys=keys, threads=2,
                         block_size=100)
    _assert_same(got.metrics(), retrieval_metrics(new, labels, mixed, labels, query_ids=keys,
                                                  gallery_ids=keys), 1e-6)
    group = labels < 3
    sub = retrieval_metrics(new[group], labels[group],
                            _stored(index)[1], labels, query_ids=keys[group], gallery_ids=keys)
    _assert_same(got.metrics(group), sub, 1e-12)
    with pytest.raises(ValueError, match="rows mask"):
        got.metrics(group[:5])


def test_fast_map_is_certified_and_tolerance_zero_is_float64():
    """Without re-scoring, |mAP - float64 mAP| stays within the mean certified bound; with
    tolerance 0 every row with a key collision is scored in float64: equal to the reference.
    Near-equal scores are made on purpose (vectors differing in the last float32 bits)."""
    rng = np.random.default_rng(3)
    base, labels = _clustered(300, 6, seed=4, classes=3)
    x = np.concatenate([base, base + rng.normal(scale=1e-7, size=base.shape)])  # near-duplicates
    labels = np.concatenate([labels, rng.integers(0, 3, 300)])
    keys = np.arange(600, dtype=np.int64)
    index = ShardedGalleryIndex(6, num_shards=2).build(keys, x)
    skeys, stored = _stored(index)
    ref = retrieval_metrics(x, labels, stored, labels, query_ids=keys, gallery_ids=skeys)
    loose = evaluate_index(index, x, labels, (keys, labels), query_keys=keys,
                           tolerance=float("inf"))
    counted = loose.n_relevant > 0
    assert loose.rows_scored_float64 == 0 and loose.ap_error_bound.max() > 0
    assert abs(loose.metrics()["mAP"] - ref["mAP"]) <= loose.ap_error_bound[counted].mean() + 1e-15
    exact = evaluate_index(index, x, labels, (keys, labels), query_keys=keys, tolerance=0)
    assert exact.rows_scored_float64 > 0 and exact.ap_error_bound.max() == 0
    _assert_same(exact.metrics(), ref, 1e-12)
    default = evaluate_index(index, x, labels, (keys, labels), query_keys=keys)
    assert default.ap_error_bound.max() <= 1e-7
    _assert_same(default.metrics(), ref, 1e-7)


def test_cmc_from_candidates_counts_ties_at_the_kth_place_like_the_metric():
    """Many exact duplicates: ties straddle the candidate cut, so some queries are decided on
    their full row; top-k still equals the metric's definition (ties in the query's favour)."""
    rng = np.random.default_rng(12)
    pool = rng.normal(size=(6, 4))
    x = pool[rng.integers(0, 6, 400)]                    # 6 distinct vectors, 400 items
    labels = rng.integers(0, 5, 400)
    keys = np.arange(400, dtype=np.int64)
    index = ShardedGalleryIndex(4, num_shards=3).build(keys, x)
    got = evaluate_index(index, x, labels, (keys, labels), query_keys=keys, topk=(1, 2, 5))
    ref = retrieval_metrics(x, labels, _stored(index)[1], labels,
                            query_ids=keys, gallery_ids=keys, topk=(1, 2, 5))
    _assert_same(got.metrics(), ref, 1e-12)
    assert got.rows_cmc_full > 0                         # the fallback was exercised


# ----------------------------------------------------------------------------- recall
def _recall_by_hand(index, x, keys, k):
    """recall@k of the approximate search: share of its k best (query excluded) whose float64
    score reaches the exact k-th best score."""
    skeys, stored = _stored(index)
    g = stored.astype(np.float64)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = np.asarray(x, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ g.T
    col = {int(key): i for i, key in enumerate(skeys)}
    _, approx = index.search(x, k + 1)
    out = []
    for r, key in enumerate(keys):
        row = s[r].copy()
        row[col[int(key)]] = -np.inf
        kth = np.sort(row)[::-1][k - 1]
        hits = [a for a in approx[r] if a >= 0 and a != key][:k]
        out.append(sum(row[col[int(a)]] >= kth for a in hits) / k)
    return float(np.mean(out))


@pytest.mark.parametrize("kind,params", [("ivf", dict(nlist=16, nprobe=1)),
                                         ("hnsw", dict(m=4, ef_search=4, ef_construction=8))])
def test_recall_of_approximate_index_matches_a_brute_force_count(kind, params):
    x, labels = _clustered(600, DIM, seed=21)
    keys = np.arange(600, dtype=np.int64)
    sources = np.where(keys % 3 == 0, "new", "transformed").astype(object)
    index = ShardedGalleryIndex(DIM, spec=IndexSpec(kind=kind, num_shards=2, **params))
    index.build(keys, x, sources=sources)
    got = evaluate_index(index, x, labels, (keys, labels), query_keys=keys, recall_at=(10, 3),
                         gallery_key_sources=(keys, sources))
    rec = got.recall_metrics()
    assert rec["recall_at_10"] == pytest.approx(_recall_by_hand(index, x, keys, 10), abs=1e-12)
    assert rec["recall_at_3"] == pytest.approx(_recall_by_hand(index, x, keys, 3), abs=1e-12)
    assert rec["recall_at_10"] < 1.0                     # a cheap index loses something
    found, expected = got.recall_by_source[10]["new"]
    assert 0 < found <= expected and rec["recall_at_10_new"] == pytest.approx(found / expected)
    assert {"recall_at_10_new", "recall_at_10_transformed"} <= set(rec)
    # the exact metrics do not depend on the approximate part
    flat = evaluate_index(ShardedGalleryIndex(DIM, num_shards=2).build(keys, x), x, labels,
                          (keys, labels), query_keys=keys, recall_at=(10,))
    _assert_same(got.metrics(), flat.metrics(), 1e-12)
    assert flat.recall_metrics() == {}


def test_exhaustive_ivf_has_full_recall():
    x, labels = _clustered(300, DIM, seed=2)
    keys = np.arange(300, dtype=np.int64)
    index = ShardedGalleryIndex(DIM, spec=IndexSpec(kind="ivf", num_shards=2, nlist=4, nprobe=4))
    index.build(keys, x)
    got = evaluate_index(index, x, labels, (keys, labels), query_keys=keys, recall_at=(5,))
    assert got.recall_metrics() == {"recall_at_5": 1.0, "recall_at_5_all": 1.0}


# ----------------------------------------------------------------------------- bad input
def test_validation_names_what_is_wrong():
    index = ShardedGalleryIndex(DIM).build(np.arange(6), np.random.default_rng(0).normal(size=(6, DIM)))
    q = np.ones((2, DIM))
    pair = (np.arange(6), np.zeros(6))
    with pytest.raises(ValueError, match=r"no label for indexed keys \[4, 5\]"):
        evaluate_index(index, q, [0, 1], {0: 0, 1: 0, 2: 1, 3: 1})
    with pytest.raises(ValueError, match=rf"query_emb: expected dim {DIM} .*got 4"):
        evaluate_index(index, np.ones((2, 4)), [0, 1], pair)
    bad = np.ones((3, DIM))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"query_emb has NaN or infinite values for rows \[2\]"):
        evaluate_index(index, bad, [0, 1, 2], pair)
    with pytest.raises(ValueError, match="query_labels"):
        evaluate_index(index, q, [0], pair)
    with pytest.raises(ValueError, match="query_keys has 3 entries"):
        evaluate_index(index, q, [0, 1], pair, query_keys=[0, 1, 2])
    with pytest.raises(ValueError, match="topk"):
        evaluate_index(index, q, [0, 1], pair, topk=(0,))
    for kwargs, name in ((dict(block_size=0), "block_size"), (dict(threads=0), "threads"),
                         (dict(tolerance=-1.0), "tolerance")):
        with pytest.raises(ValueError, match=name):
            evaluate_index(index, q, [0, 1], pair, **kwargs)
    ivf = ShardedGalleryIndex(DIM, spec=IndexSpec(kind="ivf", num_shards=1)).build(
        np.arange(6), np.random.default_rng(0).normal(size=(6, DIM)))
    with pytest.raises(ValueError, match="recall_at entry"):
        evaluate_index(ivf, q, [0, 1], pair, recall_at=(0,))
    with pytest.raises(ValueError, match=r"no source for indexed keys \[5\]"):
        evaluate_index(ivf, q, [0, 1], pair, recall_at=(2,),
                       gallery_key_sources=(np.arange(5), ["new"] * 5))


def test_empty_index_and_all_missing_labels():
    index = ShardedGalleryIndex(4)
    got = evaluate_index(index, np.ones((3, 4)), [1, 2, 3], {})
    assert got.metrics()["n_queries"] == 0 and np.isnan(got.metrics()["mAP"])
    index.build([0, 1], np.eye(2, 4))
    got = evaluate_index(index, np.ones((2, 4)), [None, 5], {0: 1, 1: 2})
    assert got.metrics()["n_queries"] == 0 and np.isnan(got.metrics()["top1"])


@pytest.mark.parametrize("num_shards,threads", [(1, 1), (3, 2)])
def test_l2_space_equals_retrieval_metrics_by_l2_with_ties(num_shards, threads):
    """evaluation.distance=l2: the sharded search ranks by raw L2 distance exactly as the
    float64 scorer does (ties and leave-one-out included), and differs from cosine."""
    from fastfill_udfs.faiss_index import VectorSpace

    n = 800
    x, labels = _tied_gallery(n, 10, seed=11)
    x = x * np.random.default_rng(12).uniform(0.5, 3.0, size=(n, 1))   # norms matter for L2
    x32 = x.astype(np.float32).astype(np.float64)
    keys = np.arange(n, dtype=np.int64) * 2 + 5
    index = ShardedGalleryIndex(10, num_shards=num_shards,
                                space=VectorSpace("l2")).build(keys, x)
    assert index.index_dim == 11
    got = evaluate_index(index, x32, labels, dict(zip(keys.tolist(), labels)), query_keys=keys,
                         topk=(1, 5), block_size=100, threads=threads).metrics()
    ref = retrieval_metrics(x32, labels, x32, labels, query_ids=keys, gallery_ids=keys,
                            topk=(1, 5), distance="l2")
    _assert_same(got, ref, 1e-9)
    cosine = retrieval_metrics(x32, labels, x32, labels, query_ids=keys, gallery_ids=keys,
                               topk=(1, 5))
    assert abs(cosine["mAP"] - ref["mAP"]) > 1e-4
    with pytest.raises(ValueError, match="evaluation.distance"):
        VectorSpace("manhattan")
