"""The forecast check (bench/forecast_check.py) on a gallery that only the Spark jobs see: the
foreign gallery of tests/spark/test_own_gallery.py (PNG files by path, a legacy old embedding
from a model the pipeline cannot run, a new model logged to MLflow), with or without labels.

Runs the real jobs in this process (ingest, train_transformation with its forecast and probes,
rank_gallery --policy auto, backfill with evaluation), then reads the run's tables back: the
realised auto curve is the one the evaluation logged; random order's spread comes from
permutations of the same plan (same batch sizes, h's pairs new at batch 0) scored exactly in
memory on the run's own vectors (batch-0 transformed ones and the final new ones).

    python bench/forecast_check_gallery.py --per-class 60 [--no-labels] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests" / "data" / "foreign_model"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--train-rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--no-labels", action="store_true")
    ap.add_argument("--random", type=int, default=8)
    ap.add_argument("--root", default="")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.cli import setup_logging
    from fastfill_udfs.config import load_config
    from fastfill_udfs.forecast import neighbour_agreement, reference_neighbours, share_gap
    from fastfill_udfs.metrics import retrieval_metrics
    from fastfill_udfs.policies import batch_sizes
    from fastfill_udfs.simulate import curve_auc, fraction_to_reach
    from fastfill_udfs.spark.delta_io import read_table, table_paths
    from fastfill_udfs.spark.evaluate import read_features, run_log
    from fastfill_udfs.spark.jobs import (backfill_job, ingest_job, rank_job,
                                          train_transformation_job)
    from fastfill_udfs.spark.rank import plan_metadata
    from fastfill_udfs.spark.session import get_spark
    from fastfill_udfs.tracking import configure_mlflow, download_forecast
    from tests.spark.own_gallery_data import make_gallery, sets

    setup_logging()
    root = Path(a.root or tempfile.mkdtemp(prefix="forecast_gallery_"))
    t0 = time.time()
    g = make_gallery(root, a.per_class)
    extra = {"data__columns__label": ""} if a.no_labels else {}
    cfg = load_config(["conf/my_gallery.yaml"], sets(
        g, transformation__train_rows=a.train_rows, backfill__batch_size=a.batch_size,
        forecast__probe_max_share=0.5, forecast__min_items=150, **extra))
    ingest_job(cfg)
    trained = train_transformation_job(cfg)
    rank_job(cfg, policy="auto", force=True)
    done = backfill_job(cfg, policy="auto", evaluate=True)
    spark = get_spark(cfg["spark"])
    run = done["run"]
    configure_mlflow(cfg)
    client = MlflowClient()
    forecast = download_forecast(trained["run_id"])
    meta = plan_metadata(spark, cfg, run)
    steps = run_log(spark, cfg, run)
    path = table_paths(cfg, run).gallery_features
    rows0, vec0 = read_features(spark, path, int(steps["table_version"].iloc[0]))
    rows1, vec1 = read_features(spark, path, int(steps["table_version"].iloc[-1]))
    order1 = np.argsort(rows1["id"].to_numpy(dtype=str))
    rows1, vec1 = rows1.iloc[order1].reset_index(drop=True), vec1[order1]
    pos0 = {i: k for k, i in enumerate(rows0["id"].to_numpy(dtype=object))}
    start = vec0[[pos0[i] for i in rows1["id"]]]
    gallery = read_table(spark, table_paths(cfg).gallery).select("id", "label").toPandas()
    labels = gallery.set_index("id")["label"].reindex(rows1["id"]).to_numpy()
    ids = rows1["id"].to_numpy(dtype=object)
    new_at = rows1["batch_id"].fillna(10 ** 9).to_numpy(np.int64)
    sizes = batch_sizes(int(meta["backfill_plan"]), **meta["batching"])
    pairs = new_at == 0
    distance = cfg.get_path("evaluation.distance")
    metric = "agreement" if a.no_labels else "mAP"
    ref = reference_neighbours(vec1, vec1, 10, distance=distance, query_ids=ids,
                               gallery_ids=ids)

    def value(gal):
        if a.no_labels:
            return float(neighbour_agreement(vec1, gal, ref, distance=distance, query_ids=ids,
                                             gallery_ids=ids).mean())
        return retrieval_metrics(vec1, labels, gal, labels, query_ids=ids, gallery_ids=ids,
                                 topk=(1,), distance=distance)["mAP"]

    def curve_of(batch_of_item):
        out = []
        for b in range(len(sizes) + 1):
            out.append(value(np.where((batch_of_item <= b)[:, None], vec1, start)))
        return np.array(out)
    x = np.cumsum(np.r_[pairs.sum(), sizes]) / len(ids)
    auto = curve_of(new_at)
    rest = np.flatnonzero(~pairs)
    r_aucs = []
    for r in range(a.random):
        perm = np.random.default_rng(100 + r).permutation(rest)
        b = np.zeros(len(ids), np.int64)
        b[perm] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
        r_aucs.append(_auc(x, curve_of(b), curve_auc))
    r_aucs = np.array(r_aucs)
    auc = _auc(x, auto, curve_auc)
    gap = share_gap(forecast, x, auto)["gap"]
    eps = forecast.stop["epsilon"]
    reach = fraction_to_reach(x, auto, auto[-1], eps)
    logged_gap = client.get_run(done["mlflow_run_id"]).data.metrics.get("forecast_gap_max")
    rec = {"dataset": "foreign" + ("_unlabelled" if a.no_labels else ""),
           "per_class": a.per_class, "choice": forecast.decision["key"], "metric": metric,
           "forecast_items": forecast.info["n_items"], "probes": forecast.info.get("n_probe"),
           "gallery": len(ids), "auto_auc": auc, "random_auc_mean": float(r_aucs.mean()),
           "random_auc_sd": float(r_aucs.std(ddof=1)), "random_auc_min": float(r_aucs.min()),
           "not_below_random": bool(auc >= r_aucs.min()), "normalised_gap_max": gap,
           "logged_gap": logged_gap, "gap_ok": gap <= 0.1, "stop_forecast":
           forecast.stop["fraction"], "reach_realised": reach,
           "stop_ok": bool(abs(forecast.stop["fraction"] - reach) <= 0.1),
           "seconds": time.time() - t0}
    print("\n".join(forecast.summary_lines()))
    print(f"\n{rec['dataset']}: auto ({rec['choice']}) {metric} AUC {auc:.4f}; random "
          f"{r_aucs.mean():.4f} +- {r_aucs.std(ddof=1):.4f} (min {r_aucs.min():.4f}) -> "
          f"{'not below' if rec['not_below_random'] else 'BELOW'} random; normalised gap "
          f"{gap:.3f} (logged {logged_gap}); stop {rec['stop_forecast']:.2f} vs realised "
          f"{reach:.2f}")
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return 0


def _auc(x, y, curve_auc):
    """As the evaluation: held flat before the first point (batch 0 is partly new)."""
    return curve_auc(np.r_[0.0, x], np.r_[y[0], y])


if __name__ == "__main__":
    sys.exit(main())
