#!/usr/bin/env bash
# The main job, end to end: set up, start the local stack, enrol the ci gallery, search every probe
# through the queue, print hit rates, stop the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/quorum demo "$@"
