"""train_transformation's hold-out: which pairs h trains on and which fit its order head."""
from __future__ import annotations

import numpy as np

from fastfill_udfs.config import load_config
from fastfill_udfs.spark.train_transformation import MIN_HELD_OUT, _holdout_rows


def _cfg(*sets):
    return load_config([], list(sets))


def test_enough_labelled_pairs_are_split_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 200)
    fit, held = _holdout_rows(_cfg("transformation.holdout_fraction=0.15"), labels)
    assert len(held) == 300 and len(fit) == 1700
    assert not set(fit) & set(held) and set(fit) | set(held) == set(range(2000))
    assert np.bincount(labels[held]).tolist() == [30] * 10


def test_nothing_is_held_out_when_nothing_is_fitted_beyond_h_or_it_cannot_be():
    labels = np.repeat(np.arange(10), 200)
    sigma = _cfg("transformation.order_head=sigma", "transformation.calibration=none")
    assert _holdout_rows(sigma, labels)[1] is None
    assert _holdout_rows(_cfg(), None)[1] is None                     # no labels
    few = labels[: int(MIN_HELD_OUT / 0.15) - 10]
    fit, held = _holdout_rows(_cfg("transformation.holdout_fraction=0.15"), few)
    assert held is None and len(np.arange(len(few))[fit]) == len(few)
