"""Mixed-gallery calibration: the fit recovers a built-in offset between the sources and
improves a mixed gallery on fresh data; the augmented vectors make an exact inner-product
index (faiss) rank exactly like the calibrated scores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastfill_udfs.calibration import (augment_gallery, augment_queries, augmented_dim,
                                       calibrated_scores, check_calibration, fit_calibration,
                                       identity_calibration, item_correction)
from fastfill_udfs.metrics import ranked_metrics, retrieval_metrics, similarity_scores


def _draw(seed, n=400, d=12, classes=6):
    """New: class clusters. Transformed: shrunk towards the origin and noisier (so new-vs-new
    scores run higher than new-vs-transformed ones), much noisier for a known third
    (sigma says which)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = np.random.default_rng(99).normal(size=(classes, d)) * 2.0
    new = centres[labels] + rng.normal(size=(n, d))
    bad = rng.random(n) < 0.33
    sigma = np.where(bad, 3.0, 1.0) * np.exp(rng.normal(scale=0.1, size=n))
    transformed = 0.6 * new + np.where(bad, 1.5, 1.0)[:, None] * rng.normal(size=(n, d))
    return new, transformed, labels, np.arange(n), sigma


@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("neighbourhood", [1.0, 0.3])
def test_fit_improves_a_mixed_gallery_on_fresh_data(distance, neighbourhood):
    new, tr, labels, ids, sigma = _draw(0)
    p = fit_calibration(new, labels, new, tr, labels, distance=distance, query_ids=ids,
                        gallery_ids=ids, neighbourhood=neighbourhood)
    assert json.loads(json.dumps(p)) == p                 # JSON-able, storable with h
    new2, tr2, labels2, ids2, _ = _draw(1)
    half = np.random.default_rng(2).random(len(labels2)) < 0.5
    mixed = np.where(half[:, None], new2, tr2)
    scale, bias = item_correction(p, ~half)
    kw = dict(query_ids=ids2, gallery_ids=ids2, distance=distance)
    plain = retrieval_metrics(new2, labels2, mixed, labels2, **kw)["mAP"]
    fixed = retrieval_metrics(new2, labels2, mixed, labels2, gallery_scale=scale,
                              gallery_bias=bias, **kw)["mAP"]
    assert fixed > plain + 0.002
    # pure galleries are unchanged: t=1 has no transformed item; at t=0 one source only
    # changes by a positive scale and a constant bias, which keeps every ranking
    s0, b0 = item_correction(p, np.ones(len(labels2), bool))
    assert retrieval_metrics(new2, labels2, tr2, labels2, gallery_scale=s0, gallery_bias=b0,
                             **kw)["mAP"] == pytest.approx(
        retrieval_metrics(new2, labels2, tr2, labels2, **kw)["mAP"], abs=1e-9)


