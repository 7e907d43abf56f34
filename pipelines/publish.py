"""Point the serving alias at a run's servable index, atomically; or roll it back.

    spark-submit pipelines/publish.py --config conf/fashion_mnist.yaml --policy uncertainty            # as it is now
    spark-submit pipelines/publish.py --config conf/fashion_mnist.yaml --policy uncertainty --to 3     # after batch 3
    spark-submit pipelines/publish.py --config conf/fashion_mnist.yaml --rollback                      # the state before

The alias is a row of the Delta table <warehouse>/serving (serving.alias, or --alias); one
commit moves it, and `pipelines/search.py --serving` searches what it points at. Exit codes: 0
done, 2 config error or a batch not committed / nothing to roll back to, 3 the alias kept
moving under it (another publish), 4 refused (run not ranked, nothing published)."""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job


def main(argv=None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--policy", choices=["uncertainty", "random"],
                        help="which run to publish (default: backfill.policy)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--to", "--batch", dest="batch", type=int, default=None,
                       help="publish the run as it was after this committed batch (default: "
                            "as it is now: its latest batch and the syncs since)")
    which.add_argument("--rollback", action="store_true",
                       help="point the alias back at the state it had before")
    parser.add_argument("--alias", default=None, help="the alias (default: serving.alias)")

    def job(cfg, args):
        from fastfill_udfs.spark.serving import publish_job

        return publish_job(cfg, policy=args.policy, batch=args.batch, alias=args.alias,
                           do_rollback=args.rollback, master=args.master)

    try:
        return run_job(parser, job, argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
