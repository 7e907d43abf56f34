"""The servable index (no Spark): hits with their provenance, save / load and its refusals,
query checks, queries from image files with the run's new model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fastfill_udfs.faiss_index import IndexSpec
from fastfill_udfs.search import (IndexMismatchError, QueryModelMismatchError, ServableIndex,
                                  check_query_model, embed_image_file, format_hits,
                                  parse_embedding)

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "tests" / "data" / "image_folder" / "trouser" / "t10k_00002.png"
DIM = 8


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _served(n=60, seed=0, spec=None, **info):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, DIM))
    new = np.arange(n) % 3 == 0
    return ServableIndex.create(
        [f"item{i:03d}" for i in range(n)], emb,
        np.where(new, "new", "transformed"),
        np.where(new, "models:/fastfill_new/1", "models:/fastfill_h/1"),
        np.where(new, 1 + np.arange(n) % 2, None), rng.integers(0, 4, n),
        info={"run": "demo_uncertainty", "batch_id": 2, "features_version": 5,
              "ranking": "123", "new_model": {"version": "models:/fastfill_new/1",
                                              "weights": "abc"}, **info},
        spec=spec), emb


def test_hits_carry_id_score_label_source_and_model_version():
    served, emb = _served()
    hits = served.search(emb[[0, 1]], k=5)
    assert list(hits.columns) == ["query", "rank", "id", "score", "label", "source",
                                  "model_version", "batch_id"]
    assert hits.groupby("query")["rank"].apply(list).tolist() == [[1, 2, 3, 4, 5]] * 2
    first = hits[hits["query"] == 0].iloc[0]
    assert first["id"] == "item000" and first["score"] == pytest.approx(1.0, abs=1e-6)
    assert (first["source"], first["model_version"], first["batch_id"]) == (
        "new", "models:/fastfill_new/1", 1)
    # provenance is the item's own, whatever rank it lands at
    cat = served.items.set_index("id")
    for _, row in hits.iterrows():
        assert row["source"] == cat.loc[row["id"], "source"]
        assert row["model_version"] == cat.loc[row["id"], "model_version"]
    # the ranking is the exact cosine ranking
    g = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    order = np.argsort(-(g[1] @ g.T))[:5]
    assert hits[hits["query"] == 1]["id"].tolist() == [f"item{i:03d}" for i in order]
    no_self = served.search(emb[0], k=3, exclude_ids=["item000"])
    assert "item000" not in set(no_self["id"]) and len(no_self) == 3
    text = format_hits(hits[hits["query"] == 0])
    counts = hits[hits["query"] == 0]["source"].value_counts()
    assert text.splitlines()[-1] == "top-5: " + ", ".join(f"{counts[s]} {s}"
                                                         for s in sorted(counts.index))
    assert "item000" in text and "models:/fastfill_new/1" in text
    assert served.summary().startswith(
        "run demo_uncertainty at batch 2 (gallery_features version 5): 60 items, 20 new (33.3%, "
        "models:/fastfill_new/1), 40 transformed (models:/fastfill_h/1); index flat")
    assert served.info["n_new"] == 20 and served.info["n_transformed"] == 40


def test_bad_queries_are_named():
    served, _ = _served()
    with pytest.raises(ValueError, match=r"query has dimension 5, but the run's embeddings .* "
                                         r"are 8-d"):
        served.search(np.ones(5))
    with pytest.raises(ValueError, match="query contains NaN or infinite values"):
        served.search(np.r_[np.ones(7), np.nan])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        served.search(np.array([np.ones(8), np.r_[np.ones(7), np.inf]]))
    with pytest.raises(ValueError, match="k must be a positive int"):
        served.search(np.ones(8), k=0)
    with pytest.raises(ValueError, match=r"duplicate ids in the gallery: \['a'\]"):
        ServableIndex.create(["a", "a"], np.ones((2, 3)), ["new"] * 2, ["m"] * 2, [1, 1],
                             [0, 0], info={"run": "r", "batch_id": 1, "features_version": 1})
    with pytest.raises(ValueError, match=r"embeddings of ids \['b'\] contain NaN"):
        ServableIndex.create(["a", "b"], np.array([[1.0, 0], [np.nan, 1]]), ["new"] * 2,
                             ["m"] * 2, [1, 1], [0, 0],
                             info={"run": "r", "batch_id": 1, "features_version": 1})


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_saved_index_loads_back_and_refuses_another_run_or_version(tmp_path, kind):
    served, emb = _served(spec=IndexSpec(kind=kind, num_shards=2))
    folder = served.save(tmp_path / "idx")
    back = ServableIndex.load(folder, run="demo_uncertainty", batch_id=2, features_version=5,
                              ranking="123")
    pd.testing.assert_frame_equal(back.search(emb[:3], k=4), served.search(emb[:3], k=4))
    assert back.info["batch_id"] == 2 and back.index.spec.kind == kind
    with pytest.raises(IndexMismatchError, match=r"run 'demo_uncertainty', not 'demo_random'"):
        ServableIndex.load(folder, run="demo_random")
    with pytest.raises(IndexMismatchError,
                       match=r"features_version 5, not 7.*written for run 'demo_uncertainty' at "
                             r"batch 2, gallery_features version 5"):
        ServableIndex.load(folder, run="demo_uncertainty", features_version=7)
    with pytest.raises(IndexMismatchError, match="batch_id 2, not 3"):
        ServableIndex.load(folder, run="demo_uncertainty", batch_id=3)
    with pytest.raises(IndexMismatchError, match="ranking '123', not '456'"):
        ServableIndex.load(folder, run="demo_uncertainty", ranking="456")
    with pytest.raises(FileNotFoundError, match="no servable.json"):
        ServableIndex.load(tmp_path, run="demo_uncertainty")
    manifest = json.loads((folder / "servable.json").read_text())
    (folder / "servable.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(ValueError, match="other/9"):
        ServableIndex.load(folder, run="demo_uncertainty")


def test_loading_needs_no_spark(tmp_path):
    served, emb = _served()
    folder = served.save(tmp_path / "idx")
    np.save(tmp_path / "q.npy", emb[4])
    code = f"""
