#!/usr/bin/env python
"""GPU inference benchmark: the backfill's batch-embedding function (BatchEmbedder) versus a
plain torch loop on the same model, in images per second, fp32 and bf16.

Standalone: needs only torch, numpy (and torchvision for the model; a built-in ResNet is used when
torchvision is missing) plus ``fastfill_udfs.inference`` from this repo -- no Spark, no Java.

    python bench/bench_gpu_inference.py                    # CUDA: ResNet-50, 224x224, batch 256
    python bench/bench_gpu_inference.py --quick            # CPU smoke test (tiny sizes)

Setup (both sides identical): ResNet-50 (torchvision, weights=None, fc -> Identity, 2048-d
embeddings), eval mode, channels-last on CUDA, cudnn.benchmark on; synthetic decoded images held on
the host as a pageable uint8 [N, 224, 224, 3] numpy array (what a backfill partition receives).

* plain loop: what a competent user writes -- per batch ``torch.from_numpy(b).pin_memory()
  .cuda(non_blocking=True)``, ``permute(0,3,1,2).float().div_(255)`` on the device (channels-last),
  ``model(x)``; one autocast context around the loop for bf16; outputs kept on the device and
  copied back once at the end (``torch.cat(...).float().cpu()``).
* BatchEmbedder: ``BatchEmbedder(model, precision=...)(images)`` -> float32 numpy [N, 2048].
* compute-only (informational ceiling): the model on one pre-staged device batch, no transfers.

Every variant is timed with torch.cuda.synchronize() around it; variants are interleaved (order
rotated each round) and the median over rounds is reported. Target: BatchEmbedder >= 90% of the
plain loop's images/s. Results go to --out (JSON) and are printed as a markdown table.
"""
from __future__ import annotations

import argparse
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
from torch import nn  # noqa: E402

from fastfill_udfs.inference import BatchEmbedder  # noqa: E402

TARGET_RATIO = 0.90


# --------------------------------------------------------------------------- model
class _Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return torch.relu(self.bn3(self.conv3(x)) + idt)


class _BuiltinResNet(nn.Module):
    """Bottleneck ResNet (ResNet-50 with layers=(3,4,6,3)), head removed: used only when
    torchvision is not installed."""

    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for i, n in enumerate(layers):
            width = 64 * 2 ** i
            for j in range(n):
                blocks.append(_Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.embedding_dim = cin

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)


def build_model(name: str):
    """(model, impl) with the classifier replaced by Identity (embedding output)."""
    try:
        import torchvision
        model = getattr(torchvision.models, name)(weights=None)
        model.fc = nn.Identity()
        return model, f"torchvision {torchvision.__version__} {name}"
    except ImportError:
        layers = {"resnet50": (3, 4, 6, 3), "resnet26": (2, 2, 2, 2), "resnet18": (2, 2, 2, 2)}
        print(f"NOTE: torchvision not installed; using the built-in bottleneck ResNet "
              f"{layers.get(name, (2, 2, 2, 2))} for {name!r}", flush=True)
        blocks = layers.get(name, (2, 2, 2, 2))
        return _BuiltinResNet(blocks), f"builtin bottleneck ResNet {blocks} (in place of {name})"


# --------------------------------------------------------------------------- variants
def plain_loop(model, images: np.ndarray, bs: int, device: torch.device, amp_dtype,
               channels_last: bool) -> np.ndarray:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cuda = device.type == "cuda"
    outs = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                                enabled=amp_dtype is not None):
        for i in range(0, len(images), bs):
            t = torch.from_numpy(images[i:i + bs])
            if cuda:
                t = t.pin_memory().to(device, non_blocking=True)
            x = t.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=fmt)
            outs.append(model(x))
        return torch.cat(outs).float().cpu().numpy()


