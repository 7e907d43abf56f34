"""Serving a run's mixed gallery (no Spark): the servable index, queries and their hits.

During a backfill every item is searchable in the new space: the `new` items by the new model's
embeddings, the rest by `h`'s transformation of their old embeddings. A :class:`ServableIndex` is
that gallery at one committed batch: the faiss shards, the item catalog (key -> id, label,
source, the model version that made the vector, the batch that made it new) and what it reflects
(run, ranking, batch, Delta version of `gallery_features`, the new model and `h`). It is saved to
a plain folder (``servable.json`` + ``items.parquet`` + the shards) and loaded back without
Spark; a load is refused, naming both, when the folder was written for another run, ranking,
batch or Delta version than the one asked for.

Queries are new-model embeddings: given directly, or computed from an image file with the run's
new model (:func:`embed_image_file`; :func:`check_query_model` refuses another model than the
one the run's plan was made for, naming both).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from fastfill_udfs.faiss_index import IndexSpec, ShardedGalleryIndex, VectorSpace

__all__ = ["ServableIndex", "IndexMismatchError", "QueryModelMismatchError", "embed_image_file",
           "check_query_model", "parse_embedding", "format_hits"]

FORMAT = "fastfill-servable/1"
MANIFEST = "servable.json"
ITEMS = "items.parquet"
SHARDS = "shards"
ITEM_COLUMNS = ("id", "label", "source", "model_version", "batch_id")


class IndexMismatchError(ValueError):
    """A saved index reflects another run, ranking, batch or Delta version than asked for."""


class QueryModelMismatchError(ValueError):
    """The model that would embed a query is not the run's new model."""


