"""Spark glue of search: a run's gallery at any committed batch (Delta time travel) as a
servable index, query vectors by item id, and servable indexes written to the warehouse or to
MLflow and read back. `search_job` is what `pipelines/search.py` and `notebooks/04_search.py`
run."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.config import EXPORT_TARGETS, Config
from fastfill_udfs.faiss_index import IndexSpec, space_for
from fastfill_udfs.search import (ServableIndex, check_query_model, embed_image_file,
                                  format_hits, parse_embedding)
from fastfill_udfs.spark.arrow_utils import arrow_rows
from fastfill_udfs.spark.delta_io import (TableNotFoundError, hadoop_fs, hadoop_path,
                                          is_delta_table, is_local_uri, local_path, ranking_id, read_features, read_table,
                                          run_id_for, table_paths)
from fastfill_udfs.spark.sync import synced_history

log = logging.getLogger(__name__)
ARTIFACT_DIR = "servable_index"


def resolve_batch(spark: SparkSession, cfg: Config, run: str, batch: int | None = None
                  ) -> tuple[int, int, str | None]:
    """(batch_id, gallery_features version, note) of `run` at committed batch `batch` (None:
    the latest). A run with no committed batch resolves to batch 0, the gallery as ranked (all
    transformed except h's training pairs), and the note says so. Raises TableNotFoundError for
    a run not ranked, ValueError for a batch not committed (naming the committed ones)."""
    path = table_paths(cfg, run).backfill_log
    if not is_delta_table(spark, path):
        raise TableNotFoundError(f"run '{run}' is not ranked yet (no {path}): run "
                                 "pipelines/rank_gallery.py first")
    logged = (read_table(spark, path).select("batch_id", "table_version").toPandas()
              .sort_values("batch_id"))
    if logged.empty:
        raise TableNotFoundError(f"run '{run}' is not ranked yet (no batch 0 in {path})")
    committed = logged["batch_id"].astype(int).tolist()
    note = None
    latest = batch is None or batch < 0
    if latest:
        batch = committed[-1]
        if batch == 0:
            note = (f"run '{run}' has no committed backfill batch yet: searching batch 0, the "
                    "gallery as ranked (every item transformed by h, except h's training pairs)")
    elif batch not in committed:
        raise ValueError(f"batch {batch} of run '{run}' is not committed; committed batches: "
                         f"{_ranges(committed)}")
    version = int(logged.loc[logged["batch_id"] == batch, "table_version"].iloc[0])
    if latest:   # the latest: with what syncs changed since that batch (docs/moving_gallery.md)
        from fastfill_udfs.spark.sync_history import latest_synced_version

        synced = latest_synced_version(spark, table_paths(cfg, run).gallery_features, version)
        if synced != version:
            note = ((note + "; ") if note else "") + (
                f"gallery_features version {synced}: batch {batch} and the syncs since")
            version = synced
    return int(batch), version, note


def _ranges(values: list[int]) -> str:
    if len(values) > 6:
        return f"{values[0]}..{values[-1]} ({len(values)} batches)"
    return ", ".join(map(str, values))


def plan_info(spark: SparkSession, cfg: Config, run: str) -> dict:
    """What a servable index of `run` records besides its batch: ranking, new model, h."""
    from fastfill_udfs.spark.rank import plan_metadata

    meta = plan_metadata(spark, cfg, run) or {}
    return {"ranking": ranking_id(spark, cfg, run), "new_model": meta.get("new_model"),
            "h": meta.get("h"), "ranked_on_gallery_version": meta.get("ranked_on_gallery_version"),
            "calibration": meta.get("calibration")}


def build_servable(spark: SparkSession, cfg: Config, run: str, batch: int | None = None
                   ) -> tuple[ServableIndex, str | None]:
    """(the servable index of `run` at committed `batch` (None: the latest), note): built from
    gallery_features at the batch's Delta version, labels from the gallery as ranked."""
    batch_id, version, note = resolve_batch(spark, cfg, run, batch)
    paths = table_paths(cfg, run)
    info = plan_info(spark, cfg, run)
    rows, vectors = read_features(spark, paths.gallery_features, version)
    history, ranked = synced_history(spark, cfg, run)   # labels as the run's gallery had them
    gallery = read_table(spark, paths.gallery, version=history.gallery_version(version)
                         if history is not None else info.get("ranked_on_gallery_version"))
    labels = (gallery.select("id", "label").toPandas().set_index("id")["label"]
              .reindex(rows["id"].to_numpy(dtype=object)))
    served = ServableIndex.create(
        rows["id"], vectors, rows["source"], rows["model_version"], rows["batch_id"],
        labels.to_numpy(dtype=object),
        info={"run": run, "batch_id": batch_id, "features_version": version,
              "features_table": paths.gallery_features, **info},
        spec=IndexSpec.from_config(cfg),
        space=space_for(cfg.get_path("evaluation.distance"), info.get("calibration")))
    return served, note


def query_for_id(spark: SparkSession, cfg: Config, run: str, served: ServableIndex,
                 item_id: str) -> tuple[np.ndarray, str]:
    """The new-model embedding of item `item_id` and where it came from: its row of
    query_features, else its gallery_features row at the index's version when that row is
    already `new`. Raises ValueError naming the item when it has no new-model embedding."""
    paths = table_paths(cfg, run)
    if is_delta_table(spark, paths.query_features):
        rows, emb = arrow_rows(read_table(spark, paths.query_features)
                               .where(F.col("id") == item_id).select("id", "embedding"),
                               f"query_features {paths.query_features}")
        if len(rows):
            return emb[0], f"item {item_id!r}: its new-model embedding from query_features"
    version = served.info["features_version"]
    rows, emb = arrow_rows(read_table(spark, paths.gallery_features, version=version)
                           .where(F.col("id") == item_id).select("id", "source", "embedding"),
                           f"gallery_features {paths.gallery_features}")
    if not len(rows):
        raise ValueError(f"item {item_id!r} is in neither query_features "
                         f"({paths.query_features}) nor gallery_features of run '{run}'")
    if rows["source"].iloc[0] != "new":
        raise ValueError(f"item {item_id!r} has no new-model embedding: it is not in "
                         f"query_features and is still transformed at batch "
                         f"{served.info['batch_id']} (its vector is h(old)); query by image")
    return emb[0], f"item {item_id!r}: its new-model embedding from gallery_features"


# ----------------------------------------------------------------------------- export / load


def warehouse_location(cfg: Config, run: str, batch_id: int, version: int) -> str:
    """Where `export_servable(..., "warehouse")` writes batch `batch_id` (Delta version
    `version`) of `run`: <warehouse>/runs/<run>/servable_index/batch_<k>_v<version>."""
    base = table_paths(cfg, run).backfill_log.rsplit("/", 1)[0]
    return f"{base}/{ARTIFACT_DIR}/batch_{batch_id:04d}_v{version}"


def export_servable(spark: SparkSession, cfg: Config, run: str, served: ServableIndex,
                    target: str, *, mlflow_run_id: str | None = None) -> str:
    """Write `served` to the warehouse or as an artifact of the run's MLflow run; returns where
    (a path, or a runs:/ URI). Raises ValueError for an unknown target."""
    if target not in EXPORT_TARGETS:
        raise ValueError(f"export target (evaluation.export_index / --export) must be one of "
                         f"{EXPORT_TARGETS}, got {target!r}")
    batch_id, version = served.info["batch_id"], served.info["features_version"]
    name = f"batch_{batch_id:04d}_v{version}"
    with tempfile.TemporaryDirectory() as tmp:
        local = served.save(Path(tmp) / name)
        if target == "mlflow":
            from mlflow.tracking import MlflowClient

            from fastfill_udfs.tracking import backfill_mlflow_run, configure_mlflow

            configure_mlflow(cfg)
            if mlflow_run_id is None:
                mlflow_run_id = backfill_mlflow_run(cfg, run, run.rsplit("_", 1)[-1], {},
                                                    ranking=served.info.get("ranking")
                                                    or ranking_id(spark, cfg, run))
            MlflowClient().log_artifacts(mlflow_run_id, str(local), f"{ARTIFACT_DIR}/{name}")
            return f"runs:/{mlflow_run_id}/{ARTIFACT_DIR}/{name}"
        dest = warehouse_location(cfg, run, batch_id, version)
        if is_local_uri(dest):
            path = local_path(dest)
            staging = path.with_name(f".{path.name}.{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(local, staging)
            shutil.rmtree(path, ignore_errors=True)  # same batch and version: same content
            staging.rename(path)
        else:
            fs, target_path = hadoop_fs(spark, dest)
            fs.delete(target_path, True)
            fs.copyFromLocalFile(False, True, hadoop_path(spark, local), target_path)
        return dest


def load_servable(spark: SparkSession | None, cfg: Config, source: str, *, run: str,
                  batch_id: int | None = None, features_version: int | None = None
                  ) -> ServableIndex:
    """Load a servable index from a local folder, a warehouse URI (copied through Spark's file
    systems) or an MLflow artifact URI (runs:/..., models:/...); refused (IndexMismatchError
    naming both) when it reflects another run, batch or Delta version than asked for."""
    with tempfile.TemporaryDirectory() as tmp:
        if source.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
            import mlflow

            from fastfill_udfs.tracking import configure_mlflow

            configure_mlflow(cfg)
            folder = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)
        elif is_local_uri(source):
            folder = str(local_path(source))
        else:
            if spark is None:
                raise ValueError(f"{source} is not a local folder: copy it locally first, or "
                                 "load it with a SparkSession")
            fs, src = hadoop_fs(spark, source)
            fs.copyToLocalFile(False, src, hadoop_path(spark, tmp + "/index"), True)
            folder = tmp + "/index"
        return ServableIndex.load(folder, run=run, batch_id=batch_id,
                                  features_version=features_version)


# ----------------------------------------------------------------------------- the job
def search_job(cfg: Config, *, policy: str | None = None, image: str | None = None,
               item_id: str | None = None, embedding=None, batch: int | None = None,
               k: int | None = None, index: str | None = None, export: str | None = None,
               serving: bool = False, alias: str | None = None,
               master: str | None = None, out=print) -> dict:
    """Search `run` (`<run_name>_<policy>`) at committed `batch` (None: the latest) with one
    query: an image file (embedded by the run's new model), an item id, or an embedding
    (numbers or a .npy/.txt file). Prints the top-k hits with id, score, label, source
    (`new` / `transformed`) and model version; returns {run, batch_id, features_version,
    hits, notes, location (when exported)}.

    `index`: a saved servable index (folder or MLflow URI) instead of building one from Delta;
    with `batch` given it needs no Spark unless the query is an item id. `export`: also write
    the built index ("warehouse" / "mlflow"). `serving`: search what the serving alias
    (`alias`, default serving.alias) points at (pipelines/publish.py), whatever its run. Raises ValueError for not exactly one query, a
    query of the wrong dimension or with NaN (naming it), an item without a new-model
    embedding, a batch not committed; QueryModelMismatchError for another new model;
    IndexMismatchError for a saved index of another run, batch or Delta version."""
    queries = [x for x in (image, item_id, embedding) if x is not None and x != ""]
    if len(queries) != 1:
        raise ValueError("give exactly one query: an image file, an item id or an embedding")
    if serving and (policy or batch is not None or index or export):
        raise ValueError("--serving searches what the alias points at: leave out --policy, "
                         "--batch, --index and --export")
    run = run_id_for(cfg, policy)
    k = int(k or cfg.get_path("search.topk"))
    notes: list[str] = []
    spark = None

    def session():
        nonlocal spark
        if spark is None:
            from fastfill_udfs.spark.session import get_spark

            spark = get_spark(cfg["spark"], master=master)
        return spark

    location = None
    if serving:
        from fastfill_udfs.spark.serving_pointer import current, describe

        state = current(session(), cfg, alias)
        if state is None:
            raise TableNotFoundError(f"nothing is published under alias "
                                     f"{alias or cfg.get_path('serving.alias')!r}: run "
                                     "pipelines/publish.py first")
        run = state["run"]
        served = load_servable(spark, cfg, state["location"], run=run,
                               batch_id=state["batch_id"],
                               features_version=state["features_version"])
        notes.append(f"serving alias {state['alias']}: {describe(state)}")
    elif index:
        version = None
        if batch is None:                          # "the latest": the log says which that is
            batch, version, note = resolve_batch(session(), cfg, run, None)
            notes += [note] if note else []
        served = load_servable(spark, cfg, index, run=run, batch_id=batch,
                               features_version=version)
        notes.append(f"index loaded from {index}")
    else:
        served, note = build_servable(session(), cfg, run, batch)
        notes += [note] if note else []
        if export:
            location = export_servable(spark, cfg, run, served, export)
            notes.append(f"index written to {location}")

    exclude = None
    if image is not None:
        from fastfill_udfs.model_loading import load_configured_model
        from fastfill_udfs.preprocess import Preprocess

        model = load_configured_model(cfg, "new")
        check_query_model(served.info.get("new_model"), model)
        vector = embed_image_file(image, model, Preprocess.from_config(
            cfg.get_path("models.preprocess")))
        what = f"image {image}, embedded by {model.version}"
    elif item_id is not None:
        vector, what = query_for_id(session(), cfg, run, served, item_id)
        if cfg.get_path("search.exclude_self"):
            exclude = [item_id]
    else:
        vector = parse_embedding(embedding) if isinstance(embedding, str) else np.asarray(
            embedding, dtype=np.float64)
        what = f"an embedding of dimension {vector.shape[-1] if vector.ndim else 0}"
    query = served.check_query(vector, "query embedding" if embedding is not None else "query")
    hits = served.search(query, k, exclude_ids=exclude)
    for line in [served.summary(), *notes, f"query: {what}", format_hits(hits)]:
        out(line)
    return {"run": run, "batch_id": served.info["batch_id"],
            "features_version": served.info["features_version"], "hits": hits, "notes": notes,
            "location": location, "summary": served.summary()}
