"""Train the old/new models and h (FCT and FastFill) and compare backfilling orders (the study).

    python pipelines/run_study.py --config conf/fashion_mnist.yaml [--set key=value ...]
    spark-submit pipelines/run_study.py --config conf/fashion_mnist.yaml

Logs an MLflow run "study" (loss curves, reference points, AUCs, the models), registers the old
model, the new model and h where models.old / models.new / models.h point (the Spark jobs load
them from there), and writes <paths.outputs>/study/ (CSV tables, study.md, curves.png,
loss_curves.png). Needs no Spark session.
"""
import _bootstrap  # noqa: F401

import sys

from fastfill_udfs.cli import job_parser, run_job
from fastfill_udfs.demo.study_job import run_study_job

if __name__ == "__main__":
    parser = job_parser(__doc__)
    sys.exit(run_job(parser, lambda cfg, args: run_study_job(cfg)))
