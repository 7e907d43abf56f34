#!/usr/bin/env bash
# One-time (idempotent) set-up: Java check, Fashion-MNIST Debian package, a project virtualenv
# with pinned packages, the Delta Lake jars from Maven Central, Spark's spark-defaults.conf and
# log4j2.properties, and Chromium for the MLflow UI test.
# Usage: bash scripts/setup.sh          (rerunning it is cheap: finished steps are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${FASTFILL_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
log() { printf '[setup] %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi
}

# 1. Java 17+ for Spark 4.
if ! java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])'; then
  log "installing Java 17 (Spark 4 needs Java 17 or newer)"
  as_root apt-get update -qq && as_root apt-get install -y -qq openjdk-17-jre-headless >/dev/null \
    || { log "ERROR: install Java 17+ (e.g. apt-get install openjdk-17-jre-headless) and rerun"; exit 1; }
fi

# 2. Fashion-MNIST from Debian.
if [ ! -f "$FMNIST" ]; then
  log "installing the Debian package dataset-fashion-mnist"
  { as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || {
    log "ERROR: could not install dataset-fashion-mnist. As root run: apt-get update && apt-get install dataset-fashion-mnist"
    log "       (or set data.fashion_mnist_dir to a folder holding the four Fashion-MNIST IDX .gz files)"
    exit 1; }
fi

# 3. Virtualenv with pinned packages (skipped when setup.py and constraints.txt are unchanged).
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.fastfill-installed"
WANT=$(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  log "installing packages (torch, pyspark, delta-spark, mlflow, faiss-cpu, ...) into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev,bench,databricks]"
  echo "$WANT" > "$STAMP"
else
  log "packages up to date in $VENV"
fi

# 4. Delta Lake jars (Maven Central) into .cache/ivy, the venv's spark-defaults.conf and a quiet
#    log4j2.properties (Spark at WARN; --set spark.log_level=INFO brings its INFO lines back).
"$VENV/bin/python" -m fastfill_udfs.spark.jars | sed 's/^/[setup] /'

# 5. Chromium (Debian) for the MLflow UI test and scripts/mlflow_screenshots.py; optional.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  log "installing the Debian package chromium (the MLflow UI test opens the UI in it)"
  { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq chromium >/dev/null; } \
    || log "note: could not install chromium; the MLflow UI test fails under scripts/test.sh (as root: apt-get install chromium)"
fi
log "done: activate with 'source $VENV/bin/activate' (environment size: $(du -sh "$VENV" | cut -f1))"
