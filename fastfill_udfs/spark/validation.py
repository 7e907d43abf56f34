"""Up-front checks on Spark tables: clear errors naming the table, ids or sizes, and the
row-count reconciliation that every job runs after it commits."""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


class ReconciliationError(RuntimeError):
    """Row counts across the contract's tables do not add up."""


def check_gallery(df: DataFrame, what: str, column: str = "id") -> int:
    """One aggregate pass: raise ValueError for an empty table, null ids or duplicated ids
    (naming up to 5 and how many); returns the row count."""
    row = df.agg(F.count(F.lit(1)).alias("n"), F.count_distinct(column).alias("distinct"),
                 F.sum(F.col(column).isNull().cast("long")).alias("nulls")).first()
    if row["n"] == 0:
        raise ValueError(f"{what} is empty: nothing to rank or backfill")
    if row["nulls"]:
        raise ValueError(f"{what} has {row['nulls']} rows with a null {column}")
    if row["distinct"] < row["n"]:
        check_unique_ids(df, what, column)
    return int(row["n"])


def check_unique_ids(df: DataFrame, what: str, column: str = "id") -> None:
    """Raise ValueError listing up to 5 duplicated ids (and how many there are)."""
    dupes = df.groupBy(column).count().where("count > 1")
    sample = [r[column] for r in dupes.limit(5).collect()]
    if sample:
        raise ValueError(f"{what} has {dupes.count()} duplicated {column}s, e.g. {sample}; "
                         f"ids must be unique")
    null_ids = df.where(F.col(column).isNull()).count()
    if null_ids:
        raise ValueError(f"{what} has {null_ids} rows with a null {column}")


def check_embedding_dim(df: DataFrame, column: str, expected: int, what: str,
                        model_name: str) -> None:
    """Raise ValueError when the most common embedding size in `column` is not the model's
    input size (a model/gallery mismatch, not a per-row problem)."""
    sizes = (df.select(F.size(column).alias("dim")).where("dim >= 0")
             .groupBy("dim").count().orderBy(F.desc("count")).limit(3).collect())
    if sizes and sizes[0]["dim"] != expected:
        found = ", ".join(f"{r['dim']} ({r['count']} rows)" for r in sizes)
        raise ValueError(f"{model_name} expects {column} of dimension {expected}, but {what} "
                         f"holds embeddings of dimension {found}: wrong model for this gallery?")


def reconcile(counts: dict[str, int], equal: list[tuple[str, str]]) -> None:
    """Raise ReconciliationError unless each (a, b) pair of named counts is equal.

    A name may be a sum such as 'backfill_plan+quarantine'."""
    def value(name: str) -> int:
        return sum(counts[part] for part in name.split("+"))
    problems = [f"{a} = {value(a)} but {b} = {value(b)}" for a, b in equal if value(a) != value(b)]
    if problems:
        raise ReconciliationError("row counts do not reconcile: " + "; ".join(problems))
