"""The whole FastFill pipeline on Fashion-MNIST: train, ingest, rank and backfill with
evaluation for each policy, compare in MLflow.

    python pipelines/run_demo.py --config conf/fashion_mnist.yaml
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job

if __name__ == "__main__":
    parser = job_parser(__doc__)
    parser.add_argument("--skip-study", action="store_true",
                        help="reuse the registered models (models.old/new/h) instead of training them again")

    def _demo(cfg, args):
        from fastfill_udfs.demo.run import run_demo

        run_demo(cfg, master=args.master, skip_study=args.skip_study)

    sys.exit(run_job(parser, _demo))
