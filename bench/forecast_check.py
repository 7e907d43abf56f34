"""Does the forecast hold where nobody tuned it? (issue 25)

For one dataset and seed: the demo's study trains the old and new CNNs and `h` on the train
split, forecasts the backfill on the hold-out rows (``forecast_orders``: never the gallery) and
gives `h` the chosen `auto` order; then, on the test split (the gallery, never used to choose),
the realised curves of the `auto` order and of several random permutations. Prints and checks:

* the auto order's realised mAP AUC against random order's (mean, sd and range over the
  permutations): not below random's spread;
* the forecast's normalised curve (share of the t0 -> t=1 gain) against the realised one at
  every batch: the largest gap (target <= 0.1);
* the forecast's recommended stop against the realised fraction where mAP first comes within
  forecast.stop_epsilon of new/new (target within 0.1).

Datasets: ``new_classes`` and ``bigger_model`` (Fashion-MNIST, the demo's two scenarios),
``biased`` (the biased-footwear update, with a hold-out), ``digits`` (scikit-learn's 8x8 digits
written as an image folder: another dataset through ``data.dataset=image_folder``).

    python bench/forecast_check.py --dataset new_classes --seed 0
    python bench/forecast_check.py --dataset digits --seed 1 --out bench/results/forecast_check.json

Appends one JSON record per run to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastfill_udfs.config import load_config  # noqa: E402
from fastfill_udfs.forecast import share_gap  # noqa: E402
from fastfill_udfs.policies import (assign_batches, auto_scores, batching_from_config,  # noqa: E402
                                    order_scores, rank_order)
from fastfill_udfs.simulate import backfill_curve, curve_auc, fraction_to_reach  # noqa: E402

DATASETS = {
    "new_classes": (["conf/fashion_mnist.yaml"], []),
    "bigger_model": (["conf/fashion_mnist.yaml", "conf/fashion_mnist_bigger_model.yaml"], []),
    "biased": (["conf/fashion_mnist.yaml", "conf/biased_footwear.yaml"],
               ["demo.holdout_items=5000"]),
    "digits": (["conf/fashion_mnist.yaml"], [
        "data.dataset=image_folder", "data.train_fraction=0.6", "demo.holdout_items=300",
        "demo.old_model.classes=[0, 1, 2, 3, 4]", "demo.old_model.epochs=6",
        "demo.new_model.epochs=6", "backfill.batch_size=50", "transformation.epochs=30"]),
}


def digits_folder(root: Path) -> Path:
    """scikit-learn's 8x8 digits (1797 images) as PNG files, one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = root / "digits"
    if (folder / "9").is_dir():
        return folder
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        (folder / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((28, 28)).save(
            folder / str(y) / f"digit_{i:04d}.png")
    return folder


def config(name: str, seed: int, extra: list[str], cache: Path):
    overlays, sets = DATASETS[name]
    sets = list(sets) + [f"seed={seed}", f"study.model_cache={cache}",
                         "study.policies=[fastfill_random, fastfill_auto]"]
    if name == "digits":
        sets.append(f"data.image_folder={digits_folder(cache)}")
    return load_config(overlays, sets + extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random", type=int, default=8, help="random permutations on the gallery")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "forecast_check"))
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    import torch

    from fastfill_udfs.cli import setup_logging
    from fastfill_udfs.demo.protocol import load_split
    from fastfill_udfs.demo.study import embed, train_all
    from fastfill_udfs.metrics import retrieval_metrics
    from fastfill_udfs.training import transform

    setup_logging()
    torch.set_num_threads(2)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    cfg = config(a.dataset, a.seed, a.set, cache)
    t0 = time.time()
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    models = train_all(cfg, train)
    fc = models.forecast
    if fc is None:
        print("no forecast (no hold-out rows)")
        return 1
    (cache / f"forecast_{a.dataset}_s{a.seed}.json").write_text(fc.to_json())
    h = models.h["fastfill"]
    old_t, new_t = embed(models.old, test.images), embed(models.new, test.images)
    transformed, _ = transform(h, old_t)
    distance = cfg.get_path("evaluation.distance")
    batch_ids = assign_batches(len(test.ids), **batching_from_config(cfg.get_path("backfill")))
    newnew = retrieval_metrics(new_t, test.labels, new_t, test.labels, query_ids=test.ids,
                               gallery_ids=test.ids, topk=(1,), distance=distance)["mAP"]

    def realised(scores, calibration=None):
        kw = {}
        if calibration:
            from fastfill_udfs.calibration import item_correction
            s, b = item_correction(calibration, np.ones(len(test.ids), bool))
            kw = {"transformed_scale": s, "transformed_bias": b}
        return backfill_curve(rank_order(scores, test.ids), transformed, new_t, new_t,
                              test.labels, test.labels, batch_ids=batch_ids, query_ids=test.ids,
                              gallery_ids=test.ids, topk=(1,), distance=distance,
                              dtype="float32", **kw)
    auto = realised(auto_scores(h, old_t, test.ids, cfg.get_path("seed")),
                    (h.auto_order or {}).get("calibration"))
    auto.to_csv(cache / f"realised_auto_{a.dataset}_s{a.seed}.csv", index=False)
    rand = [realised(order_scores("random", ids=test.ids, seed=1000 + r)) for r in range(a.random)]
    x = auto["backfill_fraction"].to_numpy()
    auc = curve_auc(x, auto["mAP"])
    r_auc = np.array([curve_auc(x, c["mAP"]) for c in rand])
    key = fc.decision["key"]
    compared = share_gap(fc, x, auto["mAP"], key=key)
    gap = compared["gap"]
    eps = cfg.get_path("forecast.stop_epsilon")
    reach = fraction_to_reach(x, auto["mAP"].to_numpy(), newnew, eps)
    stop = fc.stop["fraction"]
    rec = {"dataset": a.dataset, "seed": a.seed, "sets": a.set, "choice": key,
           "beats_random_forecast": fc.decision["beats_random"],
           "forecast_items": fc.info["n_items"], "gallery": len(test.ids),
           "auto_mAP_auc": auc, "random_mAP_auc_mean": float(r_auc.mean()),
           "random_mAP_auc_sd": float(r_auc.std(ddof=1)), "random_mAP_auc_min": float(r_auc.min()),
           "random_mAP_auc_max": float(r_auc.max()),
           "auto_minus_random_sd": float((auc - r_auc.mean()) / max(r_auc.std(ddof=1), 1e-12)),
           "not_below_random": bool(auc >= r_auc.min()),
           "normalised_gap_max": gap, "gap_ok": gap <= 0.1,
           "gap_per_batch": np.round(compared["predicted"] - compared["realised"], 4).tolist(),
           "stop_forecast": stop, "reach_realised": reach,
           "stop_ok": bool(np.isfinite(reach) and abs(stop - reach) <= 0.1),
           "newnew_mAP": newnew, "t0_mAP": float(auto["mAP"].iloc[0]),
           "auto_top1_auc": curve_auc(x, auto["top1"]),
           "random_top1_auc_mean": float(np.mean([curve_auc(x, c["top1"]) for c in rand])),
           "random_top1_auc_min": float(np.min([curve_auc(x, c["top1"]) for c in rand])),
           "seconds": time.time() - t0}
    print("\n".join(fc.summary_lines()))
    print(f"\n{a.dataset} seed {a.seed}: auto ({key}) realised mAP AUC {auc:.4f}; random "
          f"{r_auc.mean():.4f} +- {r_auc.std(ddof=1):.4f} (range {r_auc.min():.4f}-"
          f"{r_auc.max():.4f}) -> {'not below' if rec['not_below_random'] else 'BELOW'} random")
    print(f"normalised curve, forecast - realised per batch: max |gap| {gap:.3f} "
          f"({'ok' if rec['gap_ok'] else 'MISSED'} <= 0.1)")
    print(f"recommended stop t={stop:.2f}, realised within {eps * 100:.1f} pt of new/new at "
          f"t={reach:.2f} ({'ok' if rec['stop_ok'] else 'MISSED'} within 0.1); "
          f"{rec['seconds']:.0f} s")
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
