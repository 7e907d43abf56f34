"""FastFill's transformation `h` with its uncertainty head, and the spec registry: every model
of ours is rebuilt from a JSON-able spec plus a state dict, so saved models load without
unpickling code. (The demo's CNNs live in `fastfill_udfs.demo.cnn`.)"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


def make_uncertainty_head(new_dim: int, hidden_dim: int = 0) -> nn.Module:
    """The head on h's output that predicts s = log sigma^2: Linear(new_dim, 1) (the official
    one, `hidden_dim` 0) or a small MLP Linear -> ReLU -> Linear with `hidden_dim` units."""
    if hidden_dim < 0:
        raise ValueError(f"head hidden_dim must be >= 0, got {hidden_dim}")
    if hidden_dim == 0:
        return nn.Linear(new_dim, 1)
    return nn.Sequential(nn.Linear(new_dim, hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, 1))


class Transformation(nn.Module):
    """FastFill's `h`: an MLP old_dim -> new_dim (Linear, BatchNorm, ReLU hidden layers) and,
    when `uncertainty`, a head on h's output that predicts s = log sigma^2 (Linear(new_dim, 1),
    or an MLP with `head_hidden_dim` units). `forward(old)` returns (transformed embedding, s);
    s is zeros without the head.

    `h` also carries small JSON-able parameters fitted with it, kept in its spec so they travel
    with the model (MLflow, the Spark broadcast): `calibration` (the mixed-gallery score
    correction, :mod:`fastfill_udfs.calibration`), `prototypes` (class means in the new space
    for the classifier-free order, :func:`fastfill_udfs.policies.fit_prototypes`) and
    `order_blend` (:func:`fastfill_udfs.order_fitting.fit_order_blend`: sigma becomes a blend of
    the head's order and the prototype margin's, see :func:`blend_s`); None when not fitted.

    For the ``auto`` policy (:mod:`fastfill_udfs.forecast`), `order_heads` holds named extra
    heads on h's output (e.g. the paper's joint sigma head and a benefit head, whatever the
    chosen order reads; name -> hidden width in the spec) and `auto_order` the order the
    forecast chose (an order spec, :func:`order_priority`), scored by :meth:`auto_priority`."""

    def __init__(self, old_dim: int, new_dim: int, hidden_dim: int = 1024,
                 num_hidden_layers: int = 2, uncertainty: bool = True, head_hidden_dim: int = 0,
                 calibration: dict | None = None, prototypes: dict | None = None,
                 order_blend: dict | None = None, order_heads: dict | None = None,
                 auto_order: dict | None = None):
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
        self.uncertainty_head = make_uncertainty_head(new_dim, head_hidden_dim) if uncertainty else None
        self.head_hidden_dim = int(head_hidden_dim)
        self.old_dim, self.new_dim = old_dim, new_dim
        self.embedding_dim = new_dim
        self.calibration = calibration
        self.prototypes = prototypes
        self.order_blend = order_blend
        self.order_heads = nn.ModuleDict()
        self.order_head_dims: dict[str, int] = {}
        for name, hidden in (order_heads or {}).items():
            self.set_order_head(name, make_uncertainty_head(new_dim, int(hidden)), int(hidden))
        self.auto_order = auto_order

    def set_order_head(self, name: str, head: nn.Module, hidden_dim: int) -> None:
        """Store `head` (new_dim -> 1, built by `make_uncertainty_head(new_dim, hidden_dim)`) as
        the order component `name` (see :meth:`order_components`)."""
        if name in ORDER_GEOMETRY:
            raise ValueError(f"order head name {name!r} is taken by a prototype component")
        self.order_heads[name] = head
        self.order_head_dims[name] = int(hidden_dim)

    def order_components(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per item, every value an order spec may read from h's output `out`: each order
        head's output, and with prototypes the `margin` (second-nearest minus nearest
        prototype distance) and `distance` (to the nearest prototype)."""
        comps = {name: head(out).squeeze(1) for name, head in self.order_heads.items()}
        if self.prototypes is not None:
            comps.update(prototype_geometry(out, self.prototypes))
        return comps

    def auto_priority(self, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h's output, the ``auto`` order's priority: higher is backfilled earlier). Raises
        ValueError when h carries no forecast choice or the choice is the random order (which
        needs the item ids: `policies.order_scores`)."""
        if self.auto_order is None:
            raise ValueError("h carries no forecast choice (auto_order): train it with "
                             "pipelines/train_transformation.py and forecast.enabled=true")
        if self.auto_order.get("random"):
            raise ValueError("h's forecast chose the random order: score it from the ids")
        out = self.mlp(old)
        return out, order_priority(self.auto_order, self.order_components(out))

    def spec_params(self) -> dict:
        """The constructor arguments (see `model_spec`)."""
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        return {"old_dim": self.old_dim, "new_dim": self.new_dim,
                "hidden_dim": linears[0].out_features if len(linears) > 1 else self.new_dim,
                "num_hidden_layers": len(linears) - 1, "uncertainty": self.has_uncertainty,
                "head_hidden_dim": self.head_hidden_dim, "calibration": self.calibration,
                "prototypes": self.prototypes, "order_blend": self.order_blend,
                "order_heads": dict(self.order_head_dims), "auto_order": self.auto_order}

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
            first = self.uncertainty_head if isinstance(self.uncertainty_head, nn.Linear) \
                else self.uncertainty_head[0]
            first.weight.div_(scale)

    def forward(self, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if old.dim() != 2 or old.shape[1] != self.old_dim:
            raise ValueError(f"h expects old embeddings of shape [N, {self.old_dim}], "
                             f"got {list(old.shape)}")
        out = self.mlp(old)
        if self.uncertainty_head is None:
            return out, torch.zeros(out.shape[0], device=out.device, dtype=out.dtype)
        s = self.uncertainty_head(out).squeeze(1)
        if self.order_blend is not None:
            s = blend_s(out, s, self.order_blend, self.prototypes)
        return out, s


def _quantile_cdf(x: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear CDF in [0, 1] from K sorted quantiles at levels 0, 1/(K-1), ..., 1."""
    k = quantiles.numel()
    idx = torch.searchsorted(quantiles, x.contiguous()).clamp(1, k - 1)
    lo, hi = quantiles[idx - 1], quantiles[idx]
    frac = ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    return ((idx - 1).to(x.dtype) + frac) / (k - 1)


