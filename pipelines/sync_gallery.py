"""Bring the gallery and its backfill runs up to date with your source table: rows added since
the last sync are embedded by the new model on arrival (or transformed by h and queued by
their score, `--set sync.mode=transform`), changed rows are embedded again, deleted rows leave
the features, the plan and the index. It may run while a backfill works on the same run.

    spark-submit pipelines/sync_gallery.py --config conf/my_gallery.yaml              # every ranked run
    spark-submit pipelines/sync_gallery.py --config conf/my_gallery.yaml --policy uncertainty

Reads the source's Delta Change Data Feed when it has one, else compares it with the gallery by
id (Parquet, CDF off), and says which. Exit codes: 0 done, 2 config error, 3 another sync holds
the gallery (or a concurrent job kept winning the same Delta commit), 4 refused (gallery
re-ingested since the run was ranked, another new model or h than the run's)."""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job


def main(argv=None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--policy", choices=["uncertainty", "random"],
                        help="the run to bring along (default: every ranked run of run_name)")
    parser.add_argument("--mode", choices=["embed", "transform"], default=None,
                        help="added and changed items: embedded now, or h(old) and queued "
                             "(default: sync.mode)")

    def job(cfg, args):
        from fastfill_udfs.spark.sync import sync_job

        return sync_job(cfg, policy=args.policy, mode=args.mode, master=args.master)

    try:
        return run_job(parser, job, argv)
    except ValueError as exc:   # a bad source row set (duplicated ids, emptied gallery)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
