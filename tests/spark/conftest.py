"""Shared, expensive setup for the Spark pipeline tests, done once per test session:

- `pipeline_env`: tiny models trained by the real study job (registered in the env's MLflow
  store, where models.old/new/h point) and one
  ingest of a 300-item Fashion-MNIST gallery into a private warehouse + MLflow store.
- `make_cfg(run_name, *overrides)`: a config on that warehouse, models and MLflow store; tests
  that create per-run tables use their own `run_name` so they never see each other's tables.
- `e2e_run`: the reference run (uncertainty policy): rank, then backfill every batch with
  evaluation, through the same job functions the `pipelines/` entrypoints call.
- `own_gallery`: a foreign user's gallery (own_gallery_data.py) through the README's "Your own
  gallery" commands, each a plain spark-submit: ingested, h trained, run `products_auto`
  (the default policy) ranked, backfilled and evaluated; `make_cfg(run_name)` for runs of its
  own on that gallery and h.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import FASHION_MNIST_DIR, FMNIST_INSTALLED, REQUIRE_DATA
N_GALLERY = 300
BATCH_SIZE = 100
N_BATCHES = 3  # N_GALLERY / BATCH_SIZE

# Tiny but real: 1-epoch CNNs with a few channels, a narrow h trained for 2 epochs.
TINY = [
    "data.train_limit=600", f"data.test_limit={N_GALLERY}",
    "demo.old_model.channels=[4, 8]", "demo.old_model.embedding_dim=16",
    "demo.new_model.channels=[4, 8]", "demo.new_model.embedding_dim=24",
    "transformation.hidden_dim=32", "transformation.epochs=2",
    "transformation.batch_size=128", "transformation.objective=fastfill",
    f"backfill.batch_size={BATCH_SIZE}", "backfill.num_batches=0", "backfill.max_batches=0",
    "backfill.inference_batch_size=64", "backfill.device=cpu",
    "study.policies=[fastfill_uncertainty]",
]


@dataclass
class PipelineEnv:
    root: Path
    make_cfg: Callable
    ingest_counts: dict
    study: dict


@pytest.fixture(scope="session")
def pipeline_env(spark, tmp_path_factory) -> PipelineEnv:
    from fastfill_udfs.config import load_config
    from fastfill_udfs.spark.jobs import ingest_job
    from fastfill_udfs.demo.study_job import run_study_job

    if not FMNIST_INSTALLED and not REQUIRE_DATA:
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} "
                    "(sudo apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("ffpipe")

    def make_cfg(run_name: str = "test", *overrides: str, warehouse: Path | None = None):
        return load_config(["conf/test.yaml"], [
            f"paths.warehouse={warehouse or root / 'warehouse'}",
            f"paths.outputs={root / 'outputs'}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            *TINY, f"run_name={run_name}", *overrides,
        ])

    study = run_study_job(make_cfg())
    counts = ingest_job(make_cfg())
    return PipelineEnv(root, make_cfg, counts, study)


@pytest.fixture(scope="session")
def e2e_run(pipeline_env):
    """Rank + backfill all batches with evaluation for run `e2e_uncertainty`."""
    from fastfill_udfs.spark.jobs import backfill_job, rank_job

    cfg = pipeline_env.make_cfg("e2e")
    ranked = rank_job(cfg, policy="uncertainty")
    backfilled = backfill_job(cfg, policy="uncertainty", evaluate=True)
    return {"cfg": cfg, "run": "e2e_uncertainty", "ranked": ranked, "backfilled": backfilled}


@pytest.fixture(scope="session")
def own_gallery(tmp_path_factory) -> dict:
    """The README's own-gallery commands run once (own_gallery_data.run_readme_commands), and
    `make_cfg(run_name, *overrides)` for a config on that gallery, warehouse, h and store."""
    from fastfill_udfs.config import load_config

    from .own_gallery_data import run_readme_commands

    done = run_readme_commands(tmp_path_factory.mktemp("own_gallery"))

    def make_cfg(run_name: str = "products", *overrides: str):
        return load_config([str(done["conf"])], [*done["overrides"], f"run_name={run_name}",
                                                 *overrides])

    return {**done, "make_cfg": make_cfg}
