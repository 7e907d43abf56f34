"""ShardedGalleryIndex (build / upsert / search) and evaluate_index against the exact metrics."""
from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pytest

from fastfill_udfs.faiss_index import ShardedGalleryIndex, evaluate_index
from fastfill_udfs.metrics import retrieval_metrics

DIM = 16


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """faiss's OpenMP threads spin against each other on a busy 2-core box: use one."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n, dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.choice(10 ** 9, size=n, replace=False).astype(np.int64)
    return keys, rng.normal(size=(n, dim))


# ----------------------------------------------------------------------------- build / upsert
@pytest.mark.parametrize("method", ["inplace", "remove_add"])
def test_build_and_upsert_give_the_same_search(method):
    keys, x = _data(600)
    rng = np.random.default_rng(1)
    x_new = x.copy()
    changed = rng.choice(600, size=150, replace=False)
    x_new[changed] = rng.normal(size=(150, DIM))

    full = ShardedGalleryIndex(DIM, num_shards=4).build(keys, x_new)

    inc = ShardedGalleryIndex(DIM, num_shards=4).build(keys[:400], x[:400])
    inc.upsert(keys[400:500], x_new[400:500], method=method)      # new keys only
    inc.upsert(keys[500:], x_new[500:], method=method)            # new keys only
    old = changed[changed < 400]
    for part in np.array_split(old, 3):                           # replace existing keys
        inc.upsert(keys[part], x_new[part], method=method)
    assert inc.ntotal == full.ntotal == 600

    q = rng.normal(size=(40, DIM))
    for k in (1, 7, 600, 650):
        s_full, k_full = full.search(q, k)
        s_inc, k_inc = inc.search(q, k)
        np.testing.assert_array_equal(k_inc, k_full)
        np.testing.assert_array_equal(s_inc, s_full)
    kf, vf = full.reconstruct_all()
    ki, vi = inc.reconstruct_all()
    np.testing.assert_array_equal(ki, kf)
    np.testing.assert_array_equal(vi, vf)


def test_search_is_exact_sorted_and_padded():
    keys, x = _data(300)
    index = ShardedGalleryIndex(DIM, num_shards=3).build(keys, x)
    q = np.random.default_rng(2).normal(size=(25, DIM))
    sims = _unit(q).astype(np.float64) @ _unit(x).astype(np.float64).T
    scores, got = index.search(q, 10)
    assert scores.dtype == np.float32 and got.dtype == np.int64 and scores.shape == (25, 10)
    assert np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_array_equal(got, keys[np.argsort(-sims, axis=1)[:, :10]])
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :10], atol=1e-6)

    scores, got = index.search(q, 305)                            # k > ntotal: padding
    assert np.all(got[:, 300:] == -1) and np.all(np.isneginf(scores[:, 300:]))
    assert all(set(row) == set(keys) for row in got[:, :300])

    empty = ShardedGalleryIndex(DIM)
    scores, got = empty.search(q, 3)
    assert empty.ntotal == 0 and np.all(got == -1) and np.all(np.isneginf(scores))


@pytest.mark.parametrize("method", ["inplace", "remove_add"])
def test_upsert_replaces_instead_of_duplicating(method):
    keys, x = _data(200)
    index = ShardedGalleryIndex(DIM, num_shards=4).build(keys, x)
    rng = np.random.default_rng(3)
    sel = rng.choice(200, size=50, replace=False)
    y = rng.normal(size=(50, DIM))

    index.upsert(keys[sel], y, method=method)                     # keys all present
    assert index.ntotal == 200
    got_keys, vecs = index.reconstruct_all()
    assert len(np.unique(got_keys)) == len(got_keys) == 200
    np.testing.assert_array_equal(got_keys, np.sort(keys))
    pos = np.searchsorted(got_keys, keys[sel])
    np.testing.assert_allclose(vecs[pos], _unit(y), atol=1e-7)
    untouched = np.setdiff1d(np.arange(200), sel)
    np.testing.assert_allclose(vecs[np.searchsorted(got_keys, keys[untouched])], _unit(x[untouched]),
                               atol=1e-7)
    scores, top = index.search(y, 1)                              # each new vector finds itself
    np.testing.assert_array_equal(top[:, 0], keys[sel])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)

    new_keys = np.array([10 ** 9 + 1, 10 ** 9 + 2], dtype=np.int64)  # mixed: 2 new, 3 present
    index.upsert(np.concatenate([new_keys, keys[:3]]), rng.normal(size=(5, DIM)), method=method)
    assert index.ntotal == 202
    assert len(np.unique(index.keys())) == 202


def test_upsert_into_empty_index_equals_build_and_methods_mix():
    keys, x = _data(120)
    a = ShardedGalleryIndex(DIM, num_shards=2).upsert(keys, x)
    b = ShardedGalleryIndex(DIM, num_shards=2).build(keys, x)
    np.testing.assert_array_equal(a.reconstruct_all()[1], b.reconstruct_all()[1])
    y = np.random.default_rng(4).normal(size=(30, DIM))
    a.upsert(keys[:30], y, method="remove_add")                   # positions move ...
    a.upsert(keys[10:40], x[10:40])                               # ... the in-place lookup follows
    b.upsert(keys[:10], y[:10])
    np.testing.assert_array_equal(a.reconstruct_all()[1], b.reconstruct_all()[1])


def test_shard_assignment_covers_all_keys():
    keys, x = _data(500)
    index = ShardedGalleryIndex(DIM, num_shards=4).build(keys, x)
    index.upsert(keys[:50] + 1, x[:50] * 2)                       # some new keys, other shards
    all_keys = np.union1d(keys, keys[:50] + 1)
    parts = [index.shard_keys(s) for s in range(4)]
    for s, part in enumerate(parts):
        assert np.all(part % 4 == s)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), all_keys)
    assert index.shard_sizes() == [len(p) for p in parts] and index.ntotal == len(all_keys)
    np.testing.assert_array_equal(index.keys(), all_keys)


def test_zero_vector_scores_zero():
    x = np.eye(3, DIM)
    x[1] = 0.0
    index = ShardedGalleryIndex(DIM, num_shards=2).build(np.arange(3), x)
    scores, keys = index.search(np.eye(1, DIM), 3)
    assert keys[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0)
    assert dict(zip(keys[0], scores[0]))[1] == 0.0


def test_normalisation_handles_extreme_magnitudes_and_leaves_input_alone():
    x = np.array([[1e30, 1e30, 0], [1e-30, 0, 1e-30], [0, 0, 0], [3, 4, 0]], dtype=np.float32)
    before = x.copy()
    index = ShardedGalleryIndex(3, num_shards=2).build(np.arange(4), x)
    index.upsert([9], np.array([[1e300, 0.0, 1e300]]))           # beyond float32 range
    np.testing.assert_array_equal(x, before)
    _, vecs = index.reconstruct_all()
    s = np.float32(np.sqrt(0.5))
    np.testing.assert_allclose(vecs, [[s, s, 0], [s, 0, s], [0, 0, 0], [0.6, 0.8, 0], [s, 0, s]],
                               rtol=1e-6)


# ----------------------------------------------------------------------------- validation
def test_validation_names_dim_keys_and_arguments():
    index = ShardedGalleryIndex(DIM, num_shards=2).build(np.arange(5), np.ones((5, DIM)))
    with pytest.raises(ValueError, match=rf"vectors: expected dim {DIM} .*got 5"):
        index.upsert([7], np.ones((1, 5)))
    with pytest.raises(ValueError, match=rf"queries: expected dim {DIM} .*got 3"):
        index.search(np.ones((2, 3)), 1)
    bad = np.ones((4, DIM))
    bad[1, 3] = np.nan
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"NaN or infinite.*\[11, 13\]"):
        index.upsert([10, 11, 12, 13], bad)
    with pytest.raises(ValueError, match=r"duplicate keys.*\[4, 9\]"):
        index.build([9, 4, 1, 4, 9], np.ones((5, DIM)))
    with pytest.raises(ValueError, match=r"keys must be >= 0.*\[-1\]"):
        index.upsert([-1], np.ones((1, DIM)))
    with pytest.raises(ValueError, match="keys has 2 entries, vectors has 3 rows"):
        index.upsert([1, 2], np.ones((3, DIM)))
    with pytest.raises(ValueError, match="method"):
        index.upsert([1], np.ones((1, DIM)), method="delete")
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search(np.ones((1, DIM)), 0)
    with pytest.raises(ValueError, match="num_shards"):
        ShardedGalleryIndex(DIM, num_shards=0)
    with pytest.raises(ValueError, match="dim"):
        ShardedGalleryIndex(0)
    # a failed call leaves the index as it was
    assert index.ntotal == 5
    np.testing.assert_array_equal(index.keys(), np.arange(5))


def test_evaluate_index_validation():
    index = ShardedGalleryIndex(DIM).build(np.arange(6), np.random.default_rng(0).normal(size=(6, DIM)))
    q = np.ones((2, DIM))
    with pytest.raises(ValueError, match=r"no label for indexed keys \[4, 5\]"):
        evaluate_index(index, q, [0, 1], {0: 0, 1: 0, 2: 1, 3: 1})
    with pytest.raises(ValueError, match=rf"query_emb: expected dim {DIM} .*got 4"):
        evaluate_index(index, np.ones((2, 4)), [0, 1], (np.arange(6), np.zeros(6)))
    with pytest.raises(ValueError, match="query_labels"):
        evaluate_index(index, q, [0], (np.arange(6), np.zeros(6)))
    with pytest.raises(ValueError, match="query_keys has 3 entries"):
        evaluate_index(index, q, [0, 1], (np.arange(6), np.zeros(6)), query_keys=[0, 1, 2])
    with pytest.raises(ValueError, match="topk"):
        evaluate_index(index, q, [0, 1], (np.arange(6), np.zeros(6)), topk=(0,))
    with pytest.raises(ValueError, match="block_size"):
        evaluate_index(index, q, [0, 1], (np.arange(6), np.zeros(6)), block_size=0)


# ----------------------------------------------------------------------------- evaluation
def _tied_gallery(n, dim, seed):
    """Rounded vectors drawn with repetition (exact duplicates) and copies rescaled by powers of two (exact): many ties."""
    rng = np.random.default_rng(seed)
    pool = np.round(rng.normal(size=(n // 4, dim)), 1)
    x = pool[rng.integers(0, len(pool), n)] * rng.choice([1.0, 2.0, 0.5, 4.0], size=(n, 1))
    labels = rng.integers(0, 12, n).astype(object)
    labels[rng.choice(n, size=n // 50, replace=False)] = None     # some missing labels
    return x, labels


def _assert_same(got, ref):
    assert got["n_queries"] == ref["n_queries"]
    for name in ref:
        assert got[name] == pytest.approx(ref[name], abs=1e-6), (name, got, ref)


@pytest.mark.parametrize("num_shards", [1, 4])
def test_evaluate_index_equals_retrieval_metrics_leave_one_out_with_ties(num_shards):
    n = 900
    x, labels = _tied_gallery(n, 12, seed=5)
    keys = np.random.default_rng(6).permutation(n).astype(np.int64) * 3 + 1   # sparse-ish keys
    index = ShardedGalleryIndex(12, num_shards=num_shards).build(keys, x)
    gallery = dict(zip(keys.tolist(), labels))
    ref = retrieval_metrics(x, labels, x, labels, query_ids=keys, gallery_ids=keys, topk=(1, 5, 10))
    got = evaluate_index(index, x, labels, gallery, query_keys=keys, topk=(1, 5, 10), block_size=128)
    _assert_same(got, ref)
    assert 0 < got["n_queries"] < n                               # missing labels left out
    # the ties are real: many queries have duplicates of themselves in the gallery
    s, _ = index.search(x[:50], 3)
    assert np.mean(s[:, 1] == s[:, 2]) > 0.2


def test_evaluate_index_equals_retrieval_metrics_no_loo_and_foreign_queries():
    rng = np.random.default_rng(7)
    xg, lg = _tied_gallery(700, 8, seed=8)
    xq = np.concatenate([xg[:100], np.round(rng.normal(size=(150, 8)), 1)])  # in and out of gallery
    lq = np.concatenate([lg[:100], rng.integers(0, 14, 150).astype(object)])  # labels 12,13: no match
    keys = np.arange(700, dtype=np.int64)
    index = ShardedGalleryIndex(8, num_shards=3).build(keys, xg)
    series = pd.Series(lg, index=keys)

    ref = retrieval_metrics(xq, lq, xg, lg)
    got = evaluate_index(index, xq, lq, series, block_size=64)
    _assert_same(got, ref)

    # leave-one-out where only the first 100 queries are gallery items (others: unknown keys)
    qk = np.concatenate([keys[:100], np.arange(10_000, 10_150)])
    ref = retrieval_metrics(xq, lq, xg, lg, query_ids=qk, gallery_ids=keys)
    got = evaluate_index(index, xq, lq, (keys, lg), query_keys=qk, block_size=1000)
    _assert_same(got, ref)


def test_evaluate_index_after_backfill_upsert_matches_mixed_gallery():
    """A backfill batch through upsert evaluates like the exact metrics on the mixed gallery."""
    rng = np.random.default_rng(9)
    n = 800
    old = rng.normal(size=(n, DIM))
    new = old + 0.8 * rng.normal(size=(n, DIM))
    labels = rng.integers(0, 10, n)
    keys = np.arange(n, dtype=np.int64)
    index = ShardedGalleryIndex(DIM, num_shards=4).build(keys, old)
    batch = rng.choice(n, size=200, replace=False)
    index.upsert(keys[batch], new[batch])
    mixed = old.copy()
    mixed[batch] = new[batch]
    ref = retrieval_metrics(new, labels, mixed, labels, query_ids=keys, gallery_ids=keys)
    got = evaluate_index(index, new, labels, (keys, labels), query_keys=keys)
    _assert_same(got, ref)


def test_evaluate_index_empty_and_all_missing():
    index = ShardedGalleryIndex(4)
    got = evaluate_index(index, np.ones((3, 4)), [1, 2, 3], {})
    assert got["n_queries"] == 0 and np.isnan(got["mAP"])
    index.build([0, 1], np.eye(2, 4))
    got = evaluate_index(index, np.ones((2, 4)), [None, 5], {0: 1, 1: 2})
    assert got["n_queries"] == 0 and np.isnan(got["top1"])
