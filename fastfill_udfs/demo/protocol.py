"""The demo's data protocol (DESIGN.md): train / gallery splits, the old model's training subset
(seen classes, under-sampled minority subgroup) and subgroup labels. Pure numpy, no I/O besides
reading the dataset.

Sources: Fashion-MNIST (train split = its 60k training images, gallery = its 10k test images)
or your own labelled images (`data.dataset: image_folder | image_table`, the demo's own-data
mode): each item goes to the training split when a seeded hash of its id falls below
`data.train_fraction` (`train_mask`), so the Spark ingest, which sees the items one partition at
a time, puts every item on the same side as the study does."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fastfill_udfs.config import Config
from fastfill_udfs.data import load_fashion_mnist, stratified_subset, subsample_classes

DEMO_SOURCES = ("fashion_mnist", "image_folder", "image_table")
MIN_ITEMS_PER_CLASS = 2  # a leave-one-out query needs one other item of its class


@dataclass
class Split:
    images: np.ndarray      # uint8 [N, H, W] (grayscale) or [N, H, W, C]
    labels: np.ndarray      # int64 [N]
    ids: np.ndarray         # str [N], stable across runs
    subgroups: np.ndarray   # str [N]


def subgroup_of(labels: np.ndarray, cfg: Config) -> np.ndarray:
    """Map class labels to subgroup names via data.subgroups (minority classes vs the rest);
    "" (no subgroup) for all when no minority classes are configured."""
    sub = cfg.get_path("data.subgroups")
    if not sub["minority_classes"]:
        return np.full(len(labels), "", dtype=object)
    minority = np.isin(labels, np.asarray(sub["minority_classes"], dtype=np.int64))
    return np.where(minority, sub["minority_name"], sub["majority_name"]).astype(object)


def train_mask(ids, seed: int, train_fraction: float) -> np.ndarray:
    """True for the items of the demo's training split: a seeded hash of each id (independent
    of row order and partitioning) below `train_fraction`. Raises ValueError for a fraction
    outside (0, 1)."""
    from fastfill_udfs.policies import random_scores_for_ids

    if not 0.0 < float(train_fraction) < 1.0:
        raise ValueError(f"data.train_fraction must be in (0, 1), got {train_fraction}")
    keys = np.char.add("train-split:", np.asarray(ids, dtype=str))
    return random_scores_for_ids(keys, int(seed)) < float(train_fraction)


@lru_cache(maxsize=2)
def _own_items(dataset: str, source: str, size: tuple | None, channels: int):
    """All usable items of an image folder / table, decoded as the models will see them."""
    from fastfill_udfs.data import load_image_folder, load_image_table
    from fastfill_udfs.preprocess import Preprocess

    items, _ = (load_image_folder(source) if dataset == "image_folder"
                else load_image_table(source))
    if items.empty:
        raise ValueError(f"data.{dataset} {source} holds no usable images")
    pre = Preprocess(size=size, channels=channels,
                     mean=(0.0,) * channels, std=(1.0,) * channels)
    try:
        images = np.stack([pre.decode(b, item_id=i) for i, b in zip(items["id"], items["image"])])
    except ValueError as exc:
        raise ValueError(f"data.{dataset} {source}: images differ in size; set "
                         f"models.preprocess.size to [height, width] ({exc})") from None
    if channels == 1:
        images = images[..., 0]
    return (images, items["label"].to_numpy(np.int64),
            items["id"].astype(str).to_numpy(dtype=object))


def load_split(cfg: Config, split: str) -> Split:
    """Load `split` ("train" | "test"; test = the gallery and queries) of the demo's source with
    the configured seeded, stratified limit. Raises ValueError for a source the demo cannot
    train on, or a class with fewer than MIN_ITEMS_PER_CLASS items in either split (named)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    dataset = cfg.get_path("data.dataset")
    if dataset == "fashion_mnist":
        images, labels = load_fashion_mnist(cfg.get_path("data.fashion_mnist_dir"), split)
        ids = np.array([f"{split}-{i:06d}" for i in range(len(labels))], dtype=object)
    elif dataset in ("image_folder", "image_table"):
        pre = cfg.get_path("models.preprocess")
        images, labels, ids = _own_items(dataset, cfg.resolve_path(f"data.{dataset}"),
                                         tuple(pre["size"]) or None, int(pre["channels"]))
        in_train = train_mask(ids, cfg.get_path("seed"), cfg.get_path("data.train_fraction"))
        check_class_sizes(labels, in_train, dataset)
        keep = in_train if split == "train" else ~in_train
        images, labels, ids = images[keep], labels[keep], ids[keep]
    else:
        raise ValueError(f"the demo trains its models on labelled images: data.dataset must be "
                         f"one of {DEMO_SOURCES}, got {dataset!r} (a gallery_table brings its "
                         "own old embeddings and needs no demo)")
    idx = stratified_subset(labels, cfg.get_path(f"data.{split}_limit"), cfg.get_path("seed"))
    return Split(images[idx], labels[idx], ids[idx], subgroup_of(labels[idx], cfg))


def check_class_sizes(labels: np.ndarray, in_train: np.ndarray, what: str) -> None:
    """Raise ValueError naming every class with too few items in the train or gallery split."""
    small = []
    for c in np.unique(labels):
        n_train = int(np.sum(in_train & (labels == c)))
        n_gallery = int(np.sum(~in_train & (labels == c)))
        if min(n_train, n_gallery) < MIN_ITEMS_PER_CLASS:
            small.append(f"class {int(c)}: {n_train} train / {n_gallery} gallery")
    if small:
        raise ValueError(f"data.{what}: classes too small for the demo's split (need at least "
                         f"{MIN_ITEMS_PER_CLASS} items in each; data.train_fraction decides the "
                         f"split): " + "; ".join(small))


def old_model_subset(split: Split, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the items the old model trains on and their remapped labels (0..k-1).

    Keeps only `demo.old_model.classes`, then `demo.old_model.minority_fraction` of the minority
    subgroup's classes (the biased-update demo). Raises ValueError for bad class lists."""
    classes = list(cfg.get_path("demo.old_model.classes"))
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"demo.old_model.classes must be distinct class ids, got {classes}")
    keep = np.flatnonzero(np.isin(split.labels, classes))
    if keep.size == 0:
        raise ValueError(f"demo.old_model.classes {classes} match none of the training labels "
                         f"{sorted(set(split.labels.tolist()))}")
    fraction = cfg.get_path("demo.old_model.minority_fraction")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"demo.old_model.minority_fraction must be in (0, 1], got {fraction}")
    if fraction < 1.0:
        minority = [c for c in cfg.get_path("data.subgroups.minority_classes") if c in classes]
        sub = subsample_classes(split.labels[keep], {int(c): fraction for c in minority},
                                cfg.get_path("seed"))
        keep = keep[sub]
    remap = {c: i for i, c in enumerate(classes)}
    return keep, np.array([remap[int(c)] for c in split.labels[keep]], dtype=np.int64)
