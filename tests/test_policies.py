"""Ordering policies, reproducible ranking and batching."""
from __future__ import annotations

import numpy as np
import pytest

from fastfill_udfs.policies import (POLICIES, assign_batches, batch_id_for_rank, batch_sizes,
                                    fit_prototypes, prototype_margin, prototype_scores,
                                    order_scores, random_scores_for_ids, rank_order)


# ----------------------------------------------------------------------------- scores
def test_uncertainty_is_sigma_as_float64():
    sigma = np.array([0.3, 0.1, 0.9], dtype=np.float32)
    s = order_scores("uncertainty", sigma=sigma)
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, sigma.astype(np.float64))
    assert rank_order(s).tolist() == [2, 0, 1]


def test_random_is_seeded():
    a = order_scores("random", n=1000, seed=7)
    b = order_scores("random", n=1000, seed=7)
    c = order_scores("random", n=1000, seed=8)
    assert np.array_equal(a, b)
    assert np.array_equal(rank_order(a), rank_order(b))
    assert not np.array_equal(rank_order(a), rank_order(c))
    assert a.dtype == np.float64 and a.min() >= 0.0 and a.max() < 1.0
    assert len(order_scores("random", sigma=np.zeros(5))) == 5    # n inferred


def test_random_by_id_ignores_row_order():
    ids = np.array([f"img-{i}" for i in range(500)])
    perm = np.random.default_rng(0).permutation(500)
    a = order_scores("random", ids=ids, seed=3)
    b = order_scores("random", ids=ids[perm], seed=3)
    np.testing.assert_array_equal(a[perm], b)                    # same id -> same score
    assert not np.array_equal(a, random_scores_for_ids(ids, seed=4))
    assert 0.0 <= a.min() and a.max() < 1.0
    assert 0.4 < a.mean() < 0.6                                   # roughly uniform


def test_oracle_on_hand_made_vectors():
    transformed = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    new = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    s = order_scores("oracle", transformed=transformed, new=new)
    # same direction -> 0; orthogonal -> sqrt(2); 45 degrees -> sqrt(2 - sqrt(2))
    np.testing.assert_allclose(s, [0.0, np.sqrt(2.0), np.sqrt(2.0 - np.sqrt(2.0))], atol=1e-12)
    assert rank_order(s).tolist() == [1, 2, 0]


def test_policy_errors_name_the_problem():
    with pytest.raises(ValueError, match="'entropy'.*uncertainty, random, oracle"):
        order_scores("entropy", sigma=np.ones(3))
    with pytest.raises(ValueError, match="sigma"):
        order_scores("uncertainty")
    with pytest.raises(ValueError, match="sigma"):
        order_scores("uncertainty", sigma=np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match=r"\bn\b"):
        order_scores("random")
    with pytest.raises(ValueError, match="transformed"):
        order_scores("oracle", new=np.ones((2, 2)))
    with pytest.raises(ValueError, match="new"):
        order_scores("oracle", transformed=np.ones((2, 2)))
    with pytest.raises(ValueError, match="new shape"):
        order_scores("oracle", transformed=np.ones((2, 2)), new=np.ones((3, 2)))
    assert POLICIES == ("auto", "uncertainty", "random", "oracle", "prototype")


# ----------------------------------------------------------------------------- rank_order
def test_rank_order_ties_by_id_or_index():
    scores = np.array([1.0, 2.0, 2.0, 0.0, 2.0])
    assert rank_order(scores).tolist() == [1, 2, 4, 0, 3]
    ids = np.array(["b", "z", "a", "c", "m"])
    assert rank_order(scores, ids).tolist() == [2, 4, 1, 0, 3]
    assert rank_order(scores, [10, 3, 7, 1, 5]).tolist() == [1, 4, 2, 0, 3]   # numeric ids


def test_rank_order_reproducible_under_shuffle():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 20, 2000).astype(float)         # many ties
    ids = np.array([f"x{i:05d}" for i in range(2000)])
    perm = rng.permutation(2000)
    a = ids[rank_order(scores, ids)]
    b = ids[perm][rank_order(scores[perm], ids[perm])]
    np.testing.assert_array_equal(a, b)                        # same id order, any row order
    assert np.all(np.diff(scores[rank_order(scores, ids)]) <= 0)


def test_rank_order_errors():
    with pytest.raises(ValueError, match="scores"):
        rank_order(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="ids"):
        rank_order(np.array([1.0, 2.0]), ["a"])
    with pytest.raises(ValueError, match="ids"):
        rank_order(np.array([1.0, 2.0]), ["a", "a"])


