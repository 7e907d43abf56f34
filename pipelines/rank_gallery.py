"""Score the gallery with h (transformed embedding + sigma), rank it by a policy and write the
backfill plan, the initial gallery features and batch 0 of the backfill log.

    spark-submit pipelines/rank_gallery.py --config conf/fashion_mnist.yaml --policy uncertainty
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.policies import RUN_POLICIES
from fastfill_udfs.spark.jobs import rank_job

if __name__ == "__main__":
    parser = job_parser(__doc__)
    parser.add_argument("--policy", choices=RUN_POLICIES,
                        help="ordering policy (default: backfill.policy)")
    parser.add_argument("--force", action="store_true",
                        help="re-rank even if the run is already ranked (overwrites its tables; "
                             "its backfill starts over, logged in a new MLflow run)")
    sys.exit(run_job(parser, lambda cfg, args: rank_job(
        cfg, policy=args.policy, master=args.master, force=args.force)))
