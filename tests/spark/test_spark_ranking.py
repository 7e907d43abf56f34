"""The distributed sort behind `backfill_plan`: `assign_ranks` and `batch_id_column` on a small
DataFrame spread over several partitions agree with the pure-numpy policies module."""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F

from fastfill_udfs import policies
from fastfill_udfs.spark.rank import assign_ranks, batch_id_column

N = 53


@pytest.fixture
def many_partitions(spark):
    """Sort into several shuffle partitions and keep them (no AQE coalescing), so ranks really
    are stitched together from per-partition offsets."""
    keys = ("spark.sql.shuffle.partitions", "spark.sql.adaptive.coalescePartitions.enabled")
    before = {k: spark.conf.get(k, None) for k in keys}
    spark.conf.set(keys[0], "5")
    spark.conf.set(keys[1], "false")
    yield
    for k, v in before.items():
        if v is None:
            spark.conf.unset(k)
        else:
            spark.conf.set(k, v)


@pytest.fixture
def scored(spark):
    rng = np.random.default_rng(7)
    # few distinct scores -> many ties, broken by id ascending; ids not in score order
    scores = rng.integers(0, 6, N).astype(float) / 4.0
    ids = [f"item-{i:03d}" for i in rng.permutation(N)]
    df = spark.createDataFrame(list(zip(ids, scores.tolist())), "id string, score double")
    return df.repartition(4), np.array(ids), scores


BATCHINGS = {"bs10": {"batch_size": 10}, "bs_all": {"batch_size": N},
             "bs_over": {"batch_size": 4 * N},
             "nb4": {"num_batches": 4}, "nb7": {"num_batches": 7}, "nb_all": {"num_batches": N},
             "nb1": {"num_batches": 1}}


def _cached_plans(spark) -> int:
    """How many DataFrames are cached in this session (the JVM CacheManager's entries)."""
    return spark._jsparkSession.sharedState().cacheManager().numCachedEntries()


def test_assign_ranks_and_batch_ids_match_policies(spark, scored, many_partitions):
    df, ids, scores = scored
    cached_before = _cached_plans(spark)
    with assign_ranks(df) as ranked:
        for name, batching in BATCHINGS.items():
            ranked = ranked.withColumn(name, batch_id_column(F.col("rank"), N, **batching))
        pdf = ranked.withColumn("part", F.spark_partition_id()).toPandas()
        assert _cached_plans(spark) == cached_before + 1   # the sorted rows, while in use
    assert _cached_plans(spark) == cached_before            # ... released afterwards
    # several sorted partitions contributed rows: ranks were stitched from per-partition offsets
    assert pdf["part"].nunique() > 1

    # ranks: a permutation of 0..N-1 in (score desc, id asc) order
    assert len(pdf) == N and sorted(pdf["rank"]) == list(range(N))
    by_rank = pdf.sort_values("rank")
    expected = policies.rank_order(scores, ids)
    assert by_rank["id"].tolist() == ids[expected].tolist()
    assert by_rank["score"].tolist() == scores[expected].tolist()
    # ranks grow with the partition index (range-partitioned sort)
    assert by_rank["part"].is_monotonic_increasing

    # batch ids: the same rule as policies, by size and by count (uneven last batches)
    ranks = by_rank["rank"].to_numpy()
    for name, batching in BATCHINGS.items():
        got = by_rank[name].to_numpy()
        assert by_rank[name].dtype.kind == "i", name
        np.testing.assert_array_equal(got, policies.batch_id_for_rank(ranks, N, **batching),
                                      err_msg=name)
        np.testing.assert_array_equal(np.bincount(got)[1:], policies.batch_sizes(N, **batching),
                                      err_msg=name)


def test_batch_id_column_rejects_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        batch_id_column(F.col("rank"), 10)
    with pytest.raises(ValueError, match="exactly one"):
        batch_id_column(F.col("rank"), 10, batch_size=2, num_batches=2)
    with pytest.raises(ValueError, match="batch_size"):
        batch_id_column(F.col("rank"), 10, batch_size=0)
    with pytest.raises(ValueError, match="num_batches"):
        batch_id_column(F.col("rank"), 10, num_batches=11)
