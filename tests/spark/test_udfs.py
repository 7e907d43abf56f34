"""`transform_fn`, the Arrow function rank_gallery maps over the gallery, called directly on
Arrow batches (no Spark needed): each policy's score comes out as the in-memory policies
module computes it, bad rows get a reason and null outputs; rank_gallery refuses a policy its h
cannot score before it touches any table."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from fastfill_udfs.model_loading import ModelPayload, ModelRef
from fastfill_udfs.models import Transformation
from fastfill_udfs.policies import fit_prototypes, prototype_scores
from fastfill_udfs.spark.rank import rank_gallery
from fastfill_udfs.spark.udfs import transform_fn


@pytest.fixture(scope="module")
def h_with_prototypes():
    torch.manual_seed(0)
    h = Transformation(4, 3, hidden_dim=8).eval()
    rng = np.random.default_rng(1)
    h.prototypes = fit_prototypes(rng.standard_normal((30, 3)), rng.integers(0, 3, 30),
                                  distance="l2")
    return h


def _run(h, policy: str, old: list) -> pa.RecordBatch:
    bc = SimpleNamespace(value=ModelPayload.from_model(h))  # what a Spark broadcast gives
    batch = pa.RecordBatch.from_pydict({
        "id": [f"i{i}" for i in range(len(old))],
        "old_embedding": pa.array(old, pa.list_(pa.float32()))})
    out = list(transform_fn(bc, 4, ["id"], policy=policy, seed=0)(iter([batch])))
    return pa.Table.from_batches(out).combine_chunks().to_batches()[0]


def test_prototype_policy_scores_are_the_distance_to_the_nearest_prototype(h_with_prototypes):
    rng = np.random.default_rng(2)
    old = rng.standard_normal((6, 4)).astype(np.float32)
    out = _run(h_with_prototypes, "prototype", [list(map(float, r)) for r in old] + [None])
    with torch.inference_mode():
        want = prototype_scores(h_with_prototypes(torch.from_numpy(old))[0].numpy(),
                                h_with_prototypes.prototypes)
    score = out.column("score").to_pylist()
    np.testing.assert_allclose(score[:6], want, rtol=1e-6)
    assert score[6] is None and out.column("reason").to_pylist()[6]  # the null row: a reason


def test_uncertainty_policy_score_is_sigma(h_with_prototypes):
    old = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 0.0]]
    out = _run(h_with_prototypes, "uncertainty", old)
    assert out.column("score").to_pylist() == out.column("sigma").to_pylist()


def test_rank_gallery_refuses_prototype_policy_without_prototypes():
    h = ModelRef.from_module(Transformation(4, 3, hidden_dim=8), "h-plain")
    new = ModelRef.from_module(Transformation(4, 3, hidden_dim=8, uncertainty=False), "new")
    # refused before any Spark or table access: no session or config needed
    with pytest.raises(ValueError, match="policy 'prototype' needs class prototypes.*h-plain"):
        rank_gallery(None, None, h, new, "prototype", "run")


def test_embed_images_fn_decodes_ahead_and_keeps_every_row():
    """The embedding function, called directly (no Spark): decoding the next chunk while the
    model runs gives the same rows as decoding the whole Arrow batch first; an undecodable
    image gets a reason and a null embedding, its neighbours their embeddings."""
    import io

    from PIL import Image

    from fastfill_udfs.demo.cnn import EmbeddingCNN
    from fastfill_udfs.preprocess import Preprocess
    from fastfill_udfs.spark.udfs import embed_images_fn

    torch.manual_seed(0)
    bc = SimpleNamespace(value=ModelPayload.from_model(EmbeddingCNN([4], 6, 3).eval()))
    rng = np.random.default_rng(0)
    images = []
    for k in range(7):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10 + k, 12), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    images[3] = b"broken"
    batch = pa.RecordBatch.from_pydict({"id": [f"i{k}" for k in range(7)],
                                        "image": pa.array(images, pa.binary())})
    pre = Preprocess(size=(8, 8), channels=1)
    outs = {}
    for prefetch in (False, True):
        fn = embed_images_fn(bc, ["id"], pre, device="cpu", batch_size=2, prefetch=prefetch,
                             decode_threads=2, torch_threads=-1)
        outs[prefetch] = pa.Table.from_batches(list(fn(iter([batch])))).to_pydict()
    for out in outs.values():
        assert out["id"] == [f"i{k}" for k in range(7)]
        assert out["embedding"][3] is None and "'i3'" in out["reason"][3]
        assert all(out["reason"][k] is None and len(out["embedding"][k]) == 6
                   for k in range(7) if k != 3)
    np.testing.assert_allclose(
        np.array([e for e in outs[True]["embedding"] if e is not None]),
        np.array([e for e in outs[False]["embedding"] if e is not None]), rtol=1e-6, atol=1e-6)


def test_a_task_with_a_gpu_embeds_on_that_gpu(monkeypatch):
    """On a multi-GPU executor each task runs its model on the GPU Spark gave it (its address,
    renumbered when the cluster manager masked the devices), not all on GPU 0."""
    import pyspark

    from fastfill_udfs.spark.udfs import task_device

    class Ctx:
        def __init__(self, addresses):
            self._res = {"gpu": SimpleNamespace(addresses=addresses)} if addresses else {}

        def resources(self):
            return self._res

    def in_task(addresses):
        monkeypatch.setattr(pyspark.TaskContext, "get",
                            staticmethod(lambda: None if addresses is None else Ctx(addresses)))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    in_task(["3"])
    assert task_device("auto") == "cuda:3" and task_device("cuda") == "cuda:3"
    assert task_device("cpu") == "cpu" and task_device("cuda:1") == "cuda:1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    in_task(["7"])
    assert task_device("auto") == "cuda:1"
    in_task([])
    assert task_device("auto") == "auto"
    in_task(None)                                  # on the driver
    assert task_device("cuda") == "cuda"


def test_a_small_batch_is_spread_over_every_task_slot(spark, tmp_path):
    """A batch read in few partitions is spread over the application's task slots (two here),
    so every core (or GPU) embeds a share; a plan that has plenty, or a shuffle's, is left
    alone."""
    from fastfill_udfs.spark.udfs import spread_over_slots

    path = str(tmp_path / "one_file")
    spark.range(40).selectExpr("cast(id as string) as id").coalesce(1).write.parquet(path)
    one = spark.read.parquet(path)
    assert one.rdd.getNumPartitions() == 1
    spread = spread_over_slots(spark, one)
    assert spread.rdd.getNumPartitions() == spark.sparkContext.defaultParallelism == 2
    assert sorted(r["id"] for r in spread.collect()) == sorted(str(i) for i in range(40))
    shuffled = spark.range(40).repartition(3)
    assert spread_over_slots(spark, shuffled) is shuffled
    many = spark.read.parquet(path).union(spark.read.parquet(path)).union(
        spark.read.parquet(path)).union(spark.read.parquet(path))   # 4 splits for 2 slots
    assert spread_over_slots(spark, many) is many
