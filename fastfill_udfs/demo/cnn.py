"""The demo's embedding CNNs (old and new model of the Fashion-MNIST protocol) and their
training. A user brings their own new model (see `fastfill_udfs.model_loading`); these exist so
the demo has an old and a new model to update between."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastfill_udfs.progress import Progress
from fastfill_udfs.training import History, cosine_with_warmup, seed_everything

log = logging.getLogger(__name__)


class EmbeddingCNN(nn.Module):
    """Conv blocks (3x3 conv, BatchNorm, ReLU, 2x2 max-pool) -> global average pool ->
    linear embedding; a linear classifier on the embedding. `forward` returns
    (embedding, logits); input is float [N, C, H, W] in [0, 1]."""

    def __init__(self, channels: Sequence[int], embedding_dim: int, num_classes: int,
                 in_channels: int = 1):
        super().__init__()
        if not channels:
            raise ValueError("channels must list at least one conv block width")
        if embedding_dim <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_dim ({embedding_dim}) and num_classes ({num_classes}) "
                             "must be positive")
        blocks, prev = [], in_channels
        for width in channels:
            blocks += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev = width
        self.features = nn.Sequential(*blocks)
        self.embedding = nn.Linear(prev, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes

    def spec_params(self) -> dict:
        """The constructor arguments (see `fastfill_udfs.models.model_spec`)."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        return {"channels": [m.out_channels for m in convs], "embedding_dim": self.embedding_dim,
                "num_classes": self.num_classes, "in_channels": convs[0].in_channels}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x)
        return emb, self.classifier(emb)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] (or [N, H, W, C]) -> float [N, C, H, W] in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() == 4:
        t = t.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {tuple(t.shape)}")
    return t.float().div_(255.0)


def train_embedding_model(images: np.ndarray, labels: np.ndarray, *, num_classes: int,
                          channels, embedding_dim: int, epochs: int, batch_size: int,
                          lr: float, seed: int, name: str = "model",
                          augment: bool = True, label_smoothing: float = 0.0,
                          ) -> tuple[EmbeddingCNN, History]:
    """Train an EmbeddingCNN with cross-entropy (Adam, cosine schedule, random flips; label
    smoothing as given, the paper's models use 0.1).

    `labels` must lie in [0, num_classes); raises ValueError otherwise."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) must be non-empty "
                         "and of equal length")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    gen = seed_everything(seed)
    x_all, y_all = images_to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    model = EmbeddingCNN(channels, embedding_dim, num_classes, in_channels=x_all.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, epochs * steps_per_epoch, steps_per_epoch // 2))
    history, progress = History(), Progress(f"train {name}: epoch", epochs, log)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_all), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            x, y = x_all[idx], y_all[idx]
            if augment:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            _, logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
        history.loss.append(loss_sum / total)
        history.accuracy.append(correct / total)
        progress.update(extra=f"loss {history.loss[-1]:.4f} acc {history.accuracy[-1]:.3f}")
    model.eval()
    return model, history
