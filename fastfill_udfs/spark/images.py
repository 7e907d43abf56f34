"""Reading image files referenced by path or URI, through Spark (`binaryFile`, so any Hadoop
file system the cluster is configured for: local, `file:`, `hdfs:`, `s3a:`, `abfss:`, `dbfs:`).

A backfill batch reads exactly its own items' files: the batch's URIs (a bounded list) are
handed to one `binaryFile` read. A URI that does not resolve is not a crash of the batch: it
comes back as a reason naming the URI, and the item goes to quarantine."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from fastfill_udfs.spark.delta_io import hadoop_fs

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _default_fs(spark: SparkSession) -> str:
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    return (conf.get("fs.defaultFS") or "file:///").rstrip("/")


def resolve_uri(uri: str, image_root: str = "") -> str:
    """`uri` joined to `image_root` when it is relative (neither absolute nor with a scheme)."""
    if image_root and not _SCHEME.match(uri) and not uri.startswith("/"):
        return image_root.rstrip("/") + "/" + uri
    return uri


def normalize_uri(uri: str, default_fs: str = "file://") -> str:
    """The form Hadoop (and so `binaryFile`'s `path` column) gives a fully qualified path:
    `file:/abs/x.png` for local files, `scheme://authority/path` otherwise, with repeated
    slashes collapsed. A path without a scheme is taken on `default_fs`."""
    import os

    if not _SCHEME.match(uri) or re.match(r"^[A-Za-z]:[\\/]", uri):
        if default_fs.startswith("file:"):
            return "file:" + re.sub(r"/+", "/", os.path.abspath(uri))
        return default_fs.rstrip("/") + "/" + re.sub(r"/+", "/", uri).lstrip("/")
    scheme, rest = uri.split(":", 1)
    if scheme.lower() == "file":
        rest = re.sub(r"^//(localhost)?(?=/)", "", rest)
        return "file:" + re.sub(r"/+", "/", rest)
    if rest.startswith("//"):
        authority, _, path = rest[2:].partition("/")
        return f"{scheme}://{authority}/" + re.sub(r"/+", "/", path).lstrip("/")
    return f"{scheme}:" + re.sub(r"/+", "/", rest)


def _exists(spark: SparkSession, uris: list[str]) -> list[bool]:
    """Which of `uris` exist, checked through the Hadoop file systems (in parallel threads)."""
    def check(uri: str) -> bool:
        try:
            fs, path = hadoop_fs(spark, uri)
            return bool(fs.isFile(path))
        except Exception:  # a malformed URI or an unknown scheme: it does not resolve
            return False
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(check, uris))


def read_image_files(spark: SparkSession, uris: list[str]) -> tuple[DataFrame, dict[str, str]]:
    """(DataFrame[uri, image] of the files that exist, {uri: reason} of those that do not).

    `uris` should be normalized (`normalize_uri`); one `binaryFile` read covers them all. When
    some do not exist, they are found with one parallel existence check and left out."""
    missing: dict[str, str] = {}
    todo = sorted(set(uris))
    schema = "uri string, image binary"
    for _ in range(3):  # a file may vanish between the check and the read: retry then
        if not todo:
            return spark.createDataFrame([], schema), missing
        try:
            files = spark.read.format("binaryFile").load(todo)
            return files.select(F.col("path").alias("uri"), F.col("content").alias("image")), missing
        except Exception as exc:  # AnalysisException [PATH_NOT_FOUND] names only the first one
            if "PATH_NOT_FOUND" not in str(exc) and "does not exist" not in str(exc):
                raise
        exists = _exists(spark, todo)
        for uri, ok in zip(todo, exists):
            if not ok:
                missing[uri] = f"image file {uri} does not exist or is not a file"
        todo = [u for u, ok in zip(todo, exists) if ok]
    raise RuntimeError(f"image files keep disappearing while being read ({len(todo)} left)")


def attach_images(spark: SparkSession, rows: DataFrame, image_root: str = ""
                  ) -> tuple[DataFrame, DataFrame]:
    """`rows` (with `id` and `image_uri`; a bounded set such as one backfill batch) with their
    file contents as `image`, and DataFrame[id, reason] of the rows whose file is missing.

    The URIs are collected to the driver to name the files of one read, so call it per batch."""
    default_fs = _default_fs(spark)
    pairs = [(r["id"], r["image_uri"]) for r in rows.select("id", "image_uri").collect()]
    norm = {}
    bad = []
    for item_id, uri in pairs:
        if uri is None or not str(uri).strip():
            bad.append((item_id, f"item {item_id!r}: image path is null or empty"))
            continue
        norm[item_id] = normalize_uri(resolve_uri(str(uri), image_root), default_fs)
    files, missing = read_image_files(spark, list(norm.values()))
    bad += [(i, f"item {i!r}: {missing[u]}") for i, u in norm.items() if u in missing]
    keys = spark.createDataFrame([(i, u) for i, u in norm.items() if u not in missing],
                                 "id string, _uri string")
    out = (rows.drop("image").join(keys, "id")
           .join(files.withColumnRenamed("uri", "_uri"), "_uri", "left").drop("_uri"))
    return out, spark.createDataFrame(bad, "id string, reason string")