import sys, numpy as np
from fastfill_udfs.search import ServableIndex
s = ServableIndex.load({str(folder)!r}, run="demo_uncertainty", batch_id=2)
hits = s.search(np.load({str(tmp_path / 'q.npy')!r}), k=2)
assert hits["id"].iloc[0] == "item004", hits
assert not any(m == "pyspark" or m.startswith("pyspark.") for m in sys.modules), "pyspark loaded"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_parse_embedding_reads_text_and_files(tmp_path):
    np.testing.assert_array_equal(parse_embedding("1, 2.5 -3"), [1.0, 2.5, -3.0])
    np.save(tmp_path / "q.npy", np.arange(3.0))
    np.testing.assert_array_equal(parse_embedding(str(tmp_path / "q.npy")), [0.0, 1.0, 2.0])
    (tmp_path / "q.txt").write_text("4 5\n6")
    np.testing.assert_array_equal(parse_embedding(str(tmp_path / "q.txt")), [4.0, 5.0, 6.0])
    assert np.isnan(parse_embedding("1,nan")).any()       # NaN is read; the index refuses it
    with pytest.raises(ValueError, match="'1, two' is not a list of numbers"):
        parse_embedding("1, two")


class _Ref:
    def __init__(self, model, version="models:/fastfill_new/1", weights="abc"):
        self.model, self.version, self.weights_hash = model, version, weights


def _tiny_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, DIM)).eval()


def test_image_query_uses_the_runs_new_model_and_refuses_another():
    from fastfill_udfs.preprocess import Preprocess

    prep = Preprocess(size=(28, 28), channels=1)
    model = _tiny_model()
    vec = embed_image_file(IMAGE, _Ref(model), prep)
    assert vec.shape == (1, DIM) and np.isfinite(vec).all()
    import torch

    img = prep.decode(IMAGE.read_bytes()).astype(np.float32)[None, ..., 0] / 255.0
    with torch.no_grad():
        want = model(torch.from_numpy(img)[:, None]).numpy()
    np.testing.assert_allclose(vec, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embed_image_file(f"file://{IMAGE}", _Ref(model), prep), vec)
    with pytest.raises(FileNotFoundError, match="query image .*nope.png not found"):
        embed_image_file(IMAGE.parent / "nope.png", _Ref(model), prep)
    from fastfill_udfs.data import ImageDecodeError

    with pytest.raises(ImageDecodeError):
        embed_image_file(IMAGE.parent / "corrupt.png", _Ref(model), prep)

    plan = {"uri": "models:/fastfill_new@current", "version": "models:/fastfill_new/1",
            "weights": "abc"}
    check_query_model(plan, _Ref(model))                 # the same model: fine
    check_query_model(None, _Ref(model))                 # no record: nothing to check
    with pytest.raises(QueryModelMismatchError,
                       match=r"embedded by the new model models:/fastfill_new/1 \(weights abc\), "
                             r"but models.new is models:/fastfill_new/2 \(weights def\)"):
        check_query_model(plan, _Ref(model, "models:/fastfill_new/2", "def"))
