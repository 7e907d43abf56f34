"""Search a backfill run's gallery (new and transformed items mixed) with one query, at its
latest or any earlier committed batch: prints the top-k ids, scores, labels and, for each hit,
whether it is `new` or `transformed` and the model version that made its vector.

    spark-submit pipelines/search.py --config conf/fashion_mnist.yaml --policy uncertainty --image img.png
    spark-submit pipelines/search.py --config conf/fashion_mnist.yaml --id test-000042 --batch 3
    python pipelines/search.py --config conf/fashion_mnist.yaml --embedding q.npy --k 5
    python pipelines/search.py ... --export warehouse            # also save the servable index
    python pipelines/search.py ... --index DIR_OR_runs:/URI --batch 3 --image img.png   # no Spark
    python pipelines/search.py --config conf/fashion_mnist.yaml --serving --id t10k_00042   # what is published

Exit codes: 0 done, 2 config error or bad query, 4 refused (saved index of another run, batch or
Delta version; another new model than the run's; run not ranked)."""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.config import EXPORT_TARGETS
from fastfill_udfs.policies import RUN_POLICIES


def main(argv=None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--policy", choices=RUN_POLICIES,
                        help="which run to search (default: backfill.policy)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="an image file, embedded by the run's new model")
    query.add_argument("--id", dest="item_id", help="an item id (its new-model embedding)")
    query.add_argument("--embedding", help="numbers separated by commas or spaces, or a "
                                           ".npy / .txt file")
    parser.add_argument("--batch", type=int, default=None,
                        help="committed batch to search (default: the latest; 0 = as ranked)")
    parser.add_argument("--k", type=int, default=None, help="hits (default: search.topk)")
    parser.add_argument("--index", default=None,
                        help="a saved servable index (folder, warehouse URI or MLflow runs:/ "
                             "URI) instead of building it from Delta")
    parser.add_argument("--export", choices=EXPORT_TARGETS, default=None,
                        help="also write the index built from Delta")
    parser.add_argument("--serving", action="store_true",
                        help="search the index the serving alias points at (pipelines/publish.py)")
    parser.add_argument("--alias", default=None,
                        help="with --serving: the alias (default: serving.alias)")

    def job(cfg, args):
        from fastfill_udfs.spark.search import search_job

        return search_job(cfg, policy=args.policy, image=args.image, item_id=args.item_id,
                          embedding=args.embedding, batch=args.batch, k=args.k,
                          index=args.index, export=args.export, serving=args.serving,
                          alias=args.alias, master=args.master)

    from fastfill_udfs.search import IndexMismatchError, QueryModelMismatchError

    try:
        return run_job(parser, job, argv)
    except (IndexMismatchError, QueryModelMismatchError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 4
    except (ValueError, FileNotFoundError) as exc:   # a bad query, batch or setting: no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
