"""Screenshots of the MLflow UI as a user sees it, for docs/mlflow.md and the README: start
`mlflow server` on a tracking store, open it in headless Chromium (Debian's `chromium`) and save
the experiment's run list, the mAP-against-step chart of the backfill runs, the "Backfill curves"
view and one run's `curve.png` artifact.

    .venv/bin/python scripts/mlflow_screenshots.py                      # ./mlruns.db -> docs/
    .venv/bin/python scripts/mlflow_screenshots.py --store sqlite:////abs/mlruns.db \\
        --experiment fastfill --run demo_uncertainty --out docs/

Retake them after `bash scripts/run_demo.sh` (which writes ./mlruns.db)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from fastfill_udfs.mlflow_ui import BrowserUnavailableError, capture_screenshots

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"sqlite:///{ROOT / 'mlruns.db'}",
                        help="tracking store URI (default: the demo's ./mlruns.db)")
    parser.add_argument("--experiment", default="fastfill", help="MLflow experiment name")
    parser.add_argument("--run", default=None,
                        help="backfill run whose curve.png to show (default: newest uncertainty run)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNG files")
    args = parser.parse_args(argv)
    try:
        shots = capture_screenshots(args.store, args.out, experiment=args.experiment,
                                    run_name=args.run)
    except (ValueError, BrowserUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in shots.items():
        if name != "texts":
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
