"""The demo's data protocol (DESIGN.md): Fashion-MNIST splits, the old model's training subset
(seen classes, under-sampled minority subgroup) and subgroup labels. Pure numpy, no I/O besides
reading the dataset."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastfill_udfs.config import Config
from fastfill_udfs.data import load_fashion_mnist, stratified_subset, subsample_classes


@dataclass
class Split:
    images: np.ndarray      # uint8 [N, 28, 28]
    labels: np.ndarray      # int64 [N]
    ids: np.ndarray         # str [N], stable across runs: "<split>-<index in the full split>"
    subgroups: np.ndarray   # str [N]


def subgroup_of(labels: np.ndarray, cfg: Config) -> np.ndarray:
    """Map class labels to subgroup names via data.subgroups (minority classes vs the rest)."""
    sub = cfg.get_path("data.subgroups")
    minority = np.isin(labels, np.asarray(sub["minority_classes"], dtype=np.int64))
    return np.where(minority, sub["minority_name"], sub["majority_name"]).astype(object)


def load_split(cfg: Config, split: str) -> Split:
    """Load `split` ("train" | "test") with the configured seeded, stratified limit."""
    images, labels = load_fashion_mnist(cfg.get_path("data.fashion_mnist_dir"), split)
    limit = cfg.get_path(f"data.{split}_limit")
    idx = stratified_subset(labels, limit, cfg.get_path("seed"))
    ids = np.array([f"{split}-{i:06d}" for i in idx], dtype=object)
    return Split(images[idx], labels[idx], ids, subgroup_of(labels[idx], cfg))


def old_model_subset(split: Split, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the items the old model trains on and their remapped labels (0..k-1).

    Keeps only `models.old.classes`, then `models.old.minority_fraction` of the minority
    subgroup's classes (the biased-update demo). Raises ValueError for bad class lists."""
    classes = list(cfg.get_path("models.old.classes"))
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"models.old.classes must be distinct class ids, got {classes}")
    keep = np.flatnonzero(np.isin(split.labels, classes))
    fraction = cfg.get_path("models.old.minority_fraction")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"models.old.minority_fraction must be in (0, 1], got {fraction}")
    if fraction < 1.0:
        minority = [c for c in cfg.get_path("data.subgroups.minority_classes") if c in classes]
        sub = subsample_classes(split.labels[keep], {int(c): fraction for c in minority},
                                cfg.get_path("seed"))
        keep = keep[sub]
    remap = {c: i for i, c in enumerate(classes)}
    return keep, np.array([remap[int(c)] for c in split.labels[keep]], dtype=np.int64)
