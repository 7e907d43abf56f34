"""The forecast (fastfill_udfs/forecast.py): agreement, order specs, cross-fitting, the
decision rule, the stop rule, and the `auto` order carried by h."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastfill_udfs import forecast as fc
from fastfill_udfs.forecast import (Candidate, Forecast, choose_order, fit_auto_order,
                                    forecast_orders, gain_share, neighbour_agreement,
                                    recommend_stop, reference_neighbours)
from fastfill_udfs.models import (Transformation, build_model, check_order_spec, model_spec,
                                  order_priority)
from fastfill_udfs.policies import auto_scores, fit_prototypes, random_scores_for_ids
from fastfill_udfs.training import PrototypeHead, train_transformation

C = 6
FRACTIONS = [0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]


def _data(n, rng, centers, bad_region: bool):
    """New embeddings around class centres; old = a noisy view of them. With `bad_region`,
    items of the first half of the classes get far noisier old embeddings (their h(old) is
    poor: an order that finds them should win)."""
    y = rng.integers(0, C, n)
    new = centers[y] + 0.6 * rng.normal(size=(n, centers.shape[1]))
    noise = np.where((y < C // 2)[:, None], 2.5, 0.2) if bad_region else 0.2
    old = new[:, :8] + noise * rng.normal(size=(n, 8))
    return old.astype(np.float32), new.astype(np.float32), y


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    centers = 3.0 * rng.normal(size=(C, 12))
    of, nf, yf = _data(1200, rng, centers, True)
    oh, nh, yh = _data(300, rng, centers, True)
    h, _ = train_transformation(of, nf, yf, new_classifier=PrototypeHead.from_embeddings(nf, yf, C),
                                objective="fastfill", hidden_dim=32, epochs=15, batch_size=256,
                                seed=0)
    h.prototypes = fit_prototypes(nf, yf, distance="l2")
    return h, (oh, nh, yh)


@pytest.fixture(scope="module")
def forecast(setup):
    h, (oh, nh, yh) = setup
    return forecast_orders(h, oh, nh, yh, sigma_head=h.uncertainty_head, start_share=0.1,
                           fractions=FRACTIONS, random_orders=6, bootstrap=50, folds=4, seed=0)


# ----------------------------------------------------------------------------- agreement
def test_neighbour_agreement_by_hand():
    q = np.array([[0.0, 0.0], [10.0, 0.0]])
    new = np.array([[1.0, 0.0], [2.0, 0.0], [9.0, 0.0], [11.5, 0.0]])
    ref = reference_neighbours(q, new, 2, distance="l2")
    assert [sorted(r) for r in ref] == [[0, 1], [2, 3]]
    np.testing.assert_allclose(neighbour_agreement(q, new, ref, distance="l2"), [1.0, 1.0])
    moved = new.copy()
    moved[1] = [20.0, 0.0]           # query 0 loses item 1 to item 2; query 1 keeps 2 and 3
    np.testing.assert_allclose(neighbour_agreement(q, moved, ref, distance="l2"), [0.5, 1.0])


def test_neighbour_agreement_leaves_the_query_out():
    g = np.array([[0.0], [1.0], [3.0], [7.0]])
    ids = np.arange(4)
    ref = reference_neighbours(g, g, 1, distance="l2", query_ids=ids, gallery_ids=ids)
    assert ref[:, 0].tolist() == [1, 0, 1, 2]   # never itself
    with pytest.raises(ValueError, match="reference"):
        neighbour_agreement(g, g, ref[:2], distance="l2")


# ----------------------------------------------------------------------------- order specs
def test_order_priority_single_blend_and_reverse():
    comps = {"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([0.1, 0.3, 0.2])}
    up = {"version": 1, "terms": [{"component": "a", "weight": 1.0, "descending": True,
                                   "quantiles": None}], "reverse": False}
    assert order_priority(up, comps).tolist() == [3.0, 1.0, 2.0]
    assert order_priority({**up, "reverse": True}, comps).tolist() == [-3.0, -1.0, -2.0]
    blend = {"version": 1, "reverse": False, "terms": [
        {"component": "a", "weight": 0.5, "descending": True, "quantiles": [1.0, 2.0, 3.0]},
        {"component": "b", "weight": 0.5, "descending": False, "quantiles": [0.1, 0.2, 0.3]}]}
    # CDFs: a -> [1, 0, .5]; 1 - CDF(b) -> [1, 0, .5]
    np.testing.assert_allclose(order_priority(blend, comps).numpy(), [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="reads 'c'"):
        order_priority({**up, "terms": [{**up["terms"][0], "component": "c"}]}, comps)
    with pytest.raises(ValueError, match="quantiles"):
        check_order_spec({**blend, "terms": [{**t, "quantiles": None} for t in blend["terms"]]})
    with pytest.raises(ValueError, match="version"):
        check_order_spec({"terms": []})


def test_candidate_keys_round_trip():
    for c in (Candidate("benefit+margin", True, True), Candidate("random", calibrated=True),
              Candidate("sigma")):
        assert Candidate.from_key(c.key) == c
    with pytest.raises(ValueError, match="unknown candidate"):
        Candidate.from_key("entropy")


# ----------------------------------------------------------------------------- the decision
def _row(key, auc, lo, hi):
    return {"key": key, "auc": auc, "gain": (lo + hi) / 2, "gain_lo": lo, "gain_hi": hi}


def test_choose_order_takes_the_best_only_beyond_random_spread():
    random = [0.50, 0.51, 0.49]
    rows = [_row("sigma", 0.53, 0.01, 0.04), _row("margin", 0.52, 0.005, 0.02),
            _row("random", 0.50, 0.0, 0.0)]
    d = choose_order(rows, random)
    assert d["key"] == "sigma" and d["beats_random"] and d["decided"]
    # best AUC inside random's range: random order, and more items could not change it
    rows = [_row("sigma", 0.505, -0.004, 0.006), _row("random", 0.50, 0.0, 0.0)]
    d = choose_order(rows, random)
    assert d["key"] == "random" and not d["beats_random"] and d["decided"]
    assert "random's own spread" in d["reason"]
    # beats every permutation but its gain band reaches below zero: undecided
    rows = [_row("sigma", 0.515, -0.002, 0.03), _row("random", 0.50, 0.0, 0.0)]
    d = choose_order(rows, random)
    assert d["key"] == "random" and not d["decided"]


def test_recommend_stop_and_peak():
    x = np.linspace(0, 1, 11)
    y = np.array([0.70, 0.75, 0.79, 0.80, 0.81, 0.805, 0.80, 0.80, 0.80, 0.80, 0.80])
    s = recommend_stop(x, y, 0.005)
    assert s["fraction"] == pytest.approx(0.3)            # first point >= 0.795
    assert s["peak_fraction"] == pytest.approx(0.4) and s["peak_gain"] == pytest.approx(0.01)
    assert "peaks at t=0.40" in s["reason"]
    flat = recommend_stop(x, np.linspace(0.7, 0.8, 11), 0.005)
    assert flat["fraction"] == pytest.approx(1.0) and "peaks" not in flat["reason"]
    with pytest.raises(ValueError, match="epsilon"):
        recommend_stop(x, y, -1.0)


def test_gain_share():
    np.testing.assert_allclose(gain_share([0.5, 0.6, 0.7]), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(gain_share([0.5, 0.6], end=0.9), [0.0, 0.25])
    assert np.isnan(gain_share([0.5, 0.5])).all()


# ----------------------------------------------------------------------------- the forecast
def test_forecast_finds_the_bad_region_and_beats_random(forecast):
    """Half of the classes have poor h(old): h's sigma finds them, so it must beat random."""
    assert forecast.metric == "mAP"
    assert forecast.decision["beats_random"], forecast.summary_lines()
    chosen = forecast.chosen
    assert chosen["auc"] > max(forecast.random_aucs)
    assert chosen["auc_lo"] <= chosen["auc"] <= chosen["auc_hi"]
    keys = {c["key"] for c in forecast.candidates}
    assert {"sigma", "sigma reversed", "margin", "distance reversed", "random"} <= keys
    assert any(k.endswith("+ calibration") for k in keys)
    x = forecast.fractions
    assert x[0] == pytest.approx(0.1) and x[-1] == pytest.approx(1.0)
    ends = {round(c["curve"][-1], 12) for c in forecast.candidates if "calibration" not in c["key"]}
    assert len(ends) == 1                     # at t=1 every order is the all-new gallery
    for c in forecast.candidates:             # labelled: mAP, top-1 and agreement curves
        assert len(c["agreement_curve"]) == len(x) and c["agreement_curve"][-1] == 1.0