def prototype_margin_torch(out: torch.Tensor, prototypes: dict) -> torch.Tensor:
    """`policies.prototype_margin` in torch: second-nearest minus nearest prototype distance."""
    return prototype_geometry(out, prototypes)["margin"]


def blend_s(out: torch.Tensor, s: torch.Tensor, blend: dict, prototypes: dict | None
            ) -> torch.Tensor:
    """s (= log sigma^2) of the blended order: sigma = (1 - w) F(head's sigma) + w (1 - G(margin))
    (+1e-6), F and G the held-out CDFs stored in `blend`, the margin that of h's output to the
    prototypes. The order follows the head's where w = 0 and the smallest margins first at 1."""
    if prototypes is None:
        raise ValueError("h.order_blend needs h.prototypes (fitted together by fit_h_extras)")
    sq = torch.as_tensor(blend["sigma_quantiles"], dtype=out.dtype, device=out.device)
    mq = torch.as_tensor(blend["margin_quantiles"], dtype=out.dtype, device=out.device)
    w = float(blend["weight"])
    u = _quantile_cdf(sigma_from_s(s), sq)
    v = 1.0 - _quantile_cdf(prototype_margin_torch(out, prototypes), mq)
    return 2.0 * torch.log((1.0 - w) * u + w * v + 1e-6)


ORDER_SPEC_VERSION = 1
ORDER_GEOMETRY = ("margin", "distance")   # order components computed from the prototypes


def prototype_geometry(out: torch.Tensor, prototypes: dict) -> dict[str, torch.Tensor]:
    """{"margin": second-nearest minus nearest prototype distance, "distance": nearest
    prototype distance} of h's output (as `policies.prototype_margin` / `prototype_scores`)."""
    p = torch.as_tensor(prototypes["prototypes"], dtype=out.dtype, device=out.device)
    if prototypes["distance"] == "cosine":
        d = 1.0 - torch.nn.functional.normalize(out, dim=1) @ p.T
    else:
        d = torch.cdist(out, p)
    if d.shape[1] < 2:
        zero = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
        return {"margin": zero, "distance": d[:, 0] if d.shape[1] else zero}
    two = torch.topk(d, 2, dim=1, largest=False).values
    return {"margin": two[:, 1] - two[:, 0], "distance": two[:, 0]}


