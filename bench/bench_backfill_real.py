"""A real model on real-sized images: the backfill job end to end against the model alone.

    .venv/bin/python bench/bench_backfill_real.py [--items 192] [--batch 96]
        [--inference-batch 16] [--model-items 16] [--variants ...] [--merge]
        [--out backfill_real.json]

Sizes: a ResNet-50 in fp32 does 5-10 images/s on the 2 cores idle (about 1 with the shared
machine busy), so the default gallery is 192 images in 2 batches of 96 per variant; four
variants took 23 min at load average 10-18 (five would take about 6 min idle, estimated from
the rates).

1. A gallery of --items JPEGs of real size (224x224 to 500x375, 16 sizes and both
   orientations): Fashion-MNIST test images upscaled, colourised on a procedural background with
   film grain, re-encoded at quality 80-95 (`.cache/bench/backfill_real/images/`, made once and
   reused; never committed). The gallery table holds them by path (`image_uri`) and, in a
   second warehouse, as bytes (`image`).
2. The new model: a torchvision ResNet-50 (random weights, seeded; fc -> Identity, 2048-d)
   logged to MLflow with the pytorch flavor and registered as `models:/bench_resnet50@current`;
   its preprocessing (shorter side 256, centre crop 224, ImageNet mean/std) in
   `models.preprocess`. `h`: a random Transformation 128 -> 2048.
3. Side by side in one process (driver and a `local[*]` Spark):
   (a) the model alone: a plain torch loop over already-decoded, normalised float tensors, the
       torch threads at their default (all cores); its outputs are the queries' new features;
   (b) decode + preprocess alone (`Preprocess.decode_many`, JPEG bytes in memory), on 1 thread
       and on all cores;
   (c) the `backfill` job (`jobs.backfill_job`, the real one) for each variant: a fresh
       `rank_gallery` of its own run, then every batch, timed from the call to its return.
   Per variant: items/s, (c)/(a), and where the time goes: the driver's steps (the image files'
   read, the MERGE and its commit checks, the log row, evaluation) wrapped with timers, and the
   workers' own accounting ($FASTFILL_PROFILE: decode, model, Arrow in/out, model load).
Results: bench/results/backfill_real.json (--out); the markdown table is printed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, WORK, machine_info, write_json  # noqa: E402

BASE = WORK / "backfill_real"
OLD_DIM, NEW_DIM = 128, 2048
SIZES = [(224, 224), (256, 256), (300, 225), (225, 300), (320, 240), (240, 320), (400, 300),
         (300, 400), (448, 336), (336, 448), (500, 375), (375, 500), (500, 333), (333, 500),
         (480, 320), (320, 480)]  # (width, height)
IMAGENET = {"size": [], "resize_shorter": 256, "center_crop": [224, 224], "channels": 3,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
MODEL_NAME = "bench_resnet50"

# name -> (gallery source, evaluate after each batch, config overrides)
VARIANTS = {
    "paths_before": ("paths", False, []),   # *_before: the embedding as before the fix
    "paths": ("paths", False, []),
    "bytes_before": ("bytes", False, []),
    "bytes": ("bytes", False, []),
    "paths_eval": ("paths", True, []),
}


def _log(msg: str) -> None:
    print(f"[backfill_real {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=192, help="gallery size (images)")
    p.add_argument("--batch", type=int, default=96, help="backfill batch size (items)")
    p.add_argument("--inference-batch", type=int, default=16,
                   help="backfill.inference_batch_size (images per forward pass)")
    p.add_argument("--model-items", type=int, default=16,
                   help="images of (a), the model alone, measured before the first variant "
                        "and after each (a variant's ratio uses the two around it)")
    p.add_argument("--variants", default="paths_before,paths,bytes_before,bytes,paths_eval",
                   help=f"comma-separated, run in this order; known: {', '.join(VARIANTS)}; "
                        "NAME=SOURCE:EVAL:key=value;key=value defines one (SOURCE paths|bytes, "
                        "EVAL 0|1)")
    p.add_argument("--master", default="local[*]")
    p.add_argument("--driver-memory", default="6g")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="backfill_real.json")
    p.add_argument("--merge", action="store_true",
                   help="add this run's variants (each with its own model-alone figures) to "
                        "the --out of an earlier run instead of replacing it")
    p.add_argument("--decode-only", action="store_true",
                   help="measure only (b) and write it into the --out of an earlier run")
    return p


# ============================================================================ gallery
def _colourised(gray, size, rng):
    """A 28x28 grey item -> an RGB JPEG-ready image of `size` (w, h): the item, upscaled and
    colourised, on a smooth procedural background, with grain."""
    import numpy as np
    from PIL import Image

    w, h = size
    bg_small = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    bg = np.asarray(Image.fromarray(bg_small).resize((w, h), Image.BICUBIC), np.float32)
    side = int(min(w, h) * rng.uniform(0.6, 0.95))
    item = np.asarray(Image.fromarray(gray).resize((side, side), Image.BICUBIC), np.float32)
    alpha = (item / 255.0)[..., None]
    colour = rng.uniform(30, 255, 3).astype(np.float32)
    shade = rng.uniform(0.4, 1.0)
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    patch = bg[top:top + side, left:left + side]
    bg[top:top + side, left:left + side] = patch * (1 - alpha) + alpha * colour * \
        (shade + (1 - shade) * alpha)
    bg += rng.normal(0, 6.0, bg.shape)
    return Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))


def ensure_images(n: int, seed: int) -> list[tuple[str, int, str]]:
    """[(id, label, path)] of the gallery's JPEGs, made once (a marker records the settings)."""
    import numpy as np

    from fastfill_udfs.config import load_config
    from fastfill_udfs.data import load_fashion_mnist

    folder = BASE / "images"
    marker = folder / "gallery.json"
    want = {"n": n, "seed": seed, "sizes": SIZES, "version": 1}
    rows_file = folder / "rows.json"
    if marker.is_file() and json.loads(marker.read_text()) == want and rows_file.is_file():
        return [tuple(r) for r in json.loads(rows_file.read_text())]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    images, labels = load_fashion_mnist(load_config([]).get_path("data.fashion_mnist_dir"),
                                        "test")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(0, len(labels)))
        size = SIZES[i % len(SIZES)]
        img = _colourised(images[k], size, rng)
        label = int(labels[k])
        path = folder / f"class_{label}" / f"img{i:06d}.jpg"
        path.parent.mkdir(exist_ok=True)
        img.save(path, format="JPEG", quality=int(rng.integers(80, 96)))
        rows.append((f"img{i:06d}", label, str(path)))
    rows_file.write_text(json.dumps(rows))
    marker.write_text(json.dumps(want))
    return rows


