"""Training FastFill's `h` on the CPU (or GPU when present), and the shared training helpers."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fastfill_udfs.config import OBJECTIVES
from fastfill_udfs.losses import alignment_loss, fastfill_loss, fct_loss, l2_per_item
from fastfill_udfs.models import Transformation, make_uncertainty_head, sigma_from_s
from fastfill_udfs.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class History:
    """Per-epoch training curve: mean loss (and accuracy for classifiers)."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up for `warmup` steps, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_transformation(old: np.ndarray, new: np.ndarray, labels: np.ndarray | None, *,
                         objective: str, new_classifier: nn.Module | None = None,
                         hidden_dim: int = 1024, num_hidden_layers: int = 2, epochs: int = 60,
                         batch_size: int = 1024, lr: float = 5e-4, weight_decay: float = 0.0,
                         warmup_epochs: int = 3, freeze_bn_after: float = 0.5,
                         label_smoothing: float = 0.1, seed: int = 0,
                         device: str | torch.device = "cpu") -> tuple[Transformation, History]:
    """Train `h: old -> new` with `objective` "fct" (L2 only, no uncertainty head) or
    "fastfill" (L2 + label-smoothed CE through the frozen class head `new_classifier`, weighted
    by the predicted uncertainty; without `labels` the L2 term alone is weighted). The class
    head maps new-space embeddings to logits: the new model's linear classifier, or a
    `PrototypeHead` of class means. Adam with warm-up + cosine schedule; BatchNorm frozen (eval
    mode) after `freeze_bn_after` of the epochs. Raises ValueError for bad inputs, naming them."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if len(old) != len(new) or len(old) == 0:
        raise ValueError(f"old ({len(old)}) and new ({len(new)}) embeddings must be non-empty "
                         "and of equal length")
    if objective == "fastfill" and labels is not None and new_classifier is None:
        raise ValueError("objective 'fastfill' with labels needs new_classifier (the new "
                         "model's classifier or a PrototypeHead)")
    for name, arr in (("old", old), ("new", new)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} embeddings contain NaN or inf")
    gen = seed_everything(seed)
    device = torch.device(device)
    # Train in a space where new embeddings have unit RMS norm, so that the L2 term is on the
    # scale of the cross-entropy and exp(-s) does not shrink its gradient by the raw norm.
    scale = float(np.sqrt(np.mean(np.sum(np.square(new, dtype=np.float64), axis=1)))) or 1.0
    new = new / scale
    h = Transformation(old.shape[1], new.shape[1], hidden_dim, num_hidden_layers,
                       uncertainty=(objective == "fastfill")).to(device)
    o_all = torch.from_numpy(np.ascontiguousarray(old, dtype=np.float32)).to(device)
    n_all = torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32)).to(device)
    y_all = None if labels is None else torch.from_numpy(labels.astype(np.int64)).to(device)
    if new_classifier is not None:
        new_classifier = new_classifier.to(device).eval()
        for p in new_classifier.parameters():
            p.requires_grad_(False)
    opt = torch.optim.Adam(h.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(o_all) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(
        s, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch))
    freeze_epoch = int(round(freeze_bn_after * epochs)) if freeze_bn_after > 0 else epochs
    history, progress = History(), Progress(f"train h ({objective}): epoch", epochs, log,
                                            min_interval=5.0)
    for epoch in range(epochs):
        h.train()
        if epoch >= freeze_epoch:
            for m in h.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.eval()
        perm = torch.randperm(len(o_all), generator=gen).to(device)
        loss_sum, total = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows in training mode
                continue
            pred, s = h(o_all[idx])
            if objective == "fct":
                loss = fct_loss(pred, n_all[idx])
            elif y_all is None:  # no labels: the alignment term alone, weighted by sigma
                loss = fastfill_loss(l2_per_item(pred, n_all[idx]), s)
            else:
                per_item = alignment_loss(pred, n_all[idx], new_classifier(pred * scale),
                                          y_all[idx], label_smoothing)
                loss = fastfill_loss(per_item, s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            total += len(idx)
        history.loss.append(loss_sum / max(total, 1))
        progress.update(extra=f"loss {history.loss[-1]:.4f}")
    h.eval()
    h.fold_output_scale(scale)
    return h.cpu(), history


def fit_uncertainty_head(h: Transformation, old: np.ndarray, new: np.ndarray,
                         labels: np.ndarray, *, new_classifier: nn.Linear, epochs: int = 200,
                         lr: float = 1e-2, label_smoothing: float = 0.1, weight_decay: float = 0.0,
                         head_hidden_dim: int = 0, seed: int = 0) -> Transformation:
    """Cross-fitting: refit `h`'s uncertainty head on pairs `h` was NOT trained on.

    `h`'s embedding MLP stays frozen; a fresh head Linear(new_dim, 1) on h's output is fitted
    (full batch, Adam) with the FastFill loss ``0.5 exp(-s) L + 0.5 s``, L the per-item
    alignment loss of the frozen h on these held-out pairs (the same units as in training: new
    embeddings scaled to unit RMS norm). On training pairs a wide `h` has memorised, L is small
    and uninformative; on held-out pairs it is the error the gallery will see.
    Returns a copy of `h` with the new head (h itself is not modified). Raises ValueError for
    bad inputs or an `h` without uncertainty head."""
    import copy

    if not h.has_uncertainty:
        raise ValueError("h has no uncertainty head (trained with objective 'fct')")
    if len(old) != len(new) or len(old) != len(labels) or len(old) < 2:
        raise ValueError(f"old ({len(old)}), new ({len(new)}) and labels ({len(labels)}) must "
                         "have equal length >= 2")
    if old.shape[1] != h.old_dim or new.shape[1] != h.new_dim:
        raise ValueError(f"old/new widths {old.shape[1]}/{new.shape[1]} do not fit h "
                         f"({h.old_dim} -> {h.new_dim})")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    gen = seed_everything(seed)
    scale = float(np.sqrt(np.mean(np.sum(np.square(new, dtype=np.float64), axis=1)))) or 1.0
    out = copy.deepcopy(h).eval()
    with torch.no_grad():
        pred = out.mlp(torch.from_numpy(np.ascontiguousarray(old, dtype=np.float32)))
        target = torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32))
        y = torch.from_numpy(labels.astype(np.int64))
        per_item = alignment_loss(pred / scale, target / scale, new_classifier.eval()(pred), y,
                                  label_smoothing)
    target = torch.log(per_item.clamp_min(1e-8))
    out.uncertainty_head = fit_head(pred, lambda s: fastfill_loss(per_item, s), h.new_dim,
                                    head_hidden_dim, float(target.mean()), epochs, lr,
                                    weight_decay, gen)
    out.head_hidden_dim = int(head_hidden_dim)
    return out


def fit_head(feats: torch.Tensor, loss_fn, new_dim: int, hidden: int, init_bias: float,
             epochs: int, lr: float, weight_decay: float, gen: torch.Generator) -> nn.Module:
    """Full-batch Adam fit of a fresh head (`make_uncertainty_head(new_dim, hidden)`, last bias
    `init_bias`) on fixed features `feats` (h's raw-scale output, standardised inside by
    folding the feature mean/std into the first layer afterwards), minimising
    `loss_fn(head scores)` for `epochs` steps of Adam (`lr`, `weight_decay`) seeded by `gen`."""
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    head = make_uncertainty_head(new_dim, hidden)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / np.sqrt(m.in_features), generator=gen)
                m.bias.zero_()
        last = head if isinstance(head, nn.Linear) else head[-1]
        last.weight.mul_(1e-2)
        last.bias.fill_(init_bias)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = loss_fn(head(z).squeeze(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():                          # head(z) == head'(feats)
        first = head if isinstance(head, nn.Linear) else head[0]
        first.bias.sub_((first.weight / sd) @ mu)
        first.weight.div_(sd)
    return head.eval()


def benefit_head(h: Transformation, old: np.ndarray, benefit: np.ndarray, *,
                 head_hidden_dim: int = 64, epochs: int = 300, lr: float = 1e-2,
                 weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """A head on h's (frozen) output (new_dim -> 1) that ranks items by their realised benefit
    of backfilling: it regresses the rank of ``benefit`` (N,), scaled to [-3, 3], by least
    squares, so only the order matters. ``old`` (N x old_dim) are the items' old embeddings.
    Raises ValueError for bad inputs."""
    if len(old) != len(benefit) or len(old) < 2:
        raise ValueError(f"old ({len(old)}) and benefit ({len(benefit)}) must have equal "
                         "length >= 2")
    if old.shape[1] != h.old_dim:
        raise ValueError(f"old width {old.shape[1]} does not fit h ({h.old_dim})")
    b = np.asarray(benefit, dtype=np.float64)
    if not np.all(np.isfinite(b)):
        raise ValueError("benefit contains NaN or infinite values")
    gen = seed_everything(seed)
    ranks = np.argsort(np.argsort(b, kind="stable"), kind="stable")
    target = torch.from_numpy(6.0 * (ranks + 0.5) / len(b) - 3.0).float()
    with torch.no_grad():
        feats = h.eval().mlp(torch.from_numpy(np.ascontiguousarray(old, dtype=np.float32)))
    return fit_head(feats, lambda s: (s - target).pow(2).mean(), h.new_dim, head_hidden_dim,
                     0.0, epochs, lr, weight_decay, gen)


def fit_benefit_head(h: Transformation, old: np.ndarray, benefit: np.ndarray, *,
                     head_hidden_dim: int = 64, epochs: int = 300, lr: float = 1e-2,
                     weight_decay: float = 1e-4, seed: int = 0) -> Transformation:
    """Give `h` a head that ranks items by their predicted retrieval benefit of backfilling.

    `benefit` (N,) is the realised benefit of backfilling each of N held-out items (e.g.
    :func:`fastfill_udfs.reachability.item_map_benefit` on held-out pairs `h` was not trained
    on); see :func:`benefit_head`. The head's output takes the place of s, so sigma = exp(s / 2)
    orders items exactly like the predicted benefit and the ``uncertainty`` policy needs no
    change. Returns a copy of `h`. Raises ValueError for bad inputs."""
    import copy

    head = benefit_head(h, old, benefit, head_hidden_dim=head_hidden_dim, epochs=epochs, lr=lr,
                        weight_decay=weight_decay, seed=seed)
    out = copy.deepcopy(h).eval()
    out.uncertainty_head = head
    out.head_hidden_dim = int(head_hidden_dim)
    return out


@torch.inference_mode()
def transform(h: Transformation, old: np.ndarray, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Apply `h` to old embeddings: (transformed float32 [N, new_dim], sigma float64 [N])."""
    h.eval()
    outs, sigmas = [], []
    for i in range(0, len(old), batch_size):
        pred, s = h(torch.from_numpy(np.ascontiguousarray(old[i:i + batch_size], dtype=np.float32)))
        outs.append(pred.numpy())
        sigmas.append(sigma_from_s(s).double().numpy())
    if not outs:
        return np.zeros((0, h.new_dim), np.float32), np.zeros(0)
    return np.concatenate(outs), np.concatenate(sigmas)