def compute_only(model, x_dev: torch.Tensor, n_batches: int, amp_dtype) -> None:
    with torch.inference_mode(), torch.autocast(x_dev.device.type,
                                                dtype=amp_dtype or torch.bfloat16,
                                                enabled=amp_dtype is not None):
        for _ in range(n_batches):
            model(x_dev)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke-test sizes (for CPU-only machines)")
    ap.add_argument("--model", default=None, help="torchvision model name (default resnet50; "
                                                  "resnet18 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--n-batches", type=int, default=None, help="batches per timed run")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (median)")
    ap.add_argument("--no-compute-only", action="store_true",
                    help="skip the informational compute-only ceiling")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_inference.json"))
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    notes = []
    if not cuda and not args.quick:
        print("NOTE: CUDA is not available; switching to --quick (the full ResNet-50 run is a "
              "GPU benchmark).", flush=True)
        args.quick = True
    quick = args.quick
    model_name = args.model or ("resnet18" if quick else "resnet50")
    bs = args.batch_size or (16 if quick else 256)
    n_batches = args.n_batches or (4 if quick else 20)
    size = args.image_size or (64 if quick else 224)
    repeats = args.repeats or (2 if quick else 5)
    n = bs * n_batches
    if not cuda:
        notes.append("CPU run: these numbers are a smoke test, NOT the GPU target "
                     "(the target applies to a CUDA GPU).")
        print("NOTE: " + notes[-1], flush=True)

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    channels_last = cuda
    model, impl = build_model(model_name)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    dev_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(f"device: {dev_name} | torch {torch.__version__} (cuda {torch.version.cuda}, cudnn "
          f"{torch.backends.cudnn.version() if cuda else None}) | model: {impl} | "
          f"{n} images {size}x{size}x3 uint8, batch {bs}, {repeats} rounds", flush=True)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)  # pageable host array

    precisions = {"fp32": None, "bf16": torch.bfloat16}
    embedders = {p: BatchEmbedder(model, device=device, batch_size=bs, precision=p,
                                  channels_last=channels_last) for p in precisions}
    variants = {}
    for p, amp in precisions.items():
        variants[f"plain_{p}"] = (lambda imgs, amp=amp: plain_loop(model, imgs, bs, device, amp,
                                                                   channels_last))
        variants[f"embedder_{p}"] = (lambda imgs, p=p: embedders[p](imgs))
    x_dev = None
    if not args.no_compute_only:
        x_dev = torch.from_numpy(images[:bs]).to(device).permute(0, 3, 1, 2).float().div_(255)
        x_dev = x_dev.contiguous(memory_format=torch.channels_last if channels_last
                                 else torch.contiguous_format)
        for p, amp in precisions.items():
            variants[f"compute_only_{p}"] = (
                lambda imgs, amp=amp: compute_only(model, x_dev, n_batches, amp))

    # warm-up (cudnn autotuning, allocator, pinned pools) + correctness cross-check
    warm = images[: bs * min(3, n_batches)]
    t_w = time.perf_counter()
    outs = {k: fn(warm) for k, fn in variants.items()}
    sync(device)
    check = {}
    for p in precisions:
        a, b = outs[f"plain_{p}"], outs[f"embedder_{p}"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        check[p] = {"shape": list(b.shape), "dtype": str(b.dtype),
                    "max_abs_diff": float(np.abs(a - b).max()),
                    "min_cosine": float(cos.min())}
    print(f"warm-up {time.perf_counter() - t_w:.1f}s; embedder vs plain: {check}", flush=True)
    del outs

    times = {k: [] for k in variants}
    keys = list(variants)
    for r in range(repeats):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            times[k].append(timed(lambda: variants[k](images), device))
        print(f"round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {n / times[k][-1]:,.0f}" for k in keys) + " img/s", flush=True)

    results = {k: {"median_img_per_s": n / statistics.median(v),
                   "img_per_s_each_round": [n / t for t in v],
                   "seconds_each_round": v} for k, v in times.items()}
    ratios = {p: results[f"embedder_{p}"]["median_img_per_s"]
              / results[f"plain_{p}"]["median_img_per_s"] for p in precisions}
    out = {
        "benchmark": "BatchEmbedder vs plain torch loop (GPU inference)",
        "device": dev_name, "cuda": cuda,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "python": platform.python_version(),
        "model": impl, "embedding_dim": check["fp32"]["shape"][1],
        "image_shape": [size, size, 3], "input": "host numpy uint8 NHWC (pageable)",
        "batch_size": bs, "n_images_per_run": n, "rounds": repeats,
        "channels_last": channels_last, "cudnn_benchmark": True, "quick": quick,
        "results": results,
        "ratio_embedder_over_plain": ratios,
        "target_ratio": TARGET_RATIO,
        "target_met": {p: r >= TARGET_RATIO for p, r in ratios.items()} if cuda else None,
        "correctness_embedder_vs_plain": check,
        "notes": notes,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)

    print()
    print(f"**{dev_name}**, torch {torch.__version__}, {impl}, batch {bs}, {n} images "
          f"{size}x{size}, median of {repeats} rounds")
    print()
    hdr = "| precision | plain loop img/s | BatchEmbedder img/s | ratio | target >= 0.90 |"
    if x_dev is not None:
        hdr += " compute-only img/s |"
    print(hdr)
    print("|" + "---|" * hdr.count(" |"))
    for p in precisions:
        row = (f"| {p} | {results[f'plain_{p}']['median_img_per_s']:,.0f} | "
               f"{results[f'embedder_{p}']['median_img_per_s']:,.0f} | {ratios[p]:.3f} | "
               f"{('yes' if ratios[p] >= TARGET_RATIO else 'NO') if cuda else 'n/a (CPU)'} |")
        if x_dev is not None:
            row += f" {results[f'compute_only_{p}']['median_img_per_s']:,.0f} |"
        print(row)
    for note in notes:
        print(f"\nNOTE: {note}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
