"""Spark UDFs that run the project's models on workers.

Models travel as a broadcast `ModelPayload` and are rebuilt once per Python worker process
(cached by content hash), never once per batch.

* `transform_fn` / `embed_images_fn`: Arrow-native `mapInArrow` functions used by the jobs.
* `transformation_udf(h)`: the public pandas UDF (iterator of Series) for notebooks and SQL:
  old embedding -> struct(transformed array<float>, sigma double); register it with
  `spark.udf.register("fastfill_transform", transformation_udf(h))`.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pandas as pd  # module level: the pandas UDF's type hints are resolved against it
import pyarrow as pa
import pyarrow.compute as pc

from fastfill_udfs.model_loading import ModelPayload
from fastfill_udfs.preprocess import Preprocess, stack_by_shape
from fastfill_udfs.spark.arrow_utils import embedding_matrix, list_array

_WORKER_EMBEDDERS: dict[tuple, object] = {}
TRANSFORM_STRUCT = "struct<transformed: array<float>, sigma: double>"


def _worker_embedder(payload: ModelPayload, device: str, batch_size: int,
                     preprocess: Preprocess):
    key = (payload.key, device, batch_size, preprocess)
    if key not in _WORKER_EMBEDDERS:
        from fastfill_udfs.inference import BatchEmbedder

        _WORKER_EMBEDDERS[key] = BatchEmbedder(payload.load(), device=device,
                                               batch_size=batch_size,
                                               preprocess=preprocess.normalizer())
    return _WORKER_EMBEDDERS[key]


def _passthrough(batch: pa.RecordBatch, keep: list[str]) -> dict[str, pa.Array]:
    return {name: batch.column(name) for name in keep}


def _masked_list(matrix: np.ndarray, bad: np.ndarray) -> pa.Array:
    arr = list_array(matrix)
    if bad.any():
        arr = pc.if_else(pa.array(bad), pa.scalar(None, arr.type), arr)
    return arr


def apply_h(h, old: np.ndarray, reasons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(transformed float32 [n, d], sigma float64 [n]) of `h` on `old`; rows whose output is not
    finite get a reason in `reasons` (in place) and zero outputs."""
    import torch

    from fastfill_udfs.models import sigma_from_s

    with torch.inference_mode():
        emb, s = h(torch.from_numpy(np.require(old, dtype=np.float32, requirements="W")))
        emb = emb.numpy()
        sigma = sigma_from_s(s).double().numpy()
    finite = np.isfinite(emb).all(axis=1) & np.isfinite(sigma)
    if not finite.all():
        fresh = ~finite & (reasons == None)  # noqa: E711
        reasons[fresh] = "h output (transformed embedding or sigma) is NaN or inf"
        emb = np.where(finite[:, None], emb, 0.0).astype(np.float32)
        sigma = np.where(finite, sigma, 0.0)
    return emb, sigma


