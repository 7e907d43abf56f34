"""Backfill the ranked gallery batch by batch with the new model (resumable), evaluating and
logging to MLflow after each batch.

    spark-submit pipelines/backfill.py --config conf/fashion_mnist.yaml --policy uncertainty [--max-batches 5]
    spark-submit pipelines/backfill.py --config conf/my_gallery.yaml --estimate-only
    spark-submit pipelines/backfill.py --config conf/my_gallery.yaml --stop forecast
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.config import BACKFILL_STOPS
from fastfill_udfs.policies import RUN_POLICIES
from fastfill_udfs.spark.jobs import backfill_job

if __name__ == "__main__":
    parser = job_parser(__doc__)
    parser.add_argument("--policy", choices=RUN_POLICIES,
                        help="which run to backfill (default: backfill.policy)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="stop after N batches (a compute budget); a later run continues")
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false", default=None,
                        help="do not evaluate after each batch (run pipelines/evaluate.py later)")
    parser.add_argument("--stop", choices=BACKFILL_STOPS, default=None,
                        help="forecast: stop at the forecast's recommended fraction "
                             "(default: backfill.stop)")
    parser.add_argument("--estimate-only", action="store_true",
                        help="measure the new model's rate on the plan's images, print the "
                             "cost of the rest and of the recommended stop, and exit")
    sys.exit(run_job(parser, lambda cfg, args: backfill_job(
        cfg, policy=args.policy, max_batches=args.max_batches, evaluate=args.evaluate,
        master=args.master, stop=args.stop, estimate_only=args.estimate_only)))
