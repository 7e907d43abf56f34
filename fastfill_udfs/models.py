"""Torch models: the demo's embedding CNNs and FastFill's transformation `h` with its
uncertainty head. Every model is rebuilt from a JSON-able spec plus a state dict, so saved
models load without unpickling code."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn


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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x)
        return emb, self.classifier(emb)


class Transformation(nn.Module):
    """FastFill's `h`: an MLP old_dim -> new_dim (Linear, BatchNorm, ReLU hidden layers) and,
    when `uncertainty`, a head Linear(new_dim, 1) on h's output that predicts s = log sigma^2.
    `forward(old)` returns (transformed embedding, s); s is zeros without the head."""

    def __init__(self, old_dim: int, new_dim: int, hidden_dim: int = 1024,
                 num_hidden_layers: int = 2, uncertainty: bool = True):
        super().__init__()
        for name, value in (("old_dim", old_dim), ("new_dim", new_dim),
                            ("hidden_dim", hidden_dim), ("num_hidden_layers", num_hidden_layers)):
            if int(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        layers, prev = [], old_dim
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(prev, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            prev = hidden_dim
        layers.append(nn.Linear(prev, new_dim))
        self.mlp = nn.Sequential(*layers)
        self.uncertainty_head = nn.Linear(new_dim, 1) if uncertainty else None
        self.old_dim, self.new_dim = old_dim, new_dim
        self.embedding_dim = new_dim

    @property
    def has_uncertainty(self) -> bool:
        return self.uncertainty_head is not None

    @torch.no_grad()
    def fold_output_scale(self, scale: float) -> None:
        """Make h output `scale` times its current embedding while the uncertainty head keeps
        its predictions (training runs in a unit-scale space; this maps h back to the new
        model's raw scale)."""
        last = self.mlp[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
        if self.uncertainty_head is not None:
            self.uncertainty_head.weight.div_(scale)

    def forward(self, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if old.dim() != 2 or old.shape[1] != self.old_dim:
            raise ValueError(f"h expects old embeddings of shape [N, {self.old_dim}], "
                             f"got {list(old.shape)}")
        out = self.mlp(old)
        if self.uncertainty_head is None:
            return out, torch.zeros(out.shape[0], device=out.device, dtype=out.dtype)
        return out, self.uncertainty_head(out).squeeze(1)


def sigma_from_s(s: torch.Tensor) -> torch.Tensor:
    """sigma = exp(s / 2), since the head predicts s = log sigma^2."""
    return torch.exp(0.5 * s)


MODEL_KINDS = {"embedding_cnn": EmbeddingCNN, "transformation": Transformation}


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The JSON-able spec from which `build_model` recreates `model`'s architecture."""
    if isinstance(model, EmbeddingCNN):
        channels = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
        first = next(m for m in model.features if isinstance(m, nn.Conv2d))
        return {"kind": "embedding_cnn", "params": {
            "channels": channels, "embedding_dim": model.embedding_dim,
            "num_classes": model.num_classes, "in_channels": first.in_channels}}
    if isinstance(model, Transformation):
        linears = [m for m in model.mlp if isinstance(m, nn.Linear)]
        return {"kind": "transformation", "params": {
            "old_dim": model.old_dim, "new_dim": model.new_dim,
            "hidden_dim": linears[0].out_features if len(linears) > 1 else model.new_dim,
            "num_hidden_layers": len(linears) - 1, "uncertainty": model.has_uncertainty}}
    raise TypeError(f"no spec for model type {type(model).__name__}")


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Recreate an (untrained) model from `model_spec` output; unknown kinds raise ValueError."""
    kind = spec.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](**spec["params"])
