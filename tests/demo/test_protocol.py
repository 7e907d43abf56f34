"""The demo's own-data mode: an image folder split by a seeded hash of each id into the study's
training items and the gallery, the same split whichever way the ids are partitioned (the Spark
ingest applies it per batch), resized to models.preprocess, and a clear stop for a class too
small for the protocol."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastfill_udfs.config import load_config
from fastfill_udfs.demo.protocol import load_split, train_mask


def _folder(root, per_class: dict[str, int], size=(20, 24)):
    rng = np.random.default_rng(0)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(
                root / name / f"{i:03d}.png")
    return root


def test_train_mask_is_seeded_and_per_id():
    ids = np.array([f"cls/{i}.png" for i in range(2000)])
    mask = train_mask(ids, seed=3, train_fraction=0.25)
    assert 0.2 < mask.mean() < 0.3
    # any subset of the ids (a Spark partition) gets the same answer for each id
    part = np.random.default_rng(1).permutation(len(ids))[:300]
    np.testing.assert_array_equal(train_mask(ids[part], 3, 0.25), mask[part])
    assert not np.array_equal(train_mask(ids, 4, 0.25), mask)          # the seed matters
    with pytest.raises(ValueError, match="data.train_fraction must be in"):
        train_mask(ids, 0, 1.0)


def test_image_folder_splits_into_train_and_gallery_at_the_model_size(tmp_path):
    root = _folder(tmp_path / "images", {"boots": 30, "coats": 30, "hats": 30})
    cfg = load_config([], ["data.dataset=image_folder", f"data.image_folder={root}",
                           "data.train_fraction=0.5", "models.preprocess.size=[28, 28]"])
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(train.ids) + len(test.ids) == 90 and not set(train.ids) & set(test.ids)
    assert train.images.shape[1:] == (28, 28) and train.images.dtype == np.uint8
    assert set(train.labels) == set(test.labels) == {0, 1, 2}    # folders in name order
    in_train = train_mask(np.concatenate([train.ids, test.ids]), 0, 0.5)
    assert in_train[:len(train.ids)].all() and not in_train[len(train.ids):].any()
    assert test.ids[0].split("/")[0] in {"boots", "coats", "hats"}


def test_a_class_too_small_for_the_split_is_named(tmp_path):
    root = _folder(tmp_path / "images", {"boots": 30, "rare": 2})
    cfg = load_config([], ["data.dataset=image_folder", f"data.image_folder={root}",
                           "models.preprocess.size=[28, 28]"])
    with pytest.raises(ValueError, match=r"classes too small .*class 1: \d train / \d gallery"):
        load_split(cfg, "train")


def test_a_gallery_table_is_not_a_demo_source():
    with pytest.raises(ValueError, match="the demo trains its models on labelled images"):
        load_split(load_config([], ["data.dataset=gallery_table"]), "train")
