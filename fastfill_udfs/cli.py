"""Shared command-line plumbing for the `pipelines/` entrypoints: config layering and logging."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from fastfill_udfs.config import Config, ConfigError, add_config_arguments, config_from_args


def job_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a `pipelines/` job; its --help description is the first paragraph of
    `doc` (the job's docstring), whose sentence often runs over two lines."""
    parser = argparse.ArgumentParser(description=" ".join(doc.strip().split("\n\n")[0].split()))
    add_config_arguments(parser)
    parser.add_argument("--master", default=None,
                        help="Spark master URL (overrides spark.master and spark-submit's)")
    return parser


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("py4j", "alembic", "mlflow.store", "matplotlib", "urllib3", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


EXIT_CONFIG, EXIT_REFUSED, EXIT_BUSY = 2, 4, 3


def run_job(parser: argparse.ArgumentParser, job: Callable[[Config, argparse.Namespace], object],
            argv: Sequence[str] | None = None) -> int:
    """Parse args, load config and run `job(cfg, args)`. Exit codes: 0 done, 2 config error,
    3 another job holds the run, 4 refused (stale plan, other model, missing model or table),
    143 stopped by SIGTERM; each with its message on stderr. Other errors propagate
    (traceback, exit 1)."""
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from fastfill_udfs.spark.lease import RunBusyError
    from fastfill_udfs.spark.run_status import JobTerminated, refusal_errors

    try:
        job(cfg, args)
    except RunBusyError as exc:
        print(f"busy: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except refusal_errors() as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except JobTerminated as exc:  # SIGTERM: the run's MLflow status says KILLED
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    return 0
