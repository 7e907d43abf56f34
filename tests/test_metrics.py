"""Retrieval metrics against a plain per-query sklearn reference (ties included)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from fastfill_udfs.metrics import ranked_metrics, retrieval_metrics, similarity_scores


# ----------------------------------------------------------------------------- reference
def _normalise(x):
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _cosine(qi, g):
    return (_normalise(g) * _normalise(qi[None])[0]).sum(axis=1)   # row-wise: duplicates tie


def _neg_sq_l2(qi, g):
    return -((np.asarray(g, np.float64) - qi) ** 2).sum(axis=1)


def _reference(q, ql, g, gl, qids=None, gids=None, ks=(1, 5), score=_cosine, scale=None,
               bias=None):
    """Per-query loop: sklearn AP; top-k by 'some relevant item scores >= the k-th score'.
    `score(q_i, g)` gives one query's similarities; optional per-item scale/bias on top."""
    q = np.asarray(q, np.float64)
    aps, hits = [], {k: [] for k in ks}
    for i in range(len(q)):
        s = score(q[i], g)
        if scale is not None:
            s = s * scale
        if bias is not None:
            s = s + bias
        keep = np.ones(len(g), bool) if qids is None else (np.asarray(gids) != qids[i])
        s, y = s[keep], np.asarray(gl)[keep] == ql[i]
        if not y.any():
            continue
        aps.append(average_precision_score(y, s))
        desc = np.sort(s)[::-1]
        for k in ks:
            kth = desc[min(k, len(desc)) - 1]
            hits[k].append(bool(np.any(s[y] >= kth)))
    return {"mAP": float(np.mean(aps)), **{f"top{k}": float(np.mean(hits[k])) for k in ks},
            "n_queries": len(aps)}, aps


def _dyadic(rng, n, dim=16, nnz=4):
    """Unit vectors with nnz entries of +-0.5: every cosine is an exact multiple of 1/4,
    so ties are exact in any summation order and in float32 as well."""
    x = np.zeros((n, dim))
    for i in range(n):
        idx = rng.choice(dim, nnz, replace=False)
        x[i, idx] = rng.choice([-0.5, 0.5], nnz)
    return x


def _assert_close(got, want, ks=(1, 5)):
    assert got["n_queries"] == want["n_queries"]
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-6)
    for k in ks:
        assert got[f"top{k}"] == pytest.approx(want[f"top{k}"], abs=1e-12)


@pytest.fixture(scope="module")
def tied_data():
    rng = np.random.default_rng(0)
    g = _dyadic(rng, 400)
    g[350:] = g[:50]                                  # exact duplicates as well
    labels = rng.integers(0, 12, len(g))
    labels[:4] = [100, 101, 102, 103]                 # classes with a single item
    return g, labels, np.array([f"id{i:04d}" for i in range(len(g))])


# ----------------------------------------------------------------------------- retrieval_metrics
def test_leave_one_out_with_ties_matches_sklearn(tied_data):
    g, labels, ids = tied_data
    want, aps = _reference(g, labels, g, labels, ids, ids)
    assert want["n_queries"] == len(g) - 4            # the single-item classes drop out
    got = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids)
    _assert_close(got, want)
    # many ties really occur: fewer distinct scores than items in a row
    assert len(np.unique(np.round(_normalise(g) @ _normalise(g)[5], 12))) < 20


def test_per_query_ap_matches_sklearn_with_ties(tied_data):
    g, labels, ids = tied_data
    _, aps = _reference(g[4:40], labels[4:40], g, labels, ids[4:40], ids)
    for i, want in zip(range(4, 40), aps):
        got = retrieval_metrics(g[i:i + 1], labels[i:i + 1], g, labels,
                                query_ids=ids[i:i + 1], gallery_ids=ids)
        assert got["mAP"] == pytest.approx(want, abs=1e-6)


