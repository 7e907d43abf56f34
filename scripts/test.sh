#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYSPARK_PYTHON="$PWD/.venv/bin/python"
export FASTFILL_REQUIRE_DATA=1   # a test that needs Fashion-MNIST fails here instead of skipping
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=25 "$@"   # the 25 slowest at the end