def test_forecast_json_round_trip_and_summary(forecast):
    back = Forecast.from_json(forecast.to_json())
    assert back.decision == forecast.decision and back.fractions == forecast.fractions
    assert back.table()["key"].tolist() == forecast.table()["key"].tolist()
    text = "\n".join(forecast.summary_lines())
    assert forecast.decision["key"] in text and "random order, 6 permutations" in text
    assert "where to stop:" in text


def test_cross_fitting_never_scores_the_items_it_fits(setup, monkeypatch):
    h, (oh, nh, yh) = setup
    fitted_on = []
    real = fc._fit_parts

    def spy(h_, sigma_head, old, new, labels, **kw):
        fitted_on.append({tuple(r) for r in np.round(old, 5)})
        return real(h_, sigma_head, old, new, labels, **kw)
    scored = []
    real_components = fc._components

    def spy_components(h_, heads, old):
        scored.append({tuple(r) for r in np.round(old, 5)})
        return real_components(h_, heads, old)
    monkeypatch.setattr(fc, "_fit_parts", spy)
    monkeypatch.setattr(fc, "_components", spy_components)
    forecast_orders(h, oh[:150], nh[:150], yh[:150], sigma_head=h.uncertainty_head,
                    fractions=[0.0, 0.5, 1.0], random_orders=2, bootstrap=10, folds=3,
                    calibration=False, seed=1)
    # _fit_parts computes components on its own items first; then each fold is scored
    fold_scores = [s for s in scored if not any(s == f for f in fitted_on)]
    assert len(fitted_on) == 3 and len(fold_scores) == 3
    for fit, score in zip(fitted_on, fold_scores):
        assert not fit & score
    assert set().union(*fold_scores) == {tuple(r) for r in np.round(oh[:150], 5)}


