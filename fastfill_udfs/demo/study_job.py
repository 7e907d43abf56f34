"""The study job: `study.run_study` inside an MLflow run (experiment `mlflow.study_experiment`),
plus the files and the printed report.

Trains the old/new CNNs and `h` (FCT and FastFill), logs every loss curve, the reference points
and the backfilling AUCs to MLflow, logs the models (state dict + JSON spec, loadable without
unpickling code) and registers the old model, the new model and the `h` of
`transformation.objective` where `models.old`, `models.new` and `models.h` point
(`models:/<name>@<alias>`: a new version, the alias moved to it), so every Spark job finds them.
Writes `<paths.outputs>/study/{references,summary,curves}.csv`, `study.md`, `curves.png`,
`loss_curves.png`.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pandas as pd

from fastfill_udfs import model_store, reporting
from fastfill_udfs.config import Config
from fastfill_udfs.demo.study import StudyResult, run_study
from fastfill_udfs.model_loading import register_logged_model, registry_target
from fastfill_udfs.progress import format_seconds
from fastfill_udfs.tracking import configure_mlflow

log = logging.getLogger(__name__)

STUDY_DIR = "study"
POLICY_LABELS = {
    "fct_random": "FCT-random",
    "fastfill_random": "FastFill-random",
    "fastfill_uncertainty": "FastFill-uncertainty (paper's sigma)",
    "fastfill_benefit": "FastFill-uncertainty, benefit head",
    "fastfill_prototype": "FastFill-prototype (no classifier)",
    "fastfill_oracle": "FastFill-oracle",
}


def study_params(cfg: Config) -> dict:
    """The MLflow params of a study run: dataset, sizes, model and `h` settings, seed."""
    old, new, t = (cfg.get_path(k) for k in ("demo.old_model", "demo.new_model", "transformation"))
    params = {
        "dataset": cfg.get_path("data.dataset"),
        "seed": cfg.get_path("seed"),
        "train_limit": cfg.get_path("data.train_limit"),
        "test_limit": cfg.get_path("data.test_limit"),
        "old_classes": ",".join(str(c) for c in old["classes"]),
        "old_minority_fraction": old["minority_fraction"],
        "backfill_batch_size": cfg.get_path("backfill.batch_size"),
        "backfill_num_batches": cfg.get_path("backfill.num_batches"),
        "study_policies": ",".join(cfg.get_path("study.policies")),
        "holdout_items": cfg.get_path("demo.holdout_items"),
        "distance": cfg.get_path("evaluation.distance"),
    }
    for name, m in (("old", old), ("new", new)):
        for key in ("embedding_dim", "epochs", "batch_size", "lr", "label_smoothing"):
            params[f"{name}_{key}"] = m[key]
        params[f"{name}_channels"] = ",".join(str(c) for c in m["channels"])
    for key, value in t.items():
        params[f"h_{key}"] = value
    return params


def _metric_name(text: str) -> str:
    """MLflow-safe metric name: 'new/h_fct(old) (t=0)' -> 'new_h_fct_old_t_0'."""
    return re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_]+", "_", text)).strip("_")


def reference_metrics(references: pd.DataFrame) -> dict[str, float]:
    """Flatten the references table to MLflow metrics: old_old_mAP, new_new_top1,
    t0_h_fastfill_mAP, ..."""
    out = {}
    for row in references.to_dict("records"):
        setting = row["setting"]
        m = re.match(r"new/h_(\w+)\(old\) \(t=0\)", setting)
        prefix = f"t0_h_{m.group(1)}" if m else _metric_name(setting)
        for key, value in row.items():
            if key not in ("setting", "n_queries") and isinstance(value, (int, float)):
                out[f"{prefix}_{key}"] = float(value)
    return out


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    out = {}
    for row in summary.to_dict("records"):
        for key, value in row.items():
            if key != "policy" and isinstance(value, (int, float)):
                out[f"{row['policy']}_{key}"] = float(value)
    return out


def uncertainty_gain(summary: pd.DataFrame, metric: str = "mAP_auc") -> float | None:
    """FastFill-uncertainty minus FCT-random on `metric`, in points (x100); None when either
    policy is not part of the study."""
    s = summary.set_index("policy")[metric]
    if "fastfill_uncertainty" not in s or "fct_random" not in s:
        return None
    return 100.0 * float(s["fastfill_uncertainty"] - s["fct_random"])


def _readable_summary(summary: pd.DataFrame) -> pd.DataFrame:
    df = summary.copy()
    df["policy"] = [POLICY_LABELS.get(p, p) for p in df["policy"]]
    return df


def _readable_references(references: pd.DataFrame) -> pd.DataFrame:
    df = references.drop(columns=[c for c in ("n_queries",) if c in references.columns]).copy()
    df["setting"] = [re.sub(r"new/h_(\w+)\(old\) \(t=0\)",
                            lambda m: f"compatibility t=0: new queries vs h_{m.group(1)}(old)", s)
                     for s in df["setting"]]
    return df


def headline(summary: pd.DataFrame) -> str:
    gain_map, gain_top1 = uncertainty_gain(summary), uncertainty_gain(summary, "top1_auc")
    if gain_map is None:
        return "FastFill-uncertainty vs FCT-random: not compared (both policies are needed)"
    return (f"FastFill-uncertainty vs FCT-random: {gain_map:+.2f} mAP AUC points "
            f"({gain_top1:+.2f} top-1 AUC points)")


def study_markdown(cfg: Config, result: StudyResult, seconds: float | None = None) -> str:
    """The study report: headline, reference table and AUC table in markdown."""
    train_limit, test_limit = cfg.get_path("data.train_limit"), cfg.get_path("data.test_limit")
    lines = [
        f"# FastFill study ({cfg.get_path('data.dataset')}, seed {cfg.get_path('seed')})", "",
        f"**{headline(result.summary)}**", "",
        f"Train items: {'all' if train_limit == 0 else train_limit}; "
        f"gallery = queries = test items: {'all' if test_limit == 0 else test_limit} "
        "(leave-one-out); queries always use the new model; distance "
        f"{cfg.get_path('evaluation.distance')}."
        + (f" Run time: {format_seconds(seconds)}." if seconds is not None else ""), "",
        "## Reference points", "",
        reporting.markdown_table(_readable_references(result.references)), "",
        "## Backfilling curves: area under the curve (trapezoid over t in [0, 1]; `_mean`: "
        "the official mean of the points), fraction to get within 0.5 mAP points of new/new, "
        "closure against FCT-random", "",
        reporting.markdown_table(_readable_summary(result.summary)), "",
        "![backfilling curves](curves.png)", "",
    ]
    return "\n".join(lines)


def _log_histories(mlflow, histories: dict) -> None:
    for name, hist in histories.items():
        for epoch, value in enumerate(hist.loss, start=1):
            mlflow.log_metric(f"loss_{name}", float(value), step=epoch)
        for epoch, value in enumerate(getattr(hist, "accuracy", []) or [], start=1):
            mlflow.log_metric(f"train_accuracy_{name}", float(value), step=epoch)


def write_study_files(cfg: Config, result: StudyResult, out_dir: Path,
                      seconds: float | None = None) -> dict[str, Path]:
    """Write the CSVs, the markdown report and the plots into `out_dir`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "references": out_dir / "references.csv", "summary": out_dir / "summary.csv",
        "curves": out_dir / "curves.csv", "markdown": out_dir / "study.md",
        "curves_png": out_dir / "curves.png", "loss_curves_png": out_dir / "loss_curves.png",
    }
    result.references.to_csv(paths["references"], index=False)
    result.summary.to_csv(paths["summary"], index=False)
    result.curves.to_csv(paths["curves"], index=False)
    paths["markdown"].write_text(study_markdown(cfg, result, seconds))
    reporting.plot_curves(
        result.curves, paths["curves_png"], metric="mAP", references=result.references,
        title=f"Backfilling on {cfg.get_path('data.dataset')} (seed {cfg.get_path('seed')}): "
              "new-model queries, gallery mixes new and h(old)")
    reporting.plot_loss_curves(result.models.histories, paths["loss_curves_png"])
    return paths


