"""The forecast's Spark side (issue 25): gather the held-out pairs `train_transformation` keeps,
probe more gallery items when they are too few to decide, run
:func:`fastfill_udfs.forecast.forecast_orders` and give `h` the chosen order.

Probes are gallery items embedded with the new model only for the forecast: they are appended
to `train_pairs` (role `probe`), so `rank_gallery` puts them into `gallery_features` as `new` at
batch 0, like h's training pairs, and the backfill never embeds them again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.forecast import (Forecast, fit_auto_order, forecast_orders,
                                    forecast_settings, random_spec)
from fastfill_udfs.model_loading import ModelRef
from fastfill_udfs.spark.delta_io import is_delta_table, read_table, table_paths

log = logging.getLogger(__name__)


class NoForecastError(ValueError):
    """A job needs a forecast the run's h does not carry (policy auto, backfill.stop=forecast)."""


def cluster_prototypes(new: np.ndarray, distance: str, seed: int) -> dict:
    """Class prototypes without labels: k-means centroids of new embeddings (k about one per
    30 items, 2..64), for the margin and distance orders of an unlabelled gallery."""
    import faiss

    from fastfill_udfs.policies import fit_prototypes

    x = np.ascontiguousarray(new, dtype=np.float32)
    k = int(np.clip(len(x) // 30, 2, 64))
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=int(seed), verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return fit_prototypes(x, assign[:, 0], distance=distance)


@dataclass
class HeldOut:
    """The items a forecast runs on: old/new embeddings, labels (or None), ids, and how many
    of them are probes."""
    old: np.ndarray
    new: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray
    n_probe: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, other: "HeldOut") -> "HeldOut":
        if not len(other):
            return self
        cat = np.concatenate
        labels = None if self.labels is None or other.labels is None else \
            cat([self.labels, other.labels])
        return HeldOut(cat([self.old, other.old]), cat([self.new, other.new]), labels,
                       cat([self.ids, other.ids]), self.n_probe + len(other))

    def subset(self, n: int, seed: int) -> "HeldOut":
        if n >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return HeldOut(self.old[keep], self.new[keep],
                       None if self.labels is None else self.labels[keep], self.ids[keep],
                       self.n_probe)


def probe(spark: SparkSession, cfg: Config, new_model: ModelRef, n: int, round_: int,
          labelled: bool) -> HeldOut:
    """Embed `n` more gallery items (seeded sample of rows not in `train_pairs` yet) with the
    new model and append them to `train_pairs` as role `probe`. Returns them (fewer when items
    could not be embedded; those stay in the backfill plan)."""
    from fastfill_udfs.spark.delta_io import latest_version, write_table
    from fastfill_udfs.spark.pairs import embed_pairs, sample_rows, usable_gallery

    paths = table_paths(cfg)
    gallery, image_col = usable_gallery(spark, cfg)
    taken = read_table(spark, paths.train_pairs).select("id")
    rest = gallery.join(taken, "id", "left_anti").select("id", "label", "old_embedding",
                                                           image_col)
    sample = sample_rows(rest, n, cfg.get_path("seed") + 1000 + round_)
    rows, _, _ = embed_pairs(spark, cfg, new_model, sample, image_col, "probe")
    got = rows.toPandas()   # embedded once: the sample excludes train_pairs, which this extends
    if len(got):
        write_table(spark.createDataFrame(got, schema=rows.schema), paths.train_pairs,
                    mode="append")
    version = latest_version(spark, paths.train_pairs)
    log.info("forecast: %d probe items embedded (round %d; train_pairs version %d)", len(got),
             round_, version)
    return held_out(got, labelled, n_probe=len(got))


def held_out(pdf, labelled: bool, n_probe: int = 0) -> HeldOut:
    def matrix(column):
        return (np.stack(pdf[column].to_numpy()).astype(np.float32) if len(pdf)
                else np.zeros((0, 0), np.float32))
    old, new = matrix("old_embedding"), matrix("new_embedding")
    labels = pdf["label"].to_numpy(dtype=np.int64) if labelled else None
    return HeldOut(old, new, labels, pdf["id"].to_numpy(dtype=object), n_probe)


def labelled_queries(spark: SparkSession, cfg: Config, limit: int = 2000):
    """(embeddings, labels) of the user's own labelled queries (data.queries.source other than
    the gallery), at most `limit` of them (seeded); None where there are none."""
    if cfg.get_path("data.queries.source") == "gallery":
        return None
    path = table_paths(cfg).query_features
    if not is_delta_table(spark, path):
        return None
    q = read_table(spark, path).where(F.col("label").isNotNull()).select("label", "embedding")
    pdf = q.orderBy(F.xxhash64("label", "embedding")).limit(limit).toPandas()
    if len(pdf) < 2:
        return None
    return (np.stack(pdf["embedding"].to_numpy()).astype(np.float32),
            pdf["label"].to_numpy(dtype=np.int64))


def forecast_and_choose(spark: SparkSession, cfg: Config, new_model: ModelRef, h_base, h,
                        held: HeldOut, *, n_gallery: int, n_pairs: int):
    """Forecast on `held` (probing more gallery items while the forecast cannot decide, within
    `forecast.probe_max_share` of the gallery), then give `h` the chosen order (`auto_order`).

    `h_base`: h as trained (its own sigma head, never refit); `h`: the h to register (it
    receives the chosen order); `n_gallery`/`n_pairs`: gallery rows and h's pairs, for the
    backfill's starting share. Returns (h, Forecast or None, held-out used, log lines)."""
    f = cfg.get_path("forecast")
    seed = cfg.get_path("seed")
    labelled = held.labels is not None
    budget = int(f["probe_max_share"] * n_gallery)
    notes, round_ = [], 0
    if len(held) < f["min_items"] and budget > 0:
        want = min(f["min_items"] - len(held), budget)
        held = held.add(probe(spark, cfg, new_model, want, round_, labelled))
        notes.append(f"probed {held.n_probe} gallery items: {len(held) - held.n_probe} held-out "
                     f"pairs are fewer than forecast.min_items={f['min_items']}")
    queries = labelled_queries(spark, cfg) if labelled else None
    sigma_head = h_base.uncertainty_head if h_base.has_uncertainty else None
    settings = forecast_settings(cfg)
    forecast = None
    while True:
        sample = held.subset(int(f["max_items"]), seed + 7)
        start = min(0.95, (n_pairs + held.n_probe) / max(n_gallery, 1))
        if len(sample) < 8:
            notes.append(f"only {len(sample)} held-out items: too few to forecast; the auto "
                         "policy orders at random")
            break
        forecast = forecast_orders(
            h_base, sample.old, sample.new, sample.labels, sigma_head=sigma_head,
            queries=None if queries is None else queries[0],
            query_labels=None if queries is None else queries[1], start_share=start,
            seed=seed + 11, **settings)
        used = held.n_probe
        if forecast.decision["decided"] or round_ >= f["probe_rounds"] or used >= budget:
            break
        round_ += 1
        want = min(len(held), budget - used)
        held = held.add(probe(spark, cfg, new_model, want, round_, labelled))
        notes.append(f"probed {held.n_probe - used} more gallery items (round {round_}): "
                     f"{forecast.decision['reason']}; more items may decide it")
    if forecast is not None:
        forecast.info.update(n_probe=held.n_probe, notes=notes, n_gallery=n_gallery,
                             n_pairs=n_pairs)
        h = fit_auto_order(h, sigma_head, held.old, held.new, held.labels,
                           forecast.decision["key"], **_fit_kwargs(settings), seed=seed + 13)
    else:
        h.auto_order = random_spec(seed)
    for line in notes:
        log.info("forecast: %s", line)
    return h, forecast, held


def _fit_kwargs(settings: dict) -> dict:
    return {k: settings[k] for k in ("distance", "margin_weight", "top1_weight",
                                     "head_hidden_dim")}


def load_forecast(h: ModelRef) -> Forecast | None:
    """The forecast logged with `h` (train_transformation's MLflow run), or None."""
    from fastfill_udfs.tracking import download_forecast

    return download_forecast(h.run_id) if h.run_id else None


def announce_forecast(h: ModelRef) -> Forecast | None:
    """Log (print) the forecast behind h's ``auto`` order before a ranking: every candidate's
    forecast AUC and band, random order's spread, the decision and its reason, where to stop.
    Raises ValueError when h carries no forecast choice."""
    spec = getattr(h.model, "auto_order", None)
    if spec is None:
        raise NoForecastError(f"policy 'auto' needs h trained with a forecast (forecast.enabled=true "
                         f"in pipelines/train_transformation.py); h {h.version} has none: "
                         "retrain it, or choose --policy uncertainty or random")
    forecast = load_forecast(h)
    if forecast is None:
        log.info("auto order: %s (h %s; no forecast was logged with it: too few held-out "
                 "items)", spec.get("name"), h.version)
        return None
    for line in forecast.summary_lines():
        log.info("%s", line)
    return forecast


def run_forecast(meta: dict, policy: str) -> tuple[Forecast, str] | None:
    """(the forecast behind a backfill run's plan, the candidate that stands for the run's
    order) from batch 0's metadata: the ``auto`` order's own forecast, or its ``random``
    candidate for a random run planned with the same h. None when there is none."""
    from fastfill_udfs.tracking import download_forecast

    run_id = meta.get("forecast_run")
    if not run_id or policy not in ("auto", "random"):
        return None
    try:
        forecast = download_forecast(run_id)
    except Exception as exc:  # a run deleted from the store: the backfill goes on without
        log.warning("forecast of MLflow run %s not readable (%s)", run_id, exc)
        return None
    if forecast is None:
        return None
    key = forecast.decision["key"] if policy == "auto" else "random"
    return forecast, key


def planned_fractions(meta: dict, planned: dict[int, int]) -> dict[int, float]:
    """step (batch id, 0 = before batch 1) -> backfill fraction, from the plan's sizes and
    the items already new at batch 0 (h's pairs and probes)."""
    total = max(int(meta.get("gallery_features") or 0), 1)
    done = int(meta.get("pairs") or 0)
    out = {0: done / total}
    for batch in sorted(planned):
        done += planned[batch]
        out[batch] = done / total
    return out


def stop_batch(forecast: Forecast, key: str, fractions: dict[int, float]) -> tuple[int, float]:
    """(the first batch whose fraction reaches the forecast's recommended stop for candidate
    `key`, that fraction)."""
    from fastfill_udfs.forecast import recommend_stop

    c = forecast.candidate(key)
    eps = forecast.stop["epsilon"]
    stop = recommend_stop(forecast.fractions, c["curve"], eps, forecast.metric)["fraction"]
    for batch in sorted(fractions):
        if batch > 0 and fractions[batch] >= stop - 1e-9:
            return batch, stop
    return max(fractions), stop