def test_a_perfect_h_leaves_nothing_to_order():
    """When h(old) equals the new embedding, backfilling changes nothing: no order can beat
    random, so the decision is random order."""
    rng = np.random.default_rng(3)
    new = rng.normal(size=(120, 4)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    h = Transformation(4, 4, hidden_dim=4, num_hidden_layers=1)
    with torch.no_grad():               # the identity: Linear(4,4) I, BN off, ReLU on >= 0 ...
        h.mlp = torch.nn.Sequential(torch.nn.Identity())
    h.prototypes = fit_prototypes(new, y, distance="l2")
    f = forecast_orders(h, new, new, y, sigma_head=h.uncertainty_head, random_orders=4,
                        bootstrap=20, folds=3, seed=0)
    assert f.decision["key"] == "random" and not f.decision["beats_random"]


def test_label_free_forecast_decides_on_agreement(setup):
    h, (oh, nh, _) = setup
    f = forecast_orders(h, oh, nh, None, sigma_head=h.uncertainty_head, random_orders=4,
                        fractions=FRACTIONS[:1] + FRACTIONS[3::2], start_share=0.1,
                        bootstrap=20, folds=3, seed=0)
    assert f.metric == "agreement@10" and not f.info["labelled"]
    assert not any("benefit" in c["key"] or "calibration" in c["key"] for c in f.candidates)
    assert all("mAP_curve" not in c for c in f.candidates)
    assert f.chosen["curve"][-1] == pytest.approx(1.0)


def test_forecast_rejects_bad_arguments(setup):
    h, (oh, nh, yh) = setup
    with pytest.raises(ValueError, match="distance"):
        forecast_orders(h, oh, nh, yh, distance="dot")
    with pytest.raises(ValueError, match="at least 8"):
        forecast_orders(h, oh[:5], nh[:5], yh[:5])
    with pytest.raises(ValueError, match="start_share"):
        forecast_orders(h, oh, nh, yh, start_share=1.0)
    with pytest.raises(ValueError, match="fractions"):
        forecast_orders(h, oh, nh, yh, fractions=[0.0, 0.5])


# ----------------------------------------------------------------------------- h carries it
def test_auto_order_travels_in_h_and_scores_like_the_forecast(setup, forecast):
    h, (oh, nh, yh) = setup
    chosen = fit_auto_order(h, h.uncertainty_head, oh, nh, yh, "sigma+margin reversed",
                            seed=0)
    spec = chosen.auto_order
    assert spec["name"] == "sigma+margin reversed" and spec["reverse"]
    rebuilt = build_model(model_spec(chosen))
    rebuilt.load_state_dict(chosen.state_dict())
    ids = np.array([f"item-{i}" for i in range(len(oh))])
    a = auto_scores(chosen, oh, ids)
    np.testing.assert_allclose(auto_scores(rebuilt.eval(), oh, ids), a)
    assert model_spec(rebuilt)["params"]["order_heads"] == {"sigma": 0}
    rnd = fit_auto_order(h, None, oh, nh, yh, "random", seed=0)
    np.testing.assert_array_equal(auto_scores(rnd, oh, ids, seed=5),
                                  random_scores_for_ids(ids, 5))
    with pytest.raises(ValueError, match="forecast"):
        auto_scores(h, oh, ids)


def test_cost_lines_from_the_measured_rate():
    from fastfill_udfs.spark.estimate import Rate, cost_lines, estimate_metrics

    rate = Rate(items=256, seconds=12.8, device="cpu", parallelism=2)      # 20 items/s
    stop = {"batch": 7, "fraction": 0.35, "items": 36000, "gain": 0.012, "metric": "mAP"}
    lines = cost_lines(rate, 72000, stop=stop)
    assert lines[0] == "items left to embed: 72000"
    assert "20.0 items/s" in lines[1] and "2 task slots" in lines[1]
    assert lines[2].startswith("the rest of the plan: 1h00m00s (2 core-hours)")
    assert lines[3].startswith("to the recommended stop (batch 7, t=0.35): 36000 items, "
                               "30m00s (1 core-hours); forecast gain +1.20 mAP points, +1.2 per")
    m = estimate_metrics(rate, 72000, stop)
    assert m["estimate_hours_rest"] == pytest.approx(1.0)
    assert m["estimate_hours_to_stop"] == pytest.approx(0.5)
    assert cost_lines(None, 5)[1].startswith("rate: not measured")


def test_share_gap_compares_shares_at_the_runs_own_fractions(forecast):
    x = np.asarray(forecast.fractions, np.float64)
    chosen = np.asarray(forecast.chosen["curve"], np.float64)
    mid = (x[:-1] + x[1:]) / 2                    # points between the forecast's own
    realised = np.interp(mid, x, chosen)
    got = fc.share_gap(forecast, mid, realised)
    assert np.allclose(got["predicted"], np.interp(mid, x, fc.gain_share(chosen)))
    assert np.allclose(got["realised"], fc.gain_share(realised))
    assert got["gap"] == pytest.approx(np.max(np.abs(got["predicted"] - got["realised"])))
    # the realised share ends where it is told to (new/new), not at its last point
    end = realised[-1] + 0.1
    moved = fc.share_gap(forecast, mid, realised, end=end)
    assert moved["realised"][-1] < 1.0 and moved["gap"] > 0.0
