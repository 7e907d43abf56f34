"""What a backfill will cost, measured before its first batch (issue 25): the new model's rate
on a sample of the plan's own images, on the device the job runs on, and from it the time for
the rest of the plan, for the forecast's recommended stop, and the forecast's gain per hour.

`backfill.py --estimate-only` prints it and exits, so a user can ask on the cluster that will
run the backfill; every backfill prints and logs it before the first batch it runs."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import BACKFILL_STOPS as STOP_RULES
from fastfill_udfs.config import Config
from fastfill_udfs.model_loading import ModelRef
from fastfill_udfs.progress import format_seconds
from fastfill_udfs.spark.delta_io import read_table, table_paths

log = logging.getLogger(__name__)


@dataclass
class Rate:
    """Items embedded per second on this cluster, and how it was measured."""
    items: int
    seconds: float
    device: str
    parallelism: int

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


def measure_rate(spark: SparkSession, cfg: Config, new_model: ModelRef, run: str,
                 batch_id: int, n: int, image_column: str) -> Rate | None:
    """Embed up to `n` items of planned batch `batch_id` (read, decode, preprocess, model:
    what a batch does before its MERGE) after a warm-up that loads the model on the workers,
    and time it. Nothing is written. None when the batch has no item or `n` is 0."""
    from fastfill_udfs.spark.ingest import embed_images

    if n <= 0:
        return None
    plan = (read_table(spark, table_paths(cfg, run).backfill_plan)
            .where(F.col("batch_id") == batch_id).select("id", image_column))

    def embed(rows):
        items = rows
        if image_column == "image_uri":
            from fastfill_udfs.spark.images import attach_images

            items, _ = attach_images(spark, rows, cfg.get_path("data.image_root"))
        return embed_images(spark, items, new_model, cfg, ["id"]).where("reason IS NULL").count()

    sample = plan.orderBy("id").limit(int(n)).persist()
    try:
        total = sample.count()
        if total == 0:
            return None
        embed(sample.limit(min(16, total)))          # warm-up: model load, Python workers
        t0 = time.perf_counter()
        done = embed(sample)
        seconds = time.perf_counter() - t0
    finally:
        sample.unpersist()
    device = cfg.get_path("backfill.device")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Rate(int(done), seconds, device, spark.sparkContext.defaultParallelism)


def cost_lines(rate: Rate | None, items_left: int, *, stop: dict | None = None) -> list[str]:
    """The estimate as printed: items left, the measured rate, hours for the rest and for the
    recommended stop, device-hours (one device per task slot: GPUs on a GPU cluster, cores on
    CPUs; `fastfill_udfs.cost.backfill_cost`, as BENCHMARKS.md projects) and the forecast's
    gain per device-hour. `stop`: {batch, fraction, items, gain, metric} or None."""
    from fastfill_udfs.cost import backfill_cost

    lines = [f"items left to embed: {items_left}"]
    if rate is None or not rate.items_per_s > 0:
        return lines + ["rate: not measured (backfill.throughput_sample=0, or nothing planned)"]
    devices = max(1, rate.parallelism)
    per_device = rate.items_per_s / devices
    unit = "core-hours" if rate.device == "cpu" else "GPU-hours"

    def cost(n):
        c = backfill_cost(int(n), per_device, n_devices=devices)
        return c, f"{format_seconds(c['wall_hours'] * 3600)} ({c['device_hours']:.3g} {unit})"
    rest, text = cost(items_left)
    lines += [f"measured rate: {rate.items_per_s:.1f} items/s on this cluster ({rate.device}, "
              f"{devices} task slots; {rate.items} items in {rate.seconds:.1f} s: read + decode "
              "+ model)",
              f"the rest of the plan: {text}, embedding alone (each batch adds its MERGE and "
              "log row)"]
    if stop:
        c, text = cost(stop["items"])
        line = (f"to the recommended stop (batch {stop['batch']}, t={stop['fraction']:.2f}): "
                f"{stop['items']} items, {text}")
        if stop.get("gain") is not None and c["device_hours"] > 0:
            line += (f"; forecast gain {stop['gain'] * 100:+.2f} {stop['metric']} points, "
                     f"{stop['gain'] * 100 / c['device_hours']:+.3g} per {unit[:-1]}")
        lines.append(line)
    return lines


def estimate_metrics(rate: Rate | None, items_left: int, stop: dict | None) -> dict:
    """The numbers behind `cost_lines`, for MLflow."""
    if rate is None or not rate.items_per_s > 0:
        return {"estimate_items_left": items_left}
    out = {"estimate_items_left": items_left, "estimate_items_per_s": rate.items_per_s,
           "estimate_hours_rest": items_left / rate.items_per_s / 3600.0}
    if stop:
        out["estimate_hours_to_stop"] = stop["items"] / rate.items_per_s / 3600.0
    return out


def plan_ahead(spark: SparkSession, cfg: Config, new_model: ModelRef, run: str, policy: str, *,
               stop: str, max_batches: int | None, measure: bool = True) -> dict:
    """Before a backfill's first batch: the batches it will run (`max_batches`, cut at the
    forecast's recommended stop when `stop` is ``forecast``), the measured rate and the cost
    lines. Returns {max_batches, lines, metrics, stop, pending (batches)}. Raises ValueError for an unknown
    `stop` (naming backfill.stop), NoForecastError for ``forecast`` without a forecast."""
    from fastfill_udfs.forecast import forecast_fractions
    from fastfill_udfs.spark.backfill import committed_batches, planned_batches
    from fastfill_udfs.spark.forecast import (NoForecastError, planned_fractions, run_forecast,
                                              stop_batch)
    from fastfill_udfs.spark.rank import plan_metadata

    if stop not in STOP_RULES:
        raise ValueError(f"backfill.stop must be one of {STOP_RULES}, got {stop!r}")
    meta = plan_metadata(spark, cfg, run) or {}
    planned = planned_batches(spark, cfg, run)
    done = set(committed_batches(spark, cfg, run))
    pending = [b for b in sorted(planned) if b not in done]
    found = run_forecast(meta, meta.get("policy", policy))
    if stop == "forecast" and found is None:
        raise NoForecastError(
            f"backfill.stop=forecast: run '{run}' has no forecast (its policy is "
            f"{meta.get('policy', policy)!r}; the forecast covers the auto and random orders of "
            "an h trained with forecast.enabled=true). Use --stop none or --max-batches N")
    stop_info = None
    if found is not None:
        forecast, key = found
        fractions = planned_fractions(meta, planned)
        batch, at = stop_batch(forecast, key, fractions)
        now = fractions[max(done)] if done else fractions[0]
        curve = forecast_fractions(forecast, [now, fractions[batch]], key=key)["curve"]
        stop_info = {"batch": batch, "fraction": at,
                     "items": sum(planned[b] for b in pending if b <= batch),
                     "gain": float(curve[1] - curve[0]) if batch > (max(done) if done else 0)
                     else 0.0, "metric": forecast.metric}
    budget = max_batches or None
    if stop == "forecast":
        left = len([b for b in pending if b <= stop_info["batch"]])
        budget = left if budget is None else min(budget, left)
    items_left = sum(planned[b] for b in pending)
    rate = None
    if measure and pending and budget != 0:
        rate = measure_rate(spark, cfg, new_model, run, pending[0],
                            int(cfg.get_path("backfill.throughput_sample")),
                            meta.get("image_column", "image"))
    lines = cost_lines(rate, items_left, stop=stop_info)
    if stop == "forecast":
        lines.append(f"backfill.stop=forecast: this job stops after batch {stop_info['batch']} "
                     f"({budget} batch(es) to run now); rerun with --stop none to go on")
    return {"max_batches": budget, "lines": lines, "rate": rate, "stop": stop_info,
            "pending": len(pending), "metrics": estimate_metrics(rate, items_left, stop_info)}
