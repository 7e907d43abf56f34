"""Train the transformation h on the user's own gallery and register it at models.h.

Samples rows, embeds their images with the new model in Spark, trains h (FastFill loss), fits
its order head on held-out pairs, and logs and registers it in MLflow (models.h).

    spark-submit pipelines/train_transformation.py --config conf/my_gallery.yaml [--set transformation.train_rows=20000]
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.spark.jobs import train_transformation_job

if __name__ == "__main__":
    parser = job_parser(__doc__)
    sys.exit(run_job(parser, lambda cfg, args: train_transformation_job(cfg, master=args.master)))
