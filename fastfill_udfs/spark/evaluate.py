"""Evaluation of a backfill run, tracked in MLflow.

For each committed batch, read `gallery_features` at the Delta version recorded in
`backfill_log` (time travel: the whole curve can be rebuilt after the fact), update the faiss
shards with the rows that batch changed (a full build on the first step evaluated), and score the
new-model query features against them over the full ranking (exact mAP, CMC top-k, overall and
per subgroup). Logs `mAP`, `top1`, `top5`, `backfill_fraction` at step = committed batches; when
the run is complete, `mAP_auc`, `top1_auc` and the curve as CSV and PNG."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.faiss_index import ShardedGalleryIndex
from fastfill_udfs.metrics import retrieval_metrics
from fastfill_udfs.simulate import curve_auc
from fastfill_udfs.subgroups import combine_metrics, subgroup_metrics
from fastfill_udfs.spark.delta_io import is_delta_table, read_table, table_paths

log = logging.getLogger(__name__)
CURVE_METRICS = ("mAP", "top1", "top5")


def _to_matrix(pdf: pd.DataFrame, column: str) -> np.ndarray:
    if pdf.empty:
        return np.zeros((0, 0), np.float32)
    return np.stack(pdf[column].to_numpy()).astype(np.float32)


class QuerySet:
    """New-model query features held on the driver (the evaluation set is small by design)."""

    def __init__(self, spark: SparkSession, cfg: Config):
        path = table_paths(cfg).query_features
        pdf = read_table(spark, path).toPandas().sort_values("id", kind="stable")
        if pdf.empty:
            raise ValueError(f"query_features table {path} is empty")
        self.ids = pdf["id"].to_numpy(dtype=object)
        self.labels = pdf["label"].to_numpy()
        self.subgroups = pdf["subgroup"].fillna("").to_numpy(dtype=object)
        self.embeddings = _to_matrix(pdf, "embedding")


class RunEvaluator:
    """Evaluates the steps of one backfill run, keeping faiss shards between steps."""

    def __init__(self, spark: SparkSession, cfg: Config, run: str, queries: QuerySet | None = None):
        self.spark, self.cfg, self.run = spark, cfg, run
        self.paths = table_paths(cfg, run)
        self.queries = queries or QuerySet(spark, cfg)
        gallery = read_table(spark, self.paths.gallery).select("id", "label", "subgroup").toPandas()
        gallery = gallery.sort_values("id", kind="stable").reset_index(drop=True)
        self.key_of = pd.Series(np.arange(len(gallery), dtype=np.int64), index=gallery["id"])
        self.gallery = gallery
        self.index: ShardedGalleryIndex | None = None
        self.indexed_batch: int | None = None
        self.topk = tuple(self.cfg.get_path("evaluation.topk"))
        self.subgroup_names = sorted(set(self.queries.subgroups) - {""})
        self.references = self._new_new_reference()
        self.gap_pair = self._gap_pair()

    def _new_new_reference(self) -> dict:
        """new/new: the new model's embeddings of the gallery the curve ranks (the items in
        gallery_features; quarantined ones are in neither). Known when the queries are the
        gallery's items (the leave-one-out protocol); {} otherwise (the curve's t=1 is it)."""
        q = self.queries
        features = read_table(self.spark, self.paths.gallery_features).select("id").toPandas()
        in_gallery = np.isin(q.ids, features["id"].to_numpy(dtype=object))
        if in_gallery.sum() != len(features):
            return {}
        out = self._scored(q.ids[in_gallery], q.embeddings[in_gallery], q.labels[in_gallery])
        return {f"new_new_{k}": v for k, v in out.items()}

    def _scored(self, gallery_ids, vectors, gallery_labels) -> dict:
        q = self.queries
        kwargs = dict(query_ids=q.ids, gallery_ids=gallery_ids, topk=self.topk,
                      block_size=self.cfg.get_path("evaluation.query_block_size"))
        per_group = subgroup_metrics(q.embeddings, q.labels, q.subgroups, vectors, gallery_labels,
                                     **kwargs)
        if per_group and (q.subgroups != "").all():
            overall = combine_metrics(per_group.values())  # subgroups partition the queries
        else:
            overall = retrieval_metrics(q.embeddings, q.labels, vectors, gallery_labels, **kwargs)
        out = {m: overall[m] for m in CURVE_METRICS if m in overall}
        for name, sub in per_group.items():
            out[f"mAP_{name}"], out[f"top1_{name}"] = sub["mAP"], sub["top1"]
        return out

    def _update_index(self, batch_id: int, version: int) -> None:
        features = read_table(self.spark, self.paths.gallery_features, version=version)
        incremental = self.index is not None and self.indexed_batch == batch_id - 1
        if incremental:
            changed = (features.where((F.col("planned_batch_id") == batch_id)  # its partition
                                      & (F.col("batch_id") == batch_id))
                       .select("id", "embedding"))
            pdf = changed.toPandas()
            self.index.upsert(self.key_of[pdf["id"]].to_numpy(), _to_matrix(pdf, "embedding"))
        else:
            pdf = features.select("id", "embedding").toPandas()
            vectors = _to_matrix(pdf, "embedding")
            self.index = ShardedGalleryIndex(vectors.shape[1], self.cfg.get_path("evaluation.num_shards"))
            self.index.build(self.key_of[pdf["id"]].to_numpy(), vectors)
        self.indexed_batch = batch_id

    def evaluate_step(self, batch_id: int, version: int, n_backfilled: int) -> dict:
        """Metrics of the gallery as of `version` (after batch `batch_id`)."""
        self._update_index(batch_id, version)
        keys, vectors = self.index.reconstruct_all()
        ids = self.gallery["id"].to_numpy(dtype=object)[keys]
        out = self._scored(ids, vectors, self.gallery["label"].to_numpy()[keys])
        out["backfill_fraction"] = n_backfilled / max(1, len(keys))
        pair = self.gap_pair
        for metric in ("top1", "mAP"):
            if pair:
                out[f"{metric}_gap"] = out[f"{metric}_{pair[0]}"] - out[f"{metric}_{pair[1]}"]
            for name in self.subgroup_names if self.references else ():  # vs own new/new
                out[f"{metric}_shortfall_{name}"] = (self.references[f"new_new_{metric}_{name}"]
                                                     - out[f"{metric}_{name}"])
        return out

    def _gap_pair(self) -> tuple[str, str] | None:
        """(majority, minority) as named in data.subgroups when both occur, else the two
        subgroups in name order; None unless there are exactly two."""
        if len(self.subgroup_names) != 2:
            return None
        sub = self.cfg.get_path("data.subgroups")
        named = (sub["majority_name"], sub["minority_name"])
        return named if set(named) == set(self.subgroup_names) else tuple(self.subgroup_names)


def run_log(spark: SparkSession, cfg: Config, run: str) -> pd.DataFrame:
    """backfill_log rows sorted by batch, with the cumulative items backfilled."""
    pdf = read_table(spark, table_paths(cfg, run).backfill_log).toPandas()
    pdf = pdf.sort_values("batch_id").reset_index(drop=True)
    pdf["n_backfilled"] = pdf["n_items"].cumsum()  # batch 0: items already new (h's pairs)
    return pdf


def ranking_id(spark: SparkSession, cfg: Config, run: str) -> str:
    """Identifies one ranking of `run`: when its batch 0 was started (microseconds since the
    epoch, whatever the session's time zone). A
    re-ranked run (rank --force, or tables rebuilt from scratch) gets a new one, and with it a
    new MLflow run. Raises ValueError when `run` has not been ranked."""
    path = table_paths(cfg, run).backfill_log
    row = (read_table(spark, path).where("batch_id = 0")
           .select(F.unix_micros("started_at").alias("started_at")).first()
           if is_delta_table(spark, path) else None)
    if row is None:
        raise ValueError(f"run {run!r} is not ranked (no batch 0 in {path}): run "
                         f"pipelines/rank_gallery.py first")
    return str(row["started_at"])


def run_curve_auc(fractions, values) -> float:
    """Trapezoid area over t in [0, 1] of a run's curve, held flat before its first point and
    after its last: a run whose batch 0 already holds new embeddings (h's training pairs)
    starts above t=0, and one with images quarantined at backfill ends below t=1 (those items
    stay transformed). With points at 0 and 1 it is `simulate.curve_auc` itself."""
    t = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if len(t) and t[0] > 0:
        t, v = np.r_[0.0, t], np.r_[v[0], v]
    if len(t) and t[-1] < 1:
        t, v = np.r_[t, 1.0], np.r_[v, v[-1]]
    return curve_auc(t, v)


def curve_from_history(client, mlflow_run_id: str) -> pd.DataFrame:
    """The curve as logged: one row per step with backfill_fraction and metrics."""
    frames = []
    for key in ("backfill_fraction",) + CURVE_METRICS:
        hist = client.get_metric_history(mlflow_run_id, key)
        frames.append(pd.Series({m.step: m.value for m in hist}, name=key))
    curve = pd.concat(frames, axis=1).sort_index()
    curve.index.name = "step"
    return curve.reset_index()


class BackfillTracker:
    """MLflow side of one backfill run: parameters, per-step metrics, final AUCs and curve."""

    def __init__(self, spark: SparkSession, cfg: Config, run: str, policy: str):
        from fastfill_udfs.spark.rank import plan_metadata
        from fastfill_udfs.tracking import backfill_mlflow_run

        self.spark, self.cfg, self.run = spark, cfg, run
        meta = plan_metadata(spark, cfg, run) or {}
        self.policy = policy = meta.get("policy", policy)
        self.evaluator = RunEvaluator(spark, cfg, run)
        paths = self.evaluator.paths
        params = {  # what the plan was made from (batch 0's record), not today's config
            "policy": policy, "run": run, "dataset": meta.get("dataset"),
            "model_new": (meta.get("new_model") or {}).get("version"),
            "model_new_uri": (meta.get("new_model") or {}).get("uri"),
            "model_h": (meta.get("h") or {}).get("version"),
            "model_h_uri": (meta.get("h") or {}).get("uri"),
            "new_dim": meta.get("new_dim"),
            **{f"backfill_{k}": v for k, v in (meta.get("batching") or {}).items()},
            "n_gallery": meta.get("gallery_features"), "n_quarantined_at_rank":
                meta.get("quarantine"), "n_train_pairs": meta.get("pairs"),
            "n_queries": len(self.evaluator.queries.ids),
            "gallery_table": paths.gallery, "query_features_table": paths.query_features,
            "features_table": paths.gallery_features, "log_table": paths.backfill_log,
            "plan_table": paths.backfill_plan,
        }
        self.run_id = backfill_mlflow_run(cfg, run, policy, params,
                                          ranking=ranking_id(spark, cfg, run))
        self._log_minority_share()

    def _log_minority_share(self, fraction: float = 0.1) -> None:
        """Log the minority subgroup's share of the first `fraction` of the backfill order."""
        from fastfill_udfs.tracking import log_step_metrics, logged_steps

        minority = self.cfg.get_path("data.subgroups.minority_name")
        key = f"{minority}_share_first_10pct"
        if minority not in self.evaluator.subgroup_names or logged_steps(self.run_id, key):
            return
        paths = self.evaluator.paths
        plan = read_table(self.spark, paths.backfill_plan)
        n = plan.count()
        head = plan.where(F.col("rank") < max(1, round(fraction * n))).join(
            read_table(self.spark, paths.gallery).select("id", "subgroup"), "id")
        row = head.agg(F.avg((F.col("subgroup") == minority).cast("double")).alias("share")).first()
        log_step_metrics(self.run_id, {key: row["share"]}, step=0)

    def catch_up(self) -> int:
        """Evaluate and log every committed batch not yet logged; returns how many."""
        from fastfill_udfs.tracking import log_step_metrics, logged_steps

        done = logged_steps(self.run_id)
        steps = run_log(self.spark, self.cfg, self.run)
        todo = steps[~steps["batch_id"].isin(done)]
        for row in todo.itertuples():
            metrics = self.evaluator.evaluate_step(int(row.batch_id), int(row.table_version),
                                                   int(row.n_backfilled))
            if row.batch_id == 0:
                metrics.update(self.evaluator.references)
            log_step_metrics(self.run_id, metrics, step=int(row.batch_id))
            log.info("evaluate %s step %d (t=%.3f): mAP %.4f top1 %.4f", self.run, row.batch_id,
                     metrics["backfill_fraction"], metrics["mAP"], metrics["top1"])
        return len(todo)

    def on_committed(self, batch_id: int, version: int) -> None:
        self.catch_up()

    def finalize(self) -> dict | None:
        """When every planned batch is committed and logged: log mAP_auc / top1_auc and the
        curve (CSV + PNG). Returns the AUCs, or None while the run is incomplete."""
        from mlflow.tracking import MlflowClient

        from fastfill_udfs.reporting import plot_curves
        from fastfill_udfs.spark.backfill import planned_batches
        from fastfill_udfs.tracking import log_step_metrics

        client = MlflowClient()
        logged = client.get_run(self.run_id).data.metrics
        if "mAP_auc" in logged and "top1_auc" in logged:  # already final: rerun changes nothing
            return {"mAP_auc": logged["mAP_auc"], "top1_auc": logged["top1_auc"]}
        curve = curve_from_history(client, self.run_id)
        n_planned = len(planned_batches(self.spark, self.cfg, self.run))
        if len(curve) < n_planned + 1 or curve["backfill_fraction"].isna().any():
            log.info("evaluate %s: %d of %d steps logged; AUCs once the run completes",
                     self.run, len(curve), n_planned + 1)
            return None
        aucs = {f"{m}_auc": run_curve_auc(curve["backfill_fraction"], curve[m])
                for m in ("mAP", "top1")}
        log_step_metrics(self.run_id, aucs, step=n_planned)
        with tempfile.TemporaryDirectory() as tmp:
            csv, png = Path(tmp) / "curve.csv", Path(tmp) / "curve.png"
            curve.to_csv(csv, index=False)
            refs = self.evaluator.references
            plot_curves(curve.assign(policy=self.policy), png,
                        references={"new/new": {m: refs[f"new_new_{m}"] for m in ("mAP", "top1")}}
                        if refs else None,
                        title=f"{self.run}: retrieval vs backfill fraction")
            client.log_artifact(self.run_id, str(csv))
            client.log_artifact(self.run_id, str(png))
        log.info("evaluate %s: mAP AUC %.4f, top-1 AUC %.4f", self.run, aucs["mAP_auc"],
                 aucs["top1_auc"])
        return aucs
