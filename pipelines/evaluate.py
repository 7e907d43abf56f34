"""Evaluate a backfill run after the fact from its log (Delta time travel), logging every
not-yet-logged step and, once complete, the AUCs and curve to MLflow.

    spark-submit pipelines/evaluate.py --config conf/fashion_mnist.yaml --policy uncertainty
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.policies import RUN_POLICIES
from fastfill_udfs.spark.jobs import evaluate_job

if __name__ == "__main__":
    parser = job_parser(__doc__)
    parser.add_argument("--policy", choices=RUN_POLICIES,
                        help="which run to evaluate (default: backfill.policy)")
    sys.exit(run_job(parser, lambda cfg, args: evaluate_job(
        cfg, policy=args.policy, master=args.master)))
