"""Backfill the ranked gallery batch by batch with the new model (resumable), evaluating and
logging to MLflow after each batch.

    spark-submit pipelines/backfill.py --config conf/fashion_mnist.yaml --policy uncertainty [--max-batches 5]
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.policies import POLICIES
from fastfill_udfs.spark.jobs import backfill_job

if __name__ == "__main__":
    parser = job_parser(__doc__)
    parser.add_argument("--policy", choices=POLICIES,
                        help="which run to backfill (default: backfill.policy)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="stop after N batches (a compute budget); a later run continues")
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false", default=None,
                        help="do not evaluate after each batch (run pipelines/evaluate.py later)")
    sys.exit(run_job(parser, lambda cfg, args: backfill_job(
        cfg, policy=args.policy, max_batches=args.max_batches, evaluate=args.evaluate,
        master=args.master)))
