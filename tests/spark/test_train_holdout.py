"""train_transformation's hold-out: which pairs h trains on and which fit its order head, its
calibration and the forecast."""
from __future__ import annotations

import numpy as np

from fastfill_udfs.config import load_config
from fastfill_udfs.spark.train_transformation import MIN_HELD_OUT, _holdout_rows


def _cfg(*sets):
    return load_config([], list(sets))


def test_enough_labelled_pairs_are_split_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 200)
    fit, held = _holdout_rows(_cfg("transformation.holdout_fraction=0.15"), labels, len(labels))
    assert len(held) == 300 and len(fit) == 1700
    assert not set(fit) & set(held) and set(fit) | set(held) == set(range(2000))
    assert np.bincount(labels[held]).tolist() == [30] * 10


def test_the_forecast_holds_out_pairs_with_or_without_labels():
    """The forecast needs held-out pairs even where no order head is fitted: without labels
    they are split at random (seeded), and a small labelled sample is split too (the forecast
    probes more gallery items when the held-out pairs are too few)."""
    fit, held = _holdout_rows(_cfg(), None, 1000)
    assert len(held) == 150 and not set(fit) & set(held)
    again = _holdout_rows(_cfg(), None, 1000)[1]
    np.testing.assert_array_equal(held, again)
    few = np.repeat(np.arange(4), 16)
    assert len(_holdout_rows(_cfg(), few, len(few))[1]) == 10


def test_nothing_is_held_out_when_nothing_is_fitted_beyond_h_or_it_cannot_be():
    labels = np.repeat(np.arange(10), 200)
    off = "forecast.enabled=false"
    sigma = _cfg(off, "transformation.order_head=sigma", "transformation.calibration=none")
    assert _holdout_rows(sigma, labels, len(labels))[1] is None
    assert _holdout_rows(_cfg(off), None, 2000)[1] is None                 # no labels
    few = labels[: int(MIN_HELD_OUT / 0.15) - 10]
    fit, held = _holdout_rows(_cfg(off, "transformation.holdout_fraction=0.15"), few, len(few))
    assert held is None and len(np.arange(len(few))[fit]) == len(few)
    assert _holdout_rows(_cfg(), None, 3)[1] is None                       # too few to split
