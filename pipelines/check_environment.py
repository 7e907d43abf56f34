"""Check the stack: Spark with Delta Lake (write, MERGE, time travel), MLflow, torch and faiss.

    spark-submit pipelines/check_environment.py [--config conf/x.yaml] [--set key=value]
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.environment import check_environment

if __name__ == "__main__":
    parser = job_parser(__doc__)
    sys.exit(run_job(parser, lambda cfg, args: check_environment(cfg, master=args.master)))
