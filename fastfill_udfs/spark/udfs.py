"""Arrow-native Spark UDFs (`mapInArrow`) that run the project's torch models on workers.

Models travel as a broadcast (spec, state-dict bytes) and are rebuilt once per Python worker
process (cached by content hash), never once per batch."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from fastfill_udfs.spark.arrow_utils import embedding_matrix, list_array

_WORKER_MODELS: dict[str, nn.Module] = {}
_WORKER_EMBEDDERS: dict[tuple, object] = {}


@dataclass(frozen=True)
class ModelPayload:
    """A model in code-free form: architecture spec, state-dict bytes and their hash."""

    key: str
    spec: dict
    weights: bytes

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelPayload":
        from fastfill_udfs.model_store import model_to_bytes

        spec, weights = model_to_bytes(model)
        return cls(hashlib.sha256(weights).hexdigest()[:16], spec, weights)

    def load(self) -> nn.Module:
        """The model, built once per worker process."""
        model = _WORKER_MODELS.get(self.key)
        if model is None:
            from fastfill_udfs.model_store import model_from_bytes

            model = _WORKER_MODELS[self.key] = model_from_bytes(self.spec, self.weights)
        return model


def _worker_embedder(payload: ModelPayload, device: str, batch_size: int):
    key = (payload.key, device, batch_size)
    if key not in _WORKER_EMBEDDERS:
        from fastfill_udfs.inference import BatchEmbedder

        _WORKER_EMBEDDERS[key] = BatchEmbedder(payload.load(), device=device, batch_size=batch_size)
    return _WORKER_EMBEDDERS[key]


def _passthrough(batch: pa.RecordBatch, keep: list[str]) -> dict[str, pa.Array]:
    return {name: batch.column(name) for name in keep}


def transform_fn(payload_bc, old_dim: int, keep: list[str], *, policy: str | None = None,
                 seed: int = 0) -> Callable:
    """mapInArrow function: old_embedding -> transformed embedding, sigma, the `policy`'s
    ordering score (`policies.order_scores`; omitted without a policy) and a `reason` for rows
    that cannot be scored (null / wrong dimension / NaN), which get null outputs."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        from fastfill_udfs.models import sigma_from_s
        from fastfill_udfs.policies import order_scores

        h = payload_bc.value.load()
        torch.set_num_threads(1)
        for batch in batches:
            old, reasons = embedding_matrix(batch.column("old_embedding"), old_dim)
            with torch.inference_mode():
                emb, s = h(torch.from_numpy(np.require(old, requirements="W")))
                sigma = sigma_from_s(s).double().numpy()
            bad = reasons != None  # noqa: E711
            emb_arr = list_array(emb.numpy())
            if bad.any():
                mask = pa.array(bad)
                emb_arr = pc.if_else(mask, pa.scalar(None, emb_arr.type), emb_arr)
                sigma = np.where(bad, np.nan, sigma)
            cols = _passthrough(batch, keep)
            cols["transformed"] = emb_arr
            cols["sigma"] = pa.array(sigma, mask=bad)
            if policy is not None:
                ids = batch.column("id").to_numpy(zero_copy_only=False)
                score = order_scores(policy, sigma=np.where(bad, 0.0, sigma), ids=ids, seed=seed)
                cols["score"] = pa.array(score, mask=bad)
            cols["reason"] = pa.array(reasons.tolist(), pa.string())
            yield pa.RecordBatch.from_pydict(cols)
    return run


def embed_images_fn(payload_bc, keep: list[str], *, device: str = "auto",
                    batch_size: int = 256, image_size: int | None = None) -> Callable:
    """mapInArrow function: encoded `image` bytes -> `embedding` with the model; undecodable
    images get a null embedding and a `reason` naming the problem."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from fastfill_udfs.data import ImageDecodeError, decode_image

        embedder = _worker_embedder(payload_bc.value, device, batch_size)
        for batch in batches:
            ids = batch.column("id").to_pylist()
            images = batch.column("image").to_pylist()
            decoded, reasons = [], []
            for item_id, data in zip(ids, images):
                try:
                    img = decode_image(data, item_id=item_id, size=image_size)
                    decoded.append(np.round(img * 255.0).astype(np.uint8))
                    reasons.append(None)
                except ImageDecodeError as exc:
                    decoded.append(None)
                    reasons.append(str(exc))
            good = [i for i, r in enumerate(reasons) if r is None]
            out = None
            if good:
                out = embedder(np.stack([decoded[i] for i in good]))
            dim = out.shape[1] if out is not None else 1
            full = np.zeros((len(ids), dim), np.float32)
            if good:
                full[good] = out
            emb_arr = list_array(full)
            bad = np.array([r is not None for r in reasons], dtype=bool)
            if bad.any():
                emb_arr = pc.if_else(pa.array(bad), pa.scalar(None, emb_arr.type), emb_arr)
            cols = _passthrough(batch, keep)
            cols["embedding"] = emb_arr
            cols["reason"] = pa.array(reasons, pa.string())
            yield pa.RecordBatch.from_pydict(cols)
    return run
