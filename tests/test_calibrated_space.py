"""A run whose `auto` order includes the mixed-gallery calibration is searched and evaluated
through a CalibratedSpace: faiss ranks by the calibrated score, the certified evaluation agrees
with the exact metrics under the same correction, and the space survives a save/load."""
from __future__ import annotations

import numpy as np
import pytest

from fastfill_udfs.calibration import CALIBRATION_VERSION
from fastfill_udfs.faiss_index import (CalibratedSpace, IndexSpec, ShardedGalleryIndex,
                                       VectorSpace, space_for, top_k_keys)
from fastfill_udfs.index_eval import evaluate_index
from fastfill_udfs.metrics import retrieval_metrics, similarity_scores


def _params(distance, scale=0.6, bias=-0.4):
    return {"version": CALIBRATION_VERSION, "distance": distance, "scale": scale,
            "bias": bias, "sigma_weight": 0.0}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, d = 300, 8
    labels = rng.integers(0, 5, n)
    centres = 2.0 * rng.normal(size=(5, d))
    g = centres[labels] + rng.normal(size=(n, d))
    q = centres[labels] + rng.normal(size=(n, d))
    source = np.where(rng.random(n) < 0.5, "transformed", "new").astype(object)
    return q, g, labels, source


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_faiss_ranks_by_the_calibrated_score(data, distance):
    q, g, labels, source = data
    space = CalibratedSpace(distance, _params(distance))
    transformed = source == "transformed"
    scale = np.where(transformed, 0.6, 1.0)
    bias = np.where(transformed, -0.4, 0.0)
    want = similarity_scores(q, g, distance=distance, gallery_scale=scale, gallery_bias=bias)
    got = top_k_keys(space, g, q, 5, sources=source)
    np.testing.assert_array_equal(got, np.argsort(-want, axis=1, kind="stable")[:, :5])
    # the same gallery without the correction ranks differently: the test can tell
    plain = top_k_keys(VectorSpace(distance), g, q, 5)
    assert (plain != got).any()


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_certified_evaluation_matches_the_corrected_exact_metrics(data, distance):
    q, g, labels, source = data
    keys = np.arange(len(g))
    index = ShardedGalleryIndex(g.shape[1], spec=IndexSpec(num_shards=3),
                                space=CalibratedSpace(distance, _params(distance)))
    index.build(keys, g, sources=source)
    result = evaluate_index(index, q, labels, (keys, labels), query_keys=keys, topk=(1, 5))
    transformed = source == "transformed"
    exact = retrieval_metrics(q, labels, g, labels, query_ids=keys, gallery_ids=keys,
                              topk=(1, 5), distance=distance,
                              gallery_scale=np.where(transformed, 0.6, 1.0),
                              gallery_bias=np.where(transformed, -0.4, 0.0))
    m = result.metrics()
    assert m["mAP"] == pytest.approx(exact["mAP"], abs=1e-6)
    assert m["top1"] == exact["top1"] and m["top5"] == exact["top5"]
    # upserting an item as `new` scores it plainly from then on
    index.upsert(keys[:10], g[:10], sources=np.full(10, "new", object))
    source2 = source.copy()
    source2[:10] = "new"
    t2 = source2 == "transformed"
    exact2 = retrieval_metrics(q, labels, g, labels, query_ids=keys, gallery_ids=keys,
                               topk=(1,), distance=distance,
                               gallery_scale=np.where(t2, 0.6, 1.0),
                               gallery_bias=np.where(t2, -0.4, 0.0))
    again = evaluate_index(index, q, labels, (keys, labels), query_keys=keys, topk=(1,))
    assert again.metrics()["mAP"] == pytest.approx(exact2["mAP"], abs=1e-6)


def test_space_for_and_its_description(tmp_path, data):
    q, g, labels, source = data
    assert type(space_for("l2", None)) is VectorSpace
    space = space_for("l2", _params("l2"))
    assert isinstance(space, CalibratedSpace)
    assert VectorSpace.from_description(space.describe()) == space
    index = ShardedGalleryIndex(g.shape[1], space=space).build(np.arange(len(g)), g,
                                                               sources=source)
    index.save(tmp_path / "idx")
    back = ShardedGalleryIndex.load(tmp_path / "idx")
    assert back.space == space
    np.testing.assert_array_equal(back.search(q[:5], 3)[1], index.search(q[:5], 3)[1])
    with pytest.raises(ValueError, match="fitted for distance"):
        CalibratedSpace("cosine", _params("l2"))
    with pytest.raises(ValueError, match="affine"):
        CalibratedSpace("l2", {**_params("l2"), "sigma_weight": 0.3})
