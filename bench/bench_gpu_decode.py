#!/usr/bin/env python
"""GPU decode benchmark: the backfill's embedding path fed JPEG bytes (decoded, resized and
cropped on the GPU) against a plain torch loop fed already-decoded arrays, in images per second.

Standalone: needs torch, torchvision, numpy and Pillow plus ``fastfill_udfs.inference`` and
``fastfill_udfs.preprocess`` from this repo -- no Spark, no Java, no dataset (the JPEGs are
generated).

    python bench/bench_gpu_decode.py                 # CUDA: ResNet-50 bf16, batch 256
    python bench/bench_gpu_decode.py --quick         # CPU smoke test (tiny sizes, no target)

Images: --unique procedural JPEGs (smooth colour fields, shapes, grain; quality 80-95) in 16
sizes from 224x224 to 500x375, both orientations, repeated to --n-images per run. Preprocessing
as `models.preprocess` for an ImageNet model: shorter side 256, centre crop 224, ImageNet
mean/std. Variants, interleaved (order rotated each round), median over rounds:

* plain_decoded (the baseline): the images decoded, resized and cropped beforehand (untimed) into
  a pageable uint8 [N, 224, 224, 3] host array; ``bench_gpu_inference.plain_loop``: per batch
  ``pin_memory().cuda(non_blocking)``, permute, ``/255``, ``model(x)`` under one bf16 autocast
  (no mean/std step: a baseline a little faster than the pipeline's); one copy back at the end.
* embedder_decoded: ``BatchEmbedder`` (with the mean/std step) fed the same decoded arrays.
* pipeline_jpeg_gpu (the target): ``inference.embed_batch(embedder, preprocess, ids, jpegs,
  decode_device="cuda", chunk=batch)``, what a backfill worker runs per Arrow batch: nvJPEG
  decode (``torchvision.io.decode_jpeg(device="cuda")``), resize and crop on the device, the
  next chunk decoded while the model runs on this one.
* pipeline_jpeg_cpu: the same fed JPEG bytes, decoded on the host with --cpu-threads threads
  (PIL), for comparison (what the worker does with ``backfill.decode_device=cpu``).
* decode_gpu / decode_cpu: decoding + resize + crop alone, each way (no model).

Target: pipeline_jpeg_gpu >= 0.9 x plain_decoded. Results: --out (JSON), printed as markdown.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_gpu_inference import plain_loop, sync  # noqa: E402  (the same baseline loop)

from fastfill_udfs.inference import BatchEmbedder, embed_batch  # noqa: E402
from fastfill_udfs.preprocess import Preprocess, host_workers  # noqa: E402

TARGET_RATIO = 0.90
SIZES = [(224, 224), (256, 256), (300, 225), (225, 300), (320, 240), (240, 320), (400, 300),
         (300, 400), (448, 336), (336, 448), (500, 375), (375, 500), (500, 333), (333, 500),
         (480, 320), (320, 480)]  # (width, height)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(n_unique: int, seed: int = 0) -> list[bytes]:
    """Procedural photo-like JPEGs: a smooth colour field, a few filled shapes, grain."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_unique):
        w, h = SIZES[i % len(SIZES)]
        field = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
        im = Image.fromarray(field).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1),
                                                                     fill=colour)
        arr = np.asarray(im, np.float32) + rng.normal(0, 6.0, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=int(rng.integers(80, 96)))
        out.append(buf.getvalue())
    return out


