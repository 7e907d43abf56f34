"""Image encoding/decoding and local (driver-side, no Spark) loaders for labelled images.

Loaders return `(items, rejected)`: `items` holds the usable rows, `rejected[id, reason]` every
row that was left out and why, so nothing is dropped silently. These loaders read everything into
memory: they are for the demo and tests; at scale the Spark jobs read the tables themselves.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image

PathLike = Union[str, "os.PathLike[str]"]
SizeArg = Union[int, Tuple[int, int], None]

REQUIRED_TABLE_COLUMNS = ("id", "label", "image")
ITEM_COLUMNS = ["id", "label", "class_name", "image"]
REJECTED_COLUMNS = ["id", "reason"]


class ImageDecodeError(ValueError):
    """Bytes that should hold an encoded image cannot be decoded."""


# --------------------------------------------------------------------------- encode / decode

def encode_png(img: np.ndarray) -> bytes:
    """Encode a uint8 image (HxW, HxWx1, HxWx3 or HxWx4) as PNG bytes (lossless).

    Raises TypeError when `img` is not a uint8 ndarray, ValueError on any other shape.
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"img must be a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"img must have dtype uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise ValueError(f"img must be HxW, HxWx1, HxWx3 or HxWx4, got shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"img must not be empty, got shape {img.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _size_hw(size: SizeArg) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size
    ):
        hw = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be None, an int or a (height, width) pair, got {size!r}")
    if min(hw) <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return hw


def decode_image(
    data: Any,
    *,
    item_id: Any = None,
    size: SizeArg = None,
    grayscale: bool = True,
) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ... anything PIL reads) to float32 in [0, 1].

    Args:
        data: the encoded bytes (bytes, bytearray or memoryview).
        item_id: the item's id, used only to name it in errors.
        size: None keeps the image's size; an int or (height, width) resizes (bilinear).
        grayscale: True -> [H, W] luminance; False -> [H, W, 3] RGB.
    Raises:
        ValueError: bad `size`.
        ImageDecodeError (a ValueError): missing, empty or undecodable bytes; names `item_id`.
    """
    hw = _size_hw(size)

    def resize(im):
        return im.resize((hw[1], hw[0]), Image.BILINEAR) if hw is not None \
            and (im.height, im.width) != hw else im
    arr = decode_uint8(data, item_id=item_id, grayscale=grayscale, transform=resize)
    return arr.astype(np.float32) / np.float32(255.0)


def decode_uint8(data: Any, *, item_id: Any = None, grayscale: bool = True,
                 transform: Optional[Callable[[Image.Image], Image.Image]] = None) -> np.ndarray:
    """Decode encoded image bytes to uint8 [H, W] (grayscale) or [H, W, 3] (RGB), applying
    `transform` (PIL image -> PIL image, e.g. a resize) to the decoded image first.

    Raises ImageDecodeError (a ValueError) naming `item_id` for missing, empty or undecodable
    bytes; an error raised by `transform` propagates unchanged."""
    who = f"item {item_id!r}" if item_id is not None else "image"
    if data is None:
        raise ImageDecodeError(f"{who}: image bytes are null")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"{who}: expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(f"{who}: image bytes are empty")
    try:
        im = Image.open(io.BytesIO(bytes(data)))
        im.load()  # force a full decode so truncated files fail here, not later
        im = im.convert("L" if grayscale else "RGB")
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise ImageDecodeError(
            f"{who}: cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}"
        ) from exc
    if transform is not None:
        im = transform(im)
    return np.asarray(im, dtype=np.uint8)


def _decode_problem(data: Any, item_id: Any) -> Optional[str]:
    """None when `data` decodes as an image, else the reason it does not."""
    try:
        decode_image(data, item_id=item_id)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def _rejected_frame(rows: List[Tuple[Any, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=REJECTED_COLUMNS).astype({"reason": str})


# --------------------------------------------------------------------------- image folder

def load_image_folder(root: PathLike) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Load an image-folder dataset: `root/<class_name>/**/<file>`, one sub-folder per class.

    Class index = position of the sub-folder in sorted name order; `id` = the file's path
    relative to `root` with '/' separators. Hidden files and folders (leading '.') are skipped.
    Returns:
        (items[id, label int64, class_name, image bytes (the file as is)],
         rejected[id, reason]) where rejected lists undecodable files and files lying
        directly in `root` (outside any class folder).
    Raises:
        FileNotFoundError / NotADirectoryError: `root` missing or not a folder.
        ValueError: `root` has no class sub-folders, or they hold no files; names the folder.
    """
    root_path = Path(root)
    if not root_path.exists():
        raise FileNotFoundError(f"image folder {root_path} does not exist")
    if not root_path.is_dir():
        raise NotADirectoryError(f"image folder {root_path} is not a directory")
    entries = sorted(p for p in root_path.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    if not class_dirs:
        raise ValueError(
            f"image folder {root_path} has no class sub-folders (expected root/<class>/<image>)"
        )
    rejected: List[Tuple[Any, str]] = [
        (p.name, "file is not inside a class sub-folder") for p in entries if p.is_file()
    ]
    rows = []
    for label, class_dir in enumerate(class_dirs):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                file_path = Path(dirpath) / name
                item_id = file_path.relative_to(root_path).as_posix()
                data = file_path.read_bytes()
                problem = _decode_problem(data, item_id)
                if problem is not None:
                    rejected.append((item_id, problem))
                else:
                    rows.append((item_id, label, class_dir.name, data))
    if not rows and not rejected:
        raise ValueError(f"image folder {root_path}: class sub-folders hold no files")
    items = pd.DataFrame(rows, columns=ITEM_COLUMNS).astype({"label": np.int64})
    return items, _rejected_frame(rejected)


# --------------------------------------------------------------------------- Delta

def _read_delta(table: Path, columns: Sequence[str]) -> pa.Table:
    """`columns` of the latest version of the Delta table at `table`, read with the `deltalake`
    package (delta-rs: no JVM), which follows the whole protocol: checkpoints, deletion
    vectors, column mapping, partition columns. Raises ValueError naming the table when it
    cannot be read or lacks one of `columns`."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    try:
        delta = DeltaTable(str(table))
        _require_columns(table, [f.name for f in delta.schema().fields], columns)
        data = pa.table(delta.scan(columns=list(columns)))
    except (DeltaError, pa.ArrowException, OSError) as exc:
        raise ValueError(f"Delta table {table} cannot be read: {type(exc).__name__}: {exc}"
                         ) from exc
    # delta-rs hands strings and bytes over as Arrow view types; the loader works on plain ones
    plain = {pa.types.is_string_view: pa.string(), pa.types.is_binary_view: pa.binary()}
    return data.cast(pa.schema([
        f.with_type(next((t for is_view, t in plain.items() if is_view(f.type)), f.type))
        for f in data.schema]))


# --------------------------------------------------------------------------- Parquet / Delta

def _require_columns(where: Path, names: Sequence[str],
                     required: Sequence[str] = REQUIRED_TABLE_COLUMNS) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(
            f"table {where} is missing required column(s) {missing}; it has {list(names)}"
        )


def _label_problem(value: Any) -> Tuple[Optional[int], Optional[str]]:
    """(label, None) for a valid label, else (None, reason)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, "label is null"
    if isinstance(value, (bool, np.bool_)):
        return None, f"label {value!r} is not an integer"
    if isinstance(value, (int, np.integer)):
        label = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        label = int(value)
    else:
        return None, f"label {value!r} is not an integer"
    if label < 0:
        return None, f"label {label} is negative"
    return label, None


def load_image_table(path: PathLike, extra_columns: Sequence[str] = ()
                     ) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Load a labelled image table with columns id, label, image (encoded bytes), plus
    `extra_columns` passed through as they are (e.g. the user's own subgroup column).

    Args:
        path: a Parquet file, a folder of Parquet files (hive partitions allowed), or a Delta
            table folder (has `_delta_log/`), read without Spark by `deltalake` (any Delta
            table: checkpoints, deletion vectors, column mapping).
    Returns:
        (items[id str, label int64, image bytes, *extra_columns], rejected[id, reason]); a row
        is rejected when
        its id or image is null, its label is null, negative or not an integer, or its image does
        not decode (all its problems are listed in `reason`).
    Raises:
        FileNotFoundError: `path` missing. ValueError: required or extra columns missing (named),
        duplicate ids (a few listed), or a Delta table that cannot be read (named).
    """
    table_path = Path(path)
    if not table_path.exists():
        raise FileNotFoundError(f"image table {table_path} does not exist")
    extra = [c for c in extra_columns if c not in REQUIRED_TABLE_COLUMNS]
    columns = list(REQUIRED_TABLE_COLUMNS) + extra
    if table_path.is_dir() and (table_path / "_delta_log").is_dir():
        table = _read_delta(table_path, columns)
    else:
        try:
            dataset = pads.dataset(table_path, format="parquet", partitioning="hive")
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"cannot read {table_path} as Parquet: {exc}") from exc
        _require_columns(table_path, dataset.schema.names, columns)
        table = dataset.to_table(columns=columns)

    if table.num_rows == 0:
        empty = pd.DataFrame({"id": pd.Series([], dtype=object),
                              "label": pd.Series([], dtype=np.int64),
                              "image": pd.Series([], dtype=object),
                              **{c: pd.Series([], dtype=object) for c in extra}})
        return empty, _rejected_frame([])

    image_type = table.schema.field("image").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise ValueError(
            f"table {table_path}: column 'image' must be binary (encoded image bytes), "
            f"got {image_type}"
        )
    ids = [None if v is None else str(v) for v in table.column("id").to_pylist()]
    labels = table.column("label").to_pylist()
    images = table.column("image").to_pylist()
    extras = [table.column(c).to_pylist() for c in extra]

    seen, dups = set(), []
    for item_id in ids:
        if item_id is not None:
            if item_id in seen and item_id not in dups:
                dups.append(item_id)
            seen.add(item_id)
    if dups:
        shown = ", ".join(repr(d) for d in dups[:5])
        raise ValueError(
            f"table {table_path}: column 'id' must be unique; {len(dups)} duplicated id(s), "
            f"e.g. {shown}"
        )

    rows, rejected = [], []
    for row, (item_id, raw_label, data) in enumerate(zip(ids, labels, images)):
        problems = []
        if item_id is None:
            problems.append(f"row {row}: id is null")
        label, label_problem = _label_problem(raw_label)
        if label_problem:
            problems.append(label_problem)
        image_problem = _decode_problem(data, item_id if item_id is not None else f"row {row}")
        if image_problem:
            problems.append(image_problem)
        if problems:
            rejected.append((item_id, "; ".join(problems)))
        else:
            rows.append((item_id, label, data, *(values[row] for values in extras)))
    items = pd.DataFrame(rows, columns=["id", "label", "image", *extra]).astype(
        {"label": np.int64})
    return items, _rejected_frame(rejected)


# --------------------------------------------------------------------------- subsets

def _check_labels(labels: Any) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def stratified_subset(labels: Any, limit: int, seed: int) -> np.ndarray:
    """Seeded, class-stratified subset of `limit` indices into `labels`, sorted ascending.

    Each class gets its proportional share of `limit` (largest-remainder rounding, ties to the
    smaller class id), drawn at random within the class. Same inputs -> same output.
    Args:
        labels: 1-D integer class labels (length N).
        limit: subset size; 0 or >= N returns all indices 0..N-1.
        seed: non-negative int.
    Raises:
        ValueError: `labels` not 1-D integers, `limit` negative or not an int, bad `seed`.
    """
    arr = _check_labels(labels)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise ValueError(f"limit must be a non-negative int (0 = all), got {limit!r}")
    rng = np.random.default_rng(_check_seed(seed))
    n = arr.size
    if limit == 0 or limit >= n:
        return np.arange(n, dtype=np.int64)
    classes, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
    exact = counts * (limit / n)
    quota = np.floor(exact).astype(np.int64)
    # Hand out the rounding leftovers to the largest remainders; stable sort keeps ties ordered.
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: limit - int(quota.sum())]] += 1
    picked = []
    for k in range(classes.size):
        members = np.flatnonzero(inverse == k)
        picked.append(rng.permutation(members)[: quota[k]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def subsample_classes(labels: Any, fractions: Mapping[int, float], seed: int) -> np.ndarray:
    """Seeded indices keeping `fractions[c]` of each listed class c and all of the others.

    Used to bias a model, e.g. `{5: 0.03, 7: 0.03, 9: 0.03}` keeps 3% of footwear. A listed class
    keeps round(fraction * count) items, at least 1 when the fraction is > 0; listed classes that
    do not occur are ignored. Returns sorted int64 indices; same inputs -> same output.
    Raises:
        ValueError: `labels` not 1-D integers, a fraction outside [0, 1] or a non-int class key
            (named), bad `seed`.
    """
    arr = _check_labels(labels)
    if not isinstance(fractions, Mapping):
        raise ValueError(f"fractions must be a dict {{class: fraction}}, got {type(fractions).__name__}")
    for cls, frac in fractions.items():
        if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)):
            raise ValueError(f"fractions: class key {cls!r} must be an int")
        if isinstance(frac, bool) or not isinstance(frac, (int, float, np.number)) or not 0 <= frac <= 1:
            raise ValueError(f"fractions[{cls}] must be a number in [0, 1], got {frac!r}")
    rng = np.random.default_rng(_check_seed(seed))
    keep = np.ones(arr.size, dtype=bool)
    for cls in sorted(int(c) for c in fractions):
        members = np.flatnonzero(arr == cls)
        if members.size == 0:
            continue
        frac = float(fractions[cls])
        n_keep = int(round(frac * members.size))
        if frac > 0:
            n_keep = max(n_keep, 1)
        keep[members] = False
        keep[rng.permutation(members)[:n_keep]] = True
    return np.flatnonzero(keep).astype(np.int64)
