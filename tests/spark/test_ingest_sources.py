"""Where the ingest's items and subgroups come from: the config's class mapping or the user's
own subgroup column of an image table (no Spark needed)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fastfill_udfs.config import load_config
from fastfill_udfs.spark.ingest import load_source_items


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), seed * 20, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_table(tmp_path):
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({
        "id": ["a", "b", "c", "d"], "label": pa.array([5, 0, 7, 1], pa.int64()),
        "image": [_png(i) for i in range(4)],
        "region": ["eu", "us", None, "eu"]}), path)
    return path


def _cfg(path, *sets):
    return load_config([], ["data.dataset=image_table", f"data.image_table={path}", *sets])


def test_subgroups_from_the_config_class_mapping(image_table):
    items, rejected = load_source_items(_cfg(image_table))
    assert rejected.empty
    assert dict(zip(items["id"], items["subgroup"])) == {     # base: classes 5, 7, 9 = footwear
        "a": "footwear", "b": "rest", "c": "footwear", "d": "rest"}


def test_subgroups_from_the_users_own_column(image_table):
    items, _ = load_source_items(_cfg(image_table, "data.subgroups.column=region"))
    assert list(items.columns) == ["id", "label", "subgroup", "image"]
    assert dict(zip(items["id"], items["subgroup"])) == {"a": "eu", "b": "us", "c": "", "d": "eu"}
    with pytest.raises(ValueError, match=r"missing.*'zone'"):
        load_source_items(_cfg(image_table, "data.subgroups.column=zone"))
    with pytest.raises(ValueError, match="data.subgroups.column"):
        load_source_items(load_config([], ["data.subgroups.column=region"]))  # fashion_mnist