@dataclass
class ServableIndex:
    """A run's gallery at one committed batch, searchable.

    ``index`` the shards (keys = positions in ``items``); ``items`` one row per key (index =
    key) with ``id``, ``label``, ``source`` (``new`` / ``transformed``), ``model_version``,
    ``batch_id``; ``info`` what it reflects: ``run``, ``ranking``, ``batch_id``,
    ``features_version``, ``features_table``, ``new_model`` / ``h`` (uri, version, weights),
    ``created_at`` (filled in by :meth:`create`)."""

    index: ShardedGalleryIndex
    items: pd.DataFrame
    info: dict = field(default_factory=dict)

    @classmethod
    def create(cls, ids, embeddings, sources, model_versions, batch_ids, labels, *,
               info: dict, spec: IndexSpec | None = None,
               space: VectorSpace | None = None) -> "ServableIndex":
        """Build the shards from one row per item (ids unique). Raises ValueError for
        duplicate ids (naming them), length mismatches, embeddings that are not one finite
        (n x dim) matrix (naming the ids of NaN rows), or ``info`` without ``run`` /
        ``batch_id`` / ``features_version``."""
        for key in ("run", "batch_id", "features_version"):
            if key not in info:
                raise ValueError(f"info must name {key!r} (what the index reflects)")
        ids = np.asarray(ids, dtype=object)
        emb = np.asarray(embeddings)
        n = len(ids)
        columns = {"id": ids, "label": labels, "source": sources,
                   "model_version": model_versions, "batch_id": batch_ids}
        for name, values in columns.items():
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} ids")
        if emb.ndim != 2 or len(emb) != n:
            raise ValueError(f"embeddings must be (n x dim) with n = {n} ids, got shape "
                             f"{emb.shape}")
        dup = pd.Index(ids).duplicated()
        if dup.any():
            raise ValueError(f"duplicate ids in the gallery: {sorted(set(ids[dup]))[:5]}")
        bad = ~np.isfinite(emb).all(axis=1) if emb.size else np.zeros(n, bool)
        if bad.any():
            raise ValueError(f"embeddings of ids {list(ids[bad][:5])} contain NaN or inf")
        items = pd.DataFrame({name: (pd.array(v, dtype="Int64") if name == "batch_id" else
                                     nullable_labels(v) if name == "label" else
                                     np.asarray(v, dtype=object)) for name, v in columns.items()})
        items.index.name = "key"
        index = ShardedGalleryIndex(emb.shape[1], spec=spec, space=space)
        index.build(np.arange(n, dtype=np.int64), emb, sources=items["source"].to_numpy())
        info = {**info, "n_items": n,
                "n_new": int((items["source"] == "new").sum()),
                "n_transformed": int((items["source"] == "transformed").sum()),
                "created_at": info.get("created_at")
                or datetime.now(timezone.utc).isoformat(timespec="seconds")}
        return cls(index, items, info)

    # -- queries
    @property
    def dim(self) -> int:
        return self.index.dim

    def check_query(self, queries, name: str = "query") -> np.ndarray:
        """Queries as a float (nq x dim) array; one vector may be 1-D. Raises ValueError
        naming ``name`` for a wrong dimension or NaN/inf values."""
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            got = q.shape[-1] if q.ndim else "a scalar"
            raise ValueError(f"{name} has dimension {got}, but the run's embeddings (new model "
                             f"{(self.info.get('new_model') or {}).get('version', '?')}) are "
                             f"{self.dim}-d")
        if not np.issubdtype(q.dtype, np.number):
            raise ValueError(f"{name} must be numeric, got dtype {q.dtype}")
        if not np.isfinite(q).all():
            rows = np.flatnonzero(~np.isfinite(q).all(axis=1))
            where = "" if len(q) == 1 else f" (rows {rows[:5].tolist()})"
            raise ValueError(f"{name} contains NaN or infinite values{where}")
        return q

    def search(self, queries, k: int = 10, *, exclude_ids=None, exact: bool | None = None
               ) -> pd.DataFrame:
        """Top-``k`` hits per query: one row per (query, rank) with ``query`` (0-based row),
        ``rank`` (1 = best), ``id``, ``score``, ``label``, ``source``, ``model_version``,
        ``batch_id``. ``exclude_ids`` (one per query, or None) drops that item from its
        query's hits (searching by an item's own embedding). ``exact`` as in
        :meth:`ShardedGalleryIndex.search`. Raises ValueError for a bad query (see
        :meth:`check_query`) or ``k``."""
        q = self.check_query(queries)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        excl = [None] * len(q) if exclude_ids is None else list(exclude_ids)
        if len(excl) != len(q):
            raise ValueError(f"exclude_ids has {len(excl)} entries for {len(q)} queries")
        scores, keys = self.index.search(q, int(k) + 1, exact=exact)
        ids = self.items["id"].to_numpy(dtype=object)
        rows = []
        for r in range(len(q)):
            rank = 0
            for s, key in zip(scores[r], keys[r]):
                if key < 0 or (excl[r] is not None and ids[key] == excl[r]):
                    continue
                rank += 1
                if rank > k:
                    break
                rows.append((r, rank, key, float(s)))
        out = pd.DataFrame(rows, columns=["query", "rank", "key", "score"])
        cat = self.items.reset_index(drop=True)
        out = pd.concat([out.drop(columns="key"),
                         cat.iloc[out["key"].to_numpy()].reset_index(drop=True)], axis=1)
        return out[["query", "rank", "id", "score", "label", "source", "model_version",
                    "batch_id"]]

    def summary(self) -> str:
        """One line: what this index reflects and how much of it is new."""
        i = self.info
        n, n_new = i.get("n_items", len(self.items)), i.get("n_new", 0)
        share = 100.0 * n_new / n if n else 0.0
        models = self.items.groupby("source")["model_version"].agg(
            lambda v: ", ".join(sorted(set(map(str, v))))).to_dict()
        return (f"run {i.get('run')} at batch {i.get('batch_id')} (gallery_features version "
                f"{i.get('features_version')}): {n:,} items, {n_new:,} new ({share:.1f}%, "
                f"{models.get('new', '-')}), {i.get('n_transformed', 0):,} transformed "
                f"({models.get('transformed', '-')}); index {self.index.spec.describe()}")

    # -- persistence
    def save(self, folder) -> Path:
        """Write to the new (or empty) local folder ``folder``; returns it."""
        folder = Path(folder)
        self.index.save(folder / SHARDS)
        self.items.reset_index().to_parquet(folder / ITEMS, index=False)
        manifest = {"format": FORMAT, **self.info}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True,
                                                  default=str))
        return folder

    @classmethod
    def read_info(cls, folder) -> dict:
        """The manifest of a saved index (what it reflects). Raises FileNotFoundError when
        ``folder`` holds no servable index, ValueError for another format."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no servable index (no {MANIFEST})")
        info = json.loads(path.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{path} is format {info.get('format')!r}; this version reads "
                             f"{FORMAT!r}")
        return {k: v for k, v in info.items() if k != "format"}

    @classmethod
    def load(cls, folder, *, run: str, batch_id: int | None = None,
             features_version: int | None = None, ranking: str | None = None
             ) -> "ServableIndex":
        """Load a saved index, refusing one that reflects something else than asked for.

        ``run`` must match; ``batch_id``, ``features_version`` and ``ranking`` are checked
        when given. Raises IndexMismatchError naming both values, FileNotFoundError /
        ValueError for a missing or damaged folder (naming the file)."""
        info = cls.read_info(folder)
        checks = [("run", run), ("ranking", ranking), ("batch_id", batch_id),
                  ("features_version", features_version)]
        wrong = [f"{key} {info.get(key)!r}, not {want!r}" for key, want in checks
                 if want is not None and info.get(key) != want]
        if wrong:
            raise IndexMismatchError(
                f"the index at {folder} reflects {'; '.join(wrong)} as asked "
                f"(it was written for run {info.get('run')!r} at batch {info.get('batch_id')}, "
                f"gallery_features version {info.get('features_version')}); build or export "
                f"the index of the run and batch you want")
        index = ShardedGalleryIndex.load(Path(folder) / SHARDS)
        items = pd.read_parquet(Path(folder) / ITEMS).set_index("key")
        if len(items) != index.ntotal:
            raise ValueError(f"{folder}: {len(items)} catalog rows for {index.ntotal} vectors")
        items["batch_id"] = items["batch_id"].astype("Int64")
        items["label"] = nullable_labels(items["label"])
        return cls(index, items, info)


def nullable_labels(values) -> pd.array:
    """Labels as nullable ints (the data contract's `label int`), other values as they are."""
    values = pd.Series(list(values), dtype=object)
    try:
        return pd.array(values.where(values.notna(), None).tolist(), dtype="Int64")
    except (TypeError, ValueError):
        return pd.array(values.to_numpy(dtype=object), dtype=object)


# ----------------------------------------------------------------------------- queries
def parse_embedding(text: str) -> np.ndarray:
    """A query embedding from text: comma- or space-separated numbers, or the path of a
    ``.npy`` / text file holding them. Raises ValueError naming what could not be read."""
    text = str(text).strip()
    path = Path(text)
    if text and path.suffix in (".npy", ".txt", ".csv") and path.is_file():
        if path.suffix == ".npy":
            return np.asarray(np.load(path), dtype=np.float64)
        text = path.read_text()
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        return np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        raise ValueError(f"query embedding {text[:60]!r} is not a list of numbers (nor a "
                         ".npy / .txt file)") from None


def check_query_model(plan_new_model: dict | None, model_ref) -> None:
    """Refuse to embed queries with another model than the run's new model (version and
    weights recorded in the plan's batch 0). Raises QueryModelMismatchError naming both."""
    want = plan_new_model or {}
    if not want:
        return                                     # a plan without the record: nothing to check
    if (want.get("version"), want.get("weights")) != (model_ref.version, model_ref.weights_hash):
        raise QueryModelMismatchError(
            f"the run's gallery was embedded by the new model {want.get('version')} (weights "
            f"{want.get('weights')}), but models.new is {model_ref.version} (weights "
            f"{model_ref.weights_hash}): queries must come from the same model. Point "
            f"models.new at {want.get('uri') or want.get('version')}")


def embed_image_file(path, model_ref, preprocess, *, device: str = "cpu") -> np.ndarray:
    """Embed one image file (local path or ``file:`` URI) with ``model_ref.model`` after
    ``preprocess`` (a :class:`fastfill_udfs.preprocess.Preprocess`): float32 (1 x dim).
    Raises FileNotFoundError naming a missing file, ImageDecodeError for one that is not an
    image, ValueError for a non-finite embedding."""
    from fastfill_udfs.inference import BatchEmbedder

    text = str(path)
    local = Path(text[len("file:"):] if text.startswith("file:") else text)
    if text.startswith("file://"):
        local = Path(text[len("file://"):])
    if not local.is_file():
        raise FileNotFoundError(f"query image {text} not found")
    image = preprocess.decode(local.read_bytes(), item_id=text)
    embedder = BatchEmbedder(model_ref.model, device=device, batch_size=1,
                             preprocess=preprocess.normalizer())
    out = embedder(image[None, ...])
    if not np.isfinite(out).all():
        raise ValueError(f"the new model's embedding of {text} is NaN or inf")
    return out


def format_hits(hits: pd.DataFrame) -> str:
    """The hits of one query as an aligned text table, with a closing count by source."""
    if hits.empty:
        return "(no hits)"
    show = hits.assign(score=hits["score"].map(lambda s: f"{s:.4f}"),
                       batch_id=hits["batch_id"].map(lambda b: "" if pd.isna(b) else str(b)),
                       label=hits["label"].map(lambda v: "" if v is None or
                                               (isinstance(v, float) and np.isnan(v)) else str(v)))
    show = show[["rank", "id", "score", "label", "source", "model_version", "batch_id"]]
    table = show.to_string(index=False)
    counts = hits["source"].value_counts().to_dict()
    tail = ", ".join(f"{counts[s]} {s}" for s in sorted(counts))
    return f"{table}\ntop-{len(hits)}: {tail}"