def _planted(seed, n=800, d=64):
    """l2: transformed items sit off their new vector by an offset with |offset|^2 =
    8 log(sigma), nearly orthogonal to everything in 64 dims: a transformed item scores
    ~8 log(sigma) below its new score, so a new negative can outrank it more easily."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n)
    new = 0.5 * np.random.default_rng(99).normal(size=(8, d))[labels] + rng.normal(size=(n, d))
    sigma = np.exp(rng.uniform(0.0, 3.0, n))
    offset = rng.normal(size=(n, d))
    offset *= (np.sqrt(8.0 * np.log(sigma)) / np.linalg.norm(offset, axis=1))[:, None]
    return new, new + 0.3 * rng.normal(size=(n, d)) + offset, labels, np.arange(n), sigma


def test_sigma_term_corrects_a_planted_offset():
    new, tr, labels, ids, sigma = _planted(0)
    kw = dict(distance="l2", query_ids=ids, gallery_ids=ids)
    p0 = fit_calibration(new, labels, new, tr, labels, **kw)
    p = fit_calibration(new, labels, new, tr, labels, sigma=sigma, use_sigma=True, **kw)
    assert p["sigma_weight"] > 0                          # adds back what the offset took
    scale, bias = item_correction(p, np.ones(3, bool), sigma=np.array([1.0, 2.0, 4.0]))
    assert bias[0] < bias[1] < bias[2] and np.all(scale == p["scale"])
    with pytest.raises(ValueError, match="sigma"):
        item_correction(p, np.ones(3, bool))
    # on fresh data, a half-backfilled gallery ranks best with the sigma term
    new2, tr2, labels2, ids2, sigma2 = _planted(1)
    is_t = np.random.default_rng(2).random(len(labels2)) < 0.5
    mixed = np.where(is_t[:, None], tr2, new2)
    kw2 = dict(distance="l2", query_ids=ids2, gallery_ids=ids2)

    def m(params):
        sc, bi = item_correction(params, is_t, sigma2)
        return retrieval_metrics(new2, labels2, mixed, labels2, gallery_scale=sc,
                                 gallery_bias=bi, **kw2)["mAP"]
    assert m(p) > m(p0) + 0.002 and m(p) > m(identity_calibration("l2")) + 0.002


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_augmented_inner_product_index_ranks_like_calibrated_scores(distance):
    faiss = pytest.importorskip("faiss")
    new, tr, labels, ids, sigma = _draw(3, n=300)
    p = {**identity_calibration(distance), "scale": 0.8,
         "bias": 0.15 if distance == "cosine" else 4.0,
         "sigma_weight": -0.05 if distance == "cosine" else -1.5}
    is_t = np.random.default_rng(4).random(len(labels)) < 0.5
    gallery = np.where(is_t[:, None], tr, new)
    want = calibrated_scores(p, similarity_scores(new, gallery, distance=distance), is_t, sigma)
    qa = augment_queries(p, new)
    ga = augment_gallery(p, gallery, is_t, sigma)
    assert qa.shape[1] == ga.shape[1] == augmented_dim(p, new.shape[1])
    index = faiss.IndexFlatIP(ga.shape[1])
    index.add(ga)
    d, i = index.search(qa, len(gallery))
    # the index returns the calibrated scores, hence their ranking
    got_scores = np.take_along_axis(want, i, axis=1)
    assert d == pytest.approx(got_scores, rel=1e-4, abs=1e-3 * np.abs(want).max())
    assert np.all(np.diff(got_scores, axis=1) <= 1e-3 * np.abs(want).max())
    # and the metrics of the index ranking equal the exact calibrated metrics
    match = labels[i] == labels[:, None]
    valid = i != np.arange(len(labels))[:, None]
    n_rel = np.bincount(labels)[labels] - 1
    scale, bias = item_correction(p, is_t, sigma)
    exact = retrieval_metrics(new, labels, gallery, labels, query_ids=ids, gallery_ids=ids,
                              distance=distance, gallery_scale=scale, gallery_bias=bias)
    assert ranked_metrics(d, match, n_rel, valid=valid) == pytest.approx(exact, abs=1e-6)


def test_identity_changes_nothing_and_bad_params_are_named():
    p = identity_calibration("l2")
    s = np.arange(6.0).reshape(2, 3)
    assert calibrated_scores(p, s, np.array([True, False, True])) == pytest.approx(s)
    with pytest.raises(ValueError, match="scale"):
        check_calibration({**p, "scale": 0.0})
    with pytest.raises(ValueError, match="distance"):
        check_calibration({**p, "distance": "dot"})
    with pytest.raises(ValueError, match="version"):
        check_calibration({**p, "version": 99})
    with pytest.raises(ValueError, match="lack"):
        check_calibration({"version": 1})
    with pytest.raises(ValueError, match="is_transformed"):
        item_correction(p, np.array([1, 0]))
    with pytest.raises(ValueError, match="use_sigma"):
        fit_calibration(np.eye(2), [0, 1], np.eye(2), np.eye(2), [0, 1], use_sigma=True)
