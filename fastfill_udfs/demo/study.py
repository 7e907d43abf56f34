"""The demo's study: train the old/new CNNs and `h` (FCT and FastFill) on the training split,
then compare backfilling curves in memory on the gallery split. `run_study` is pure
computation; `study_job` adds MLflow logging, model registration and files."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from fastfill_udfs.config import Config
from fastfill_udfs.demo.cnn import EmbeddingCNN, train_embedding_model
from fastfill_udfs.demo.protocol import Split, load_split, old_model_subset
from fastfill_udfs.inference import BatchEmbedder
from fastfill_udfs.metrics import retrieval_metrics
from fastfill_udfs.models import Transformation
from fastfill_udfs.policies import assign_batches, batching_from_config, order_scores, rank_order
from fastfill_udfs.simulate import backfill_curve, curve_auc
from fastfill_udfs.training import History, train_transformation, transform

log = logging.getLogger(__name__)

# study policy name -> (which h, ordering policy)
STUDY_POLICIES = {
    "fct_random": ("fct", "random"),
    "fastfill_random": ("fastfill", "random"),
    "fastfill_uncertainty": ("fastfill", "uncertainty"),
    "fastfill_oracle": ("fastfill", "oracle"),
}


@dataclass
class TrainedModels:
    old: EmbeddingCNN
    new: EmbeddingCNN
    h: dict[str, Transformation]                     # objective -> h
    histories: dict[str, History] = field(default_factory=dict)


def train_all(cfg: Config, train: Split) -> TrainedModels:
    """Train the old CNN (seen classes, optional minority under-sampling), the new CNN (all
    classes) and `h` for each objective needed by `study.policies`."""
    seed = cfg.get_path("seed")
    old_cfg, new_cfg = cfg.get_path("demo.old_model"), cfg.get_path("demo.new_model")
    keep, old_labels = old_model_subset(train, cfg)
    log.info("old model: %d training images, classes %s", len(keep), old_cfg["classes"])
    old, old_hist = train_embedding_model(
        train.images[keep], old_labels, num_classes=len(old_cfg["classes"]),
        channels=old_cfg["channels"], embedding_dim=old_cfg["embedding_dim"],
        epochs=old_cfg["epochs"], batch_size=old_cfg["batch_size"], lr=old_cfg["lr"],
        label_smoothing=old_cfg["label_smoothing"], seed=seed, name="old model")
    num_classes = int(train.labels.max()) + 1
    new, new_hist = train_embedding_model(
        train.images, train.labels, num_classes=num_classes, channels=new_cfg["channels"],
        embedding_dim=new_cfg["embedding_dim"], epochs=new_cfg["epochs"],
        batch_size=new_cfg["batch_size"], lr=new_cfg["lr"],
        label_smoothing=new_cfg["label_smoothing"], seed=seed + 1, name="new model")
    old_emb, new_emb = embed(old, train.images), embed(new, train.images)
    objectives = sorted({STUDY_POLICIES[p][0] for p in cfg.get_path("study.policies")}
                        | {cfg.get_path("transformation.objective")})
    h_rows = h_training_rows(cfg, len(train.labels), keep)
    hs, histories = {}, {"old": old_hist, "new": new_hist}
    for objective in objectives:
        hs[objective], histories[f"h_{objective}"] = fit_h(
            cfg, old_emb[h_rows], new_emb[h_rows], train.labels[h_rows], new, objective)
    return TrainedModels(old, new, hs, histories)


H_TRAIN_DATA = ("all", "old_model")


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
                     topk=(1, 5)) -> pd.DataFrame:
    """old/old, new/new and the t=0 compatibility (new queries vs h(old) gallery) per h."""
    def m(q, g):
        return retrieval_metrics(q, split.labels, g, split.labels, query_ids=split.ids,
                                 gallery_ids=split.ids, topk=topk)
    rows = [{"setting": "old/old", **m(g_old, g_old)}, {"setting": "new/new", **m(q_new, g_new)}]
    for objective, g in sorted(g_transformed.items()):
        rows.append({"setting": f"new/h_{objective}(old) (t=0)", **m(q_new, g)})
    return pd.DataFrame(rows)


def study_curves(cfg: Config, test: Split, new_emb, transformed: dict, sigma: dict,
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Backfilling curves (at batch boundaries of backfill.batch_size) and their AUCs for each
    study policy. Returns (curves long table, summary table)."""
    seed = cfg.get_path("seed")
    batch_ids = assign_batches(len(test.ids), **batching_from_config(cfg.get_path("backfill")))
    curves, summary = [], []
    for name in cfg.get_path("study.policies"):
        objective, policy = STUDY_POLICIES[name]
        scores = order_scores(policy, sigma=sigma.get(objective), transformed=transformed[objective],
                              new=new_emb, ids=test.ids, seed=seed)
        order = rank_order(scores, test.ids)
        curve = backfill_curve(order, transformed[objective], new_emb, new_emb, test.labels,
                               test.labels, batch_ids=batch_ids, query_ids=test.ids,
                               gallery_ids=test.ids, topk=tuple(cfg.get_path("evaluation.topk")))
        curve.insert(0, "policy", name)
        curves.append(curve)
        first10 = order[: max(1, int(round(0.1 * len(order))))]
        summary.append({
            "policy": name,
            "mAP_auc": curve_auc(curve.backfill_fraction, curve.mAP),
            "top1_auc": curve_auc(curve.backfill_fraction, curve.top1),
            "mAP_t0": float(curve.mAP.iloc[0]), "top1_t0": float(curve.top1.iloc[0]),
            "minority_share_first10pct": float(np.mean(
                test.subgroups[first10] == cfg.get_path("data.subgroups.minority_name"))),
        })
        log.info("%s: mAP AUC %.4f, top-1 AUC %.4f", name, summary[-1]["mAP_auc"],
                 summary[-1]["top1_auc"])
    return pd.concat(curves, ignore_index=True), pd.DataFrame(summary)


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
    for objective, h in models.h.items():
        transformed[objective], s = transform(h, old_test)
        if h.has_uncertainty:
            sigma[objective] = s
    refs = reference_points(new_test, old_test, new_test, transformed, test,
                            tuple(cfg.get_path("evaluation.topk")))
    curves, summary = study_curves(cfg, test, new_test, transformed, sigma)
    return StudyResult(models, refs, curves, summary)
