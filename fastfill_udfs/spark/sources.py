"""Reading a user's tables and image folders into DataFrames of the data contract's shape:
`id` string, `label` int (nullable), `subgroup` string (nullable), the image as `image`
(encoded bytes) or `image_uri` (a path or URI, read at backfill time), `old_embedding`
array<float> where the source has one, and every other column carried along untouched.

Nothing here collects the source to the driver; bad rows come back as DataFrame[id, reason]
for the quarantine table."""
from __future__ import annotations

from typing import Mapping

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from fastfill_udfs.config import TABLE_FORMATS, Config
from fastfill_udfs.spark.delta_io import (TableNotFoundError, hadoop_fs, is_delta_table,
                                          latest_version)

CONTRACT_COLUMNS = ("id", "label", "subgroup", "image", "image_uri", "old_embedding")


def read_source_table(spark: SparkSession, path: str, fmt: str = "auto",
                      key: str = "data.gallery_table") -> DataFrame:
    """The Delta or Parquet table at `path` (`fmt` auto: Delta when it has a `_delta_log`).

    Raises ValueError for an empty `path` or unknown `fmt`, TableNotFoundError naming the path
    and the config `key` when nothing readable is there."""
    if not path:
        raise ValueError(f"{key} is empty: name the table's path")
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"data.table_format must be one of {TABLE_FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = "delta" if is_delta_table(spark, path) else "parquet"
    try:
        return spark.read.format(fmt).load(path)
    except Exception as exc:  # AnalysisException: path missing, not Parquet, ...
        raise TableNotFoundError(f"{key} = {path}: cannot read it as a {fmt} table: "
                                 f"{str(exc).splitlines()[0]}") from None


def conform(df: DataFrame, columns: Mapping[str, str], where: str, *,
            old_embedding: bool, image: bool = True) -> tuple[DataFrame, DataFrame]:
    """Rename the user's columns (`columns`: contract name -> the user's column, "" = absent for
    label / subgroup) to the contract's and type them; other columns pass through untouched.

    Returns (rows, bad[id, reason]): rows with a null id, or a label that is not an integer,
    go to `bad`. Raises ValueError naming the column and `where` when a required column is
    missing or of the wrong type, or an extra column collides with a contract name."""
    present = set(df.columns)

    def need(key: str) -> str:
        name = columns.get(key) or ""
        if name not in present:
            raise ValueError(f"{where} has no column {name!r} (data.columns.{key}); its columns "
                             f"are {sorted(present)}")
        return name

    id_col = need("id")
    mapped = {id_col: "id"}
    out = [F.col(f"`{id_col}`").cast("string").alias("id")]
    label_col = columns.get("label") or ""
    if label_col and label_col in present:
        mapped[label_col] = "label"
        out.append(F.col(f"`{label_col}`").alias("_label_raw"))
    else:
        out.append(F.lit(None).alias("_label_raw"))
    sub_col = columns.get("subgroup") or ""
    if sub_col and sub_col in present:
        mapped[sub_col] = "subgroup"
        out.append(F.col(f"`{sub_col}`").cast("string").alias("subgroup"))
    else:
        out.append(F.lit(None).cast("string").alias("subgroup"))
    if image:
        img_col = need("image")
        mapped[img_col] = "image"
        img_type = df.schema[img_col].dataType
        if isinstance(img_type, T.BinaryType):
            out.append(F.col(f"`{img_col}`").alias("image"))
        elif isinstance(img_type, T.StringType):
            out.append(F.col(f"`{img_col}`").alias("image_uri"))
        else:
            raise ValueError(f"{where}: column {img_col!r} (data.columns.image) must be binary "
                             f"(encoded image bytes) or string (a path or URI), got "
                             f"{img_type.simpleString()}")
    if old_embedding:
        emb_col = need("old_embedding")
        mapped[emb_col] = "old_embedding"
        emb_type = df.schema[emb_col].dataType
        if not (isinstance(emb_type, T.ArrayType)
                and isinstance(emb_type.elementType, (T.FloatType, T.DoubleType))):
            raise ValueError(f"{where}: column {emb_col!r} (data.columns.old_embedding) must be "
                             f"array<float> or array<double>, got {emb_type.simpleString()}")
        out.append(F.col(f"`{emb_col}`").cast("array<float>").alias("old_embedding"))
    extras = [c for c in df.columns if c not in mapped]
    clash = [c for c in extras if c in CONTRACT_COLUMNS or c.startswith("_label")]
    if clash:
        raise ValueError(f"{where}: columns {clash} clash with the data contract's names; "
                         "map them in data.columns or rename them")
    typed = df.select(*out, *[F.col(f"`{c}`") for c in extras])
    label_int = F.col("_label_raw").try_cast("int")
    reason = (F.when(F.col("id").isNull(), F.lit("id is null"))
              .when(F.col("_label_raw").isNotNull() & label_int.isNull(),
                    F.concat(F.lit("label "), F.col("_label_raw").cast("string"),
                             F.lit(" is not an integer")))
              .when(label_int < 0, F.concat(F.lit("label "), label_int.cast("string"),
                                            F.lit(" is negative"))))
    typed = typed.withColumn("_reason", reason).withColumn("label", label_int).drop("_label_raw")
    ordered = ["id", "label", "subgroup"] + [c for c in typed.columns
                                             if c not in ("id", "label", "subgroup", "_reason")]
    good = typed.where("_reason IS NULL").select(*ordered)
    bad = typed.where("_reason IS NOT NULL").select(
        F.coalesce(F.col("id"), F.lit("<null id>")).alias("id"), F.col("_reason").alias("reason"))
    return good, bad