class PrototypeHead(nn.Module):
    """A class head without a classifier: logits = cosine(x, class mean) / temperature, from
    class means of new embeddings (`from_embeddings`). Frozen; used for h's class term."""

    def __init__(self, prototypes: torch.Tensor, temperature: float = 0.1):
        super().__init__()
        if prototypes.dim() != 2 or prototypes.shape[0] < 1:
            raise ValueError(f"prototypes must be [classes, dim], got {list(prototypes.shape)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.register_buffer("prototypes", torch.nn.functional.normalize(prototypes, dim=1))
        self.temperature = float(temperature)

    @classmethod
    def from_embeddings(cls, new: np.ndarray, labels: np.ndarray, num_classes: int,
                        temperature: float = 0.1) -> "PrototypeHead":
        """Class means of `new` per label in [0, num_classes); a class without items gets a
        zero prototype (cosine 0 to everything). Raises ValueError for labels out of range."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(new):
            raise ValueError(f"labels ({len(labels)}) and new ({len(new)}) differ in length")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got "
                             f"[{labels.min()}, {labels.max()}]")
        sums = np.zeros((num_classes, new.shape[1]), np.float64)
        np.add.at(sums, labels, new)
        counts = np.bincount(labels, minlength=num_classes)[:, None]
        means = sums / np.maximum(counts, 1)
        return cls(torch.from_numpy(means.astype(np.float32)), temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x, dim=1) @ self.prototypes.T / self.temperature

