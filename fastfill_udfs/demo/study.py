"""The demo's study: train the old/new CNNs and `h` (FCT and FastFill) on the training split,
then compare backfilling curves in memory on the gallery split. `run_study` is pure
computation; `study_job` adds MLflow logging, model registration and files."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fastfill_udfs.calibration import item_correction
from fastfill_udfs.config import H_TRAIN_DATA, STUDY_POLICIES, Config
from fastfill_udfs.data import stratified_subset
from fastfill_udfs.demo.cnn import EmbeddingCNN, train_embedding_model
from fastfill_udfs.demo.protocol import Split, load_split, old_model_subset
from fastfill_udfs.inference import BatchEmbedder
from fastfill_udfs.metrics import retrieval_metrics
from fastfill_udfs.models import Transformation
from fastfill_udfs.order_fitting import fit_h_extras
from fastfill_udfs.policies import (assign_batches, auto_scores, batching_from_config,
                                    fit_prototypes, order_scores, rank_order)
from fastfill_udfs.simulate import backfill_curve, curve_auc, curve_mean, fraction_to_reach
from fastfill_udfs.training import History, train_transformation, transform

log = logging.getLogger(__name__)


@dataclass
class TrainedModels:
    old: EmbeddingCNN
    new: EmbeddingCNN
    h: dict[str, Transformation]                     # fct | fastfill | fastfill_benefit -> h
    histories: dict[str, History] = field(default_factory=dict)
    holdout: np.ndarray | None = None                # train-split rows no model trained on
    forecast: object | None = None                   # forecast.Forecast on the hold-out rows

    def registered_h(self, cfg: Config) -> Transformation:
        """The h the Spark jobs use: of `transformation.objective`, with the order head of
        `transformation.order_head` (benefit: the refit head)."""
        if cfg.get_path("transformation.objective") == "fct":
            return self.h["fct"]
        if cfg.get_path("transformation.order_head") == "benefit":
            return self.h["fastfill_benefit"]
        return self.h["fastfill"]


def holdout_rows(cfg: Config, train: Split) -> np.ndarray:
    """Rows of the train split held out from every model (demo.holdout_items, stratified and
    seeded): h's order head and calibration are fitted on them."""
    n = int(cfg.get_path("demo.holdout_items"))
    if n < 0 or n >= len(train.labels):
        raise ValueError(f"demo.holdout_items must be in [0, {len(train.labels)}), got {n}")
    if n == 0:
        return np.zeros(0, np.int64)
    return stratified_subset(train.labels, n, 10_000 + int(cfg.get_path("seed")))