def hadoop_qualified(spark: SparkSession, path: str) -> str:
    """`path` fully qualified by its Hadoop file system (`/x` -> `file:/x` on a local FS)."""
    fs, p = hadoop_fs(spark, path)
    return str(fs.makeQualified(p).toString())


def read_image_folder(spark: SparkSession, root: str) -> tuple[DataFrame, DataFrame]:
    """An image folder `root/<class>/**/<file>` read with `binaryFile` (class = the first folder
    name, label = its position in sorted order; id = the path relative to `root`).

    Returns (items[id, label, class_name, image_uri, content], bad[id, reason] for files lying
    directly in `root`). Only the class names reach the driver. Raises FileNotFoundError naming
    `root` when it does not exist, ValueError when it holds no class folders."""
    try:
        files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                 .load(root))
    except Exception as exc:
        raise FileNotFoundError(f"data.image_folder = {root}: cannot list it: "
                                f"{str(exc).splitlines()[0]}") from None
    prefix = hadoop_qualified(spark, root).rstrip("/") + "/"
    rel = F.expr(f"substring(path, {len(prefix) + 1})")
    files = files.withColumn("_rel", rel).withColumn("class_name", F.split("_rel", "/")[0])
    in_class = F.instr(F.col("_rel"), "/") > 0
    bad = files.where(~in_class).select(F.col("_rel").alias("id"), F.lit(
        "file is not inside a class sub-folder").alias("reason"))
    classes = sorted(r["class_name"] for r in files.where(in_class).select("class_name")
                     .distinct().collect())
    if not classes:
        raise ValueError(f"data.image_folder = {root} has no class sub-folders holding files "
                         "(expected root/<class>/<image>)")
    labels = spark.createDataFrame(list(zip(classes, range(len(classes)))),
                                   "class_name string, label int")
    items = (files.where(in_class).join(F.broadcast(labels), "class_name")
             .select(F.col("_rel").alias("id"), "label", "class_name",
                     F.col("path").alias("image_uri"), "content"))
    return items, bad


def derived_subgroups(df: DataFrame, cfg: Config) -> DataFrame:
    """Fill a null `subgroup` from `data.subgroups` (minority classes vs the rest)."""
    sub = cfg.get_path("data.subgroups")
    if not sub["minority_classes"]:
        return df
    derived = F.when(F.col("label").isin([int(c) for c in sub["minority_classes"]]),
                     F.lit(sub["minority_name"])).otherwise(F.lit(sub["majority_name"]))
    return df.withColumn("subgroup", F.coalesce(F.col("subgroup"),
                                                F.when(F.col("label").isNotNull(), derived)))


def source_table(spark: SparkSession, cfg: Config) -> tuple[str, bool]:
    """(data.gallery_table resolved, whether it is a Delta table). Raises ValueError unless
    data.dataset is gallery_table, TableNotFoundError naming a missing table."""
    if cfg.get_path("data.dataset") != "gallery_table":
        raise ValueError("sync_gallery follows a source table: set data.dataset=gallery_table "
                         f"(it is {cfg.get_path('data.dataset')!r}; image sources are "
                         "re-ingested instead)")
    path = cfg.resolve_path("data.gallery_table")
    read_source_table(spark, path, cfg.get_path("data.table_format"))  # names a missing table
    fmt = cfg.get_path("data.table_format")
    return path, fmt == "delta" or (fmt == "auto" and is_delta_table(spark, path))


def source_marker(spark: SparkSession, cfg: Config) -> dict:
    """What `ingest` records in the gallery's commit so the first sync can read the source's
    Change Data Feed from there: the source table and (Delta) its version, read before the
    copy (a later version would hide changes; an earlier one only repeats some)."""
    if cfg.get_path("data.dataset") != "gallery_table":
        return {}
    path, is_delta = source_table(spark, cfg)
    return {"source_table": path,
            "source_version": latest_version(spark, path) if is_delta else None}
