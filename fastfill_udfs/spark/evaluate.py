"""Evaluation of a backfill run, tracked in MLflow.

For each committed batch, bring the faiss shards to the Delta version of `gallery_features` that
`backfill_log` recorded (time travel: the whole curve can be rebuilt after the fact): the first
step evaluated builds them from the table at that version; each next batch upserts only the
rows it made `new`, read from the files its MERGE commit added (`read_batch_rows`). Then the
new-model queries are evaluated through the shards (`index_eval.evaluate_index`): each query
block is searched on every shard and merged by score (CMC top-k, and recall@k of an approximate
index), and mAP over the full ranking is exact (overall and per subgroup). Logs `mAP`, `top1`,
`top5`, `backfill_fraction` (and `recall_at_<k>` for an ivf / hnsw index) at step = committed
batches; when the run is complete, `mAP_auc`, `top1_auc` and the curve as CSV and PNG. With
`evaluation.export_index`, each evaluated step also writes the servable index of the run."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import Config
from fastfill_udfs.faiss_index import IndexSpec, ShardedGalleryIndex, space_for
from fastfill_udfs.index_eval import evaluate_index
from fastfill_udfs.simulate import curve_auc
from fastfill_udfs.spark.arrow_utils import arrow_rows
from fastfill_udfs.spark.delta_io import (ranking_id, read_features, read_table, read_text_file,
                                          table_paths)
from fastfill_udfs.spark.sync import synced_history
from fastfill_udfs.spark.validation import ReconciliationError

log = logging.getLogger(__name__)
CURVE_METRICS = ("mAP", "top1", "top5")


# ----------------------------------------------------------------------------- reading
def _commit_actions(spark: SparkSession, path: str, version: int) -> list[dict] | None:
    """The actions of commit `version` of the Delta table at `path` (its `_delta_log` JSON
    file, read through Hadoop's FileSystem so any store Spark reads works), or None when the
    file is not there (e.g. a table whose commits are managed elsewhere)."""
    text = read_text_file(spark, f"{path.rstrip('/')}/_delta_log/{version:020d}.json")
    if text is None:
        return None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _batch_files(spark: SparkSession, path: str, version: int, batch_id: int) -> list[str] | None:
    """Data files the MERGE of `batch_id` added (commit `version`) to its `planned_batch_id`
    partition, or None when the commit is not exactly that (another operation, another batch's
    tag, deletion vectors, a schema change), so the caller reads through Delta instead."""
    from fastfill_udfs.spark.backfill import BATCH_TAG

    actions = _commit_actions(spark, path, version)
    if actions is None:
        return None
    info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
    try:
        tag = json.loads(info.get("userMetadata") or "{}")
    except ValueError:
        return None
    if not isinstance(tag, dict) or tag.get(BATCH_TAG) != batch_id \
            or any("metaData" in a or "protocol" in a for a in actions):
        return None
    files = []
    for action in actions:
        add = action.get("add")
        if not add or add.get("partitionValues", {}).get("planned_batch_id") != str(batch_id):
            continue
        if add.get("deletionVector"):
            return None
        rel = unquote(add["path"])
        files.append(rel if "://" in rel or rel.startswith("/") else f"{path.rstrip('/')}/{rel}")
    return files


def read_batch_rows(spark: SparkSession, path: str, version: int, batch_id: int):
    """The rows batch `batch_id` made `new` in gallery_features, as of `version` (the version its
    MERGE committed): (id / model_version as pandas, embeddings).

    Fast path: the parquet files the batch's MERGE commit added to its partition, read by Spark
    without rebuilding the Delta snapshot at that version (the fixed cost of a time-travel read).
    Whenever that commit is not plainly the batch's MERGE, the rows are read through Delta time
    travel (`planned_batch_id = k AND batch_id = k`). Either way the caller reconciles the count
    with backfill_log."""
    files = _batch_files(spark, path, version, batch_id)
    what = f"gallery_features {path}, batch {batch_id} at version {version}"
    if files is not None:
        df = (spark.read.schema("id string, embedding array<float>, batch_id int, "
                                "model_version string")
              .parquet(*files) if files else None)
        if df is None:
            return pd.DataFrame({"id": [], "model_version": []}), np.zeros((0, 0), np.float32)
        return arrow_rows(df.where(F.col("batch_id") == batch_id)
                          .select("id", "embedding", "model_version"), what)
    log.info("evaluate: batch %d's rows read through Delta time travel (its commit %d is not a "
             "plain tagged MERGE)", batch_id, version)
    df = (read_table(spark, path, version=version)
          .where((F.col("planned_batch_id") == batch_id) & (F.col("batch_id") == batch_id))
          .select("id", "embedding", "model_version"))
    return arrow_rows(df, what)


# ----------------------------------------------------------------------------- evaluation
class QuerySet:
    """New-model query features held on the driver (the evaluation set is small by design)."""

    def __init__(self, spark: SparkSession, cfg: Config):
        path = table_paths(cfg).query_features
        others, emb = arrow_rows(read_table(spark, path).select("id", "label", "subgroup",
                                                                  "embedding"),
                                 f"query_features table {path}")
        if others.empty:
            raise ValueError(f"query_features table {path} is empty")
        order = np.argsort(others["id"].to_numpy(dtype=str), kind="stable")
        pdf = others.iloc[order].reset_index(drop=True)
        self.ids = pdf["id"].to_numpy(dtype=object)
        self.labels = pdf["label"].to_numpy()
        self.subgroups = pdf["subgroup"].fillna("").to_numpy(dtype=object)
        self.embeddings = emb[order]


def _threads(cfg: Config) -> int:
    threads = cfg.get_path("evaluation.threads")
    if threads < 0:
        raise ValueError(f"evaluation.threads must be >= 0 (0 = all CPUs), got {threads}")
    return threads or max(1, min(os.cpu_count() or 1, 8))


class RunEvaluator:
    """Evaluates the steps of one backfill run through faiss shards kept between steps."""

    def __init__(self, spark: SparkSession, cfg: Config, run: str, queries: QuerySet | None = None):
        self.spark, self.cfg, self.run = spark, cfg, run
        self.paths = table_paths(cfg, run)
        self.queries = queries or QuerySet(spark, cfg)
        self.history, self.catalog_version = synced_history(spark, cfg, run)
        gallery = (read_table(spark, self.paths.gallery, version=self.catalog_version)
                   .select("id", "label", "subgroup").toPandas())
        gallery = gallery.sort_values("id", kind="stable").reset_index(drop=True)
        self.key_of = pd.Series(np.arange(len(gallery), dtype=np.int64), index=gallery["id"])
        self.gallery = gallery
        n = len(gallery)
        # what each key's vector is at the indexed version (None: not in gallery_features)
        self.source = np.full(n, None, dtype=object)
        self.model_version = np.full(n, None, dtype=object)
        self.batch_of = np.full(n, -1, dtype=np.int64)
        self.spec = IndexSpec.from_config(cfg)
        from fastfill_udfs.spark.rank import plan_metadata

        # the plan's mixed-gallery calibration (an `auto` order that includes one) scores
        # the shards, the evaluation and the servable index alike
        self.space = space_for(cfg.get_path("evaluation.distance"),
                               (plan_metadata(spark, cfg, run) or {}).get("calibration"))
        self.index: ShardedGalleryIndex | None = None
        self.indexed_batch: int | None = None
        self.indexed_version: int | None = None
        self.topk = tuple(self.cfg.get_path("evaluation.topk"))
        self.recall_at = tuple(self.cfg.get_path("evaluation.recall_at"))
        self.threads = _threads(cfg)
        self.query_keys = self.key_of.reindex(self.queries.ids).fillna(-1).to_numpy(np.int64)
        self.subgroup_names = sorted(set(self.queries.subgroups) - {""})
        self.last_timing: dict = {}
        self.references = self._new_new_reference()
        self.gap_pair = self._gap_pair()

    def _evaluate(self, index: ShardedGalleryIndex, sources=None):
        q = self.queries
        keys = np.arange(len(self.gallery), dtype=np.int64)
        return evaluate_index(
            index, q.embeddings, q.labels, (keys, self.gallery["label"].to_numpy()),
            query_keys=self.query_keys, topk=self.topk, recall_at=self.recall_at,
            gallery_key_sources=(keys, sources) if sources is not None else None,
            block_size=self.cfg.get_path("evaluation.query_block_size"), threads=self.threads,
            tolerance=self.cfg.get_path("evaluation.ap_tolerance"))

    def _summaries(self, result) -> dict:
        """Curve metrics overall and per subgroup (mAP_<g>, top1_<g>) from one evaluation."""
        out = {m: v for m, v in result.metrics().items() if m in CURVE_METRICS}
        for name in self.subgroup_names:
            sub = result.metrics(self.queries.subgroups == name)
            out[f"mAP_{name}"], out[f"top1_{name}"] = sub["mAP"], sub["top1"]
        return out

    def _new_new_reference(self) -> dict:
        """new/new: the new model's embeddings of the gallery the curve ranks (the items in
        gallery_features; quarantined ones are in neither). Known when the queries are the
        gallery's items (the leave-one-out protocol); {} otherwise (the curve's t=1 is it)."""
        q = self.queries
        features = read_table(self.spark, self.paths.gallery_features).select("id").toPandas()
        in_gallery = np.isin(q.ids, features["id"].to_numpy(dtype=object))
        if in_gallery.sum() != len(features):
            return {}
        index = ShardedGalleryIndex(q.embeddings.shape[1], spec=IndexSpec(
            num_shards=self.spec.num_shards), space=self.space)
        index.build(self.query_keys[in_gallery], q.embeddings[in_gallery])
        return {f"new_new_{k}": v for k, v in self._summaries(self._evaluate(index)).items()}

    def _follow_gallery(self, version: int) -> None:
        """Bring the item catalog to the gallery version the run reflects at features
        `version`: items a sync added get keys, labels follow the gallery; the keys of items
        deleted since stay (unindexed), so earlier steps still resolve."""
        if self.history is None:
            return
        g = self.history.gallery_version(version)
        if g == self.catalog_version:
            return
        now = (read_table(self.spark, self.paths.gallery, version=g)
               .select("id", "label", "subgroup").toPandas())
        now["label"] = now["label"].astype(object)
        known = now["id"].isin(self.key_of.index).to_numpy()
        added = now[~known].sort_values("id", kind="stable").reset_index(drop=True)
        if len(added):
            start = len(self.gallery)
            self.gallery = pd.concat([self.gallery.astype({"label": object}), added],
                                     ignore_index=True)
            self.key_of = pd.concat([self.key_of, pd.Series(
                np.arange(start, start + len(added), dtype=np.int64), index=added["id"])])
            grow = len(added)
            self.source = np.r_[self.source, np.full(grow, None, dtype=object)]
            self.model_version = np.r_[self.model_version, np.full(grow, None, dtype=object)]
            self.batch_of = np.r_[self.batch_of, np.full(grow, -1, dtype=np.int64)]
        kept = now[known]
        rows = self.key_of.reindex(kept["id"].to_numpy(dtype=object)).to_numpy(dtype=np.int64)
        self.gallery = self.gallery.astype({"label": object})
        self.gallery.loc[rows, "label"] = kept["label"].to_numpy(dtype=object)
        self.gallery.loc[rows, "subgroup"] = kept["subgroup"].to_numpy(dtype=object)
        self.query_keys = self.key_of.reindex(self.queries.ids).fillna(-1).to_numpy(np.int64)
        self.catalog_version = g

    def _update_index(self, batch_id: int, version: int) -> None:
        path = self.paths.gallery_features
        self._follow_gallery(version)
        incremental = (self.index is not None and self.indexed_batch == batch_id - 1
                       and self.indexed_version is not None and version > self.indexed_version
                       and not (self.history is not None   # a sync moved rows: rebuild
                                and self.history.any_between(self.indexed_version, version)))
        if incremental:
            rows, vectors = read_batch_rows(self.spark, path, version, batch_id)
            keys = self._keys(rows["id"], f"batch {batch_id} of {path}")
            if len(keys):
                self.index.upsert(keys, vectors, sources=np.full(len(keys), "new", object))
            self.source[keys], self.batch_of[keys] = "new", batch_id
            self.model_version[keys] = rows["model_version"].to_numpy(dtype=object)
        else:
            rows, vectors = read_features(self.spark, path, version)
            keys = self._keys(rows["id"], f"{path} at version {version}")
            self.source[:], self.model_version[:], self.batch_of[:] = None, None, -1
            self.source[keys] = rows["source"].to_numpy(dtype=object)
            self.model_version[keys] = rows["model_version"].to_numpy(dtype=object)
            self.batch_of[keys] = rows["batch_id"].fillna(-1).to_numpy(dtype=np.int64)
            self.index = ShardedGalleryIndex(vectors.shape[1], spec=self.spec, space=self.space)
            self.index.build(keys, vectors, sources=self.source[keys])
        self.indexed_batch, self.indexed_version = batch_id, version

    def _keys(self, ids: pd.Series, what: str) -> np.ndarray:
        keys = self.key_of.reindex(ids.to_numpy(dtype=object))
        missing = keys.isna().to_numpy()
        if missing.any():
            raise ValueError(f"{what} holds ids that are not in the gallery table "
                             f"{self.paths.gallery}, e.g. {ids[missing].head(5).tolist()}")
        return keys.to_numpy(dtype=np.int64)

    def evaluate_step(self, batch_id: int, version: int, n_backfilled: int) -> dict:
        """Metrics of the gallery as of `version` (after batch `batch_id`).

        Raises ReconciliationError when the items `new` in the index are not the
        `n_backfilled` the log says (training pairs + items merged by batches 1..batch_id)."""
        t0 = time.perf_counter()
        self._update_index(batch_id, version)
        t1 = time.perf_counter()
        n_new = int((self.source == "new").sum())
        synced = self.history.new_delta(version) if self.history is not None else 0
        if n_new != n_backfilled + synced:
            raise ReconciliationError(
                f"run '{self.run}' batch {batch_id}: gallery_features at version {version} holds "
                f"{n_new} new items, backfill_log says {n_backfilled}"
                + (f" and the syncs up to it {synced:+d}" if synced else ""))
        c1 = time.process_time()
        result = self._evaluate(self.index, self.source)
        t2, c2 = time.perf_counter(), time.process_time()
        out = self._summaries(result)
        out.update(result.recall_metrics())
        out["backfill_fraction"] = n_new / max(1, self.index.ntotal)
        if self.history is not None and self.history.any_between(-1, version):  # a moving gallery
            out["n_gallery"] = self.index.ntotal
            out.update({f"synced_{k}": v for k, v in self.history.synced_counts(version).items()})
        pair = self.gap_pair
        for metric in ("top1", "mAP"):
            if pair:
                out[f"{metric}_gap"] = out[f"{metric}_{pair[0]}"] - out[f"{metric}_{pair[1]}"]
            for name in self.subgroup_names if self.references else ():  # vs own new/new
                out[f"{metric}_shortfall_{name}"] = (self.references[f"new_new_{metric}_{name}"]
                                                     - out[f"{metric}_{name}"])
        self.last_timing = {"index_update_s": t1 - t0, "scoring_s": t2 - t1,
                            "scoring_cpu_s": c2 - c1,
                            "rows_float64": result.rows_scored_float64,
                            "map_error_bound": float(result.ap_error_bound[
                                result.n_relevant > 0].mean()) if (result.n_relevant > 0).any()
                            else 0.0}
        return out

    def servable(self, info: dict | None = None):
        """The run's servable index at the indexed step: these shards with the item catalog
        (id, label, source, model version, batch) and what they reflect."""
        from fastfill_udfs.search import ServableIndex, nullable_labels

        if self.index is None:
            raise ValueError(f"run '{self.run}': no step evaluated yet, nothing to serve")
        keys = self.index.keys()
        items = pd.DataFrame({
            "id": self.gallery["id"].to_numpy(dtype=object)[keys],
            "label": nullable_labels(self.gallery["label"].to_numpy(dtype=object)[keys]),
            "source": self.source[keys], "model_version": self.model_version[keys],
            "batch_id": pd.array(np.where(self.batch_of[keys] >= 0, self.batch_of[keys], None),
                                 dtype="Int64")}, index=pd.Index(keys, name="key"))
        base = {"run": self.run, "batch_id": int(self.indexed_batch),
                "features_version": int(self.indexed_version),
                "features_table": self.paths.gallery_features, **(info or {})}
        served = ServableIndex(self.index, items, base)
        served.info.update(n_items=len(items), n_new=int((items["source"] == "new").sum()),
                           n_transformed=int((items["source"] == "transformed").sum()))
        return served

    def agreement_curve(self, steps: pd.DataFrame, k: int, max_queries: int, seed: int = 0
                        ) -> pd.Series:
        """The label-free curve: per committed step (batch_id of `steps`, backfill_log rows),
        the mean share of a query's top-`k` in the gallery as of that step that is also in its
        top-`k` in the final gallery (the run's last committed version: every item the run
        made `new`). At most `max_queries` queries (seeded subset). On a gallery moved by syncs,
        items deleted since the ranking are left out and items added count as they are at the
        end. Returns a Series indexed by batch_id."""
        from fastfill_udfs.faiss_index import top_k_keys

        path = self.paths.gallery_features
        steps = steps.sort_values("batch_id")
        first = int(steps["table_version"].iloc[0])
        last = int(steps["table_version"].iloc[-1])
        rows0, vec0 = read_features(self.spark, path, first, columns=("id", "embedding"))
        rows1, vec1 = read_features(self.spark, path, last,
                                    columns=("id", "embedding", "batch_id"))
        keys0 = self._keys(rows0["id"], f"{path} at version {first}")
        keys1 = self._keys(rows1["id"], f"{path} at version {last}")
        pos = pd.Series(np.arange(len(keys1)), index=keys1)
        # a moving gallery (syncs): items deleted since the ranking are left out, items added
        # since count with their final vector from the start
        start = vec1.copy()
        at = pos.reindex(keys0).to_numpy()
        kept = ~np.isnan(at)
        start[at[kept].astype(np.int64)] = vec0[kept]
        new_at = rows1["batch_id"].fillna(np.iinfo(np.int32).max).to_numpy(np.int64)
        q = self.queries
        pick = np.arange(len(q.ids))
        if len(pick) > max_queries:
            pick = np.sort(np.random.default_rng(seed).permutation(len(pick))[:max_queries])
        own = pos.reindex(self.query_keys[pick]).fillna(-1).to_numpy(np.int64)
        k = int(min(k, len(keys1) - 2))
        ref = top_k_keys(self.space, vec1, q.embeddings[pick], k, own)
        out = {}
        for batch in steps["batch_id"].astype(int):
            gallery = np.where((new_at <= batch)[:, None], vec1, start)
            got = top_k_keys(self.space, gallery, q.embeddings[pick], k, own)
            out[batch] = float((got[:, :, None] == ref[:, None, :]).any(axis=2).sum(axis=1)
                               .mean() / k)
        return pd.Series(out, name=f"agreement_at_{k}")

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


def run_curve_auc(fractions, values) -> float:
    """Trapezoid area over t in [0, 1] of a run's curve, held flat before its first point and
    after its last: a run whose batch 0 already holds new embeddings (h's training pairs)
    starts above t=0, and one with images quarantined at backfill ends below t=1 (those items
    stay transformed). With points at 0 and 1 it is `simulate.curve_auc` itself."""
    # a sync that adds transformed items or deletes new ones moves t back: that stretch adds
    # no area until the backfill is past its earlier t again (docs/moving_gallery.md)
    t = np.maximum.accumulate(np.asarray(fractions, dtype=np.float64))
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
            "eval_index": self.evaluator.spec.describe(),
            "eval_distance": self.evaluator.space.distance,
        }
        self.meta = meta
        self.ranking = ranking_id(spark, cfg, run)
        self.run_id = backfill_mlflow_run(cfg, run, policy, params, ranking=self.ranking)
        self._log_minority_share()
        self._start_metric: float | None = None
        self.forecast, self.forecast_key = None, None
        self._log_forecast()

    def _log_forecast(self) -> None:
        """Log what the forecast said of this run's order, before its first batch: its gain
        share at every planned step (`forecast_gain_share`, beside the realised `gain_share`
        on one MLflow chart), the recommended stop and the decision."""
        from mlflow.tracking import MlflowClient

        from fastfill_udfs.forecast import forecast_fractions
        from fastfill_udfs.spark.backfill import planned_batches
        from fastfill_udfs.spark.forecast import planned_fractions, run_forecast, stop_batch
        from fastfill_udfs.tracking import log_step_metrics, logged_steps

        found = run_forecast(self.meta, self.policy)
        if found is None:
            return
        self.forecast, self.forecast_key = found
        fractions = planned_fractions(self.meta, planned_batches(self.spark, self.cfg, self.run))
        if logged_steps(self.run_id, "forecast_gain_share"):
            return
        steps = sorted(fractions)
        at = forecast_fractions(self.forecast, [fractions[b] for b in steps],
                                key=self.forecast_key)
        for i, batch in enumerate(steps):
            log_step_metrics(self.run_id, {"forecast_gain_share": float(at["gain_share"][i])},
                             step=batch)
        batch, stop = stop_batch(self.forecast, self.forecast_key, fractions)
        client = MlflowClient()
        logged = client.get_run(self.run_id).data.params
        params = {"forecast_order": self.forecast_key, "forecast_metric": self.forecast.metric,
                  "forecast_stop_fraction": f"{stop:.4f}", "forecast_stop_batch": batch,
                  "forecast_decision": self.forecast.decision["reason"][:5000]}
        for key, value in params.items():
            if key not in logged:
                client.log_param(self.run_id, key, value)
        log.info("evaluate %s: forecast (%s) logged for %d steps; recommended stop at batch %d "
                 "(t=%.2f)", self.run, self.forecast_key, len(steps), batch, stop)

    def _gain_share(self, metrics: dict, batch_id: int) -> dict:
        """The realised share of the t0 -> new/new gain (mAP), when new/new is known."""
        refs = self.evaluator.references
        if self.forecast is None or "new_new_mAP" not in refs or not np.isfinite(
                metrics.get("mAP", np.nan)):
            return {}
        if batch_id == 0:
            self._start_metric = metrics["mAP"]
        if self._start_metric is None:
            from mlflow.tracking import MlflowClient

            hist = {m.step: m.value for m in MlflowClient().get_metric_history(self.run_id,
                                                                               "mAP")}
            self._start_metric = hist.get(0)
        gap = refs["new_new_mAP"] - (self._start_metric or 0.0)
        if self._start_metric is None or gap == 0:
            return {}
        return {"gain_share": (metrics["mAP"] - self._start_metric) / gap}

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
            metrics.update(self._gain_share(metrics, int(row.batch_id)))
            log_step_metrics(self.run_id, metrics, step=int(row.batch_id))
            timing = self.evaluator.last_timing
            recall = "".join(f" {k} {v:.4f}" for k, v in metrics.items()
                             if k.startswith("recall_at_") and k.count("_") == 2)
            log.info("evaluate %s step %d (t=%.3f): mAP %.4f top1 %.4f%s (index update %.2f s, "
                     "scoring %.2f s; mAP within %.1e of float64)", self.run, row.batch_id,
                     metrics["backfill_fraction"], metrics["mAP"], metrics["top1"], recall,
                     timing["index_update_s"], timing["scoring_s"], timing["map_error_bound"])
            self._export(int(row.batch_id))
        return len(todo)

    def _export(self, batch_id: int) -> None:
        """Write the servable index of this step where evaluation.export_index says."""
        target = self.cfg.get_path("evaluation.export_index")
        if not target:
            return
        from fastfill_udfs.spark.search import export_servable

        served = self.evaluator.servable({"ranking": self.ranking,
                                          "new_model": self.meta.get("new_model"),
                                          "h": self.meta.get("h")})
        where = export_servable(self.spark, self.cfg, self.run, served, target,
                                mlflow_run_id=self.run_id)
        log.info("evaluate %s step %d: servable index written to %s", self.run, batch_id, where)

    def on_committed(self, batch_id: int, version: int) -> None:
        """The backfill's callback after each committed batch: evaluate what is not logged."""
        self.catch_up()

    def finalize(self) -> dict | None:
        """When every planned batch is committed and logged: log mAP_auc / top1_auc (where the
        queries have labels), the label-free agreement curve (`agreement_at_<k>` per step,
        `agreement_auc`), the curve (CSV + PNG) and, with a forecast, the forecast against the
        realised curve (forecast_vs_realised.png, `forecast_gap_max`). Returns the AUCs, or
        None while the run is incomplete."""
        from mlflow.tracking import MlflowClient

        from fastfill_udfs.reporting import plot_curves
        from fastfill_udfs.spark.backfill import planned_batches
        from fastfill_udfs.tracking import log_step_metrics

        client = MlflowClient()
        logged = client.get_run(self.run_id).data.metrics
        n_planned = len(planned_batches(self.spark, self.cfg, self.run))
        # already final: a rerun changes nothing (unless a sync queued batches after the last)
        if "agreement_auc" in logged and max(
                m.step for m in client.get_metric_history(self.run_id, "agreement_auc")) \
                >= n_planned:
            return {k: v for k, v in logged.items() if k.endswith("_auc")}
        curve = curve_from_history(client, self.run_id)
        if len(curve) < n_planned + 1 or curve["backfill_fraction"].isna().any():
            log.info("evaluate %s: %d of %d steps logged; AUCs once the run completes",
                     self.run, len(curve), n_planned + 1)
            return None
        k = int(self.cfg.get_path("forecast.agreement_k"))
        agreement = self.evaluator.agreement_curve(
            run_log(self.spark, self.cfg, self.run), k,
            int(self.cfg.get_path("evaluation.agreement_queries")), self.cfg.get_path("seed"))
        curve["agreement"] = curve["step"].map(agreement).astype(float)
        for step, value in agreement.items():
            log_step_metrics(self.run_id, {agreement.name: value}, step=int(step))
        aucs = {f"{m}_auc": run_curve_auc(curve["backfill_fraction"], curve[m])
                for m in ("mAP", "top1", "agreement") if np.isfinite(curve[m]).all()}
        log_step_metrics(self.run_id, aucs, step=n_planned)
        with tempfile.TemporaryDirectory() as tmp:
            csv, png = Path(tmp) / "curve.csv", Path(tmp) / "curve.png"
            curve.to_csv(csv, index=False)
            refs = self.evaluator.references
            labelled = np.isfinite(curve["mAP"]).all()
            plot_curves(curve.assign(policy=self.policy), png,
                        metric="mAP" if labelled else "agreement",
                        second_metric="top1" if labelled else None,
                        references={"new/new": {m: refs[f"new_new_{m}"] for m in ("mAP", "top1")}}
                        if refs and labelled else None,
                        title=f"{self.run}: retrieval vs backfill fraction")
            client.log_artifact(self.run_id, str(csv))
            client.log_artifact(self.run_id, str(png))
            if self.forecast is not None:
                self._log_forecast_vs_realised(client, curve, Path(tmp))
        log.info("evaluate %s: %s", self.run,
                 ", ".join(f"{k} {v:.4f}" for k, v in sorted(aucs.items())))
        return aucs

    def _log_forecast_vs_realised(self, client, curve: pd.DataFrame, tmp: Path) -> None:
        """The realised share of the gain (mAP where the forecast used mAP, else agreement)
        beside the forecast's, per step, and their largest gap; the chart as an artifact."""
        from fastfill_udfs.forecast import share_gap
        from fastfill_udfs.reporting import plot_forecast
        from fastfill_udfs.tracking import log_step_metrics, logged_steps

        metric = "mAP" if self.forecast.metric == "mAP" else "agreement"
        values = curve[metric].to_numpy(np.float64)
        end = self.evaluator.references.get("new_new_mAP") if metric == "mAP" else 1.0
        if not np.isfinite(values).all():
            return
        compared = share_gap(self.forecast, curve["backfill_fraction"], values,
                             key=self.forecast_key, end=end)
        realised, gap = curve.assign(gain_share=compared["realised"]), compared["gap"]

        done = logged_steps(self.run_id, "gain_share")    # logged per step where new/new is known
        for row in realised.itertuples():
            if int(row.step) not in done:
                log_step_metrics(self.run_id, {"gain_share": float(row.gain_share)},
                                 step=int(row.step))
        log_step_metrics(self.run_id, {"forecast_gap_max": gap}, step=int(curve["step"].max()))
        png = tmp / "forecast_vs_realised.png"
        plot_forecast(self.forecast, png, realised=realised, key=self.forecast_key,
                      title=f"{self.run}: forecast ({self.forecast_key}) vs realised")
        client.log_artifact(self.run_id, str(png))
        log.info("evaluate %s: forecast vs realised share of the gain: largest gap %.3f",
                 self.run, gap)