# ============================================================================ model
def build_resnet50(seed: int):
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()
    return model.eval()


def log_new_model(cfg, seed: int) -> str:
    """Log the ResNet-50 to MLflow (pytorch flavor) with its preprocessing and point
    models:/bench_resnet50@current at it; returns the registered version's URI."""
    import mlflow
    import mlflow.pytorch

    from fastfill_udfs.model_loading import register_logged_model
    from fastfill_udfs.tracking import configure_mlflow

    configure_mlflow(cfg)
    import torchvision

    with mlflow.start_run(run_name="bench_resnet50_new_model"):
        mlflow.log_params({"architecture": "torchvision resnet50, fc -> Identity (2048-d)",
                           "weights": f"random, torch.manual_seed({seed})",
                           "torchvision": torchvision.__version__,
                           "models.preprocess": json.dumps(IMAGENET)})
        info = mlflow.pytorch.log_model(build_resnet50(seed), name="model",
                                        serialization_format="pickle",
                                        pip_requirements=["torch", "torchvision"])
    return register_logged_model(info.model_uri, f"models:/{MODEL_NAME}@current", "new")


# ============================================================================ (a) and (b)
def decode_alone(pre, datas: list[bytes], ids: list[str], workers: int
                 ) -> tuple[float, float, list]:
    """(wall s, CPU s of this process, decoded images): the CPU time is what one core's
    capacity is read from (the wall time of a shared machine includes other jobs' share)."""
    c, t = time.process_time(), time.perf_counter()
    decoded, reasons = pre.decode_many(datas, ids, workers=workers)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    bad = [r for r in reasons if r is not None]
    if bad:
        raise RuntimeError(f"decode failed: {bad[:3]}")
    return dt, dc, decoded


