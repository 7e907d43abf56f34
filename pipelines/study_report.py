"""The three-seed report of issue 10: the in-memory study for each seed and update scenario.

    python pipelines/study_report.py                       # seeds 0,1,2; both scenarios
    python pipelines/study_report.py --seeds 0 --scenarios new_classes --set study.model_cache=""

Scenarios: new_classes (conf/fashion_mnist.yaml: the paper's update, old and new the same CNN,
the old one trained on classes 0-4) and bigger_model (+ conf/fashion_mnist_bigger_model.yaml).
The report trains the CNNs 8 epochs (the demo: fewer, to fit its time budget; the bigger
model's old CNN keeps its 4) and h 1024 wide for 40 epochs (the demo: 512, 20). It caches the
CNNs in study.model_cache (default .cache/study_models), so a rerun only retrains h and
recomputes the curves; each study's tables are kept in <paths.outputs>/report/studies/ and reused while
its config is unchanged (--recompute runs them again; --kept-only reports the kept ones
without running any). Writes <paths.outputs>/report/
(study_report.csv per seed, study_report_summary.csv
aggregated, study_report_curves.csv, study_report.md, study_report.png); --docs also copies the
markdown and the plot to docs/. Needs no Spark and no MLflow.
"""
import _bootstrap  # noqa: F401

import argparse
import shutil
import sys
import time
from pathlib import Path

from fastfill_udfs.cli import setup_logging

# every policy of the study (the demo itself runs fewer)
REPORT_OVERRIDES = ["study.policies=[fct_random, fastfill_random, fastfill_uncertainty, "
                    "fastfill_benefit, fastfill_prototype, fastfill_oracle]"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--scenarios", default="new_classes,bigger_model")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="extra overlay(s) after each scenario's own")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--docs", action="store_true", help="also write docs/study_report.{md,png}")
    p.add_argument("--recompute", action="store_true",
                   help="run every study again instead of reusing its kept tables")
    p.add_argument("--kept-only", action="store_true",
                   help="report only the studies already kept (run none); seeds per scenario")
    args = p.parse_args(argv)
    setup_logging()
    from fastfill_udfs.config import ConfigError
    from fastfill_udfs.demo.report import (aggregate, collect, plot_report, report_markdown,
                                           scenario_config)
    from fastfill_udfs.demo.study_job import POLICY_LABELS

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    overrides = ["study.model_cache=.cache/study_models"] + REPORT_OVERRIDES + args.overrides
    try:
        cfg = scenario_config(scenarios[0], seeds[0], overrides, args.config)
        out = Path(cfg.resolve_path("paths.outputs")) / "report"
        tables = collect(scenarios, seeds, overrides, args.config,
                         cache_dir=out / "studies", reuse=not args.recompute,
                         kept_only=args.kept_only)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(tables["summary"])
    tables["summary"].to_csv(out / "study_report.csv", index=False)
    agg.to_csv(out / "study_report_summary.csv", index=False)
    tables["curves"].to_csv(out / "study_report_curves.csv", index=False)
    tables["references"].to_csv(out / "study_report_references.csv", index=False)
    kept = tables["summary"].groupby("scenario", sort=False)["seed"].unique()
    md = report_markdown(agg, tables["references"], POLICY_LABELS,
                         {sc: sorted(int(x) for x in v) for sc, v in kept.items()}
                         if args.kept_only else seeds)
    minutes = tables["seconds"].groupby("scenario")["seconds"].mean() / 60
    md += "\nMinutes per study (mean over seeds, this machine): " + ", ".join(
        f"{s} {m:.1f}" for s, m in minutes.items()) + "\n"
    (out / "study_report.md").write_text(md)
    png = plot_report(tables["curves"], tables["references"], out / "study_report.png",
                      POLICY_LABELS)
    print(md)
    print(f"files: {out}")
    if args.docs:
        docs = Path(__file__).resolve().parent.parent / "docs"
        shutil.copy(out / "study_report.md", docs / "study_report.md")
        shutil.copy(png, docs / "study_report.png")
        print(f"copied to {docs}")
    return 0


if __name__ == "__main__":
    start = time.monotonic()
    code = main()
    print(f"took {(time.monotonic() - start) / 60:.1f} min")
    sys.exit(code)
