#!/usr/bin/env bash
# The whole test suite (what .ci/run runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QUORUM_DATA_DIR=${QUORUM_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec .venv/bin/python -m pytest -q --timeout=1800 "$@"
