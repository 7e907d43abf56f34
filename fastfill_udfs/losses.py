"""FastFill's training objectives (DESIGN.md, "The method, precisely")."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_per_item(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 per row."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {list(pred.shape)} and target {list(target.shape)} differ in shape")
    return (pred - target).pow(2).sum(dim=1)


def fct_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FCT baseline: mean over the batch of ||h(o) - n||^2."""
    return l2_per_item(pred, target).mean()


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, logits: torch.Tensor,
                   labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Per-item L = ||h(o) - n||^2 + CE_ls(W h(o), y): point-to-point plus point-to-cluster
    through the frozen new classifier W (`logits` = W h(o))."""
    ce = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    return l2_per_item(pred, target) + ce


def fastfill_loss(per_item: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Heteroscedastic loss: mean of 0.5 * exp(-s) * L + 0.5 * s, s = predicted log sigma^2."""
    if per_item.shape != s.shape:
        raise ValueError(f"per-item loss {list(per_item.shape)} and s {list(s.shape)} differ")
    return (0.5 * torch.exp(-s) * per_item + 0.5 * s).mean()
