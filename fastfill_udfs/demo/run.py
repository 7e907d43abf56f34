"""The README's main command: the whole pipeline on Fashion-MNIST in one process.

study (train old/new/h, register them in MLflow) -> ingest -> for each policy: rank_gallery, backfill
every batch with evaluation -> compare. Each step is the same function its own
`pipelines/<job>.py` calls, so every step can also be run (and rerun) on its own."""
from __future__ import annotations

import logging
import time

from fastfill_udfs.config import Config
from fastfill_udfs.progress import format_seconds

log = logging.getLogger(__name__)


def run_demo(cfg: Config, *, master: str | None = None, skip_study: bool = False) -> dict:
    from fastfill_udfs.compare import compare_runs
    from fastfill_udfs.reporting import markdown_table
    from fastfill_udfs.spark.jobs import backfill_job, ingest_job, rank_job
    from fastfill_udfs.demo.study_job import run_study_job
    from fastfill_udfs.tracking import (BACKFILL_VIEW, configure_mlflow, experiment_url,
                                        tracking_uri_for)

    start, timings = time.monotonic(), {}

    def step(name, fn, *args, **kwargs):
        t0 = time.monotonic()
        log.info("=== %s ===", name)
        out = fn(*args, **kwargs)
        timings[name] = time.monotonic() - t0
        log.info("=== %s done in %s ===", name, format_seconds(timings[name]))
        return out

    if not skip_study:
        step("study: train models and simulate curves", run_study_job, cfg)
    step("ingest", ingest_job, cfg, master=master)
    for policy in cfg.get_path("backfill.policies"):
        # the ingest above wrote a new gallery version: earlier ranks of these runs are stale
        step(f"rank ({policy})", rank_job, cfg, policy=policy, master=master, force=True)
        step(f"backfill + evaluate ({policy})", backfill_job, cfg, policy=policy, evaluate=True,
             master=master)
    table, png = step("compare", compare_runs, cfg, run_prefix=cfg.get_path("run_name"))
    uri = tracking_uri_for(cfg)
    print("\nBackfill runs (Spark pipeline, MLflow):\n" + markdown_table(table))
    print(f"\ncomparison plot: {png}")
    print(f"MLflow UI:       .venv/bin/mlflow ui --backend-store-uri {uri}  then open\n"
          f"                 {experiment_url('http://127.0.0.1:5000', configure_mlflow(cfg), view=BACKFILL_VIEW)}")
    print(f"total time:      {format_seconds(time.monotonic() - start)} "
          + "(" + ", ".join(f"{k}: {format_seconds(v)}" for k, v in timings.items()) + ")")
    return {"table": table, "plot": png, "timings": timings}
