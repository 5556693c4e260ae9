#!/usr/bin/env bash
# README command 1: install, then run the service on the embedded default
# (SQLite, a serverless Celery transport, a real worker process, local artifacts)
# at http://127.0.0.1:8000. Extra arguments go to `qforge serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/qforge serve "$@"
