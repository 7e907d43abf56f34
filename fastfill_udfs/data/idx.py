"""Readers for IDX files (the MNIST / Fashion-MNIST format), plain or gzipped.

IDX layout: 2 zero bytes, a dtype code byte, a dims-count byte, then one big-endian uint32
per dimension, then the payload in C order (big-endian for multi-byte types).
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

# dtype code -> big-endian numpy dtype (IDX spec).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: Tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_INSTALL_HINT = (
    "install the Debian package with `sudo apt-get install dataset-fashion-mnist` "
    "(or run the project's setup script `scripts/setup.sh`), or pass the folder holding the "
    "IDX files as `root`"
)


class IDXFormatError(ValueError):
    """An IDX file is malformed (bad magic, dtype code, dims or payload length)."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    # Detect gzip by its magic bytes, not the file name: files get renamed and decompressed.
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise IDXFormatError(f"IDX file {path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a native-endian numpy array.

    Args:
        path: the IDX file.
    Returns:
        an array with the header's dims and dtype (uint8 for image/label files).
    Raises:
        FileNotFoundError: `path` does not exist.
        IDXFormatError (a ValueError): bad magic number, unknown dtype code, zero dims, or a
            payload whose length does not match the header; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IDXFormatError(f"IDX file {path}: only {len(raw)} bytes, too short for a header")
    if raw[0] != 0 or raw[1] != 0:
        raise IDXFormatError(
            f"IDX file {path}: bad magic number 0x{raw[:4].hex()} "
            "(expected two zero bytes, a dtype code and a dims count)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise IDXFormatError(f"IDX file {path}: unknown dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise IDXFormatError(f"IDX file {path}: header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(
            f"IDX file {path}: header declares {ndim} dims but the file ends after "
            f"{len(raw)} bytes (truncated header)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IDXFormatError(
            f"IDX file {path}: payload {what}: header dims {dims} of {dtype.name} need "
            f"{expected} bytes, found {actual}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    # Native byte order and a writable copy, so callers can mutate and pass it to torch.
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        candidate = root / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / (stem + '.gz')} not found (nor uncompressed {stem}); "
        + _INSTALL_HINT
    )


def load_fashion_mnist(
    root: PathLike | None = None, split: str = "train"
) -> Tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split from its IDX files.

    Args:
        root: folder holding `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`; None means the
            Debian package's folder, /usr/share/datasets/fashion-mnist.
        split: "train" (60k items) or "test" (10k items).
    Returns:
        (images uint8 [N, 28, 28], labels int64 [N]); class names in FASHION_MNIST_CLASSES.
    Raises:
        ValueError: unknown `split`; images/labels counts differ or shapes/labels are wrong
            (the message names the files).
        FileNotFoundError: folder or file missing; the message says how to install the data.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    root_path = Path(root if root is not None else DEFAULT_FASHION_MNIST_ROOT)
    if not root_path.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {root_path} does not exist; " + _INSTALL_HINT)
    prefix = _SPLIT_PREFIX[split]
    images_path = _find_idx(root_path, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root_path, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{images_path}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected 1-D labels, got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: {images_path} holds {images.shape[0]} images but "
            f"{labels_path} holds {labels.shape[0]} labels"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(
            f"{labels_path}: labels must be in [0, {len(FASHION_MNIST_CLASSES) - 1}], "
            f"found [{labels.min()}, {labels.max()}]"
        )
    return images, labels
