"""Reachability analysis: the per-item benefit is the exact mAP change, the greedy ceiling beats
random order, the statistics see a mixed-gallery penalty where one is built in."""
from __future__ import annotations

import numpy as np
import pytest

from fastfill_udfs.metrics import retrieval_metrics
from fastfill_udfs.reachability import (greedy_order, item_map_benefit, item_top1_benefit,
                                        per_class_map,
                                        similarity_stats)
from fastfill_udfs.simulate import backfill_curve, curve_auc


@pytest.fixture(scope="module")
def data():
    """New embeddings: class clusters; transformed: new plus noise, larger for a third."""
    rng = np.random.default_rng(0)
    n, d = 150, 8
    labels = rng.integers(0, 5, n)
    new = rng.normal(size=(n, d)) + 2.5 * np.eye(5, d)[labels]
    noise = np.where(rng.random(n) < 0.33, 2.0, 0.5)[:, None]
    transformed = 0.8 * new + noise * rng.normal(size=(n, d))
    return new, transformed, labels, np.arange(n)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_item_benefit_is_the_exact_map_change(data, distance):
    new, transformed, labels, ids = data
    rng = np.random.default_rng(1)
    n = len(labels)
    current = transformed.copy()
    current[:20] = new[:20]                               # a mixed gallery: 20 already new
    scale = np.where(np.arange(n) < 20, 1.0, rng.uniform(0.7, 1.3, n))
    bias = np.where(np.arange(n) < 20, 0.0, rng.normal(size=n) * (0.1 if distance == "cosine" else 2))
    got = item_map_benefit(new, labels, current, new, labels, query_ids=ids, gallery_ids=ids,
                           distance=distance, current_scale=scale, current_bias=bias,
                           block_size=37)
    kw = dict(query_ids=ids, gallery_ids=ids, distance=distance, topk=(1,))
    base = retrieval_metrics(new, labels, current, labels, gallery_scale=scale,
                             gallery_bias=bias, **kw)["mAP"]
    for j in list(range(0, n, 7)) + [3, 19]:
        g, sc, bi = current.copy(), scale.copy(), bias.copy()
        g[j], sc[j], bi[j] = new[j], 1.0, 0.0
        m = retrieval_metrics(new, labels, g, labels, gallery_scale=sc, gallery_bias=bi, **kw)
        assert got[j] == pytest.approx(m["mAP"] - base, abs=1e-12)
    assert np.all(got[:20] == 0.0)                        # already new: nothing to gain
    assert np.abs(got).max() > 1e-4


def test_greedy_order_beats_random(data):
    new, transformed, labels, ids = data
    order = greedy_order(new, labels, transformed, new, labels, batch_size=30, query_ids=ids,
                         gallery_ids=ids)
    assert np.array_equal(np.sort(order), np.arange(len(labels)))
    fr = np.linspace(0, 1, 6)

    def auc(o):
        c = backfill_curve(o, transformed, new, new, labels, labels, fractions=fr,
                           query_ids=ids, gallery_ids=ids, topk=(1,))
        return curve_auc(c.backfill_fraction, c.mAP)
    rand = np.mean([auc(np.random.default_rng(s).permutation(len(labels))) for s in range(3)])
    assert auc(order) > rand + 0.01
    with pytest.raises(ValueError, match="batch_size"):
        greedy_order(new, labels, transformed, new, labels, batch_size=0)


def test_similarity_stats_show_the_penalty(data):
    new, transformed, labels, ids = data
    st = similarity_stats(new, labels, new, transformed, labels, query_ids=ids, gallery_ids=ids)
    assert set(st["source"]) == {"new", "transformed"}
    pos = st[st.pairs == "positive"].set_index("source")
    neg = st[st.pairs == "negative"].set_index("source")
    assert pos.loc["new", "mean"] > neg.loc["new", "mean"]
    # transformed positives lose more often to new negatives than new positives do
    assert pos.loc["transformed", "auc_vs_new_negatives"] < pos.loc["new", "auc_vs_new_negatives"]
    assert 0.5 < pos.loc["new", "auc_vs_same_source_negatives"] <= 1.0


def test_per_class_map_averages_to_the_overall_map(data):
    new, transformed, labels, ids = data
    per = per_class_map(new, labels, transformed, labels, query_ids=ids, gallery_ids=ids)
    counts = np.bincount(labels)
    overall = retrieval_metrics(new, labels, transformed, labels, query_ids=ids,
                                gallery_ids=ids)["mAP"]
    assert list(per.index) == list(range(5))
    assert np.average(per.to_numpy(), weights=counts) == pytest.approx(overall, abs=1e-12)
    with pytest.raises(ValueError, match="distance"):
        per_class_map(new, labels, transformed, labels, distance="dot")


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_item_top1_benefit_is_the_exact_top1_change(data, distance):
    new, transformed, labels, ids = data
    current = transformed.copy()
    current[:20] = new[:20]
    got = item_top1_benefit(new, labels, current, new, labels, query_ids=ids, gallery_ids=ids,
                            distance=distance, block_size=41)
    kw = dict(query_ids=ids, gallery_ids=ids, distance=distance, topk=(1,))
    base = retrieval_metrics(new, labels, current, labels, **kw)["top1"]
    for j in range(0, len(labels), 5):
        g = current.copy()
        g[j] = new[j]
        assert got[j] == pytest.approx(retrieval_metrics(new, labels, g, labels, **kw)["top1"]
                                       - base, abs=1e-12)
    assert np.abs(got).max() > 0