def run_study_job(cfg: Config) -> dict:
    """Run the study inside an MLflow run named "study"; returns a dict with `run_id`,
    `model_uris` (the logged models), `registered` (role -> models:/name/version), `paths`
    (files written), `summary`, `references` and `gain_mAP_auc_points` (FastFill-uncertainty
    minus FCT-random). Raises ValueError (before any training) unless models.old, models.new
    and models.h are `models:/<name>@<alias>` URIs, where the trained models are registered."""
    import mlflow

    targets = {role: cfg.get_path(f"models.{role}") for role in ("old", "new", "h")}
    for role, uri in targets.items():
        registry_target(uri, role)
    configure_mlflow(cfg, experiment=cfg.get_path("mlflow.study_experiment"))
    out_dir = Path(cfg.resolve_path("paths.outputs")) / STUDY_DIR
    start = time.monotonic()
    with mlflow.start_run(run_name="study", tags={"fastfill.kind": "study"}) as run:
        mlflow.log_params(study_params(cfg))
        result = run_study(cfg)
        seconds = time.monotonic() - start
        _log_histories(mlflow, result.models.histories)
        metrics = {**reference_metrics(result.references), **summary_metrics(result.summary),
                   "study_seconds": seconds}
        gain = uncertainty_gain(result.summary)
        if gain is not None:
            metrics["gain_uncertainty_vs_fct_random_mAP_auc_points"] = gain
            metrics["gain_uncertainty_vs_fct_random_top1_auc_points"] = uncertainty_gain(
                result.summary, "top1_auc")
        mlflow.log_metrics(metrics)

        models = {"old": result.models.old, "new": result.models.new,
                  **{f"h_{key}": h for key, h in sorted(result.models.h.items())}}
        registered_h = result.models.registered_h(cfg)
        role_of = {"old": "old", "new": "new",
                   **{f"h_{k}": "h" for k, h in result.models.h.items() if h is registered_h}}
        uris, registered = {}, {}
        for name, model in models.items():
            uris[name] = model_store.log_model(model, name)
            if name in role_of:
                role = role_of[name]
                registered[role] = register_logged_model(uris[name], targets[role], role)
                log.info("model %s: %s registered as %s (%s)", name, uris[name],
                         registered[role], targets[role])

        if result.models.forecast is not None:
            from fastfill_udfs.tracking import log_forecast

            log_forecast(result.models.forecast)
        paths = write_study_files(cfg, result, out_dir, seconds)
        mlflow.log_artifacts(str(out_dir), artifact_path=STUDY_DIR)

    print()
    print("=" * 100)
    print(headline(result.summary))
    print("=" * 100)
    print("\nReference points (queries: new model; gallery: as named)\n")
    print(reporting.markdown_table(_readable_references(result.references)))
    print("\nBackfilling curves, area under the curve\n")
    print(reporting.markdown_table(_readable_summary(result.summary)))
    print("\nmodels: " + ", ".join(f"{role} {targets[role]} -> {version}"
                                   for role, version in registered.items()))
    print(f"files: {out_dir}  |  MLflow run {run.info.run_id}  |  "
          f"took {format_seconds(time.monotonic() - start)}\n")
    return {"run_id": run.info.run_id, "model_uris": uris, "registered": registered,
            "paths": paths, "summary": result.summary, "references": result.references,
            "curves": result.curves, "gain_mAP_auc_points": gain}
