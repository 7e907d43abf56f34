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

from fastfill_udfs.inference import embed_batch
from fastfill_udfs.model_loading import ModelPayload
from fastfill_udfs.preprocess import Preprocess
from fastfill_udfs.spark.arrow_utils import embedding_matrix, list_array

_WORKER_EMBEDDERS: dict[tuple, object] = {}
_BROADCASTS: dict[tuple, object] = {}
TRANSFORM_STRUCT = "struct<transformed: array<float>, sigma: double>"


def broadcast_payload(spark, payload: ModelPayload):
    """One broadcast of `payload` per Spark application, reused by every job that runs the
    model (a backfill embeds each batch with the same model: a ResNet-50 is ~100 MB to pickle,
    ship and fetch again per batch otherwise)."""
    sc = spark.sparkContext
    key = (sc.applicationId, payload.key)
    if key not in _BROADCASTS:
        for old in [k for k in _BROADCASTS if k[0] != sc.applicationId]:
            del _BROADCASTS[old]               # a stopped session's broadcasts are gone
        _BROADCASTS[key] = sc.broadcast(payload)
    return _BROADCASTS[key]


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


def spread_over_slots(spark, df):
    """`df` spread evenly over every task slot of the application when it is read in few
    partitions (fewer than twice the slots): a small backfill batch's rows come from one or two
    Parquet files, one partition holding nearly all of them, so one task (one core, or one
    GPU) would embed them while the others idle. Plans with a shuffle are left as they are
    (their partitions are the shuffle's, and counting them would run it)."""
    sc = spark.sparkContext
    slots = max(1, sc.defaultParallelism // max(1, int(sc.getConf().get("spark.task.cpus",
                                                                           "1"))))
    try:
        if slots <= 1 or "Exchange" in df._jdf.queryExecution().sparkPlan().toString():
            return df
        if df.rdd.getNumPartitions() >= 2 * slots:  # a scan: counting splits runs no job
            return df
    except Exception:  # Spark Connect has no JVM plan to read: leave the partitions as they are
        return df
    return df.repartition(slots)


def task_device(device: str) -> str:
    """The device a task's model runs on: for "auto" / "cuda" in a task that Spark gave a GPU
    (`spark.task.resource.gpu.amount`), that GPU (`cuda:<address>`), so the tasks of a
    multi-GPU executor do not all share GPU 0; otherwise `device` unchanged."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if device not in ("auto", "cuda") or ctx is None:
        return device
    gpu = (ctx.resources() or {}).get("gpu")
    addresses = list(getattr(gpu, "addresses", None) or [])
    import torch

    if not addresses or not torch.cuda.is_available():
        return device
    import os

    address = str(addresses[0]).strip()
    masked = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
              if v.strip()]
    if address in masked:      # the cluster manager masked the devices: renumbered from 0
        return f"cuda:{masked.index(address)}"
    if address.isdigit() and int(address) < torch.cuda.device_count():
        return f"cuda:{int(address)}"
    return device


def _task_cores() -> int:
    """The cores of the Spark task running this code (`spark.task.cpus`); outside a task, the
    cores this process may use."""
    from pyspark import TaskContext

    from fastfill_udfs.preprocess import host_workers

    ctx = TaskContext.get()
    return max(1, int(ctx.cpus())) if ctx is not None else host_workers()


def _profile(record: dict) -> None:
    """Append `record` as a JSON line to $FASTFILL_PROFILE/<pid>.jsonl when that is set (a
    folder; the benchmarks read where the workers' time goes from it)."""
    import json
    import os

    folder = os.environ.get("FASTFILL_PROFILE")
    if folder:
        with open(os.path.join(folder, f"embed-{os.getpid()}.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")


def embed_images_fn(payload_bc, keep: list[str], preprocess: Preprocess, *,
                    device: str = "auto", batch_size: int = 256, decode_device: str = "auto",
                    decode_threads: int = 0, prefetch: bool = True,
                    torch_threads: int = 0) -> Callable:
    """mapInArrow function: encoded `image` bytes -> `embedding` with the model; items that
    cannot be embedded get a null embedding and a `reason`.

    Images are decoded on the model's GPU when `decode_device` allows it (`preprocess.
    choose_decode_device`), else on `decode_threads` host threads (0 = the task's cores,
    `spark.task.cpus`); with `prefetch`, `batch_size` images at a time, the next ones decoded
    while the model runs. On a CPU the model runs on `torch_threads` threads (0 = the task's
    cores; -1 = as the worker started)."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import time

        from fastfill_udfs.preprocess import choose_decode_device

        t_load = time.perf_counter()
        embedder = _worker_embedder(payload_bc.value, task_device(device), batch_size,
                                    preprocess)
        where = choose_decode_device(decode_device, embedder.device)
        cores = _task_cores()
        workers = decode_threads or cores
        if not embedder.is_cuda and torch_threads >= 0:
            _set_torch_threads(torch_threads or cores)  # the model computes on the task's cores
        load_s = time.perf_counter() - t_load
        for batch in batches:
            t0 = time.perf_counter()
            ids = batch.column("id").to_pylist()
            images = batch.column("image").to_pylist()
            timings: dict = {}
            t1 = time.perf_counter()
            out, reasons = embed_batch(embedder, preprocess, ids, images, decode_device=where,
                                       workers=workers, chunk=batch_size if prefetch else 0,
                                       timings=timings)
            t2 = time.perf_counter()
            bad = np.array([r is not None for r in reasons], dtype=bool)
            if out is None:
                out = np.zeros((len(ids), 1), np.float32)
            cols = _passthrough(batch, keep)
            cols["embedding"] = _masked_list(out, bad)
            cols["reason"] = pa.array(reasons, pa.string())
            result = pa.RecordBatch.from_pydict(cols)
            _profile({"rows": len(ids), "load_s": load_s, "arrow_in_s": t1 - t0,
                      "arrow_out_s": time.perf_counter() - t2, **timings,
                      "decode_device": where, "decode_threads": workers,
                      "torch_threads": _torch_threads(), "start": t0,
                      "end": time.perf_counter()})
            load_s = 0.0
            yield result
    return run


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _set_torch_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


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