def test_continuous_with_duplicates_matches_sklearn():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(500, 24))
    g[400:] = g[:100]                                 # duplicate rows -> tied scores
    labels = rng.integers(0, 8, 500)
    ids = np.arange(500)
    want, _ = _reference(g, labels, g, labels, ids, ids)
    _assert_close(retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids), want)


def test_separate_queries_missing_and_unknown_labels():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(300, 10))
    q = rng.normal(size=(60, 10))
    gl = rng.integers(0, 5, 300).astype(object)
    gl[:10] = None                                    # unlabelled gallery items match nothing
    ql = rng.integers(0, 5, 60).astype(object)
    ql[:3] = 99                                       # label not in the gallery -> not counted
    ql[3] = None                                      # missing label -> not counted
    want, _ = _reference(q, ql, g, np.where(gl == None, -1, gl))  # noqa: E711
    got = retrieval_metrics(q, ql, g, gl)
    assert got["n_queries"] == 56
    _assert_close(got, want)


def test_float32_torch_and_block_size_agree(tied_data):
    g, labels, ids = tied_data
    base = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids)
    f32 = retrieval_metrics(g.astype(np.float32), labels, g, labels, query_ids=ids,
                            gallery_ids=ids, dtype="float32")
    tt = retrieval_metrics(torch.tensor(g), torch.tensor(labels), torch.tensor(g),
                           torch.tensor(labels), query_ids=np.arange(len(g)),
                           gallery_ids=np.arange(len(g)), device="cpu")
    small = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids, block_size=7)
    for other in (f32, tt, small):
        assert other == pytest.approx(base, abs=1e-12)


def test_non_unique_gallery_ids_exclude_every_copy():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(200, 8))
    labels = rng.integers(0, 4, 200)
    gids = np.arange(200) // 2                        # two gallery rows per id
    qids = np.arange(0, 200, 2) // 2
    q, ql = g[::2], labels[::2]
    want, _ = _reference(q, ql, g, labels, qids, gids)
    _assert_close(retrieval_metrics(q, ql, g, labels, query_ids=qids, gallery_ids=gids), want)


def test_topk_and_ap_hand_made():
    # query e1; gallery cosines 0.8 (rel), 0.6 (not), 0.6 (rel), 0.0 (rel), 1.0 (not)
    q = np.array([[1.0, 0.0]])
    g = np.array([[0.8, 0.6], [0.6, 0.8], [0.6, -0.8], [0.0, 1.0], [2.0, 0.0]])
    gl = np.array([1, 0, 1, 1, 0])
    got = retrieval_metrics(q, [1], g, gl, topk=(1, 2, 3))
    # ranking: 1.0(n) | 0.8(r) | 0.6(n), 0.6(r) tied | 0.0(r)
    # AP = (1/2 + 2/4 + 3/5) / 3
    assert got["mAP"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3, abs=1e-12)
    assert got["mAP"] == pytest.approx(
        average_precision_score(gl == 1, [0.8, 0.6, 0.6, 0.0, 1.0]), abs=1e-12)
    assert (got["top1"], got["top2"], got["top3"]) == (0.0, 1.0, 1.0)
    # tie at the k-th place counts as a hit: best relevant 0.6 tied with a non-relevant 0.6,
    # two items (1.0, 0.8) above them -> hit at k=3 (pessimistic ranking would say 4)
    gl2 = np.array([0, 0, 1, 0, 0])
    got2 = retrieval_metrics(q, [1], g, gl2, topk=(1, 2, 3))
    assert (got2["top1"], got2["top2"], got2["top3"]) == (0.0, 0.0, 1.0)
    assert got2["mAP"] == pytest.approx(1 / 4, abs=1e-12)   # tie group ends at rank 4


def test_no_relevant_queries_give_nan():
    g = np.eye(3)
    got = retrieval_metrics(g, [0, 1, 2], g, [0, 1, 2], query_ids=[0, 1, 2], gallery_ids=[0, 1, 2])
    assert got["n_queries"] == 0 and np.isnan(got["mAP"]) and np.isnan(got["top1"])


