import numpy as np
import pytest

from fastfill_udfs.config import load_config
from fastfill_udfs.metrics import retrieval_metrics
from fastfill_udfs.subgroups import (combine_metrics, fraction_to_close, share_in_first,
                                     subgroup_metrics)


def test_subgroup_metrics_on_a_hand_made_case():
    # gallery = queries; subgroup "a" = label 0 (two items that find each other first),
    # subgroup "b" = label 1 items whose nearest neighbour is an "a" item.
    emb = np.array([[1.0, 0.0], [0.99, 0.1], [0.9, 0.3], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    ids = np.array(["p", "q", "r", "s"], dtype=object)
    subs = np.array(["a", "a", "b", "b"], dtype=object)
    out = subgroup_metrics(emb, labels, subs, emb, labels, query_ids=ids, gallery_ids=ids)
    assert out["a"]["top1"] == 1.0 and out["a"]["mAP"] == 1.0
    # r: ranking q, p, s -> the only relevant item (s) is 3rd: AP = 1/3, top1 miss
    # s: ranking r (relevant, 1st) -> AP = 1, top1 hit
    assert out["b"]["top1"] == pytest.approx(0.5)
    assert out["b"]["mAP"] == pytest.approx((1 / 3 + 1) / 2)
    # the subgroups partition the queries: combining them gives the overall metrics exactly
    overall = retrieval_metrics(emb, labels, emb, labels, query_ids=ids, gallery_ids=ids)
    combined = combine_metrics(out.values())
    for key in ("mAP", "top1", "top5", "n_queries"):
        assert combined[key] == pytest.approx(overall[key], abs=1e-12)


def test_subgroup_metrics_pass_the_distance_on():
    # by cosine p's nearest is q (same direction); by L2 it is r (q is 10x longer)
    emb = np.array([[1.0, 0.0], [10.0, 0.5], [0.9, 0.4]])
    labels = np.array([0, 0, 1])
    ids = np.array(["p", "q", "r"], dtype=object)
    subs = np.array(["a", "a", "a"], dtype=object)
    for distance in ("cosine", "l2"):
        out = subgroup_metrics(emb, labels, subs, emb, labels, query_ids=ids, gallery_ids=ids,
                               distance=distance)["a"]
        ref = retrieval_metrics(emb, labels, emb, labels, query_ids=ids, gallery_ids=ids,
                                distance=distance)
        assert out["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    by_cos, by_l2 = (subgroup_metrics(emb, labels, subs, emb, labels, query_ids=ids,
                                      gallery_ids=ids, distance=d)["a"] for d in ("cosine", "l2"))
    assert by_cos["top1"] > by_l2["top1"]


def test_fraction_to_close_on_a_known_curve():
    t = [0.0, 0.1, 0.2, 0.3, 1.0]
    shortfall = [0.20, 0.08, 0.012, 0.009, 0.0]
    assert fraction_to_close(t, shortfall, threshold=0.01) == 0.3
    assert fraction_to_close(t, shortfall, threshold=0.1) == 0.1
    assert fraction_to_close(t, [0.2] * 5, threshold=0.01) is None


def test_share_in_first_fraction_of_the_order():
    ranked = ["m", "m", "r", "m", "r", "r", "r", "r", "r", "r"]
    assert share_in_first(ranked, "m", 0.2) == 1.0
    assert share_in_first(ranked, "m", 0.5) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="fraction"):
        share_in_first(ranked, "m", 0)


def test_biased_sampling_keeps_the_configured_minority_fraction():
    from fastfill_udfs.demo.protocol import Split, old_model_subset, subgroup_of

    cfg = load_config(["conf/biased_footwear.yaml"])
    labels = np.repeat(np.arange(10), 1000)
    split = Split(np.zeros((len(labels), 2, 2), np.uint8), labels,
                  np.array([str(i) for i in range(len(labels))], dtype=object),
                  subgroup_of(labels, cfg))
    keep, remapped = old_model_subset(split, cfg)
    kept = labels[keep]
    for c in range(10):
        expected = 30 if c in (5, 7, 9) else 1000
        assert (kept == c).sum() == expected, c
    assert set(split.subgroups[keep]) == {"footwear", "rest"}
    assert remapped.max() == 9


def test_subgroup_report_on_known_curves():
    import pandas as pd

    from fastfill_udfs.subgroups import subgroup_report

    t = [0.0, 0.25, 0.5, 0.75, 1.0]
    curves = pd.concat([
        pd.DataFrame({"run": "a_random", "policy": "random", "backfill_fraction": t[::-1],
                      "top1_shortfall_shoes": [0.0, 0.005, 0.02, 0.05, 0.1],
                      "mAP_shortfall_shoes": [0.0, 0.009, 0.03, 0.08, 0.2]}),
        pd.DataFrame({"run": "a_uncertainty", "policy": "uncertainty", "backfill_fraction": t,
                      "top1_shortfall_shoes": [0.1, 0.004, 0.0, 0.0, 0.0],
                      "mAP_shortfall_shoes": [0.2, 0.05, 0.002, 0.0, 0.0]})])
    report = subgroup_report(curves, "shoes", {"a_uncertainty": 0.7}).set_index("run")
    assert report.loc["a_random", "shoes_top1_shortfall_at_t0"] == 0.1   # sorted by t first
    assert report.loc["a_random", "fraction_to_close_1pt_top1"] == 0.75
    assert report.loc["a_random", "fraction_to_close_1pt_mAP"] == 0.75
    assert report.loc["a_uncertainty", "fraction_to_close_1pt_top1"] == 0.25
    assert report.loc["a_uncertainty", "fraction_to_close_1pt_mAP"] == 0.5
    assert report.loc["a_uncertainty", "shoes_share_first_10pct"] == 0.7
    assert np.isnan(report.loc["a_random", "shoes_share_first_10pct"])
    with pytest.raises(ValueError, match="top1_shortfall_bags"):
        subgroup_report(curves, "bags", {})
