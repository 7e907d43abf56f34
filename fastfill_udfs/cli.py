"""Shared command-line plumbing for the `pipelines/` entrypoints: config layering and logging."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from fastfill_udfs.config import Config, ConfigError, add_config_arguments, config_from_args


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
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


def run_job(parser: argparse.ArgumentParser, job: Callable[[Config, argparse.Namespace], object],
            argv: Sequence[str] | None = None) -> int:
    """Parse args, load config and run `job(cfg, args)`; config errors exit 2 with the message."""
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    job(cfg, args)
    return 0
