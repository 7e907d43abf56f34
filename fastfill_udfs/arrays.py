"""Small array helpers shared by the pure-numpy modules (metrics, policies, the faiss index, ...):
one home for each, so every module converts and checks its arguments the same way."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["to_numpy", "l2_normalise", "check_pos_int", "check_pos_ints", "check_topk",
           "stack_by_shape"]


def to_numpy(x) -> np.ndarray:
    """`x` as a numpy array; a torch tensor (on any device) is detached and copied to the CPU
    first, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of the 2-D array `x` scaled to unit L2 norm (an all-zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def check_pos_int(value, name: str) -> int:
    """`value` as an int; raises ValueError naming `name` unless it is an int >= 1 (a bool is
    not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_pos_ints(values, name: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    """`values` as a tuple of ints >= 1; raises ValueError naming `name` for anything else, and
    for an empty sequence unless `allow_empty`."""
    try:
        ks = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    if not ks and not allow_empty:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return tuple(check_pos_int(k, f"{name} entry") for k in ks)


def check_topk(topk) -> tuple[int, ...]:
    """The CMC cut-offs `topk` as a non-empty tuple of ints >= 1 (ValueError naming topk)."""
    return check_pos_ints(topk, "topk")


def stack_by_shape(images: Sequence) -> dict[tuple, list[int]]:
    """Positions of `images` grouped by shape (images kept at their own size may differ)."""
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    return groups