def decode_block(pre, datas, ids, cores: int) -> tuple[dict, list]:
    """(b): decode + preprocess alone, on one thread and on every core."""
    dec1_s, dec1_cpu, decoded = decode_alone(pre, datas, ids, 1)
    decn_s, decn_cpu, _ = decode_alone(pre, datas, ids, cores)
    _log(f"(b) decode+preprocess: {len(ids) / dec1_s:.0f} img/s on 1 thread "
         f"({len(ids) / dec1_cpu:.0f} per CPU-second), {len(ids) / decn_s:.0f} on {cores}")
    return {"threads_1_items_per_s": len(ids) / dec1_s,
            "threads_1_items_per_cpu_s": len(ids) / dec1_cpu,
            f"threads_{cores}_items_per_s": len(ids) / decn_s,
            f"threads_{cores}_items_per_cpu_s": len(ids) / decn_cpu,
            "cores": cores, "items": len(ids),
            "loadavg_1m": round(os.getloadavg()[0], 2)}, decoded


def model_alone(model, x_float, bs: int) -> tuple[float, "object"]:
    """A plain loop of the model over already-decoded, normalised float tensors."""
    import torch

    outs = []
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x_float), bs):
            outs.append(model(x_float[i:i + bs]))
    dt = time.perf_counter() - t
    return dt, torch.cat(outs).numpy()


# ============================================================================ tables
def write_gallery(spark, cfg, rows, datas, source: str, seed: int) -> None:
    import numpy as np
    import pandas as pd

    from fastfill_udfs.spark.delta_io import table_paths, write_table

    rng = np.random.default_rng(seed + 1)
    old = rng.normal(size=(len(rows), OLD_DIM)).astype(np.float32)
    pdf = pd.DataFrame({"id": [r[0] for r in rows], "label": [r[1] for r in rows],
                        "subgroup": [None] * len(rows), "old_embedding": list(old)})
    if source == "paths":
        pdf["image_uri"] = [r[2] for r in rows]
        schema = "id string, label int, subgroup string, old_embedding array<float>, " \
                 "image_uri string"
    else:
        pdf["image"] = datas
        schema = "id string, label int, subgroup string, old_embedding array<float>, " \
                 "image binary"
    df = spark.createDataFrame(pdf, schema).repartition(2)
    write_table(df, table_paths(cfg).gallery)


