"""Arrow <-> numpy for embedding columns (`array<float>` in Spark, `list<float>` in Arrow),
without going through Python lists: one flat buffer per batch, reshaped; `arrow_rows` brings a
Spark DataFrame with an embedding column to the driver that way."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame


def embedding_matrix(column: pa.Array | pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(matrix float32 [n, dim], bad_reason object [n]) from a list<float> column.

    Rows that are null, of another length, or hold NaN/inf get a zero row in the matrix and a
    reason string in `bad_reason` (None for good rows) so callers can quarantine them by id."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    reasons = np.full(n, None, dtype=object)
    if n == 0:
        return np.zeros((0, dim), np.float32), reasons
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    lengths = np.where(nulls, -1, np.nan_to_num(lengths, nan=-1)).astype(np.int64)
    good_len = lengths == dim
    if good_len.all():
        mat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        mat = mat.reshape(n, dim)
    else:
        mat = np.zeros((n, dim), np.float32)
        for i in np.flatnonzero(good_len):
            mat[i] = np.asarray(column[i].values, dtype=np.float32)
        reasons[nulls] = "embedding is null"
        wrong = ~good_len & ~nulls
        for i in np.flatnonzero(wrong):
            reasons[i] = f"embedding has dimension {lengths[i]}, expected {dim}"
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        reasons[~finite & (reasons == None)] = "embedding contains NaN or inf"  # noqa: E711
        mat = mat.copy()  # Arrow-backed buffers are read-only
        mat[~finite] = 0.0
    return mat, reasons


def list_array(matrix: np.ndarray) -> pa.ListArray:
    """A list<float> Arrow array from a float32 [n, dim] matrix (zero-copy for the values)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n, dim = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


def arrow_rows(df: DataFrame, what: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(the non-embedding columns as pandas, the embeddings as float32 rows) of `df`, through
    Arrow (no Python list per row). Raises ValueError naming ids with a null, wrong-size or
    NaN embedding."""
    table = df.toArrow()
    others = table.drop_columns(["embedding"]).to_pandas()
    if not len(table):
        return others, np.zeros((0, 0), np.float32)
    column = table.column("embedding").combine_chunks()
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    dim = int(np.bincount(np.nan_to_num(lengths, nan=0).astype(np.int64)).argmax())
    matrix, reasons = embedding_matrix(column, dim)
    bad = reasons != None  # noqa: E711
    if bad.any():
        ids = others["id"].to_numpy(dtype=object)[bad][:5].tolist()
        raise ValueError(f"{what}: {int(bad.sum())} rows cannot be indexed, e.g. ids {ids}: "
                         f"{reasons[bad][0]}")
    return others, matrix