def cnn_cache_key(role: str, images, labels, num_classes: int, m: dict, seed: int) -> str:
    """The study.model_cache key of a demo CNN: its settings, seed and training rows."""
    digest = hashlib.sha1(np.ascontiguousarray(labels).tobytes())
    digest.update(np.ascontiguousarray(images[:: max(1, len(images) // 64)]).tobytes())
    settings = {k: m[k] for k in ("channels", "embedding_dim", "epochs", "batch_size", "lr",
                                  "label_smoothing")}
    return hashlib.sha1(json.dumps({"role": role, "m": settings, "seed": seed, "n": len(labels),
                                    "classes": num_classes, "rows": digest.hexdigest()},
                                   sort_keys=True).encode()).hexdigest()[:20]


def _cached_cnn(cfg: Config, role: str, images, labels, num_classes: int, m: dict, seed: int):
    """Train the demo CNN `role` (or load it from study.model_cache, keyed by its settings, the
    seed and its training rows)."""
    folder = cfg.get_path("study.model_cache")
    key = None
    if folder:
        key = cnn_cache_key(role, images, labels, num_classes, m, seed)
        path = Path(cfg.resolve_path("study.model_cache")) / f"{role}_{key}.pt"
        if path.is_file():
            model = EmbeddingCNN(m["channels"], m["embedding_dim"], num_classes,
                                 in_channels=1 if images.ndim == 3 else images.shape[-1])
            model.load_state_dict(torch.load(path, weights_only=True))
            log.info("%s model: loaded from the study cache %s", role, path)
            return model.eval(), History()
    model, hist = train_embedding_model(
        images, labels, num_classes=num_classes, channels=m["channels"],
        embedding_dim=m["embedding_dim"], epochs=m["epochs"], batch_size=m["batch_size"],
        lr=m["lr"], label_smoothing=m["label_smoothing"], seed=seed, name=f"{role} model")
    if key is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model, hist


def train_all(cfg: Config, train: Split) -> TrainedModels:
    """Train the old CNN (seen classes, optional minority under-sampling), the new CNN (all
    classes) and `h` for each objective needed by `study.policies`, all on the train split
    minus the hold-out rows; then fit the FastFill h's order head, calibration and class
    prototypes on the hold-out rows (:func:`fastfill_udfs.order_fitting.fit_h_extras`)."""
    seed = cfg.get_path("seed")
    old_cfg, new_cfg = cfg.get_path("demo.old_model"), cfg.get_path("demo.new_model")
    held = holdout_rows(cfg, train)
    fit = np.setdiff1d(np.arange(len(train.labels)), held)
    fit_split = Split(train.images[fit], train.labels[fit], train.ids[fit], train.subgroups[fit])
    keep_fit, old_labels = old_model_subset(fit_split, cfg)
    keep = fit[keep_fit]
    log.info("old model: %d training images, classes %s; %d rows held out", len(keep),
             old_cfg["classes"], len(held))
    old, old_hist = _cached_cnn(cfg, "old", train.images[keep], old_labels,
                                len(old_cfg["classes"]), old_cfg, seed)
    num_classes = int(train.labels.max()) + 1
    new, new_hist = _cached_cnn(cfg, "new", train.images[fit], train.labels[fit], num_classes,
                                new_cfg, seed + 1)
    old_emb, new_emb = embed(old, train.images), embed(new, train.images)
    objectives = sorted({STUDY_POLICIES[p][0].split("_")[0] for p in cfg.get_path("study.policies")}
                        | {cfg.get_path("transformation.objective")})
    h_rows = np.intersect1d(h_training_rows(cfg, len(train.labels), keep), fit)
    hs, histories = {}, {"old": old_hist, "new": new_hist}
    for objective in objectives:
        hs[objective], histories[f"h_{objective}"] = fit_h(
            cfg, old_emb[h_rows], new_emb[h_rows], train.labels[h_rows], new, objective)
    if "fastfill" in hs:
        t, distance = cfg.get_path("transformation"), cfg.get_path("evaluation.distance")
        needs_benefit = any(STUDY_POLICIES[p][0] == "fastfill_benefit"
                            for p in cfg.get_path("study.policies")) \
            or t["order_head"] == "benefit"
        if len(held) == 0 and not needs_benefit and t["calibration"] == "none":
            # nothing to fit on held-out pairs: only the prototypes, from h's training rows
            hs["fastfill"].prototypes = fit_prototypes(new_emb[h_rows], train.labels[h_rows],
                                                       distance=distance)
            return TrainedModels(old, new, hs, histories, held)
        if len(held) < 4:
            raise ValueError("the benefit order head and the calibration are fitted on "
                             "held-out rows: set demo.holdout_items (e.g. 10000), or "
                             "transformation.order_head=sigma and calibration=none")
        extras = dict(calibration=t["calibration"], distance=distance,
                      head_hidden_dim=t["order_head_hidden"],
                      top1_weight=t["order_top1_weight"],
                      margin_weight=t["order_margin_weight"], prototype_new=new_emb[h_rows],
                      prototype_labels=train.labels[h_rows], seed=seed + 3)
        hs["fastfill"] = fit_h_extras(hs["fastfill"], old_emb[held], new_emb[held],
                                      train.labels[held], order_head="sigma", **extras)
        if needs_benefit:
            hs["fastfill_benefit"] = fit_h_extras(hs["fastfill"], old_emb[held], new_emb[held],
                                                  train.labels[held], order_head="benefit",
                                                  **extras)
    forecast = None
    if cfg.get_path("forecast.enabled") and len(held) >= 8:
        forecast = forecast_auto_order(cfg, hs, old_emb[held], new_emb[held], train.labels[held])
    return TrainedModels(old, new, hs, histories, held, forecast)


def forecast_auto_order(cfg: Config, hs: dict, old, new, labels):
    """Forecast the backfill on the hold-out rows (at most forecast.max_items of them) with the
    FastFill h (its own sigma head, prototypes of its training rows) and give every FastFill h
    the chosen order (fitted on all hold-out rows) for the ``auto`` policy. Returns the
    forecast."""
    from fastfill_udfs.forecast import (copy_auto_order, fit_auto_order, forecast_orders,
                                        forecast_settings)

    base = hs["fastfill"]
    settings = forecast_settings(cfg)
    seed = cfg.get_path("seed")
    n = int(cfg.get_path("forecast.max_items"))
    pick = np.arange(len(labels))
    if len(pick) > n:
        pick = np.sort(np.random.default_rng(seed + 7).permutation(len(pick))[:n])
    forecast = forecast_orders(base, old[pick], new[pick], labels[pick],
                               sigma_head=base.uncertainty_head, seed=seed + 11, **settings)
    chosen = fit_auto_order(base, base.uncertainty_head, old, new, labels,
                            forecast.decision["key"], seed=seed + 13,
                            **{k: settings[k] for k in ("distance", "margin_weight",
                                                        "top1_weight", "head_hidden_dim")})
    for key in [k for k in hs if k.startswith("fastfill")]:
        hs[key] = copy_auto_order(chosen, hs[key])
    for line in forecast.summary_lines():
        log.info("%s", line)
    return forecast


def h_training_rows(cfg: Config, n_train: int, old_rows: np.ndarray) -> np.ndarray:
    """Rows of the train split that `h` learns from: all of them, or only the old model's
    training images (transformation.train_data: old_model, e.g. a biased old dataset)."""
    choice = cfg.get_path("transformation.train_data")
    if choice not in H_TRAIN_DATA:
        raise ValueError(f"transformation.train_data must be one of {H_TRAIN_DATA}, got {choice!r}")
    return np.arange(n_train) if choice == "all" else np.asarray(old_rows)


def fit_h(cfg: Config, old_emb, new_emb, labels, new: EmbeddingCNN, objective: str):
    t = cfg.get_path("transformation")
    return train_transformation(
        old_emb, new_emb, labels, objective=objective, new_classifier=new.classifier,
        hidden_dim=t["hidden_dim"], num_hidden_layers=t["num_hidden_layers"], epochs=t["epochs"],
        batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"],
        warmup_epochs=t["warmup_epochs"], freeze_bn_after=t["freeze_bn_after"],
        label_smoothing=t["label_smoothing"], seed=cfg.get_path("seed") + 2,
        device="cuda" if torch.cuda.is_available() else "cpu")


def embed(model: torch.nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    return BatchEmbedder(model, batch_size=batch_size)(images)


def reference_points(q_new, g_old, g_new, g_transformed: dict, split: Split,
                     topk=(1, 5), distance: str = "cosine") -> pd.DataFrame:
    """old/old, new/new and the t=0 compatibility (new queries vs h(old) gallery) per h."""
    def m(q, g):
        return retrieval_metrics(q, split.labels, g, split.labels, query_ids=split.ids,
                                 gallery_ids=split.ids, topk=topk, distance=distance)
    rows = [{"setting": "old/old", **m(g_old, g_old)}, {"setting": "new/new", **m(q_new, g_new)}]
    for objective, g in sorted(g_transformed.items()):
        rows.append({"setting": f"new/h_{objective}(old) (t=0)", **m(q_new, g)})
    return pd.DataFrame(rows)


REACH_TOLERANCE = 0.005     # "within 0.5 mAP points of new/new"


def study_curves(cfg: Config, test: Split, new_emb, transformed: dict, sigma: dict,
                 hs: dict | None = None, old_test=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Backfilling curves (at batch boundaries of backfill.batch_size) and their summaries for
    each study policy, by `evaluation.distance`; an h that carries a calibration is scored
    with it while its items are transformed. Returns (curves long table, summary table):
    mAP / top-1 AUC (trapezoid) and mean of points (the official summary), t=0, the fraction
    backfilled when mAP gets within 0.5 points of new/new, closure = (AUC - FCT-random AUC) /
    (new/new - FCT-random AUC), and the lowest top-1 difference to the random orders."""
    seed, distance = cfg.get_path("seed"), cfg.get_path("evaluation.distance")
    topk = tuple(cfg.get_path("evaluation.topk"))
    batch_ids = assign_batches(len(test.ids), **batching_from_config(cfg.get_path("backfill")))
    hs = hs or {}
    newnew = retrieval_metrics(new_emb, test.labels, new_emb, test.labels, query_ids=test.ids,
                               gallery_ids=test.ids, topk=(1,), distance=distance)["mAP"]
    curves, summary = [], []
    for name in cfg.get_path("study.policies"):
        key, policy = STUDY_POLICIES[name]
        h = hs.get(key)
        if policy == "auto":
            scores = auto_scores(h, old_test, test.ids, seed)
        else:
            scores = order_scores(policy, sigma=sigma.get(key), transformed=transformed[key],
                                  new=new_emb, ids=test.ids, seed=seed, distance=distance,
                                  prototypes=getattr(h, "prototypes", None))
        order = rank_order(scores, test.ids)
        correction = {}
        calibration = ((h.auto_order or {}).get("calibration") if policy == "auto"
                       else getattr(h, "calibration", None))
        if calibration:
            scale, bias = item_correction(calibration, np.ones(len(test.ids), bool),
                                          sigma=sigma.get(key))
            correction = {"transformed_scale": scale, "transformed_bias": bias}
        # float32 similarities: about twice as fast on 10k x 10k, and what the Spark
        # evaluation (faiss) computes; AUCs agree with float64 to ~1e-6
        curve = backfill_curve(order, transformed[key], new_emb, new_emb, test.labels,
                               test.labels, batch_ids=batch_ids, query_ids=test.ids,
                               gallery_ids=test.ids, topk=topk, distance=distance,
                               dtype="float32", **correction)
        curve.insert(0, "policy", name)
        curves.append(curve)
        first10 = order[: max(1, int(round(0.1 * len(order))))]
        x = curve.backfill_fraction.to_numpy()
        summary.append({
            "policy": name,
            "mAP_auc": curve_auc(x, curve.mAP), "top1_auc": curve_auc(x, curve.top1),
            "mAP_mean": curve_mean(curve.mAP), "top1_mean": curve_mean(curve.top1),
            "mAP_t0": float(curve.mAP.iloc[0]), "top1_t0": float(curve.top1.iloc[0]),
            "reach_0.5pt": fraction_to_reach(x, curve.mAP.to_numpy(), newnew, REACH_TOLERANCE),
            "minority_share_first10pct": float(np.mean(
                test.subgroups[first10] == cfg.get_path("data.subgroups.minority_name"))),
        })
        log.info("%s: mAP AUC %.4f, top-1 AUC %.4f", name, summary[-1]["mAP_auc"],
                 summary[-1]["top1_auc"])
    curves_df, summary_df = pd.concat(curves, ignore_index=True), pd.DataFrame(summary)
    return curves_df, add_closure(summary_df, curves_df, newnew)


def add_closure(summary: pd.DataFrame, curves: pd.DataFrame, newnew_map: float) -> pd.DataFrame:
    """Closure against FCT-random and the lowest top-1 difference to each random order
    (top1_min_vs_fct_random, top1_min_vs_fastfill_random), where those policies were run."""
    out = summary.copy()
    by = {p: c.sort_values("backfill_fraction") for p, c in curves.groupby("policy")}
    if "fct_random" in by:
        base = float(out.set_index("policy").loc["fct_random", "mAP_auc"])
        out["closure"] = (out["mAP_auc"] - base) / (newnew_map - base)
    for ref_policy in ("fct_random", "fastfill_random"):
        if ref_policy in by:
            ref = by[ref_policy].top1.to_numpy()
            out[f"top1_min_vs_{ref_policy}"] = [
                float((by[p].top1.to_numpy() - ref).min()) for p in out["policy"]]
    out["newnew_mAP"] = newnew_map
    return out


@dataclass
class StudyResult:
    models: TrainedModels
    references: pd.DataFrame
    curves: pd.DataFrame
    summary: pd.DataFrame


def run_study(cfg: Config) -> StudyResult:
    """Train everything on the train split and evaluate all study policies on the test split."""
    unknown = set(cfg.get_path("study.policies")) - set(STUDY_POLICIES)
    if unknown:
        raise ValueError(f"study.policies has unknown entries {sorted(unknown)}; "
                         f"allowed: {sorted(STUDY_POLICIES)}")
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    models = train_all(cfg, train)
    old_test, new_test = embed(models.old, test.images), embed(models.new, test.images)
    transformed, sigma = {}, {}
    for key, h in models.h.items():
        transformed[key], s = transform(h, old_test)
        if h.has_uncertainty:
            sigma[key] = s
    refs = reference_points(new_test, old_test, new_test,
                            {k: v for k, v in transformed.items() if k in ("fct", "fastfill")},
                            test, tuple(cfg.get_path("evaluation.topk")),
                            distance=cfg.get_path("evaluation.distance"))
    curves, summary = study_curves(cfg, test, new_test, transformed, sigma, models.h, old_test)
    return StudyResult(models, refs, curves, summary)
