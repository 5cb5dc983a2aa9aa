#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run lint and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m pytest -q -p no:cacheprovider "$@"
