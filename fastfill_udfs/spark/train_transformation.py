"""train_transformation: learn `h` from the user's own gallery and new model.

1. Sample `transformation.train_rows` gallery rows (seeded; stratified by label when there are
   labels), embed their images with the new model in Spark, and write the pairs (`id`,
   `old_embedding`, `new_embedding`, `label`) to the Delta table `train_pairs`.
2. Train `h` on the pairs (driver; GPU when present). The class term of the FastFill loss goes
   through the new model's classifier when it has one (`models.classifier`), else through class
   prototypes of the labelled pairs (cosine to the class means / `prototype_temperature`); with
   no labels, the alignment term and the uncertainty alone.
3. Log `h` to MLflow with the pairs' table and version and the new model it was fitted to, and
   register it where `models.h` points. `rank_gallery` reads those params: the sampled items
   already have new embeddings and go into `gallery_features` as `new`, never embedded twice.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
from pyspark.sql import SparkSession
from torch import nn

from fastfill_udfs.config import Config
from fastfill_udfs.model_loading import ModelRef, register_logged_model, registry_target
from fastfill_udfs.spark.delta_io import latest_version, read_table
from fastfill_udfs.spark.pairs import build_pairs

log = logging.getLogger(__name__)


def class_head(cfg: Config, new_model: ModelRef, new: np.ndarray, labels: np.ndarray | None
               ) -> tuple[nn.Module | None, str]:
    """(class head for h's class term, what it is): the new model's classifier, class
    prototypes, or none. Raises ValueError when labels exceed the classifier's classes."""
    from fastfill_udfs.training import PrototypeHead

    if labels is None:
        return None, "none (no labels)"
    name = cfg.get_path("models.classifier")
    head = getattr(new_model.model, name, None) if name else None
    if isinstance(head, nn.Module):
        out = getattr(head, "out_features", None)
        if out is not None and labels.max() >= out:
            raise ValueError(f"labels go up to {labels.max()}, but the new model's classifier "
                             f"{name!r} has {out} classes: labels must be its class indices "
                             "(or set models.classifier=\"\" to use class prototypes)")
        return head, f"classifier ({name})"
    return (PrototypeHead.from_embeddings(new, labels, int(labels.max()) + 1,
                                          cfg.get_path("transformation.prototype_temperature")),
            "prototypes")


MIN_HELD_OUT = 200   # fewer held-out pairs than this fit a benefit head worse than sigma's


def _holdout_rows(cfg: Config, labels: np.ndarray | None, n: int
                  ) -> tuple[np.ndarray | slice, np.ndarray | None]:
    """(rows h trains on, held-out rows the order head, calibration and forecast are fitted
    on), or (all rows, None) when nothing is fitted beyond h: no forecast
    (`forecast.enabled=false`) and `transformation.order_head=sigma` with `calibration=none`.
    Without labels only the forecast is fitted on held-out rows (split at random)."""
    from fastfill_udfs.order_fitting import holdout_split

    t = cfg.get_path("transformation")
    forecast = cfg.get_path("forecast.enabled")
    if not forecast and t["order_head"] == "sigma" and t["calibration"] == "none":
        return slice(None), None
    fraction = float(t["holdout_fraction"])
    held = int(round(fraction * n))
    if labels is None:
        if not forecast:
            log.warning("train_transformation: no labels, so the order is h's own uncertainty "
                        "head (transformation.order_head=%s and calibration=%s need labelled "
                        "pairs)", t["order_head"], t["calibration"])
            return slice(None), None
        if held < 2 or n - held < 2:
            return slice(None), None
        perm = np.random.default_rng(cfg.get_path("seed") + 4).permutation(n)
        return np.sort(perm[held:]), np.sort(perm[:held])
    if held < 2 or n - held < 2 or (held < MIN_HELD_OUT and not forecast):
        if not forecast:
            log.warning("train_transformation: %d held-out pairs (transformation.holdout_"
                        "fraction=%s of %d) are too few to fit the order head on (at least %d), "
                        "so the order is h's own uncertainty head; raise transformation."
                        "train_rows", held, t["holdout_fraction"], n, MIN_HELD_OUT)
        return slice(None), None
    return holdout_split(labels, fraction, cfg.get_path("seed") + 4)


def train_transformation_on_gallery(spark: SparkSession, cfg: Config, new_model: ModelRef
                                    ) -> dict:
    """The whole job (see the module docstring). Returns {run_id, h_version, n_pairs,
    class_term, pairs_table, pairs_version, forecast}. Raises ValueError (before any work)
    unless models.h is `models:/<name>@<alias>`, or when no pair could be built."""
    import mlflow
    import torch

    from fastfill_udfs import model_store
    from fastfill_udfs.tracking import configure_mlflow, log_forecast
    from fastfill_udfs.training import train_transformation

    target = cfg.get_path("models.h")
    registry_target(target, "h")
    built = build_pairs(spark, cfg, new_model)
    if built["n_pairs"] < 2:
        raise ValueError(f"train_transformation: only {built['n_pairs']} pairs in "
                         f"{built['table']}: the gallery needs usable old embeddings and images")
    pdf = read_table(spark, built["table"], version=built["version"]).toPandas()
    old = np.stack(pdf["old_embedding"].to_numpy()).astype(np.float32)
    new = np.stack(pdf["new_embedding"].to_numpy()).astype(np.float32)
    labels = (pdf["label"].to_numpy(dtype=np.int64)
              if pdf["label"].notna().all() and len(pdf) else None)
    head, class_term = class_head(cfg, new_model, new, labels)
    t = cfg.get_path("transformation")
    configure_mlflow(cfg)
    with mlflow.start_run(run_name="train_transformation",
                          tags={"fastfill.kind": "train_transformation"}) as run:
        mlflow.log_params({
            "pairs_table": built["table"], "n_pairs": built["n_pairs"],
            "n_failed": built["n_failed"],
            "new_model": new_model.uri, "new_model_version": new_model.version,
            "new_model_weights": new_model.weights_hash, "class_term": class_term,
            **{f"h_{k}": v for k, v in t.items()}})
        fit, held = _holdout_rows(cfg, labels, len(pdf))
        h, history = train_transformation(
            old[fit], new[fit], None if labels is None else labels[fit],
            objective=t["objective"], new_classifier=head,
            hidden_dim=t["hidden_dim"], num_hidden_layers=t["num_hidden_layers"],
            epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"],
            weight_decay=t["weight_decay"], warmup_epochs=t["warmup_epochs"],
            freeze_bn_after=t["freeze_bn_after"], label_smoothing=t["label_smoothing"],
            seed=cfg.get_path("seed") + 2, device="cuda" if torch.cuda.is_available() else "cpu")
        for epoch, value in enumerate(history.loss, start=1):
            mlflow.log_metric("loss_h", float(value), step=epoch)
        h_base = h
        fitted = "sigma"
        if held is not None and labels is not None and len(held) >= MIN_HELD_OUT:
            from fastfill_udfs.order_fitting import fit_h_extras

            h = fit_h_extras(h, old[held], new[held], labels[held], order_head=t["order_head"],
                             calibration=t["calibration"],
                             distance=cfg.get_path("evaluation.distance"),
                             head_hidden_dim=t["order_head_hidden"],
                             top1_weight=t["order_top1_weight"],
                             margin_weight=t["order_margin_weight"],
                             prototype_new=new, prototype_labels=labels,
                             seed=cfg.get_path("seed") + 3)
            fitted = t["order_head"]
        elif held is not None and labels is not None:
            log.warning("train_transformation: %d held-out pairs are too few to fit the order "
                        "head on (at least %d): the uncertainty policy orders by h's own sigma; "
                        "raise transformation.train_rows", len(held), MIN_HELD_OUT)
        forecast, n_probe = None, 0
        if cfg.get_path("forecast.enabled") and held is not None:
            try:
                forecast, n_probe, h = _forecast(spark, cfg, new_model, h_base, h, pdf, fit,
                                                 held, labels, built)
            except ValueError as exc:   # data the forecast cannot use: random order, said so
                from fastfill_udfs.forecast import random_spec

                log.warning("train_transformation: no forecast (%s): the auto policy will order "
                            "at random", exc)
                mlflow.log_params({"forecast_choice": "random",
                                   "forecast_reason": f"no forecast: {exc}"[:5000]})
                h = copy.deepcopy(h)
                h.auto_order = random_spec(cfg.get_path("seed"))
        elif cfg.get_path("forecast.enabled"):
            from fastfill_udfs.forecast import random_spec

            log.warning("train_transformation: %d pairs are too few to hold any out for the "
                        "forecast: the auto policy will order at random; raise "
                        "transformation.train_rows", len(pdf))
            h = copy.deepcopy(h)
            h.auto_order = random_spec(cfg.get_path("seed"))
        pairs_version = latest_version(spark, built["table"])
        mlflow.log_params({"order_head_fitted": fitted,
                           "n_pairs_held_out": 0 if held is None else len(held),
                           "n_probe": n_probe, "pairs_version": pairs_version})
        if forecast is not None:
            log_forecast(forecast)
            for line in forecast.summary_lines():
                log.info("%s", line)
        uri = model_store.log_model(h, "h")
        version = register_logged_model(uri, target, "h")
    log.info("train_transformation: h trained on %d pairs (%s), registered as %s (%s)",
             built["n_pairs"], class_term, version, target)
    return {"run_id": run.info.run_id, "h_version": version, "n_pairs": built["n_pairs"],
            "class_term": class_term, "pairs_table": built["table"],
            "pairs_version": pairs_version, "n_probe": n_probe,
            "forecast": None if forecast is None else forecast.decision}


def _forecast(spark: SparkSession, cfg: Config, new_model: ModelRef, h_base, h, pdf, fit,
              held, labels, built: dict):
    """Prototypes for the forecast (class means of h's training pairs, or k-means clusters
    without labels), then `spark.forecast.forecast_and_choose`. Returns (forecast, probes, h)."""
    from fastfill_udfs.policies import fit_prototypes
    from fastfill_udfs.spark.forecast import (HeldOut, held_out, cluster_prototypes,
                                              forecast_and_choose)

    distance = cfg.get_path("evaluation.distance")
    new_fit = np.stack(pdf["new_embedding"].to_numpy()[fit]).astype(np.float32)
    h_base = copy.deepcopy(h_base)
    if labels is not None:
        h_base.prototypes = fit_prototypes(new_fit, labels[fit], distance=distance)
    else:
        h_base.prototypes = cluster_prototypes(new_fit, distance, cfg.get_path("seed") + 5)
    if h.prototypes is None:      # no order head fitted: the registered h gets these
        h = copy.deepcopy(h)
        h.prototypes = h_base.prototypes
    items: HeldOut = held_out(pdf.iloc[held].reset_index(drop=True), labels is not None)
    h, forecast, used = forecast_and_choose(spark, cfg, new_model, h_base, h, items,
                                            n_gallery=built["n_gallery"],
                                            n_pairs=len(pdf))
    return forecast, used.n_probe, h
