"""Training h on tiny synthetic problems: FCT fits a linear map, FastFill's uncertainty finds
the noisy items; the learning-rate schedule; input validation."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastfill_udfs.training import (OBJECTIVES, PrototypeHead, cosine_with_warmup,
                                    fit_benefit_head, fit_uncertainty_head,
                                    train_transformation, transform)


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: one thread is as fast, and far faster on a busy machine (idle
    OpenMP threads spin while waiting for a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _linear_problem(n=768, old_dim=8, new_dim=12, seed=0):
    rng = np.random.default_rng(seed)
    old = rng.standard_normal((n, old_dim)).astype(np.float32)
    a = rng.standard_normal((new_dim, old_dim)).astype(np.float32) / math.sqrt(old_dim)
    return old, (old @ a.T).astype(np.float32) * 5.0, rng


def test_fct_loss_decreases_and_h_fits_a_linear_map():
    old, new, _ = _linear_problem()
    h, hist = train_transformation(old, new, None, objective="fct", hidden_dim=64,
                                   num_hidden_layers=1, epochs=25, batch_size=128, lr=5e-3,
                                   warmup_epochs=1, seed=0)
    assert not h.has_uncertainty
    assert len(hist.loss) == 25
    assert hist.loss[-1] < 0.2 * hist.loss[0]
    pred, sigma = transform(h, old)
    assert pred.shape == new.shape and pred.dtype == np.float32
    assert np.allclose(sigma, 1.0)                     # no head: s = 0, sigma = 1
    rel_err = np.sum((pred - new) ** 2) / np.sum(new ** 2)
    assert rel_err < 0.05, rel_err                     # output back on the new model's scale
    cos = np.sum(pred * new, 1) / np.linalg.norm(pred, axis=1) / np.linalg.norm(new, axis=1)
    assert np.median(cos) > 0.97


def test_fastfill_gives_larger_sigma_to_noisy_items():
    old, new, rng = _linear_problem(n=1024)
    noisy = old[:, 0] > 0.5                            # h can tell them apart from `old`
    new = new + noisy[:, None] * rng.standard_normal(new.shape).astype(np.float32) * 15.0
    torch.manual_seed(0)
    classifier = nn.Linear(new.shape[1], 3)
    with torch.no_grad():
        labels = classifier(torch.from_numpy(new)).argmax(1).numpy()
    h, hist = train_transformation(old, new, labels, objective="fastfill",
                                   new_classifier=classifier, hidden_dim=64,
                                   num_hidden_layers=1, epochs=40, batch_size=128, lr=5e-3,
                                   warmup_epochs=1, seed=0)
    assert h.has_uncertainty
    assert hist.loss[-1] < hist.loss[0]
    assert all(math.isfinite(v) for v in hist.loss)
    # the frozen classifier was not trained
    assert not any(p.requires_grad for p in classifier.parameters())
    _, sigma = transform(h, old)
    assert sigma.shape == (len(old),) and (sigma > 0).all()
    # sigma^2 estimates the per-item loss: noisy items get clearly larger sigma (~1.5x here;
    # seeds 0-2 give 1.3x-1.5x), and ordering by sigma puts them first (precision 0.91-0.93)
    assert np.median(sigma[noisy]) > 1.25 * np.median(sigma[~noisy])
    top = np.argsort(-sigma)[: int(noisy.sum())]
    assert noisy[top].mean() > 0.85


def test_training_is_seeded():
    old, new, _ = _linear_problem(n=256)
    kw = dict(objective="fct", hidden_dim=16, num_hidden_layers=1, epochs=2, batch_size=64)
    h1, hist1 = train_transformation(old, new, None, seed=3, **kw)
    h2, hist2 = train_transformation(old, new, None, seed=3, **kw)
    assert hist1.loss == hist2.loss
    assert np.array_equal(transform(h1, old)[0], transform(h2, old)[0])


def test_cosine_with_warmup_values():
    # warm-up: linear to 1 over 4 steps
    assert [cosine_with_warmup(s, 12, 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cosine_with_warmup(4, 12, 4) == pytest.approx(1.0)      # cosine starts at 1
    assert cosine_with_warmup(8, 12, 4) == pytest.approx(0.5)      # halfway: cos(pi/2)
    assert cosine_with_warmup(6, 12, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_with_warmup(12, 12, 4) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(50, 12, 4) == pytest.approx(0.0, abs=1e-12)  # clamped after the end
    assert cosine_with_warmup(0, 10, 0) == pytest.approx(1.0)      # no warm-up


def test_objective_and_input_validation():
    old, new, _ = _linear_problem(n=64)
    assert OBJECTIVES == ("fastfill", "fct")
    with pytest.raises(ValueError, match="objective must be one of"):
        train_transformation(old, new, None, objective="l2")
    with pytest.raises(ValueError, match="with labels needs new_classifier"):
        train_transformation(old, new, np.zeros(64, dtype=np.int64), objective="fastfill")
    with pytest.raises(ValueError, match="equal length"):
        train_transformation(old, new[:10], None, objective="fct")
    with pytest.raises(ValueError, match="equal length"):
        train_transformation(old[:0], new[:0], None, objective="fct")
    bad = new.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="new embeddings contain NaN"):
        train_transformation(old, bad, None, objective="fct")


def test_fastfill_without_labels_weights_the_alignment_term_alone():
    """No labels (a gallery without classes): sigma still learns which items h maps badly."""
    old, new, rng = _linear_problem(n=1024)
    noisy = old[:, 0] > 0.5
    new = new + noisy[:, None] * rng.standard_normal(new.shape).astype(np.float32) * 15.0
    h, hist = train_transformation(old, new, None, objective="fastfill", hidden_dim=64,
                                   num_hidden_layers=1, epochs=40, batch_size=128, lr=5e-3,
                                   warmup_epochs=1, seed=0)
    assert h.has_uncertainty and hist.loss[-1] < hist.loss[0]
    _, sigma = transform(h, old)
    assert np.median(sigma[noisy]) > 1.25 * np.median(sigma[~noisy])


def test_prototype_head_is_cosine_to_class_means_over_temperature():
    new = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0]], dtype=np.float32)
    head = PrototypeHead.from_embeddings(new, np.array([0, 0, 2, 2]), num_classes=3,
                                         temperature=0.5)
    logits = head(torch.tensor([[1.0, 1.0], [0.0, 5.0]])).detach().numpy()
    c = 1 / np.sqrt(2)
    # class 1 has no items: a zero prototype, cosine 0
    assert logits == pytest.approx(np.array([[c / 0.5, 0.0, c / 0.5], [0.0, 0.0, 2.0]]), abs=1e-6)
    assert not any(p.requires_grad for p in head.parameters())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        PrototypeHead.from_embeddings(new, np.array([0, 0, 2, 2]), num_classes=2)
    with pytest.raises(ValueError, match="temperature must be positive"):
        PrototypeHead(torch.ones(2, 2), temperature=0.0)


def _held_out_problem():
    """h learns a linear map on clean pairs; on held-out pairs a region of the old space
    (old[:, 1] > 0.5) is noisy, which the training pairs never showed."""
    old, new, rng = _linear_problem(n=1536)
    torch.manual_seed(0)
    classifier = nn.Linear(new.shape[1], 3)
    with torch.no_grad():
        labels = classifier(torch.from_numpy(new)).argmax(1).numpy()
    h, _ = train_transformation(old[:768], new[:768], labels[:768], objective="fastfill",
                                new_classifier=classifier, hidden_dim=64, num_hidden_layers=1,
                                epochs=30, batch_size=128, lr=5e-3, warmup_epochs=1, seed=0)
    o2, n2, y2 = old[768:], new[768:].copy(), labels[768:]
    noisy = o2[:, 1] > 0.5
    n2 += noisy[:, None] * rng.standard_normal(n2.shape).astype(np.float32) * 15.0
    return h, classifier, o2, n2, y2, noisy


@pytest.mark.parametrize("head_hidden_dim", [0, 16])
def test_cross_fitted_head_finds_what_training_pairs_did_not_show(head_hidden_dim):
    h, classifier, old, new, labels, noisy = _held_out_problem()
    before = {k: v.clone() for k, v in h.state_dict().items()}
    _, sigma_trained = transform(h, old)
    h2 = fit_uncertainty_head(h, old[::2], new[::2], labels[::2], new_classifier=classifier,
                              head_hidden_dim=head_hidden_dim)
    emb, sigma = transform(h2, old[1::2])                 # items the head did not see
    top = np.argsort(-sigma)[: int(noisy[1::2].sum())]
    assert noisy[1::2][top].mean() > 0.8
    top_trained = np.argsort(-sigma_trained[1::2])[: int(noisy[1::2].sum())]
    assert noisy[1::2][top_trained].mean() < 0.7         # the trained head could not know
    np.testing.assert_allclose(emb, transform(h, old[1::2])[0], atol=1e-6)   # h's map kept
    assert all(torch.equal(before[k], v) for k, v in h.state_dict().items())  # h untouched
    assert h2.head_hidden_dim == head_hidden_dim


def test_benefit_head_orders_like_the_benefit():
    h, _, old, _, _, noisy = _held_out_problem()
    benefit = old[:, 1] + 0.1 * np.random.default_rng(1).standard_normal(len(old))
    h2 = fit_benefit_head(h, old[::2], benefit[::2], head_hidden_dim=16, seed=0)
    _, sigma = transform(h2, old[1::2])
    rank_corr = np.corrcoef(np.argsort(np.argsort(sigma)),
                            np.argsort(np.argsort(benefit[1::2])))[0, 1]
    assert rank_corr > 0.8
    with pytest.raises(ValueError, match="benefit"):
        fit_benefit_head(h, old[:3], np.array([0.0, np.nan, 1.0]))
