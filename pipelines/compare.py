"""Compare backfill runs from MLflow: print a table (policy, AUCs, mAP at t=0 and at the end)
and write an overlay plot of their curves. Only rankings current in Delta are compared; the
runs left out are listed with the reason.

    python pipelines/compare.py --config conf/fashion_mnist.yaml [--run-prefix demo]
    python pipelines/compare.py --filter "tags.fastfill.policy = 'uncertainty'" --run-prefix ''
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job


def build_parser():
    parser = job_parser(__doc__)
    parser.add_argument("--run-prefix", default=None,
                        help="only runs named <prefix>_<policy> (default: run_name; '' = all)")
    parser.add_argument("--filter", dest="filter_string", default=None,
                        help="an MLflow search filter on the backfill runs, e.g. "
                             "\"tags.fastfill.policy = 'uncertainty'\" or \"metrics.mAP_auc > 0.7\"")
    return parser


def _compare(cfg, args):
    from fastfill_udfs.compare import compare
    from fastfill_udfs.reporting import markdown_table

    prefix = cfg.get_path("run_name") if args.run_prefix is None else args.run_prefix
    try:
        found = compare(cfg, run_prefix=prefix or None, filter_string=args.filter_string)
    except ValueError as exc:  # an invalid --filter: MLflow's message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for r in found.left_out.itertuples():
        print(f"left out: {r.run} (MLflow run {r.mlflow_run_id}): {r.reason}")
    if found.plot is None:
        print("no current backfill runs with a curve in MLflow"
              + (f" matching {args.filter_string!r}" if args.filter_string else "")
              + ": run pipelines/backfill.py first")
        return
    print(markdown_table(found.table))
    print(f"\nplot: {found.plot}")


if __name__ == "__main__":
    sys.exit(run_job(build_parser(), _compare))
