"""The real stack: Delta write / read / MERGE / time travel through the project's session."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from delta.tables import DeltaTable

from fastfill_udfs.spark import jars
from fastfill_udfs.spark.delta_io import (TableNotFoundError, dictionary_columns,
                                          latest_version, local_data_files, read_table,
                                          write_table)
from tests.submit import submit_env

ROOT = Path(__file__).resolve().parent.parent


def test_session_has_delta_enabled(spark):
    assert jars.DELTA_EXTENSION in spark.conf.get("spark.sql.extensions")
    assert spark.conf.get("spark.sql.catalog.spark_catalog") == jars.DELTA_CATALOG


def test_delta_round_trip_merge_and_time_travel(spark, tmp_path):
    path = str(tmp_path / "t")
    write_table(spark.createDataFrame([(1, "a"), (2, "b")], "id long, v string"), path)
    updates = spark.createDataFrame([(2, "B"), (3, "c")], "id long, v string")
    (DeltaTable.forPath(spark, path).alias("t").merge(updates.alias("u"), "t.id = u.id")
     .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())
    now = {r.id: r.v for r in read_table(spark, path).collect()}
    then = {r.id: r.v for r in read_table(spark, path, version=0).collect()}
    assert now == {1: "a", 2: "B", 3: "c"}
    assert then == {1: "a", 2: "b"}
    assert latest_version(spark, path) == 1
    # a real Delta log: an independent reader sees the commit files and their actions
    log = sorted((tmp_path / "t" / "_delta_log").glob("*.json"))
    assert [p.name for p in log] == ["00000000000000000000.json", "00000000000000000001.json"]
    actions = [json.loads(line) for line in log[1].read_text().splitlines()]
    assert any("commitInfo" in a and a["commitInfo"]["operation"] == "MERGE" for a in actions)


def test_delta_table_is_readable_without_spark(spark, tmp_path):
    """`load_image_table` reads a table Spark + Delta wrote (deltalake, no JVM) as Spark reads
    it: partitioned, after checkpoints with the commits before them cleaned up, and with rows
    deleted through deletion vectors."""
    import numpy as np

    from fastfill_udfs.data import encode_png, load_image_table

    path = str(tmp_path / "imgs")
    rows = [(f"i{k}", k % 3, encode_png(np.full((4, 4), k, dtype=np.uint8)), f"g{k % 2}")
            for k in range(12)]
    schema = "id string, label int, image binary, subgroup string"
    write_table(spark.createDataFrame(rows[:6], schema), path, partition_by=["label"])
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ("
              "'delta.enableDeletionVectors' = 'true', 'delta.checkpointInterval' = '2')")
    write_table(spark.createDataFrame(rows[6:], schema), path, mode="append")  # checkpoint
    spark.sql(f"DELETE FROM delta.`{path}` WHERE id IN ('i1', 'i7', 'i10')")
    log = tmp_path / "imgs" / "_delta_log"
    assert (log / "_last_checkpoint").is_file()
    checkpoint = json.loads((log / "_last_checkpoint").read_text())["version"]
    for commit in log.glob("*.json"):            # what log cleanup leaves: the checkpoint on
        if int(commit.name.split(".")[0]) < checkpoint:
            commit.unlink()
    assert list((tmp_path / "imgs").rglob("deletion_vector_*.bin"))   # DELETE used a vector
    spark_ids = sorted(r.id for r in read_table(spark, path).select("id").collect())
    assert len(spark_ids) == 9

    items, rejected = load_image_table(path, extra_columns=["subgroup"])
    assert sorted(items["id"]) == spark_ids and rejected.empty
    by_id = items.set_index("id")
    assert by_id.loc["i5", "label"] == 2 and by_id.loc["i5", "subgroup"] == "g1"
    assert by_id.loc["i5", "image"] == rows[5][2]
    with pytest.raises(ValueError, match=rf"{path}.*\['nope'\]"):
        load_image_table(path, extra_columns=["nope"])
    (tmp_path / "broken" / "_delta_log").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"Delta table {tmp_path / 'broken'}"):
        load_image_table(tmp_path / "broken")


def test_data_files_of_the_current_version_and_their_dictionary_columns(spark, tmp_path):
    path = str(tmp_path / "t")
    rows = spark.createDataFrame([(str(i), "same") for i in range(50)], "id string, v string")
    spark.conf.set("parquet.enable.dictionary", "true")
    try:
        write_table(rows.coalesce(1), path)
        first = local_data_files(spark, path)
        spark.conf.set("parquet.enable.dictionary", "false")
        write_table(rows.coalesce(1), path)  # overwrite: a new version with a new file
    finally:
        spark.conf.unset("parquet.enable.dictionary")
    now = local_data_files(spark, path)
    assert len(first) == len(now) == 1 and first != now and Path(now[0]).is_file()
    assert "v" in dictionary_columns(first[0])        # the constant column kept its dictionary
    assert dictionary_columns(now[0]) == set()


def test_missing_table_is_named(spark, tmp_path):
    with pytest.raises(TableNotFoundError, match="nothing_here"):
        read_table(spark, str(tmp_path / "nothing_here"))


def test_without_the_delta_jars_a_session_is_refused_naming_the_setup_command(tmp_path):
    """A Python launch whose jar cache (FASTFILL_JAR_CACHE) is empty gets no session without
    Delta: the error names the cache it looked in and the command that fetches the jars,
    `bash scripts/setup.sh`, a script that exists."""
    empty = tmp_path / "empty-cache"
    assert jars.delta_jars_present() and not jars.delta_jars_present(empty)
    probe = ("from fastfill_udfs.spark.session import DeltaUnavailableError, get_spark\n"
             "try:\n    get_spark({'master': 'local[1]'})\n"
             "except DeltaUnavailableError as exc:\n    print('REFUSED:', exc)\n"
             "else:\n    print('STARTED')\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=submit_env(FASTFILL_JAR_CACHE=str(empty)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("REFUSED:"), proc.stdout[-2000:]
    assert str(empty / "jars") in proc.stdout
    assert "`bash scripts/setup.sh`" in proc.stdout and (ROOT / "scripts" / "setup.sh").is_file()