# ============================================================================ timers
class StepTimer:
    """Wall time of named package functions called during a backfill (wrapped in place)."""

    TARGETS = [("fastfill_udfs.spark.jobs", "load_configured_model"),
               ("fastfill_udfs.spark.backfill", "backfill_batch"),
               ("fastfill_udfs.spark.images", "attach_images"),
               ("fastfill_udfs.spark.backfill", "_merge_batch"),
               ("fastfill_udfs.spark.backfill", "tagged_commits"),
               ("fastfill_udfs.spark.backfill", "append_log_row"),
               ("fastfill_udfs.spark.backfill", "write_quarantine"),
               ("fastfill_udfs.spark.backfill", "quarantine_count"),
               ("fastfill_udfs.spark.backfill", "check_ranking_current"),
               ("fastfill_udfs.spark.backfill", "planned_batches"),
               ("fastfill_udfs.spark.backfill", "committed_batches"),
               ("fastfill_udfs.spark.evaluate", "BackfillTracker.on_committed"),
               ("fastfill_udfs.spark.evaluate", "BackfillTracker.__init__"),
               ("fastfill_udfs.spark.evaluate", "BackfillTracker.catch_up"),
               ("fastfill_udfs.spark.evaluate", "BackfillTracker.finalize")]

    def __init__(self):
        import importlib

        self.seconds: dict = defaultdict(float)
        self.calls: dict = defaultdict(int)
        self.each: dict = defaultdict(list)
        for mod_name, attr in self.TARGETS:
            mod = importlib.import_module(mod_name)
            owner, name = mod, attr
            if "." in attr:
                cls, name = attr.split(".")
                owner = getattr(mod, cls)
            fn = getattr(owner, name)
            if getattr(fn, "_bench_wrapped", False):
                continue
            setattr(owner, name, self._wrap(fn, attr))

    def _wrap(self, fn, label):
        @functools.wraps(fn)
        def timed_fn(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.calls[label] += 1
                self.each[label].append(time.perf_counter() - t)
        timed_fn._bench_wrapped = True
        return timed_fn

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.each.clear()


def worker_profile(folder: Path) -> dict:
    """Sums of the embedding workers' per-Arrow-batch records ($FASTFILL_PROFILE)."""
    recs = []
    for f in folder.glob("embed-*.jsonl"):
        recs += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if not recs:
        return {}
    out = {k: sum(r.get(k, 0.0) for r in recs)
           for k in ("rows", "load_s", "arrow_in_s", "arrow_out_s", "decode_s", "model_s")}
    out["arrow_batches"] = len(recs)
    out["workers"] = len(list(folder.glob("embed-*.jsonl")))
    out["decode_threads"] = sorted({r["decode_threads"] for r in recs})
    out["torch_threads"] = sorted({r["torch_threads"] for r in recs})
    out["decode_device"] = sorted({r["decode_device"] for r in recs})
    out["busy_span_s"] = max(r["end"] for r in recs) - min(r["start"] for r in recs)
    return out


# ============================================================================ main
def parse_variants(text: str) -> dict:
    out = {}
    for item in [v.strip() for v in text.split(",") if v.strip()]:
        if "=" in item.split(":")[0]:
            name, spec = item.split("=", 1)
            source, ev, *rest = spec.split(":")
            overrides = [o for o in ":".join(rest).split(";") if o]
            out[name] = (source, ev == "1", overrides)
        elif item in VARIANTS:
            out[item] = VARIANTS[item]
        else:
            raise SystemExit(f"unknown variant {item!r}; known: {', '.join(VARIANTS)}")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    variants = parse_variants(args.variants)
    import numpy as np
    import torch

    from fastfill_udfs.config import load_config
    from fastfill_udfs.model_loading import ModelRef, load_configured_model
    from fastfill_udfs.models import Transformation
    from fastfill_udfs.preprocess import Preprocess, host_workers
    from fastfill_udfs.spark.delta_io import read_table, run_id_for, table_paths
    from fastfill_udfs.spark.jobs import backfill_job
    from fastfill_udfs.spark.rank import rank_gallery
    from fastfill_udfs.spark.session import get_spark

    t_start = time.perf_counter()
    info = machine_info()
    profile_dir = BASE / "profile"
    shutil.rmtree(profile_dir, ignore_errors=True)
    profile_dir.mkdir(parents=True)
    os.environ["FASTFILL_PROFILE"] = str(profile_dir)  # before the JVM: its workers inherit it

    def config(source: str, overrides=()):
        return load_config([], [
            f"paths.warehouse={BASE / ('warehouse_' + source)}", f"paths.outputs={BASE / 'out'}",
            f"mlflow.tracking_uri=sqlite:///{BASE / 'mlruns.db'}",
            f"spark.master={args.master}", f"spark.driver_memory={args.driver_memory}",
            f"backfill.batch_size={args.batch}", "backfill.num_batches=0",
            f"backfill.inference_batch_size={args.inference_batch}", "backfill.device=cpu",
            f"models.new=models:/{MODEL_NAME}@current", "data.dataset=gallery_table",
            f"models.preprocess={json.dumps(IMAGENET)}", f"seed={args.seed}",
            "spark.shuffle_partitions=4", *overrides])

    rows = ensure_images(args.items, args.seed)
    ids = [r[0] for r in rows]
    datas = [Path(r[2]).read_bytes() for r in rows]
    sizes = [len(d) for d in datas]
    _log(f"{len(rows)} JPEGs, {np.mean(sizes) / 1024:.0f} KiB on average "
         f"({min(sizes) / 1024:.0f}-{max(sizes) / 1024:.0f})")
    cfg0 = config("paths")
    pre = Preprocess.from_config(cfg0.get_path("models.preprocess"))
    cores = host_workers()
    # (b) decode + preprocess alone; its output feeds (a), the model alone
    decode_res, decoded = decode_block(pre, datas, ids, cores)
    if args.decode_only:   # refresh (b) in an earlier run's results
        path = RESULTS / args.out
        prev = json.loads(path.read_text())
        prev["decode_alone"] = {**decode_res, "command": "bench/bench_backfill_real.py "
                                + " ".join(argv or sys.argv[1:])}
        write_json(args.out, prev)
        _log(f"updated decode_alone in {path}")
        return 0
    t, uri = _timed(lambda: log_new_model(cfg0, args.seed))
    _log(f"logged the ResNet-50 to MLflow as {uri} in {t:.0f} s")
    new_ref = load_configured_model(cfg0, "new")   # the pipeline's own loader
    model = new_ref.model
    n_a = min(args.model_items, len(ids))
    u8 = np.stack(decoded[:n_a])
    del decoded
    mean = torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1)
    x = ((torch.from_numpy(u8).permute(0, 3, 1, 2).float().div_(255) - mean) / std).contiguous()
    del u8
    torch_threads = torch.get_num_threads()
    with torch.inference_mode():
        model(x[:args.inference_batch])  # warm-up (allocator, oneDNN primitives)
    model_runs = []

    def measure_model(when: str) -> float:
        secs, _ = model_alone(model, x, args.inference_batch)
        model_runs.append({"when": when, "seconds": secs, "items_per_s": n_a / secs,
                           "loadavg_1m": round(os.getloadavg()[0], 2)})
        _log(f"(a) model alone ({when}): {n_a / secs:.2f} img/s ({torch_threads} torch "
             f"threads, batch {args.inference_batch}, {n_a} images)")
        return n_a / secs

    spark = get_spark(cfg0["spark"])
    spark.sparkContext.setLogLevel("ERROR")
    for source in sorted({v[0] for v in variants.values()}):
        write_gallery(spark, config(source), rows, datas, source, args.seed)
    torch.manual_seed(args.seed)
    h_ref = ModelRef.from_module(Transformation(OLD_DIM, NEW_DIM, 256, 2), "bench-h")
    timer = StepTimer()

    results = {}
    rate_before = measure_model("start")
    for name, (source, evaluate, overrides) in variants.items():
        before_fix = name.endswith("_before")
        cfg = config(source, [f"run_name=bench_{name}", *overrides])
        run = run_id_for(cfg, "uncertainty")
        if evaluate:
            _query_features_from(spark, cfg, results, read_table, table_paths, rows)
        t_rank, _ = _timed(lambda: rank_gallery(spark, cfg, h_ref, new_ref, "uncertainty", run,
                                                force=True))
        for f in profile_dir.glob("*"):
            f.unlink()
        timer.reset()
        load = os.getloadavg()[0]
        with _as_before(before_fix):
            wall, res = _timed(lambda: backfill_job(cfg, policy="uncertainty",
                                                    evaluate=evaluate))
        rate_after = measure_model(f"after {name}")
        model_rate = (rate_before + rate_after) / 2
        steps = {k: round(v, 3) for k, v in timer.seconds.items()}
        prof = worker_profile(profile_dir)
        rate = len(ids) / wall
        per_batch = [sum(v) for v in zip(*(timer.each.get(k) or [0.0] * len(
            timer.each["backfill_batch"]) for k in ("backfill_batch", "append_log_row",
                                                    "BackfillTracker.on_committed")))]
        # the steady state: batches after the first (the first pays the workers' model load)
        steady = per_batch[1:] or per_batch
        steady_rate = args.batch * len(steady) / sum(steady)
        results[name] = {"source": source, "evaluate": evaluate, "overrides": overrides,
                         "code": "before the fix" if before_fix else "this branch",
                         "run": run, "rank_s": t_rank, "wall_s": wall, "items_per_s": rate,
                         "model_alone_items_per_s": model_rate,
                         "ratio_to_model_alone": rate / model_rate,
                         "per_batch_s": per_batch, "steady_items_per_s": steady_rate,
                         "steady_ratio_to_model_alone": steady_rate / model_rate,
                         "steps_each_s": {k: v for k, v in timer.each.items()},
                         "batches": len(res["committed_now"]), "steps_s": steps,
                         "calls": dict(timer.calls), "workers": prof,
                         "loadavg_1m_at_start": round(load, 2),
                         "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _log(f"(c) {name}: {wall:.1f} s, {rate:.2f} img/s = {rate / model_rate:.3f} x model "
             f"alone ({model_rate:.2f}); batches after the first {steady_rate / model_rate:.3f}"
             f" x; per batch {[round(b, 1) for b in per_batch]} s; steps {steps}; workers "
             f"{prof}")
        rate_before = rate_after

    rates = [r["items_per_s"] for r in model_runs]
    out = {"benchmark": "backfill job on real-sized JPEGs with a ResNet-50 vs the model alone",
           "command": "bench/bench_backfill_real.py " + " ".join(argv or sys.argv[1:]),
           "machine": info, "items": len(ids), "batch": args.batch,
           "inference_batch": args.inference_batch, "master": args.master,
           "jpeg_kib_mean": float(np.mean(sizes) / 1024), "sizes_wh": SIZES,
           "preprocess": IMAGENET, "model_uri": uri, "torch": torch.__version__,
           "model_alone": {"items": n_a, "runs": model_runs,
                           "items_per_s": float(np.median(rates)),
                           "torch_threads": torch_threads},
           "decode_alone": decode_res,
           "variants": results, "total_s": time.perf_counter() - t_start}
    if args.merge and (RESULTS / args.out).is_file():
        prev = json.loads((RESULTS / args.out).read_text())
        prev["variants"].update(results)
        prev["model_alone"]["runs"] += model_runs
        prev["decode_alone"] = decode_res
        prev["merged_runs"] = prev.get("merged_runs", []) + [
            {"command": out["command"], "machine": info, "variants": list(results)}]
        out = prev
    path = write_json(args.out, out)
    print_table(out)
    _log(f"wrote {path} in {out['total_s']:.0f} s")
    return 0