def check_order_spec(spec) -> dict:
    """Validate an order spec (see :func:`order_priority`); returns it. Raises ValueError
    naming the bad field."""
    if not isinstance(spec, dict) or spec.get("version") != ORDER_SPEC_VERSION:
        raise ValueError(f"an order spec must be a dict of version {ORDER_SPEC_VERSION}, "
                         f"got {spec!r:.200}")
    if spec.get("random"):
        return spec
    terms = spec.get("terms")
    if not isinstance(terms, list) or not terms:
        raise ValueError("order spec 'terms' must be a non-empty list")
    for term in terms:
        if not isinstance(term.get("component"), str):
            raise ValueError(f"order spec term without a component name: {term!r:.200}")
        if not (isinstance(term.get("weight"), (int, float)) and term["weight"] >= 0):
            raise ValueError(f"order spec term {term['component']!r}: weight must be >= 0")
        q = term.get("quantiles")
        if q is None and len(terms) > 1:
            raise ValueError("a blend of several terms needs each term's quantiles")
        if q is not None and (len(q) < 2 or any(b < a for a, b in zip(q, q[1:]))):
            raise ValueError(f"order spec term {term['component']!r}: quantiles must be "
                             "ascending, at least 2")
    return spec


def order_priority(spec: dict, components: dict[str, torch.Tensor]) -> torch.Tensor:
    """The priority (higher = backfilled earlier, float64) of an order spec over per-item
    `components` (:meth:`Transformation.order_components`).

    Spec: ``{"version": 1, "name": str, "terms": [{"component", "weight", "descending",
    "quantiles"}], "reverse": bool}``. One term without quantiles: its value (negated when not
    `descending`). Otherwise the weighted sum of each term's CDF over the quantiles fitted on
    held-out items (1 - CDF when not `descending`). `reverse` negates the priority. Raises
    ValueError for a bad spec or a component that is missing."""
    check_order_spec(spec)
    if spec.get("random"):
        raise ValueError("the random order has no priority from components: use the item ids")
    total = None
    for term in spec["terms"]:
        name = term["component"]
        if name not in components:
            raise ValueError(f"order spec {spec.get('name')!r} reads {name!r}, which this h "
                             f"does not compute (it has {sorted(components)})")
        x = components[name].to(torch.float64)
        if term.get("quantiles") is None:
            u = x if term.get("descending", True) else -x
        else:
            u = _quantile_cdf(x, torch.as_tensor(term["quantiles"], dtype=torch.float64,
                                                 device=x.device))
            u = u if term.get("descending", True) else 1.0 - u
        u = float(term["weight"]) * u
        total = u if total is None else total + u
    return -total if spec.get("reverse") else total


def sigma_from_s(s: torch.Tensor) -> torch.Tensor:
    """sigma = exp(s / 2), since the head predicts s = log sigma^2."""
    return torch.exp(0.5 * s)


# kind -> "module:class"; imported on first use so the demo's classes stay in the demo package.
MODEL_KINDS = {"transformation": "fastfill_udfs.models:Transformation",
               "embedding_cnn": "fastfill_udfs.demo.cnn:EmbeddingCNN"}


def _model_class(kind: str) -> type:
    import importlib

    module, name = MODEL_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The JSON-able spec from which `build_model` recreates `model`'s architecture.

    Raises TypeError for a model class that is not in MODEL_KINDS."""
    for kind, path in MODEL_KINDS.items():
        if type(model).__name__ == path.split(":")[1] and isinstance(model, _model_class(kind)):
            return {"kind": kind, "params": model.spec_params()}
    raise TypeError(f"no spec for model type {type(model).__name__}")


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Recreate an (untrained) model from `model_spec` output; unknown kinds raise ValueError."""
    kind = spec.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    return _model_class(kind)(**spec["params"])