@pytest.mark.parametrize("kwargs, word", [
    ({"query_ids": [0, 1]}, "gallery_ids"),
    ({"topk": (0,)}, "topk"),
    ({"block_size": 0}, "block_size"),
    ({"dtype": "float16"}, "dtype"),
])
def test_bad_arguments_are_named(kwargs, word):
    g = np.eye(2)
    with pytest.raises(ValueError, match=word):
        retrieval_metrics(g, [0, 0], g, [0, 0], **kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="gallery_emb"):
        retrieval_metrics(np.eye(2), [0, 0], np.eye(3), [0, 0, 0])
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(np.eye(2), [0, 0], np.eye(2), [0, 0, 0])
    with pytest.raises(ValueError, match="query_emb"):
        retrieval_metrics(np.array([[np.nan, 0.0]]), [0], np.eye(2), [0, 0])


# ----------------------------------------------------------------------------- distance, correction
def test_l2_matches_sklearn_on_negative_squared_distance():
    rng = np.random.default_rng(4)
    g = rng.normal(size=(400, 12)) * rng.uniform(0.2, 3.0, size=(400, 1))   # norms vary
    g[350:] = g[:50]                                  # duplicates tie
    labels = rng.integers(0, 6, 400)
    ids = np.arange(400)
    want, _ = _reference(g, labels, g, labels, ids, ids, score=_neg_sq_l2)
    got = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids, distance="l2")
    _assert_close(got, want)
    # and it is a different metric from cosine on these vectors
    cos = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids)
    assert abs(cos["mAP"] - got["mAP"]) > 1e-3


def test_l2_with_exact_ties_matches_sklearn(tied_data):
    g, labels, ids = tied_data                        # dyadic: every distance exact
    want, _ = _reference(g, labels, g, labels, ids, ids, score=_neg_sq_l2)
    got = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids, distance="l2")
    _assert_close(got, want)


def test_l2_hand_made_ranks_by_distance_not_angle():
    q = np.array([[1.0, 0.0]])
    g = np.array([[10.0, 0.0], [1.0, 0.5]])           # same direction but far; close at an angle
    assert retrieval_metrics(q, [1], g, [0, 1], topk=(1,))["top1"] == 0.0
    assert retrieval_metrics(q, [1], g, [0, 1], topk=(1,), distance="l2")["top1"] == 1.0


@pytest.mark.parametrize("distance, score", [("cosine", _cosine), ("l2", _neg_sq_l2)])
def test_score_correction_matches_reference(distance, score):
    rng = np.random.default_rng(5)
    g = rng.normal(size=(300, 10)) * rng.uniform(0.5, 2.0, size=(300, 1))
    g[250:] = g[:50]
    labels = rng.integers(0, 5, 300)
    ids = np.arange(300)
    scale = np.where(rng.random(300) < 0.5, 1.0, rng.uniform(0.5, 1.5))     # two "sources"
    scale[250:] = scale[:50]
    bias = rng.normal(scale=0.3 if distance == "cosine" else 10.0, size=300)
    want, _ = _reference(g, labels, g, labels, ids, ids, score=score, scale=scale, bias=bias)
    got = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids,
                            distance=distance, gallery_scale=scale, gallery_bias=bias)
    _assert_close(got, want)
    plain = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids,
                              distance=distance)
    assert abs(plain["mAP"] - got["mAP"]) > 1e-3     # the correction changed the ranking
    # a scalar scale and zero bias changes nothing
    same = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids,
                             distance=distance, gallery_scale=2.0, gallery_bias=0.0)
    assert same == pytest.approx(plain, abs=1e-12)


