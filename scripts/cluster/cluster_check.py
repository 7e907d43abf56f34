"""Check a Spark cluster before running the pipeline on it (spark-submit this file):

* executors registered: how many, and where they run (each executor's working directory lies in
  its worker's folder, so two workers show up as two different worker folders);
* the package reaches the executors the way it would on a real cluster (--py-files): the
  executors import `fastfill_udfs` and report the file it came from;
* Delta works on the executors: a MERGE (which runs on executors) into a scratch table, checked.
(The project's Arrow UDFs then run on the executors in rank_gallery and backfill.)

    spark-submit --master spark://127.0.0.1:7077 --py-files fastfill_udfs.zip \
        scripts/cluster/cluster_check.py --scratch /tmp/x [--expect-executors 2]

Prints one line `CLUSTER_CHECK {json}` and exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _executor_report(_):
    import socket

    import fastfill_udfs
    from pyspark import TaskContext

    ctx = TaskContext.get()
    yield {"cwd": os.getcwd(), "pid": os.getpid(), "host": socket.gethostname(),
           "python": sys.executable, "fastfill_udfs": fastfill_udfs.__file__,
           "partition": ctx.partitionId() if ctx else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", required=True, help="folder for the scratch Delta table")
    ap.add_argument("--expect-executors", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=90.0,
                    help="seconds to wait for the executors to register")
    args = ap.parse_args(argv)

    from fastfill_udfs.spark.session import get_spark

    spark = get_spark({})
    sc = spark.sparkContext
    sc.setLogLevel("WARN")
    out: dict = {"master": sc.master, "app_id": sc.applicationId, "ok": False}

    deadline = time.monotonic() + args.timeout
    n_exec = 0
    while time.monotonic() < deadline:
        # block managers known to the driver: the driver's own plus one per executor
        n_exec = sc._jsc.sc().getExecutorMemoryStatus().size() - 1
        if n_exec >= args.expect_executors:
            break
        time.sleep(1.0)
    out["executors"] = n_exec

    n_tasks = 4 * max(1, args.expect_executors)
    reports = sc.parallelize(range(n_tasks), n_tasks).mapPartitions(_executor_report).collect()
    workers = sorted({r["cwd"].split(os.sep + "app-")[0] for r in reports})
    out["executor_dirs"] = workers
    out["executor_pythons"] = sorted({r["python"] for r in reports})
    out["executor_package_files"] = sorted({r["fastfill_udfs"] for r in reports})
    out["package_from_py_files"] = all(".zip" in f for f in out["executor_package_files"])

    # Delta MERGE: the join and the rewrite of the data files run in executor tasks.
    from delta.tables import DeltaTable

    path = os.path.join(os.path.abspath(args.scratch), "merge_check")
    spark.range(0, 1000, 1, 4).selectExpr("id", "0 AS v").write.format("delta") \
        .mode("overwrite").save(path)
    updates = spark.range(0, 1000, 1, 4).where("id % 10 = 0").selectExpr("id", "1 AS v")
    (DeltaTable.forPath(spark, path).alias("t").merge(updates.alias("u"), "t.id = u.id")
     .whenMatchedUpdate(set={"v": "u.v"}).execute())
    merged = spark.read.format("delta").load(path).groupBy().sum("v").first()[0]
    out["delta_merge_ok"] = merged == 100

    out["ok"] = bool(n_exec >= args.expect_executors
                     and len(workers) >= min(args.expect_executors, 2)
                     and out["delta_merge_ok"])
    print("CLUSTER_CHECK " + json.dumps(out), flush=True)
    print(f"[cluster-check] {n_exec} executor(s) registered with the driver; executors ran in "
          f"{len(workers)} worker folder(s): {workers}")
    print(f"[cluster-check] executors import fastfill_udfs from {out['executor_package_files']} "
          f"(from --py-files: {out['package_from_py_files']}); python {out['executor_pythons']}")
    print(f"[cluster-check] Delta MERGE on executors: {'ok' if out['delta_merge_ok'] else 'FAILED'}")
    spark.stop()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
