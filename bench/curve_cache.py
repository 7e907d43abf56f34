"""Train and cache the demo's CNNs and their embeddings for the backfilling-curve analysis.

The analysis of `h`, sigma, calibration and orders (bench/curve_analysis.py) iterates on cached
embeddings; this script is the only expensive part (CNN training on 2 CPU cores). Every CNN is
cached as a state dict keyed by its settings, so scenarios that share a model (the new model of
"new classes" and "bigger model") train it once.

Protocol: a stratified, seeded validation split of `--validation` items is carved from the train
split before any training; the CNNs never see it (it is what choices are made on; the test split
is the gallery and is never used to choose anything).

    python bench/curve_cache.py --scenario new_classes --seed 0
    python bench/curve_cache.py --scenario bigger_model --seed 0

Writes .cache/curve/emb_<scenario>_s<seed>.npz with old/new embeddings of the train and test
splits, labels, the validation indices, the new classifier (W, b) and the models' test accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastfill_udfs.data import load_fashion_mnist, stratified_subset  # noqa: E402
from fastfill_udfs.inference import BatchEmbedder  # noqa: E402
from fastfill_udfs.demo.cnn import EmbeddingCNN, train_embedding_model  # noqa: E402

CACHE = ROOT / ".cache" / "curve"
FMNIST = "/usr/share/datasets/fashion-mnist"

# scenario -> (old settings, new settings)
SCENARIOS = {
    "new_classes": (
        dict(channels=[32, 64, 128], embedding_dim=128, epochs=8, label_smoothing=0.1),
        dict(channels=[32, 64, 128], embedding_dim=128, epochs=8, label_smoothing=0.1)),
    "bigger_model": (
        dict(channels=[16, 32], embedding_dim=64, epochs=4, label_smoothing=0.0),
        dict(channels=[32, 64, 128], embedding_dim=128, epochs=8, label_smoothing=0.1)),
}
OLD_CLASSES = [0, 1, 2, 3, 4]


def validation_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A stratified validation subset of the train split (seeded; never trained on by CNNs)."""
    return stratified_subset(labels, size, 10_000 + seed) if size else np.zeros(0, np.int64)


def model_key(role: str, s: dict, seed: int, n_val: int) -> str:
    ch = "-".join(str(c) for c in s["channels"])
    return (f"{role}_c{ch}_d{s['embedding_dim']}_e{s['epochs']}_ls{s['label_smoothing']}"
            f"_s{seed}_v{n_val}")


def get_model(role, s, images, labels, num_classes, seed, n_val, batch_size=128, lr=0.002):
    path = CACHE / "models" / (model_key(role, s, seed, n_val) + ".pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        m = EmbeddingCNN(s["channels"], s["embedding_dim"], num_classes)
        m.load_state_dict(torch.load(path, weights_only=True))
        return m.eval(), 0.0
    t0 = time.time()
    m, _ = train_embedding_model(images, labels, num_classes=num_classes, channels=s["channels"],
                                 embedding_dim=s["embedding_dim"], epochs=s["epochs"],
                                 batch_size=batch_size, lr=lr, seed=seed, name=role,
                                 label_smoothing=s["label_smoothing"])
    torch.save(m.state_dict(), path)
    return m.eval(), time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation", type=int, default=10_000)
    p.add_argument("--old-epochs", type=int)
    p.add_argument("--new-epochs", type=int)
    p.add_argument("--new-channels", type=str, help="e.g. 32,64,128 (also the old model's in new_classes)")
    p.add_argument("--tag", default="", help="suffix of the cache file name")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    old_s, new_s = (dict(x) for x in SCENARIOS[a.scenario])
    if a.new_channels:
        new_s["channels"] = [int(c) for c in a.new_channels.split(",")]
        if a.scenario == "new_classes":
            old_s["channels"] = list(new_s["channels"])
    if a.old_epochs:
        old_s["epochs"] = a.old_epochs
    if a.new_epochs:
        new_s["epochs"] = a.new_epochs
    xtr, ytr = load_fashion_mnist(FMNIST, "train")
    xte, yte = load_fashion_mnist(FMNIST, "test")
    val = validation_indices(ytr, a.validation, a.seed)
    fit = np.setdiff1d(np.arange(len(ytr)), val)
    old_rows = fit[np.isin(ytr[fit], OLD_CLASSES)]
    remap = {c: i for i, c in enumerate(OLD_CLASSES)}
    old_labels = np.array([remap[int(c)] for c in ytr[old_rows]], np.int64)
    new, t_new = get_model("new", new_s, xtr[fit], ytr[fit], 10, a.seed + 1, len(val))
    old, t_old = get_model("old", old_s, xtr[old_rows], old_labels, len(OLD_CLASSES), a.seed,
                           len(val))
    emb = {}
    for name, m in (("old", old), ("new", new)):
        e = BatchEmbedder(m, batch_size=512)
        emb[f"{name}_train"], emb[f"{name}_test"] = e(xtr), e(xte)
    with torch.no_grad():
        logits = new.classifier(torch.from_numpy(emb["new_test"]))
        acc_new = float((logits.argmax(1).numpy() == yte).mean())
        lo = old.classifier(torch.from_numpy(emb["old_test"]))
        seen = np.isin(yte, OLD_CLASSES)
        acc_old = float((np.array(OLD_CLASSES)[lo.argmax(1).numpy()][seen] == yte[seen]).mean())
    meta = dict(scenario=a.scenario, seed=a.seed, old=old_s, new=new_s, n_val=len(val),
                acc_new_test=acc_new, acc_old_test_seen=acc_old, train_seconds_new=t_new,
                train_seconds_old=t_old)
    out = CACHE / f"emb_{a.scenario}_s{a.seed}{a.tag}.npz"
    np.savez(out, **emb, y_train=ytr, y_test=yte, val_idx=val,
             W=new.classifier.weight.detach().numpy(), b=new.classifier.bias.detach().numpy(),
             meta=json.dumps(meta))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
