"""Compare backfill runs from MLflow: print a table (policy, AUCs, mAP at t=0 and at the end)
and write an overlay plot of their curves.

    python pipelines/compare.py --config conf/fashion_mnist.yaml [--run-prefix demo]
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job


def _compare(cfg, args):
    from fastfill_udfs.compare import compare_runs
    from fastfill_udfs.reporting import markdown_table

    table, png = compare_runs(cfg, run_prefix=args.run_prefix or cfg.get_path("run_name"))
    if png is None:
        print("no backfill runs in MLflow yet: run pipelines/backfill.py first")
        return
    print(markdown_table(table))
    print(f"\nplot: {png}")


if __name__ == "__main__":
    parser = job_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--run-prefix", default=None,
                        help="only runs named <prefix>_<policy> (default: run_name)")
    sys.exit(run_job(parser, _compare))
