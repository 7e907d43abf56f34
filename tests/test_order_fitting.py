"""Fitting h's extras on held-out pairs: the benefit head orders items by their realised
benefit, the parameters travel in h's spec, bad arguments are named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastfill_udfs.model_store import model_from_bytes, model_to_bytes
from fastfill_udfs.order_fitting import fit_h_extras, holdout_split, realised_benefit
from fastfill_udfs.policies import prototype_margin
from fastfill_udfs.reachability import item_map_benefit, item_top1_benefit
from fastfill_udfs.training import train_transformation, transform


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem():
    """Old embeddings carry the class (so h maps them near their class's new cluster), except
    where old[:, 0] > 0.6: there the class information is noise, h maps those items poorly and
    backfilling them helps most."""
    rng = np.random.default_rng(0)
    n, d_old, d_new, classes = 900, 6, 10, 4
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d_new)) * 3
    old = rng.normal(size=(n, d_old)).astype(np.float32)
    old[:, 1:1 + classes] += 2.0 * np.eye(classes)[labels]
    hard = old[:, 0] > 0.6
    new = centres[labels] + rng.normal(size=(n, d_new)) * 0.3
    old[hard, 1:1 + classes] = rng.normal(size=(int(hard.sum()), classes))   # class unclear
    new = new.astype(np.float32)
    torch.manual_seed(0)
    clf = torch.nn.Linear(d_new, classes)
    h, _ = train_transformation(old[:500], new[:500], labels[:500], objective="fastfill",
                                new_classifier=clf, hidden_dim=32, num_hidden_layers=1,
                                epochs=40, batch_size=128, lr=5e-3, warmup_epochs=1, seed=0)
    return h, old[500:], new[500:], labels[500:], hard[500:]


def test_realised_benefit_is_map_plus_top1(problem):
    h, old, new, labels, _ = problem
    t, _ = transform(h, old)
    ids = np.arange(len(labels))
    kw = dict(query_ids=ids, gallery_ids=ids, distance="l2")
    want = item_map_benefit(new, labels, t, new, labels, **kw) \
        + 0.5 * item_top1_benefit(new, labels, t, new, labels, **kw)
    got = realised_benefit(new, labels, t, distance="l2", top1_weight=0.5)
    np.testing.assert_allclose(realised_benefit(new, labels, t, distance="l2"),
                               item_map_benefit(new, labels, t, new, labels, **kw), atol=1e-12)
    np.testing.assert_allclose(got, want, atol=1e-12)


def _rank_corr(a, b):
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def test_benefit_head_ranks_unseen_items_by_their_benefit(problem):
    h, old, new, labels, hard = problem
    h2 = fit_h_extras(h, old[::2], new[::2], labels[::2], order_head="benefit",
                      head_hidden_dim=64, distance="l2", top1_weight=0.0)
    t, joint_sigma = transform(h, old[1::2])
    benefit = realised_benefit(new[1::2], labels[1::2], t, distance="l2", top1_weight=0.0)
    assert benefit[hard[1::2]].mean() > 1.2 * benefit[~hard[1::2]].mean()   # the setting
    _, sigma = transform(h2, old[1::2])
    # sigma now orders the unseen items by predicted benefit, better than the joint head
    assert _rank_corr(sigma, benefit) > 0.3
    assert _rank_corr(sigma, benefit) > _rank_corr(joint_sigma, benefit) + 0.05
    assert h2.prototypes["distance"] == "l2" and h2.calibration is None
    assert h.prototypes is None                           # h itself is untouched


def test_extras_travel_in_the_spec(problem):
    h, old, new, labels, _ = problem
    h2 = fit_h_extras(h, old, new, labels, order_head="sigma", calibration="affine_sigma",
                      distance="cosine")
    assert h2.calibration["distance"] == "cosine" and h2.calibration["sigma_weight"] != 0.0
    back = model_from_bytes(*model_to_bytes(h2))
    assert back.calibration == h2.calibration and back.prototypes == h2.prototypes
    np.testing.assert_allclose(transform(back, old)[1], transform(h2, old)[1], rtol=1e-6)


def test_holdout_split_and_errors(problem):
    h, old, new, labels, _ = problem
    fit, held = holdout_split(labels, 0.2, seed=1)
    assert len(held) == round(0.2 * len(labels)) and len(np.intersect1d(fit, held)) == 0
    assert len(fit) + len(held) == len(labels)
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(labels, 1.0, seed=0)
    with pytest.raises(ValueError, match="order_head"):
        fit_h_extras(h, old, new, labels, order_head="entropy")
    with pytest.raises(ValueError, match="calibration"):
        fit_h_extras(h, old, new, labels, calibration="isotonic")
    with pytest.raises(ValueError, match="distance"):
        fit_h_extras(h, old, new, labels, distance="dot")
    with pytest.raises(ValueError, match="one row per held-out item"):
        fit_h_extras(h, old, new[:-1], labels)
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="order_top1_weight"):
            fit_h_extras(h, old, new, labels, top1_weight=bad)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="order_margin_weight"):
            fit_h_extras(h, old, new, labels, margin_weight=bad)


def test_margin_blend_moves_the_order_from_the_head_to_the_prototype_margin(problem):
    h, old, new, labels, _ = problem
    fit = dict(order_head="benefit", distance="l2", top1_weight=0.0)
    head = fit_h_extras(h, old[::2], new[::2], labels[::2], **fit)
    assert head.order_blend is None                        # weight 0: the head alone
    unseen = old[1::2]
    t, head_sigma = transform(head, unseen)
    margin = prototype_margin(t, head.prototypes)
    pure = fit_h_extras(h, old[::2], new[::2], labels[::2], margin_weight=1.0, **fit)
    _, pure_sigma = transform(pure, unseen)
    assert _rank_corr(pure_sigma, -margin) > 0.999         # smallest margins first
    half = fit_h_extras(h, old[::2], new[::2], labels[::2], margin_weight=0.5, **fit)
    t_half, half_sigma = transform(half, unseen)
    np.testing.assert_allclose(t_half, t, rtol=1e-6)       # the embedding is not touched
    # between the two: follows both, neither alone
    for other in (head_sigma, -margin):
        assert 0.3 < _rank_corr(half_sigma, other) < 0.995
    # the blend is the formula of its docstring, with the CDFs of the held-out items
    b = half.order_blend
    grid = np.linspace(0, 1, len(b["sigma_quantiles"]))
    u = np.interp(head_sigma, b["sigma_quantiles"], grid)
    v = 1.0 - np.interp(margin, b["margin_quantiles"], grid)
    np.testing.assert_allclose(half_sigma, 0.5 * u + 0.5 * v + 1e-6, rtol=1e-4, atol=1e-5)
    back = model_from_bytes(*model_to_bytes(half))           # travels in the spec
    assert back.order_blend == b
    np.testing.assert_allclose(transform(back, unseen)[1], half_sigma, rtol=1e-6)