def transform_fn(payload_bc, old_dim: int, keep: list[str], *, policy: str | None = None,
                 seed: int = 0) -> Callable:
    """mapInArrow function: old_embedding -> transformed embedding, sigma, the `policy`'s
    ordering score (`policies.order_scores`, from sigma, the id or, for ``prototype``, h's
    output and the prototypes stored with h; ``auto``: h's forecast choice; omitted without a
    policy) and a `reason` for rows
    that cannot be scored (null / wrong dimension / NaN input, or a non-finite output of h),
    which get null outputs."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        from fastfill_udfs.policies import auto_scores, order_scores

        h = payload_bc.value.load()
        torch.set_num_threads(1)
        for batch in batches:
            old, reasons = embedding_matrix(batch.column("old_embedding"), old_dim)
            emb, sigma = apply_h(h, old, reasons)
            bad = reasons != None  # noqa: E711
            cols = _passthrough(batch, keep)
            cols["transformed"] = _masked_list(emb, bad)
            cols["sigma"] = pa.array(sigma, mask=bad)
            if policy is not None:
                ids = batch.column("id").to_numpy(zero_copy_only=False)
                if policy == "auto":
                    score = auto_scores(h, np.where(bad[:, None], 0.0, old), ids, seed)
                else:
                    score = order_scores(policy, sigma=np.where(bad, 0.0, sigma), ids=ids,
                                         seed=seed, transformed=emb, prototypes=h.prototypes)
                cols["score"] = pa.array(score, mask=bad)
            cols["reason"] = pa.array(reasons.tolist(), pa.string())
            yield pa.RecordBatch.from_pydict(cols)
    return run


def embed_batch(embedder, preprocess: Preprocess, ids: list, images: list
                ) -> tuple[np.ndarray | None, list]:
    """Decode `images` (encoded bytes) per `preprocess` and embed them: (embeddings [n, d] with
    zero rows where a reason is set, reasons (None for good rows)). Undecodable images, images
    the model cannot take and non-finite outputs get a reason naming the item."""
    from fastfill_udfs.data import ImageDecodeError

    decoded, reasons = [], []
    for item_id, data in zip(ids, images):
        try:
            decoded.append(preprocess.decode(data, item_id=item_id))
            reasons.append(None)
        except ImageDecodeError as exc:
            decoded.append(None)
            reasons.append(str(exc))
    good = [i for i, r in enumerate(reasons) if r is None]
    out = None
    for shape, members in stack_by_shape([decoded[i] for i in good]).items():
        rows = [good[j] for j in members]
        try:
            emb, bad = embedder.embed_with_flags(np.stack([decoded[i] for i in rows]))
        except Exception as exc:  # the model rejects this image size / mode
            for i in rows:
                reasons[i] = (f"item {ids[i]!r}: the model cannot embed an image of shape "
                              f"{list(shape)}: {type(exc).__name__}: {exc}")
            continue
        if out is None:
            out = np.zeros((len(ids), emb.shape[1]), np.float32)
        out[rows] = emb
        for i, b in zip(rows, bad):
            if b:
                reasons[i] = f"item {ids[i]!r}: new-model output is NaN or inf"
    return out, reasons


def embed_images_fn(payload_bc, keep: list[str], preprocess: Preprocess, *,
                    device: str = "auto", batch_size: int = 256) -> Callable:
    """mapInArrow function: encoded `image` bytes -> `embedding` with the model; items that
    cannot be embedded get a null embedding and a `reason`."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        embedder = _worker_embedder(payload_bc.value, device, batch_size, preprocess)
        for batch in batches:
            ids = batch.column("id").to_pylist()
            out, reasons = embed_batch(embedder, preprocess, ids,
                                       batch.column("image").to_pylist())
            bad = np.array([r is not None for r in reasons], dtype=bool)
            if out is None:
                out = np.zeros((len(ids), 1), np.float32)
            cols = _passthrough(batch, keep)
            cols["embedding"] = _masked_list(out, bad)
            cols["reason"] = pa.array(reasons, pa.string())
            yield pa.RecordBatch.from_pydict(cols)
    return run


def transformation_udf(h, spark=None):
    """A pandas UDF (iterator of Series, `h` rebuilt once per worker) mapping an old embedding
    (array<float> or array<double>) to struct(transformed array<float>, sigma double); rows with
    a null, wrongly sized or non-finite embedding give null.

    `h`: a `Transformation`, a `ModelRef` or an MLflow URI / entry point of one (resolved with
    the current MLflow tracking URI). Use it in DataFrames, or in SQL after
    `spark.udf.register("fastfill_transform", transformation_udf(h))`."""
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import pandas_udf

    from fastfill_udfs.model_loading import ModelRef, resolve_model

    if isinstance(h, str):
        h = resolve_model(h, "h")
    if isinstance(h, ModelRef):
        h = h.model
    old_dim = int(h.old_dim)
    spark = spark or SparkSession.getActiveSession()
    payload_bc = spark.sparkContext.broadcast(ModelPayload.from_model(h))

    # Series-to-Series hints (the iterator form Spark infers); a struct result is yielded as a
    # DataFrame, one column per field
    @pandas_udf(TRANSFORM_STRUCT)
    def fastfill_transform(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        model = payload_bc.value.load()
        for old in batches:
            arr, reasons = embedding_matrix(pa.array(old, type=pa.list_(pa.float32())), old_dim)
            emb, sigma = apply_h(model, arr, reasons)
            bad = reasons != None  # noqa: E711
            transformed = pd.Series(list(emb), dtype=object)
            transformed[bad] = None
            yield pd.DataFrame({"transformed": transformed,
                                "sigma": pd.Series(np.where(bad, np.nan, sigma))})
    return fastfill_transform