def _query_features_from(spark, cfg, results, read_table, table_paths, rows) -> None:
    """query_features (queries = the gallery) from a finished backfill's gallery_features: the
    new model's embeddings of every item, as ingest would write them."""
    from pyspark.sql import functions as F

    from fastfill_udfs.spark.delta_io import write_table

    done = [r for r in results.values() if not r["evaluate"] and r["source"] == "paths"]
    if not done:
        raise SystemExit("an evaluating variant needs a 'paths' variant without evaluation "
                         "before it (its new embeddings are the queries' features)")
    feats = read_table(spark, table_paths(cfg, done[-1]["run"]).gallery_features)
    gallery = read_table(spark, table_paths(cfg).gallery).select("id", "label", "subgroup")
    write_table(gallery.join(feats.where(F.col("source") == "new").select("id", "embedding"),
                             "id"), table_paths(cfg).query_features)


class _as_before:
    """Within it, the backfill embeds as before the fix: the model broadcast again for every
    batch, each Arrow batch decoded whole on one thread before the model runs, the worker's
    torch threads as Spark started it, a batch embedded in as many partitions as it was read
    in (one for a small batch of image bytes)."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        if not self.active:
            return self
        import fastfill_udfs.spark.ingest as ingest

        self.saved = (ingest.broadcast_payload, ingest.embed_images_fn, ingest.spread_over_slots)
        ingest.broadcast_payload = lambda spark, payload: spark.sparkContext.broadcast(payload)
        ingest.spread_over_slots = lambda spark, df: df
        ingest.embed_images_fn = functools.partial(self.saved[1], prefetch=False,
                                                   decode_threads=1, torch_threads=-1)
        return self

    def __exit__(self, *exc):
        if self.active:
            import fastfill_udfs.spark.ingest as ingest

            ingest.broadcast_payload, ingest.embed_images_fn, ingest.spread_over_slots = \
                self.saved
        return False


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def print_table(out: dict) -> None:
    m = out["model_alone"]["items_per_s"]
    d = out["decode_alone"]
    all_cores = d[f"threads_{d['cores']}_items_per_s"]
    print(f"\n(a) model alone {m:.2f} img/s; (b) decode+preprocess "
          f"{d['threads_1_items_per_s']:.0f} img/s per core, {all_cores:.0f} on {d['cores']} "
          "cores\n")
    print("| variant | code | images | evaluate | wall s | img/s | (a) img/s | (c)/(a) | "
          "(c)/(a) after batch 1 | embed stage s | workers: model / decode / Arrow / model load "
          "s | file list + read s | MERGE s | log row s | eval s | job set-up s |")
    print("|" + "---|" * 16)
    for name, r in out["variants"].items():
        b = breakdown(r)
        w = r["workers"]
        print(f"| {name} | {r['code']} | {r['source']} | {'yes' if r['evaluate'] else 'no'} | "
              f"{r['wall_s']:.1f} | {r['items_per_s']:.2f} | {r['model_alone_items_per_s']:.2f} "
              f"| {r['ratio_to_model_alone']:.3f} | {r['steady_ratio_to_model_alone']:.3f} | "
              f"{b['embed_stage']:.1f} | {w.get('model_s', 0):.1f} / {w.get('decode_s', 0):.1f}"
              f" / {w.get('arrow_in_s', 0) + w.get('arrow_out_s', 0):.1f} / "
              f"{w.get('load_s', 0):.1f} | {b['files']:.1f} | "
              f"{b['merge']:.1f} | {b['log_row']:.1f} | {b['evaluation']:.1f} | "
              f"{b['other']:.1f} |")


def breakdown(r: dict) -> dict:
    """A variant's wall time split by the driver's steps (seconds)."""
    s = r["steps_s"]
    merge = s.get("_merge_batch", 0) + s.get("tagged_commits", 0)
    files = s.get("attach_images", 0)
    quarantine = s.get("write_quarantine", 0) + s.get("quarantine_count", 0)
    embed = s.get("backfill_batch", 0) - merge - files - quarantine
    evaluation = sum(v for k, v in s.items() if k.startswith("BackfillTracker"))
    log_row = s.get("append_log_row", 0)
    other = r["wall_s"] - s.get("backfill_batch", 0) - log_row - evaluation
    return {"embed_stage": embed, "files": files, "merge": merge, "quarantine": quarantine,
            "log_row": log_row, "evaluation": evaluation, "other": other}


if __name__ == "__main__":
    sys.exit(main())
