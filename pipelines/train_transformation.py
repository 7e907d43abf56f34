"""Train the transformation h on the user's own gallery: sample rows, embed their images with the
new model in Spark, train h (FastFill loss) and log and register it in MLflow (models.h).

    spark-submit pipelines/train_transformation.py --config conf/my_gallery.yaml [--set transformation.train_rows=20000]
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.spark.jobs import train_transformation_job

if __name__ == "__main__":
    parser = job_parser(__doc__.strip().splitlines()[0])
    sys.exit(run_job(parser, lambda cfg, args: train_transformation_job(cfg, master=args.master)))
