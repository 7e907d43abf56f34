"""A foreign user's gallery, built from scratch for the own-gallery and crash tests: PNG files
referenced by relative path, old embeddings made by a torch module only this file knows (the
old model knew half the classes), a Parquet gallery table with the user's own column names and
an extra column, and the user's new model logged as an MLflow pytorch model; and that gallery
taken through the README's "Your own gallery" config and commands (`run_readme_commands`, the
session's `own_gallery` fixture)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

from tests.submit import SPARK_SUBMIT
from tests.submit import submit_env as job_env

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "tests" / "data" / "foreign_model"
N_CLASSES, SIZE = 8, 16
COLUMNS = {"id": "item_id", "old_embedding": "old_embedding", "image": "image_path",
           "label": "category", "subgroup": ""}


def _old_model(templates: torch.Tensor) -> torch.nn.Module:
    """The user's old production model: it knew only the first half of the classes."""
    from foreign_model import TemplateNet

    known = templates.clone()
    gen = torch.Generator().manual_seed(99)
    known[N_CLASSES // 2:] = (torch.rand(N_CLASSES // 2, SIZE, SIZE, generator=gen) > 0.5).float()
    return TemplateNet(known, out_dim=8, seed=5).eval()


def make_gallery(root: Path, per_class: int, *, broken: int | None = None,
                 missing: int | None = None, register_as: str | None = "product_embedder"
                 ) -> dict:
    """Images under root/bucket/images, the gallery table under root/bucket/tables/gallery,
    an MLflow store root/mlflow.db with the new model registered as `register_as@champion`.
    `broken`: index of a row whose old embedding is null; `missing`: a row whose image file
    does not exist."""
    import mlflow
    import mlflow.pytorch

    if str(MODEL_DIR) not in sys.path:
        sys.path.insert(0, str(MODEL_DIR))
    from foreign_model import TemplateNet, make_templates

    images = root / "bucket" / "images"
    templates = make_templates(N_CLASSES, SIZE)
    rng = np.random.default_rng(0)
    rows, pixels = [], []
    for c in range(N_CLASSES):
        (images / f"cls{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = (0.25 + 0.5 * templates[c].numpy() * rng.uniform(0.4, 1.0)
                   + rng.normal(0, 0.12, (SIZE, SIZE)))
            arr = np.clip(img * 255, 0, 255).astype(np.uint8)
            rel = f"cls{c}/img_{i:03d}.png"
            Image.fromarray(arr).save(images / rel)
            rows.append([f"item-{c}-{i:03d}", rel, c])
            pixels.append(arr)
    with torch.no_grad():
        x = torch.from_numpy(np.stack(pixels)).float().div(255)[:, None]
        old = _old_model(templates)(x).numpy().astype(np.float64)
    old_emb = [list(v) for v in old]
    if broken is not None:
        old_emb[broken] = None
    if missing is not None:
        rows[missing][1] = "cls0/gone.png"
    table = root / "bucket" / "tables" / "gallery"
    table.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "item_id": [r[0] for r in rows],
        "old_embedding": pa.array(old_emb, pa.list_(pa.float64())),
        "image_path": [r[1] for r in rows], "category": pa.array([r[2] for r in rows], pa.int64()),
        "shop": [f"shop-{i % 3}" for i in range(len(rows))]}), table / "part-0.parquet")
    store = f"sqlite:///{root / 'mlflow.db'}"
    if register_as:
        mlflow.set_tracking_uri(store)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        mlflow.set_experiment("the user's own training")
        with mlflow.start_run(run_name="trained elsewhere"):
            info = mlflow.pytorch.log_model(TemplateNet(templates), name="model",
                                            code_paths=[str(MODEL_DIR / "foreign_model.py")],
                                            registered_model_name=register_as,
                                            serialization_format="pickle")
        mlflow.MlflowClient().set_registered_model_alias(register_as, "champion",
                                                         info.registered_model_version)
    return {"root": root, "table": table, "images": images, "store": store,
            "ids": [r[0] for r in rows],
            "broken": rows[broken][0] if broken is not None else None,
            "missing": rows[missing][0] if missing is not None else None}


def sets(setup: dict, **extra) -> list[str]:
    """Config overrides putting a config on this gallery, with sizes fit for a test."""
    root = setup["root"]
    out = [
        f"paths.warehouse={root / 'warehouse'}", f"paths.outputs={root / 'outputs'}",
        f"data.gallery_table={setup['table']}", f"data.image_root={setup['images']}",
        f"mlflow.tracking_uri={setup['store']}",
        f"models.preprocess.size=[{SIZE}, {SIZE}]", "models.preprocess.channels=1",
        "models.preprocess.mean=[0.0]", "models.preprocess.std=[1.0]",
        "transformation.hidden_dim=64", "transformation.epochs=40",
        "transformation.batch_size=64", "transformation.warmup_epochs=2",
        "backfill.device=cpu", "backfill.inference_batch_size=64",
        "spark.master=local[2]", "spark.shuffle_partitions=2", "spark.driver_memory=1g",
        "evaluation.num_shards=2",
    ]
    return out + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


def submit_env(**extra) -> dict:
    """tests.submit.submit_env (a child job's environment), with the foreign model's folder
    importable (for entry points)."""
    env = job_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MODEL_DIR), env.get("PYTHONPATH")) if p)
    return env


# ------------------------------------------------- the README's "Your own gallery", as written
README = (ROOT / "README.md").read_text()
SECTION = README.split("## Your own gallery", 1)[1].split("\n## ", 1)[0]   # to the next heading
PER_CLASS = 40                 # 320 items, one broken old embedding, one missing image
TRAIN_ROWS, BATCH = 64, 64     # 64 pairs; the 255 planned items in 4 batches
README_JOBS = ["pipelines/ingest.py", "pipelines/train_transformation.py",
               "pipelines/rank_gallery.py", "pipelines/backfill.py", "pipelines/evaluate.py"]


def readme_config() -> dict:
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", SECTION, re.S).group(1))


def readme_commands() -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", SECTION, re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines()]


def readme_overrides(setup: dict) -> list[str]:
    """Where this machine's copy of the README's bucket lives, and sizes fit for a test."""
    return sets(setup, transformation__train_rows=TRAIN_ROWS, backfill__batch_size=BATCH)


def run_readme_commands(root: Path) -> dict:
    """A foreign gallery under `root` (make_gallery, `broken` and `missing` rows) taken through
    the README's config (written to root/my_gallery.yaml) and its five commands, each a plain
    spark-submit: ingested, h trained and registered, run `products_auto` ranked,
    backfilled and evaluated. Returns the setup, the config file, the overrides and each
    command's output; a command that fails fails the caller, naming it."""
    setup = make_gallery(root, PER_CLASS, broken=7, missing=11)
    conf = root / "my_gallery.yaml"
    conf.write_text(yaml.safe_dump(readme_config()))
    commands = readme_commands()
    assert [c[1] for c in commands] == README_JOBS
    outputs = {}
    for args in commands:
        assert args[0] == "spark-submit"
        cmd = [str(SPARK_SUBMIT)] + [str(conf) if a == "conf/my_gallery.yaml" else a
                                     for a in args[1:]]
        for o in readme_overrides(setup):
            cmd += ["--set", o]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env=submit_env(), cwd=ROOT)
        assert proc.returncode == 0, \
            " ".join(args) + "\n" + proc.stdout[-4000:] + proc.stderr[-4000:]
        outputs[args[1]] = proc.stdout
    return {"setup": setup, "conf": conf, "overrides": readme_overrides(setup),
            "outputs": outputs}