def test_distance_and_correction_errors_are_named():
    g = np.eye(2)
    with pytest.raises(ValueError, match="distance"):
        retrieval_metrics(g, [0, 0], g, [0, 0], distance="dot")
    with pytest.raises(ValueError, match="gallery_scale"):
        retrieval_metrics(g, [0, 0], g, [0, 0], gallery_scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="gallery_bias"):
        retrieval_metrics(g, [0, 0], g, [0, 0], gallery_bias=[np.nan, 0.0])


# ----------------------------------------------------------------------------- ranked_metrics
def _full_ranking(q, ql, g, gl, qids, gids):
    s = _normalise(q) @ _normalise(g).T
    order = np.argsort(-s, axis=1, kind="stable")
    scores = np.take_along_axis(s, order, axis=1)
    match = np.asarray(gl)[order] == np.asarray(ql)[:, None]
    valid = np.asarray(gids)[order] != np.asarray(qids)[:, None]
    n_rel = (match & valid).sum(axis=1)
    return scores, match, valid, n_rel


def test_ranked_metrics_equals_retrieval_metrics(tied_data):
    g, labels, ids = tied_data
    scores, match, valid, n_rel = _full_ranking(g, labels, g, labels, ids, ids)
    got = ranked_metrics(scores, match, n_rel, valid=valid, topk=(1, 5))
    want = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids)
    assert got == pytest.approx(want, abs=1e-12)
    ref, _ = _reference(g, labels, g, labels, ids, ids)
    _assert_close(got, ref)


def test_ranked_metrics_on_faiss_output(tied_data):
    faiss = pytest.importorskip("faiss")
    g, labels, ids = tied_data
    x = _normalise(g).astype(np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    d, i = index.search(x, len(x))                   # k = gallery size, self included
    match = labels[i] == labels[:, None]
    valid = i != np.arange(len(x))[:, None]
    n_rel = np.bincount(labels, minlength=labels.max() + 1)[labels] - 1
    got = ranked_metrics(d, match, n_rel, valid=valid)
    want = retrieval_metrics(g, labels, g, labels, query_ids=ids, gallery_ids=ids)
    assert got == pytest.approx(want, abs=1e-12)


def test_ranked_metrics_truncated_hand_made():
    # top-3 of a ranking; 4 relevant items exist, 2 of them in the top 3
    scores = np.array([[0.9, 0.7, 0.7]])
    match = np.array([[True, False, True]])
    got = ranked_metrics(scores, match, [4], topk=(1,))
    assert got["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 4)
    assert got["top1"] == 1.0
    none_seen = ranked_metrics(np.array([[0.9, 0.8]]), np.array([[False, False]]), [2], topk=(5,))
    assert none_seen["mAP"] == 0.0 and none_seen["top5"] == 0.0


def test_ranked_metrics_errors():
    s = np.array([[0.9, 0.5]])
    with pytest.raises(ValueError, match="descending"):
        ranked_metrics(s[:, ::-1], np.array([[True, False]]), [1])
    with pytest.raises(ValueError, match="n_relevant"):
        ranked_metrics(s, np.array([[True, True]]), [1])
    with pytest.raises(ValueError, match="sorted_match"):
        ranked_metrics(s, np.array([[True]]), [1])
    with pytest.raises(ValueError, match="n_relevant"):
        ranked_metrics(s, np.array([[True, False]]), [1, 2])


@pytest.mark.parametrize("distance, score", [("cosine", _cosine), ("l2", _neg_sq_l2)])
def test_similarity_scores_are_the_ranked_scores(distance, score):
    rng = np.random.default_rng(6)
    q, g = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    scale, bias = rng.uniform(0.5, 2.0, 7), rng.normal(size=7)
    want = np.stack([score(qi, g) for qi in q])
    assert similarity_scores(q, g, distance=distance) == pytest.approx(want, abs=1e-12)
    got = similarity_scores(q, g, distance=distance, gallery_scale=scale, gallery_bias=bias)
    assert got == pytest.approx(want * scale + bias, abs=1e-12)
