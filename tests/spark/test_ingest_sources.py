"""Reading a user's table into the contract's shape (`sources.conform`): column mapping and
types, extra columns untouched, bad rows with reasons, errors naming the column and table;
subgroups from the user's column or from the configured classes."""
from __future__ import annotations

import pytest

from fastfill_udfs.config import load_config
from fastfill_udfs.spark.sources import derived_subgroups
from fastfill_udfs.spark.sources import conform

COLUMNS = {"id": "item", "old_embedding": "vec", "image": "uri", "label": "cls",
           "subgroup": "region"}


@pytest.fixture
def user_table(spark):
    return spark.createDataFrame(
        [("a", [1.0, 2.0], "s3a://b/a.png", "5", "eu", 7),
         ("b", [3.0, 4.0], "b.png", "0", None, 8),
         (None, [5.0, 6.0], "c.png", "1", "us", 9),
         ("d", [7.0, 8.0], "d.png", "x", "us", 10),
         ("e", [9.0, 1.0], "e.png", None, "us", 11)],
        "item string, vec array<double>, uri string, cls string, region string, extra int")


def test_conform_renames_types_and_carries_extra_columns(user_table):
    rows, bad = conform(user_table, COLUMNS, "gallery table T", old_embedding=True)
    assert rows.columns == ["id", "label", "subgroup", "image_uri", "old_embedding", "extra"]
    assert dict(rows.dtypes)["old_embedding"] == "array<float>"
    assert dict(rows.dtypes)["label"] == "int"
    got = {r["id"]: (r["label"], r["subgroup"], r["image_uri"], r["extra"])
           for r in rows.collect()}
    assert got == {"a": (5, "eu", "s3a://b/a.png", 7), "b": (0, None, "b.png", 8),
                   "e": (None, "us", "e.png", 11)}                # a null label is allowed
    reasons = {r["id"]: r["reason"] for r in bad.collect()}
    assert reasons == {"<null id>": "id is null", "d": "label x is not an integer"}


def test_conform_errors_name_the_column_and_the_table(spark, user_table):
    with pytest.raises(ValueError, match=r"gallery table T has no column 'emb' "
                                         r"\(data.columns.old_embedding\)"):
        conform(user_table, {**COLUMNS, "old_embedding": "emb"}, "gallery table T",
                old_embedding=True)
    with pytest.raises(ValueError, match=r"column 'extra' \(data.columns.image\) must be binary"):
        conform(user_table, {**COLUMNS, "image": "extra"}, "gallery table T", old_embedding=True)
    with pytest.raises(ValueError, match=r"column 'uri' \(data.columns.old_embedding\) must be "
                                         r"array<float> or array<double>"):
        conform(user_table, {**COLUMNS, "old_embedding": "uri"}, "T", old_embedding=True)
    clash = user_table.withColumnRenamed("extra", "image")
    with pytest.raises(ValueError, match=r"\['image'\] clash with the data contract"):
        conform(clash, COLUMNS, "T", old_embedding=True)


def test_binary_images_and_absent_label_and_subgroup(spark):
    df = spark.createDataFrame([("a", bytearray(b"png"))], "id string, image binary")
    rows, bad = conform(df, {"id": "id", "image": "image", "label": "", "subgroup": ""},
                        "T", old_embedding=False)
    assert rows.columns == ["id", "label", "subgroup", "image"]
    assert rows.first()["label"] is None and bad.count() == 0


def test_subgroups_come_from_the_row_else_from_the_configured_classes(user_table):
    rows, _ = conform(user_table, COLUMNS, "T", old_embedding=True)
    cfg = load_config([], ["data.subgroups.minority_classes=[5]",
                           "data.subgroups.minority_name=shoes"])
    got = {r["id"]: r["subgroup"] for r in derived_subgroups(rows, cfg).collect()}
    # a: its own 'eu' wins; b: no own subgroup, label 0 -> majority; e: no label -> none
    assert got == {"a": "eu", "b": "majority", "e": "us"}
    none = {r["id"]: r["subgroup"] for r in derived_subgroups(rows, load_config([])).collect()}
    assert none == {"a": "eu", "b": None, "e": "us"}           # base: no classes configured


def test_demo_own_data_ingest_holds_out_the_studys_training_split(spark, pipeline_env, tmp_path):
    """data.dataset=image_folder: the gallery is exactly the study's test split (the same
    seeded hash of each id), read through Spark; the rest trains the demo's models."""
    import numpy as np
    from PIL import Image

    from fastfill_udfs.demo.protocol import load_split
    from fastfill_udfs.spark.delta_io import read_table, table_paths
    from fastfill_udfs.spark.jobs import ingest_job

    rng = np.random.default_rng(0)
    for name in ("boots", "coats", "hats"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i:02d}.png")
    cfg = pipeline_env.make_cfg("ownfolder", "data.dataset=image_folder",
                                f"data.image_folder={tmp_path / 'images'}",
                                "data.train_limit=0", "data.test_limit=0",
                                warehouse=tmp_path / "warehouse")
    counts = ingest_job(cfg)
    gallery = read_table(spark, table_paths(cfg).gallery).toPandas()
    assert sorted(gallery["id"]) == sorted(load_split(cfg, "test").ids)
    assert counts["gallery"] == len(gallery) < 36 and counts["quarantine"] == 0
    assert set(gallery["image_uri"].str.startswith("file:")) == {True}
