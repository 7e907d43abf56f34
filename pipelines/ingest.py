"""Ingest a dataset into the gallery, queries and query_features Delta tables.

    spark-submit pipelines/ingest.py [--config conf/fashion_mnist.yaml] [--set data.test_limit=2000]
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.spark.jobs import ingest_job

if __name__ == "__main__":
    parser = job_parser(__doc__)
    sys.exit(run_job(parser, lambda cfg, args: ingest_job(cfg, master=args.master)))