# ----------------------------------------------------------------------------- batching
def test_batches_by_rows_with_short_last_batch():
    assert assign_batches(10, batch_size=4).tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert batch_sizes(10, batch_size=4).tolist() == [4, 4, 2]
    assert assign_batches(8, batch_size=4).tolist() == [1, 1, 1, 1, 2, 2, 2, 2]


def test_batches_by_count_nearly_equal():
    assert assign_batches(10, num_batches=3).tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for n in (1, 7, 10, 101):
        for k in range(1, min(n, 12) + 1):
            ids = assign_batches(n, num_batches=k)
            sizes = np.bincount(ids)[1:]
            assert sizes.tolist() == [len(a) for a in np.array_split(np.arange(n), k)]
            assert sizes.tolist() == batch_sizes(n, num_batches=k).tolist()
            assert np.all(np.diff(ids) >= 0) and ids[0] == 1 and ids[-1] == k


def test_batch_id_for_rank_scalar_and_array():
    ranks = np.array([9, 0, 4, 3])
    assert batch_id_for_rank(ranks, 10, batch_size=4).tolist() == [3, 1, 2, 1]
    assert batch_id_for_rank(ranks, 10, num_batches=3).tolist() == [3, 1, 2, 1]
    b = batch_id_for_rank(7, 10, num_batches=3)
    assert b == 3 and isinstance(b, int)
    full = assign_batches(1000, num_batches=7)
    sample = np.random.default_rng(0).integers(0, 1000, 50)
    np.testing.assert_array_equal(batch_id_for_rank(sample, 1000, num_batches=7), full[sample])


@pytest.mark.parametrize("kwargs, word", [
    ({}, "exactly one"),
    ({"batch_size": 3, "num_batches": 2}, "exactly one"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"num_batches": -1}, "num_batches"),
    ({"num_batches": 11}, "num_batches"),
])
def test_batching_errors_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        assign_batches(10, **kwargs)


def test_rank_and_n_items_errors():
    with pytest.raises(ValueError, match="rank"):
        batch_id_for_rank(10, 10, batch_size=3)
    with pytest.raises(ValueError, match="rank"):
        batch_id_for_rank(np.array([-1, 2]), 10, batch_size=3)
    with pytest.raises(ValueError, match="rank"):
        batch_id_for_rank(np.array([0.5]), 10, batch_size=3)
    with pytest.raises(ValueError, match="n_items"):
        assign_batches(-1, batch_size=3)


# ----------------------------------------------------------------------------- prototype
def test_prototypes_and_scores_hand_made():
    new = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = np.array(["a", "a", "b", "b"])
    p = fit_prototypes(new, labels)                       # cosine: unit class directions
    assert p["classes"] == ["a", "b"]
    np.testing.assert_allclose(p["prototypes"], [[1.0, 0.0], [0.0, 1.0]])
    t = np.array([[5.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    s = order_scores("prototype", transformed=t, prototypes=p)
    np.testing.assert_allclose(s, [0.0, 1 - np.sqrt(0.5), 1.0], atol=1e-12)
    assert rank_order(s).tolist() == [2, 1, 0]            # atypical first
    pl = fit_prototypes(new, labels, distance="l2")       # raw means (3, 0) and (0, 2)
    np.testing.assert_allclose(pl["prototypes"], [[3.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(prototype_scores(t, pl), [2.0, np.sqrt(2.0), np.sqrt(13.0)], atol=1e-12)
    # second-nearest minus nearest distance, e.g. (5, 0): 2 from a, sqrt(29) from b
    np.testing.assert_allclose(prototype_margin(t, pl),
                               [np.sqrt(29.0) - 2.0, np.sqrt(5.0) - np.sqrt(2.0),
                                4.0 - np.sqrt(13.0)], atol=1e-12)
    np.testing.assert_allclose(prototype_margin(t, p), [1.0, 0.0, 1.0], atol=1e-12)
    import json
    assert json.loads(json.dumps(p)) == p                  # stored with h as JSON


def test_prototype_errors_and_l2_oracle():
    with pytest.raises(ValueError, match="prototypes"):
        order_scores("prototype", transformed=np.eye(2))
    with pytest.raises(ValueError, match="dim"):
        prototype_scores(np.eye(3), fit_prototypes(np.eye(2), [0, 1]))
    with pytest.raises(ValueError, match="distance"):
        fit_prototypes(np.eye(2), [0, 1], distance="dot")
    with pytest.raises(ValueError, match="labels"):
        fit_prototypes(np.eye(2), [0, None])
    s = order_scores("oracle", transformed=np.array([[1.0, 0.0]]), new=np.array([[3.0, 0.0]]),
                     distance="l2")
    np.testing.assert_allclose(s, [2.0])
