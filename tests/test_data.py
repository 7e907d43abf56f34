"""Tests for the pure-Python data readers (no Spark)."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastfill_udfs.data import (
    FASHION_MNIST_CLASSES,
    IDXFormatError,
    ImageDecodeError,
    decode_image,
    encode_png,
    load_fashion_mnist,
    load_image_folder,
    load_image_table,
    read_idx,
    stratified_subset,
    subsample_classes,
)

DATA = Path(__file__).parent / "data"
from tests.conftest import FASHION_MNIST_DIR  # noqa: E402
from tests.conftest import needs_fashion_mnist as needs_fmnist  # noqa: E402


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08, *, compress: bool = True,
              payload: bytes | None = None, magic: bytes | None = None) -> Path:
    """Write an IDX file by hand (big-endian header), optionally with a forged magic/payload."""
    header = (magic or bytes([0, 0, code, arr.ndim])) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = payload if payload is not None else arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    raw = header + body
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def png(value: int, shape=(4, 4)) -> bytes:
    return encode_png(np.full(shape, value, dtype=np.uint8))


# ------------------------------------------------------------------------------------ IDX

def test_read_idx_handwritten_gz_and_plain(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / "x-idx3-ubyte.gz", arr))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    # Uncompressed, multi-byte big-endian dtype: must come back native-endian and equal.
    ints = np.array([1, -2, 70000], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / "ints-idx1", ints, code=0x0C, compress=False))
    assert out.dtype == np.dtype("int32") and out.dtype.isnative
    np.testing.assert_array_equal(out, ints)


def test_read_idx_golden_first3():
    images = read_idx(DATA / "fashion_mnist_first3" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DATA / "fashion_mnist_first3" / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [9, 2, 1]  # Ankle boot, Pullover, Trouser
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot" and len(FASHION_MNIST_CLASSES) == 10


def test_read_idx_truncated_names_file(tmp_path):
    arr = np.zeros((5, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "short-idx3-ubyte.gz", arr, payload=arr.tobytes()[:-10])
    with pytest.raises(IDXFormatError, match="short-idx3-ubyte.gz.*truncated"):
        read_idx(path)
    # A gzip stream cut in the middle is also reported with the file name.
    good = write_idx(tmp_path / "cut.gz", arr).read_bytes()
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(IDXFormatError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")


def test_read_idx_bad_magic_and_dtype(tmp_path):
    arr = np.zeros((2, 2), dtype=np.uint8)
    path = write_idx(tmp_path / "magic.gz", arr, magic=bytes([1, 2, 8, 2]))
    with pytest.raises(IDXFormatError, match="magic.gz.*bad magic"):
        read_idx(path)
    path = write_idx(tmp_path / "dtype.gz", arr, magic=bytes([0, 0, 0x42, 2]))
    with pytest.raises(IDXFormatError, match="dtype.gz.*dtype code 0x42"):
        read_idx(path)
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")


def test_load_fashion_mnist_golden_folder():
    images, labels = load_fashion_mnist(DATA / "fashion_mnist_first3", "test")
    assert images.shape == (3, 28, 28) and labels.dtype == np.int64
    assert labels.tolist() == [9, 2, 1]


def test_load_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "absent", "train")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*scripts/setup.sh"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(tmp_path, "val")


def test_load_fashion_mnist_count_mismatch(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*3 images.*t10k-labels"):
        load_fashion_mnist(tmp_path, "test")


@needs_fmnist
def test_load_fashion_mnist_real_test_split():
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    golden = read_idx(DATA / "fashion_mnist_first3" / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(images[:3], golden)
    assert labels[:3].tolist() == [9, 2, 1]


# ------------------------------------------------------------------------------ encode/decode

def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    out = decode_image(encode_png(gray))
    assert out.dtype == np.float32 and out.shape == (28, 28)
    np.testing.assert_array_equal(np.rint(out * 255).astype(np.uint8), gray)  # PNG is lossless
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    out = decode_image(encode_png(rgb), grayscale=False)
    np.testing.assert_array_equal(np.rint(out * 255).astype(np.uint8), rgb)
    resized = decode_image(encode_png(gray), size=(14, 7))
    assert resized.shape == (14, 7) and 0.0 <= resized.min() and resized.max() <= 1.0


def test_decode_errors_name_item():
    with pytest.raises(ImageDecodeError, match="item 'img-7'") as info:
        decode_image(b"garbage bytes", item_id="img-7")
    assert isinstance(info.value, ValueError)
    truncated = encode_png(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8))[:60]
    with pytest.raises(ImageDecodeError, match="cut"):
        decode_image(truncated, item_id="cut")
    with pytest.raises(ImageDecodeError, match="null"):
        decode_image(None, item_id="n")
    with pytest.raises(TypeError, match="uint8"):
        encode_png(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="size"):
        decode_image(png(1), size=(0, 3))


# ------------------------------------------------------------------------------ image folder

def test_load_image_folder_golden_with_corrupt_file():
    items, rejected = load_image_folder(DATA / "image_folder")
    assert list(items.columns) == ["id", "label", "class_name", "image"]
    assert items["id"].tolist() == [
        "ankle_boot/t10k_00000.png", "ankle_boot/t10k_00023.png",
        "trouser/t10k_00002.png", "trouser/t10k_00003.png",
    ]
    assert items["label"].tolist() == [0, 0, 1, 1]  # sorted sub-folder order
    assert items["class_name"].tolist() == ["ankle_boot"] * 2 + ["trouser"] * 2
    assert rejected["id"].tolist() == ["trouser/corrupt.png"]
    assert "cannot decode" in rejected["reason"].iloc[0]
    # The stored bytes are the file as is, and decode to the real Fashion-MNIST pixels.
    golden = read_idx(DATA / "fashion_mnist_first3" / "t10k-images-idx3-ubyte.gz")
    first = decode_image(items["image"].iloc[0])
    np.testing.assert_array_equal(np.rint(first * 255).astype(np.uint8), golden[0])


def test_load_image_folder_tmp_and_errors(tmp_path):
    for cls, values in (("b_cls", [10, 20]), ("a_cls", [30])):
        (tmp_path / cls).mkdir()
        for i, v in enumerate(values):
            (tmp_path / cls / f"{i}.png").write_bytes(png(v))
    (tmp_path / "b_cls" / "bad.png").write_bytes(b"\x00\x01garbage")
    (tmp_path / "stray.png").write_bytes(png(1))
    items, rejected = load_image_folder(tmp_path)
    assert dict(zip(items["id"], items["label"])) == {"a_cls/0.png": 0, "b_cls/0.png": 1, "b_cls/1.png": 1}
    assert set(rejected["id"]) == {"b_cls/bad.png", "stray.png"}

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*no class sub-folders"):
        load_image_folder(empty)
    (empty / "cls").mkdir()
    with pytest.raises(ValueError, match="empty.*hold no files"):
        load_image_folder(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")


# ------------------------------------------------------------------------------ tables

def write_table(path: Path, ids, labels, images, label_type=pa.int64()) -> Path:
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, label_type),
        "image": pa.array(images, pa.binary()),
        "subgroup": pa.array(["x"] * len(ids), pa.string()),
    })
    pq.write_table(table, path)
    return path


def test_load_image_table_rejects_bad_rows(tmp_path):
    path = write_table(
        tmp_path / "t.parquet",
        ["ok1", "nolabel", "neg", "badimg", "ok2"],
        [1, None, -3, 2, 0],
        [png(1), png(2), png(3), b"not an image", png(5)],
    )
    items, rejected = load_image_table(path)
    assert items["id"].tolist() == ["ok1", "ok2"]
    assert items["label"].tolist() == [1, 0] and items["label"].dtype == np.int64
    assert list(items.columns) == ["id", "label", "image"]
    reasons = dict(zip(rejected["id"], rejected["reason"]))
    assert set(reasons) == {"nolabel", "neg", "badimg"}
    assert "null" in reasons["nolabel"]
    assert "negative" in reasons["neg"]
    assert "badimg" in reasons["badimg"] and "cannot decode" in reasons["badimg"]


def test_load_image_table_non_integer_float_labels(tmp_path):
    path = write_table(tmp_path / "f.parquet", ["a", "b", "c"], [1.0, 2.5, float("nan")],
                       [png(1)] * 3, label_type=pa.float64())
    items, rejected = load_image_table(path)
    assert items["id"].tolist() == ["a"] and items["label"].tolist() == [1]
    reasons = dict(zip(rejected["id"], rejected["reason"]))
    assert "not an integer" in reasons["b"] and "null" in reasons["c"]


def test_load_image_table_duplicates_and_missing_columns(tmp_path):
    path = write_table(tmp_path / "d.parquet", ["a", "dup1", "dup1", "b"], [0, 1, 1, 2], [png(1)] * 4)
    with pytest.raises(ValueError, match="dup1"):
        load_image_table(path)
    pq.write_table(pa.table({"id": ["a"], "img": [b"x"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"missing.*'label'.*'image'"):
        load_image_table(tmp_path / "m.parquet")
    with pytest.raises(FileNotFoundError):
        load_image_table(tmp_path / "none.parquet")


def test_load_image_table_passes_extra_columns_through(tmp_path):
    path = write_table(tmp_path / "e.parquet", ["a", "bad", "b"], [0, 1, 2],
                       [png(1), b"junk", png(2)])
    items, rejected = load_image_table(path, extra_columns=["subgroup"])
    assert list(items.columns) == ["id", "label", "image", "subgroup"]
    assert items["subgroup"].tolist() == ["x", "x"] and rejected["id"].tolist() == ["bad"]
    with pytest.raises(ValueError, match=r"missing.*'region'"):
        load_image_table(path, extra_columns=["region"])


def test_load_image_table_parquet_folder(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_table(folder / "part-0.parquet", ["a", "b"], [0, 1], [png(1), png(2)])
    write_table(folder / "part-1.parquet", ["c"], [2], [png(3)])
    items, rejected = load_image_table(folder)
    assert sorted(items["id"]) == ["a", "b", "c"] and rejected.empty


def _delta_commit(log: Path, version: int, actions) -> None:
    log.mkdir(exist_ok=True)
    (log / f"{version:020d}.json").write_text("\n".join(json.dumps(a) for a in actions) + "\n")


def _delta_meta(partition_columns=()):
    fields = [{"name": n, "type": t, "nullable": True, "metadata": {}}
              for n, t in (("id", "string"), ("label", "long"), ("image", "binary"))]
    return {"metaData": {"id": "t", "format": {"provider": "parquet", "options": {}},
                         "schemaString": json.dumps({"type": "struct", "fields": fields}),
                         "partitionColumns": list(partition_columns), "configuration": {},
                         "createdTime": 0}}


def _add(table: Path, path: str, partition_values=None):
    size = (table / path.replace("%20", " ")).stat().st_size
    return {"add": {"path": path, "partitionValues": partition_values or {}, "size": size,
                    "modificationTime": 0, "dataChange": True}}


def test_load_image_table_delta_replays_add_remove(tmp_path):
    table = tmp_path / "delta"
    table.mkdir()
    write_table(table / "part-a.parquet", ["a1", "a2"], [0, 1], [png(1), png(2)])
    write_table(table / "part-b.parquet", ["b1"], [1], [png(3)])
    write_table(table / "part c.parquet", ["c1", "c2"], [None, 2], [png(4), png(5)])
    log = table / "_delta_log"
    _delta_commit(log, 0, [{"protocol": {"minReaderVersion": 1, "minWriterVersion": 2}},
                           _delta_meta(), _add(table, "part-a.parquet"),
                           _add(table, "part-b.parquet")])
    # Version 1 rewrites part-a away (e.g. a DELETE); its rows must not come back.
    _delta_commit(log, 1, [{"remove": {"path": "part-a.parquet", "dataChange": True}},
                           _add(table, "part%20c.parquet")])
    items, rejected = load_image_table(table)
    assert sorted(items["id"]) == ["b1", "c2"]
    assert rejected["id"].tolist() == ["c1"]

    (table / "part-b.parquet").unlink()               # a file the log lists is gone
    with pytest.raises(ValueError, match=f"Delta table {table}"):
        load_image_table(table)


def test_load_image_table_delta_partitioned(tmp_path):
    table = tmp_path / "delta"
    (table / "label=3").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["p1"], "image": pa.array([png(9)], pa.binary())}),
                   table / "label=3" / "part-0.parquet")
    _delta_commit(table / "_delta_log", 0, [
        {"protocol": {"minReaderVersion": 1, "minWriterVersion": 2}},
        _delta_meta(partition_columns=["label"]),
        _add(table, "label=3/part-0.parquet", {"label": "3"}),
    ])
    items, rejected = load_image_table(table)
    assert items["id"].tolist() == ["p1"] and items["label"].tolist() == [3] and rejected.empty


# ------------------------------------------------------------------------------ subsets

def test_stratified_subset_deterministic_and_balanced():
    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(1).shuffle(labels)
    a = stratified_subset(labels, 200, seed=3)
    b = stratified_subset(labels, 200, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.size == 200 and np.all(np.diff(a) > 0)
    assert np.bincount(labels[a], minlength=10).tolist() == [20] * 10
    assert not np.array_equal(a, stratified_subset(labels, 200, seed=4))
    # Unbalanced classes keep their proportions; sizes always add up to `limit`.
    skewed = np.array([0] * 90 + [1] * 9 + [2] * 1)
    idx = stratified_subset(skewed, 11, seed=0)
    assert idx.size == 11 and np.bincount(skewed[idx], minlength=3).tolist() == [10, 1, 0]
    np.testing.assert_array_equal(stratified_subset(labels, 0, seed=0), np.arange(1000))
    np.testing.assert_array_equal(stratified_subset(labels, 5000, seed=0), np.arange(1000))
    with pytest.raises(ValueError, match="limit"):
        stratified_subset(labels, -1, seed=0)
    with pytest.raises(ValueError, match="labels"):
        stratified_subset(np.zeros((2, 2), int), 1, seed=0)


def test_subsample_classes_fraction():
    labels = np.repeat(np.arange(10), 1000)
    footwear = {5: 0.03, 7: 0.03, 9: 0.03}
    idx = subsample_classes(labels, footwear, seed=0)
    counts = np.bincount(labels[idx], minlength=10)
    assert counts[[5, 7, 9]].tolist() == [30, 30, 30]
    assert counts[[0, 1, 2, 3, 4, 6, 8]].tolist() == [1000] * 7
    np.testing.assert_array_equal(idx, subsample_classes(labels, footwear, seed=0))
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(labels[subsample_classes(labels, {3: 0.0}, seed=0)], minlength=10)[3] == 0
    with pytest.raises(ValueError, match=r"fractions\[5\]"):
        subsample_classes(labels, {5: 1.5}, seed=0)
