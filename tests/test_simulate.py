"""Backfilling curve and its area."""
from __future__ import annotations

import numpy as np
import pytest

from fastfill_udfs.metrics import retrieval_metrics
from fastfill_udfs.policies import assign_batches, order_scores, rank_order
from fastfill_udfs.simulate import backfill_curve, curve_auc, curve_mean, fraction_to_reach


# ----------------------------------------------------------------------------- curve_auc
def test_auc_of_known_curves():
    assert curve_auc([0, 1], [0.7, 0.7]) == pytest.approx(0.7)
    assert curve_auc(np.linspace(0, 1, 11), np.linspace(0, 1, 11)) == pytest.approx(0.5)
    assert curve_auc([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.25 + 0.5)


def test_auc_uneven_spacing():
    # a linear curve stays exact with uneven points (the last batch is short)
    x = np.array([0.0, 0.3, 0.6, 0.9, 1.0])
    assert curve_auc(x, 0.2 + 0.5 * x) == pytest.approx(0.2 + 0.25)
    # step up at t=0.9: widths 0.9 and 0.1 -> 0.9*0 + 0.1*(0+1)/2
    assert curve_auc([0.0, 0.9, 1.0], [0.0, 0.0, 1.0]) == pytest.approx(0.05)


@pytest.mark.parametrize("x, y, word", [
    ([0.1, 1.0], [0, 1], "start at 0"),
    ([0.0, 0.9], [0, 1], "end at 1"),
    ([0.0, 0.6, 0.4, 1.0], [0, 1, 1, 1], "sorted"),
    ([0.0, 1.0], [0, 1, 2], "values"),
    ([0.0, 1.0], [0, np.nan], "values"),
    ([1.0], [1.0], "fractions"),
])
def test_auc_errors(x, y, word):
    with pytest.raises(ValueError, match=word):
        curve_auc(x, y)


# ----------------------------------------------------------------------------- backfill_curve
@pytest.fixture(scope="module")
def gallery():
    """New embeddings: tight class clusters. Transformed: half exact, half ruined."""
    rng = np.random.default_rng(0)
    n, d, classes = 240, 16, 6
    labels = np.repeat(np.arange(classes), n // classes)
    centres = rng.normal(size=(classes, d)) * 3
    new = centres[labels] + rng.normal(size=(n, d))
    transformed = new.copy()
    bad = rng.permutation(n)[: n // 2]
    transformed[bad] = rng.normal(size=(len(bad), d)) * 3     # uninformative
    ids = np.array([f"g{i:03d}" for i in range(n)])
    return new, transformed, labels, ids


def _curve(g, order, **kw):
    new, transformed, labels, ids = g
    return backfill_curve(order, transformed, new, new, labels, labels,
                          query_ids=ids, gallery_ids=ids, **kw)


def test_curve_end_points_equal_pure_galleries(gallery):
    new, transformed, labels, ids = gallery
    df = _curve(gallery, np.arange(len(new)))
    assert list(df.columns) == ["backfill_fraction", "n_backfilled", "mAP", "top1", "top5"]
    np.testing.assert_allclose(df["backfill_fraction"], np.linspace(0, 1, 11))
    assert df["n_backfilled"].tolist() == [round(0.1 * i * len(new)) for i in range(11)]
    t0 = retrieval_metrics(new, labels, transformed, labels, query_ids=ids, gallery_ids=ids)
    t1 = retrieval_metrics(new, labels, new, labels, query_ids=ids, gallery_ids=ids)
    for key in ("mAP", "top1", "top5"):
        assert df[key].iloc[0] == pytest.approx(t0[key], abs=1e-12)
        assert df[key].iloc[-1] == pytest.approx(t1[key], abs=1e-12)
    assert t1["mAP"] > t0["mAP"] + 0.1                      # the case is not degenerate


def test_perfect_order_beats_reversed(gallery):
    new, transformed, labels, ids = gallery
    scores = order_scores("oracle", transformed=transformed, new=new)
    best = rank_order(scores, ids)
    good = _curve(gallery, best, fractions=[0, 0.25, 0.5, 0.75, 1.0])
    bad = _curve(gallery, best[::-1], fractions=[0, 0.25, 0.5, 0.75, 1.0])
    auc_good = curve_auc(good["backfill_fraction"], good["mAP"])
    auc_bad = curve_auc(bad["backfill_fraction"], bad["mAP"])
    assert auc_good > auc_bad + 0.05
    # the good order has fixed every ruined item by t=0.5: at new/new level from there on
    assert good["mAP"].iloc[2] > bad["mAP"].iloc[2]
    assert good["mAP"].iloc[0] == pytest.approx(bad["mAP"].iloc[0], abs=1e-12)


def test_curve_at_batch_boundaries(gallery):
    new, transformed, labels, ids = gallery
    n = len(new)
    order = np.random.default_rng(1).permutation(n)
    batches = assign_batches(n, batch_size=100)              # 100, 100, 40
    df = _curve(gallery, order, batch_ids=batches)
    assert df["batch_id"].tolist() == [0, 1, 2, 3]
    assert df["n_backfilled"].tolist() == [0, 100, 200, 240]
    np.testing.assert_allclose(df["backfill_fraction"], [0, 100 / n, 200 / n, 1.0])
    partial = transformed.copy()
    partial[order[:200]] = new[order[:200]]
    want = retrieval_metrics(new, labels, partial, labels, query_ids=ids, gallery_ids=ids)
    assert df["mAP"].iloc[2] == pytest.approx(want["mAP"], abs=1e-12)


def test_fraction_rounding(gallery):
    new = gallery[0]
    df = _curve(gallery, np.arange(len(new)), fractions=[0.0, 0.5 / len(new), 0.3, 1.0])
    assert df["n_backfilled"].tolist() == [0, 1, 72, len(new)]   # halves round up


def test_curve_errors(gallery):
    new, transformed, labels, ids = gallery
    n = len(new)
    with pytest.raises(ValueError, match="order"):
        _curve(gallery, np.zeros(n, dtype=int))
    with pytest.raises(ValueError, match="not both"):
        _curve(gallery, np.arange(n), fractions=[0, 1], batch_ids=np.ones(n, dtype=int))
    with pytest.raises(ValueError, match="batch_ids"):
        _curve(gallery, np.arange(n), batch_ids=np.arange(n)[::-1])
    with pytest.raises(ValueError, match="fractions"):
        _curve(gallery, np.arange(n), fractions=[0, 1.5])
    with pytest.raises(ValueError, match="new_gallery"):
        backfill_curve(np.arange(n), transformed, new[:-1], new, labels, labels)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_corrected_curve_keeps_end_points_and_scores_mixed_points(gallery, distance):
    new, transformed, labels, ids = gallery
    n = len(new)
    order = np.random.default_rng(2).permutation(n)
    bias = np.random.default_rng(3).normal(size=n) * (0.2 if distance == "cosine" else 20.0)
    df = _curve(gallery, order, fractions=[0, 0.5, 1.0], distance=distance,
                transformed_scale=0.7, transformed_bias=bias)
    plain = _curve(gallery, order, fractions=[0, 0.5, 1.0], distance=distance)
    # t=1: every item is new, the correction is gone
    assert df["mAP"].iloc[-1] == pytest.approx(plain["mAP"].iloc[-1], abs=1e-12)
    # t=0.5: backfilled items plain, the others corrected
    k = int(df["n_backfilled"].iloc[1])
    mixed, scale, b = transformed.copy(), np.full(n, 0.7), bias.copy()
    mixed[order[:k]], scale[order[:k]], b[order[:k]] = new[order[:k]], 1.0, 0.0
    want = retrieval_metrics(new, labels, mixed, labels, query_ids=ids, gallery_ids=ids,
                             distance=distance, gallery_scale=scale, gallery_bias=b)
    assert df["mAP"].iloc[1] == pytest.approx(want["mAP"], abs=1e-12)
    assert df["mAP"].iloc[1] != pytest.approx(plain["mAP"].iloc[1], abs=1e-6)


def test_curve_mean_and_fraction_to_reach():
    assert curve_mean([0.5, 0.7, 0.9]) == pytest.approx(0.7)
    x = [0.0, 0.25, 0.5, 0.75, 1.0]
    y = [0.70, 0.76, 0.795, 0.80, 0.80]
    assert fraction_to_reach(x, y, 0.80, 0.005) == 0.5
    assert fraction_to_reach(x, y, 0.80) == 0.75
    assert np.isnan(fraction_to_reach(x, y, 0.90, 0.005))
    with pytest.raises(ValueError, match="tolerance"):
        fraction_to_reach(x, y, 0.8, -1)
    with pytest.raises(ValueError, match="values"):
        curve_mean([])
