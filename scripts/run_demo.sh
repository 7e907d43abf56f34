#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole pipeline on Fashion-MNIST:
#   bash scripts/run_demo.sh [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYSPARK_PYTHON="$PWD/.venv/bin/python"
exec .venv/bin/python pipelines/run_demo.py --config conf/fashion_mnist.yaml "$@"