def build_model(name: str):
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    model.fc = torch.nn.Identity()
    return model.eval(), f"torchvision {torchvision.__version__} {name}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke-test sizes")
    ap.add_argument("--model", default=None, help="torchvision model (default resnet50; "
                                                  "resnet18 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--n-images", type=int, default=None, help="images per timed run")
    ap.add_argument("--unique", type=int, default=None, help="distinct JPEGs (cycled)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (median)")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="host decode threads for pipeline_jpeg_cpu (default: all cores)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_decode.json"))
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    notes = []
    if not cuda and not args.quick:
        print("NOTE: CUDA is not available; switching to --quick (this is a GPU benchmark).")
        args.quick = True
    quick = args.quick
    name = args.model or ("resnet18" if quick else "resnet50")
    bs = args.batch_size or (8 if quick else 256)
    n = args.n_images or (32 if quick else 5120)
    unique = min(args.unique or (16 if quick else 512), n)
    repeats = args.repeats or (2 if quick else 5)
    threads = args.cpu_threads or host_workers()
    amp = torch.bfloat16 if args.precision == "bf16" and cuda else None
    if not cuda:
        notes.append("CPU run: a smoke test of the script, NOT the GPU figure (the target "
                      "applies to a CUDA GPU); the GPU-decode variants are skipped.")
        print("NOTE: " + notes[-1], flush=True)

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model, impl = build_model(name)
    model = model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    pre = Preprocess(channels=3, mean=MEAN, std=STD, resize_shorter=256, center_crop=(224, 224))
    t0 = time.perf_counter()
    pool = make_jpegs(unique)
    jpegs = [pool[i % unique] for i in range(n)]
    ids = [f"img{i:06d}" for i in range(n)]
    decoded, why = pre.decode_many(jpegs, ids, workers=threads)
    assert all(r is None for r in why), [r for r in why if r][:3]
    host_u8 = np.stack(decoded)                          # pageable host array
    del decoded
    kib = np.mean([len(b) for b in pool]) / 1024
    dev_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(f"device: {dev_name} | torch {torch.__version__} | {impl} | {n} JPEGs "
          f"({unique} distinct, {kib:.0f} KiB mean) -> 224x224, batch {bs}, {args.precision}, "
          f"{repeats} rounds | host decode threads {threads} | setup "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    embedder = BatchEmbedder(model, device=device, batch_size=bs,
                             precision=args.precision if cuda else "fp32",
                             preprocess=pre.normalizer())

    def pipeline(where: str):
        out, reasons = embed_batch(embedder, pre, ids, jpegs, decode_device=where,
                                   workers=threads, chunk=bs)
        assert all(r is None for r in reasons), [r for r in reasons if r][:3]
        return out

    def decode_gpu():
        for lo in range(0, n, bs):
            imgs, _ = pre.decode_many_on_device(jpegs[lo:lo + bs], ids[lo:lo + bs], device)
            torch.stack(imgs)

    variants = {
        "plain_decoded": lambda: plain_loop(model, host_u8, bs, device, amp, cuda),
        "embedder_decoded": lambda: embedder(host_u8),
        "pipeline_jpeg_cpu": lambda: pipeline("cpu"),
        "decode_cpu": lambda: pre.decode_many(jpegs, ids, workers=threads),
    }
    if cuda:
        variants["pipeline_jpeg_gpu"] = lambda: pipeline("cuda")
        variants["decode_gpu"] = decode_gpu

    # warm-up (cudnn autotuning, nvJPEG handles, allocator) and a correctness cross-check
    t_w = time.perf_counter()
    variants["plain_decoded"]()
    ref = variants["embedder_decoded"]()    # normalised like the pipelines (plain is not)
    check = {}
    for k in ("pipeline_jpeg_cpu", "pipeline_jpeg_gpu"):
        if k in variants:
            got = variants[k]()
            cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) *
                                        np.linalg.norm(got, axis=1) + 1e-12)
            check[k] = {"min_cosine_vs_embedder_decoded": float(cos.min()),
                        "max_abs_diff": float(np.abs(ref - got).max())}
    for k in ("decode_cpu", "decode_gpu"):
        if k in variants:
            variants[k]()
    sync(device)
    print(f"warm-up {time.perf_counter() - t_w:.1f}s; vs the embedder fed decoded arrays: "
          f"{check}", flush=True)

    times = {k: [] for k in variants}
    keys = list(variants)
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            sync(device)
            t = time.perf_counter()
            variants[k]()
            sync(device)
            times[k].append(time.perf_counter() - t)
        print(f"round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {n / times[k][-1]:,.0f}" for k in keys) + " img/s", flush=True)

    results = {k: {"median_img_per_s": n / statistics.median(v),
                   "img_per_s_each_round": [n / t for t in v], "seconds_each_round": v}
               for k, v in times.items()}
    base = results["plain_decoded"]["median_img_per_s"]
    ratios = {k: results[k]["median_img_per_s"] / base
              for k in ("pipeline_jpeg_gpu", "pipeline_jpeg_cpu") if k in results}
    out = {
        "benchmark": "embedding fed JPEG bytes (decode on GPU / host) vs plain loop fed "
                     "decoded arrays",
        "device": dev_name, "cuda": cuda, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "python": platform.python_version(),
        "model": impl, "precision": args.precision if cuda else "fp32", "batch_size": bs,
        "n_images_per_run": n, "unique_jpegs": unique, "jpeg_kib_mean": kib,
        "sizes_wh": SIZES, "preprocess": pre.as_dict(), "host_decode_threads": threads,
        "host_cpus": os.cpu_count(), "rounds": repeats, "quick": quick, "results": results,
        "ratio_to_plain_decoded": ratios, "target_ratio": TARGET_RATIO,
        "target_met": (ratios.get("pipeline_jpeg_gpu", 0) >= TARGET_RATIO) if cuda else None,
        "correctness_vs_embedder_decoded": check, "notes": notes,
        "command": "python bench/bench_gpu_decode.py " + " ".join(argv or sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)

    print(f"\n**{dev_name}**, {impl}, {out['precision']}, batch {bs}, {n} JPEGs, median of "
          f"{repeats} rounds\n")
    print("| variant | img/s | / plain_decoded |")
    print("|---|---|---|")
    for k in keys:
        ratio = results[k]["median_img_per_s"] / base
        print(f"| {k} | {results[k]['median_img_per_s']:,.0f} | {ratio:.3f} |")
    if cuda:
        met = "met" if out["target_met"] else "MISSED"
        print(f"\npipeline_jpeg_gpu / plain_decoded = {ratios['pipeline_jpeg_gpu']:.3f} "
              f"(target >= {TARGET_RATIO}: {met})")
    for note in notes:
        print(f"\nNOTE: {note}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
