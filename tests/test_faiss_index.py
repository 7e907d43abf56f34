"""ShardedGalleryIndex: build / upsert / search (exact and approximate), the vector space hook,
save / load."""
from __future__ import annotations

import numpy as np
import pytest

from fastfill_udfs.faiss_index import IndexSpec, ShardedGalleryIndex, VectorSpace

DIM = 16


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


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


# ----------------------------------------------------------------------------- approximate kinds
EXHAUSTIVE = {"ivf": dict(nlist=4, nprobe=4), "hnsw": dict(m=16, ef_search=400)}


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_follows_upserts_and_equals_exact_when_exhaustive(kind):
    """After builds and upserts (present and new keys) an exhaustive approximate search (all
    lists probed / a wide beam) returns what the exact flat stores return, and the flat stores
    stay the ground truth (exact=True)."""
    keys, x = _data(400)
    rng = np.random.default_rng(11)
    spec = IndexSpec(kind=kind, num_shards=2, **EXHAUSTIVE[kind])
    index = ShardedGalleryIndex(DIM, spec=spec).build(keys[:300], x[:300])
    changed = rng.choice(300, size=80, replace=False)
    y = rng.normal(size=(80, DIM))
    index.upsert(keys[changed], y)                                 # replace
    index.upsert(keys[300:], x[300:])                              # append
    ref = ShardedGalleryIndex(DIM, num_shards=2).build(
        keys, np.concatenate([np.where(np.isin(np.arange(300), changed)[:, None],
                                       _replace(x[:300], changed, y), x[:300]), x[300:]]))
    q = rng.normal(size=(30, DIM))
    s_ref, k_ref = ref.search(q, 10)
    s_app, k_app = index.search(q, 10)                            # approximate by default
    s_ex, k_ex = index.search(q, 10, exact=True)
    np.testing.assert_array_equal(k_ex, k_ref)
    np.testing.assert_array_equal(k_app, k_ref)
    np.testing.assert_allclose(s_app, s_ref, atol=1e-5)
    assert index.ntotal == 400 and len(np.unique(index.keys())) == 400
    stats = index.approximate_stats()
    if kind == "hnsw":                                             # replaced nodes stay as tombstones
        assert stats["tombstones"] == 80
    else:
        assert all(n >= 1 for n in stats["nlist_per_shard"])


def _replace(x, rows, y):
    out = x.copy()
    out[rows] = y
    return out


def test_flat_index_has_no_approximate_search():
    keys, x = _data(20)
    index = ShardedGalleryIndex(DIM, num_shards=2).build(keys, x)
    with pytest.raises(ValueError, match="flat"):
        index.search(x[:2], 3, exact=False)


def test_index_spec_names_the_config_keys():
    for bad, key in ((dict(kind="annoy"), "evaluation.index"), (dict(num_shards=0), "num_shards"),
                     (dict(nprobe=0), "evaluation.ivf.nprobe"), (dict(m=1), "evaluation.hnsw.m"),
                     (dict(ef_search=True), "evaluation.hnsw.ef_search")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            IndexSpec(**bad)
    from fastfill_udfs.config import load_config

    cfg = load_config([], ["evaluation.index=hnsw", "evaluation.hnsw.m=8", "evaluation.num_shards=3"])
    spec = IndexSpec.from_config(cfg)
    assert (spec.kind, spec.m, spec.num_shards) == ("hnsw", 8, 3) and spec.approximate
    assert "hnsw" in spec.describe()
    with pytest.raises(ValueError, match="evaluation.distance"):
        VectorSpace("manhattan")


class _CalibratedSpace(VectorSpace):
    """What issue 10's calibration looks like through the hook: transformed rows scaled and one
    constant coordinate appended (queries get the matching one)."""

    def index_dim(self, dim):
        return dim + 1

    def index_vectors(self, embeddings, source=None):
        x = super().index_vectors(embeddings)
        scale = np.where(np.asarray(source) == "transformed", 0.5, 1.0)[:, None]
        return np.ascontiguousarray(np.hstack([x * scale, np.full((len(x), 1), 0.1)]),
                                    dtype=np.float32)

    def query_vectors(self, queries):
        q = super().query_vectors(queries)
        return np.ascontiguousarray(np.hstack([q, np.ones((len(q), 1))]), dtype=np.float32)


def test_vector_space_is_the_one_place_vectors_pass_through():
    """A space that calibrates transformed rows changes what faiss stores and ranks, with no
    change to the index: sources reach it on build and upsert."""
    keys, x = _data(50)
    sources = np.where(np.arange(50) < 25, "transformed", "new").astype(object)
    index = ShardedGalleryIndex(DIM, num_shards=2, space=_CalibratedSpace())
    index.build(keys, x, sources=sources)
    assert index.index_dim == DIM + 1
    _, stored = index.reconstruct_all()
    order = np.argsort(keys)
    np.testing.assert_allclose(stored[:, -1], 0.1, rtol=1e-6)
    norms = np.linalg.norm(stored[:, :-1], axis=1)
    np.testing.assert_allclose(norms, np.where(sources[order] == "transformed", 0.5, 1.0),
                               rtol=1e-5)
    q = np.random.default_rng(5).normal(size=(4, DIM))
    scores, got = index.search(q, 50)
    expect = _unit(q).astype(np.float64) @ stored[:, :-1].T.astype(np.float64) + 0.1
    np.testing.assert_array_equal(got[:, :5], keys[order][np.argsort(-expect, axis=1)[:, :5]])
    index.upsert(keys[:3], x[:3], sources=np.array(["new"] * 3, dtype=object))
    assert np.allclose(np.linalg.norm(index.reconstruct_all()[1][np.searchsorted(
        np.sort(keys), keys[:3])][:, :-1], axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="sources has shape"):
        index.upsert(keys[:3], x[:3], sources=["new"])


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_and_load_give_the_same_index(tmp_path, kind):
    keys, x = _data(300)
    index = ShardedGalleryIndex(DIM, spec=IndexSpec(kind=kind, num_shards=3)).build(keys, x)
    index.upsert(keys[:40], x[:40] + 1.0)                         # tombstones for hnsw
    folder = index.save(tmp_path / "idx")
    back = ShardedGalleryIndex.load(folder)
    assert back.spec == index.spec and back.space == index.space
    assert back.shard_sizes() == index.shard_sizes()
    q = np.random.default_rng(1).normal(size=(20, DIM))
    for exact in ((True, None) if kind != "flat" else (None,)):
        np.testing.assert_array_equal(back.search(q, 7, exact=exact)[1],
                                      index.search(q, 7, exact=exact)[1])
    back.upsert(keys[40:60], x[40:60] * 2)                        # the lookup is rebuilt
    index.upsert(keys[40:60], x[40:60] * 2)
    np.testing.assert_array_equal(back.reconstruct_all()[1], index.reconstruct_all()[1])
    with pytest.raises(FileExistsError):
        index.save(folder)
    (folder / "shard_1.flat.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="shard_1.flat.faiss"):
        ShardedGalleryIndex.load(folder)
