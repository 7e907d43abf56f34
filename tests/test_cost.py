"""fastfill_udfs.cost: the backfill cost projection's arithmetic and its argument checks."""
from __future__ import annotations

import math

import pytest

from fastfill_udfs.cost import backfill_cost, cores_to_feed


def test_backfill_cost_one_device():
    c = backfill_cost(7_200_000, 1000.0)  # 7,200 s of embedding
    assert c["device_hours"] == pytest.approx(2.0)
    assert c["busy_device_hours"] == pytest.approx(2.0)
    assert c["wall_hours"] == pytest.approx(2.0)
    assert c["n_batches"] == 0


def test_backfill_cost_devices_share_the_wall_time_not_the_device_hours():
    one = backfill_cost(1_000_000, 250.0)
    eight = backfill_cost(1_000_000, 250.0, n_devices=8)
    assert eight["wall_hours"] == pytest.approx(one["wall_hours"] / 8)
    assert eight["device_hours"] == pytest.approx(one["device_hours"])
    assert eight["items_per_device"] == pytest.approx(125_000)


def test_backfill_cost_per_batch_overhead_holds_every_device():
    # 10 batches of 100 items (the last one short: 950 items), 2 s each while 4 devices wait
    c = backfill_cost(950, 10.0, n_devices=4, batch_size=100, overhead_s_per_batch=2.0)
    assert c["n_batches"] == 10
    wall_s = 950 / 10.0 / 4 + 10 * 2.0
    assert c["wall_hours"] == pytest.approx(wall_s / 3600)
    assert c["device_hours"] == pytest.approx(4 * wall_s / 3600)
    assert c["busy_device_hours"] == pytest.approx(95 / 3600)


def test_backfill_cost_of_nothing_is_zero():
    assert backfill_cost(0, 5.0)["wall_hours"] == 0.0


@pytest.mark.parametrize("kwargs, name", [
    ({"n_items": -1, "items_per_s": 1.0}, "n_items"),
    ({"n_items": 1.5, "items_per_s": 1.0}, "n_items"),
    ({"n_items": True, "items_per_s": 1.0}, "n_items"),
    ({"n_items": 10, "items_per_s": 0.0}, "items_per_s"),
    ({"n_items": 10, "items_per_s": math.inf}, "items_per_s"),
    ({"n_items": 10, "items_per_s": "5"}, "items_per_s"),
    ({"n_items": 10, "items_per_s": 1.0, "n_devices": 0}, "n_devices"),
    ({"n_items": 10, "items_per_s": 1.0, "batch_size": -5}, "batch_size"),
    ({"n_items": 10, "items_per_s": 1.0, "overhead_s_per_batch": -1.0}, "overhead_s_per_batch"),
    ({"n_items": 10, "items_per_s": 1.0, "overhead_s_per_batch": 3.0}, "batch_size"),
])
def test_backfill_cost_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        backfill_cost(**kwargs)


@pytest.mark.parametrize("device, per_core, cores", [
    (13_800.0, 300.0, 46),   # exact ratio: not pushed up by one
    (0.3, 0.1, 3),           # floating-point 0.3 / 0.1 = 2.9999999999999996
    (1000.0, 301.0, 4),      # 3.32 -> 4
    (5.0, 400.0, 1),         # a slow device still needs one core
])
def test_cores_to_feed(device, per_core, cores):
    assert cores_to_feed(device, per_core) == cores


@pytest.mark.parametrize("args, name", [
    ((0.0, 1.0), "device_items_per_s"),
    ((-3.0, 1.0), "device_items_per_s"),
    ((10.0, 0.0), "decode_items_per_s_per_core"),
    ((10.0, math.nan), "decode_items_per_s_per_core"),
])
def test_cores_to_feed_rejects_bad_rates(args, name):
    with pytest.raises(ValueError, match=name):
        cores_to_feed(*args)
