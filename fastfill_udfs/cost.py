"""What a backfill costs: device-hours and wall time from a measured embedding rate, and the CPU
cores that keep one device fed with decoded images.

Pure arithmetic (no torch, no Spark), so the pipeline can print an estimate before a backfill
and BENCHMARKS.md can project from the same functions. Rates are per device and scale linearly
with the number of devices (data-parallel batches, no shared bottleneck); a per-batch fixed cost
(the Delta MERGE and commit, during which the devices wait) is added to the wall time when given.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["backfill_cost", "cores_to_feed"]


def _positive_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _int_at_least(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def backfill_cost(n_items: int, items_per_s: float, *, n_devices: int = 1,
                  batch_size: int = 0, overhead_s_per_batch: float = 0.0) -> dict:
    """Cost of embedding `n_items` at `items_per_s` per device on `n_devices` devices.

    `batch_size` and `overhead_s_per_batch` (both or neither): batches of that many items run
    one after another, each adding that fixed time while every device waits.

    Returns {"device_hours": devices held x wall time (what renting them costs),
    "busy_device_hours": time the devices spend embedding, "wall_hours", "n_batches",
    "items_per_device"}. Raises ValueError naming the argument for a negative or non-int
    `n_items`, a rate that is not positive and finite, `n_devices` < 1, or a batch setting
    given without the other."""
    n = _int_at_least("n_items", n_items, 0)
    rate = _positive_rate("items_per_s", items_per_s)
    devices = _int_at_least("n_devices", n_devices, 1)
    batch = _int_at_least("batch_size", batch_size, 0)
    if isinstance(overhead_s_per_batch, bool) or not isinstance(overhead_s_per_batch, Real) \
            or not math.isfinite(overhead_s_per_batch) or overhead_s_per_batch < 0:
        raise ValueError(f"overhead_s_per_batch must be a finite number >= 0, "
                         f"got {overhead_s_per_batch!r}")
    if overhead_s_per_batch > 0 and batch == 0:
        raise ValueError("overhead_s_per_batch needs batch_size (items per batch) > 0")
    n_batches = -(-n // batch) if batch else 0
    busy_s = n / rate
    wall_s = busy_s / devices + n_batches * float(overhead_s_per_batch)
    return {"device_hours": wall_s * devices / 3600.0, "busy_device_hours": busy_s / 3600.0,
            "wall_hours": wall_s / 3600.0, "n_batches": n_batches,
            "items_per_device": n / devices}


def cores_to_feed(device_items_per_s: float, decode_items_per_s_per_core: float) -> int:
    """CPU cores that decode and preprocess `device_items_per_s` images per second when one core
    does `decode_items_per_s_per_core`: the ratio rounded up (at least 1). Raises ValueError
    naming the argument for a rate that is not positive and finite."""
    device = _positive_rate("device_items_per_s", device_items_per_s)
    per_core = _positive_rate("decode_items_per_s_per_core", decode_items_per_s_per_core)
    # round first so that an exact ratio computed in floating point (e.g. 0.3 / 0.1) is not
    # pushed up by one
    return max(1, math.ceil(round(device / per_core, 9)))
