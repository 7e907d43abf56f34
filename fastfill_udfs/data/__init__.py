"""Pure-Python (no Spark) data readers: IDX / Fashion-MNIST, image folders, Parquet/Delta image
tables, PNG encode/decode, and seeded subsets."""
from fastfill_udfs.data.idx import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    IDXFormatError,
    load_fashion_mnist,
    read_idx,
)
from fastfill_udfs.data.images import (
    ImageDecodeError,
    decode_image,
    encode_png,
    load_image_folder,
    load_image_table,
    stratified_subset,
    subsample_classes,
)

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "IDXFormatError",
    "ImageDecodeError",
    "decode_image",
    "encode_png",
    "load_fashion_mnist",
    "load_image_folder",
    "load_image_table",
    "read_idx",
    "stratified_subset",
    "subsample_classes",
]
