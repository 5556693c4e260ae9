#!/usr/bin/env bash
# README command 2: install, then run the whole test suite.
# The end-to-end tests start their own PostgreSQL and Redis, and drive the dashboard in
# Chromium; as root this installs them with apt when they are missing. Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
need=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # the dashboard's browser tests
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: ${need[*]} missing and not root: the tests that need them will skip (fail under CI=true)" >&2
  fi
fi
# The Triton kernel tests run in a process of their own: without a GPU they run through
# Triton's interpreter, a process-wide mode that must be on before triton is first imported,
# and in one process with the whole suite an earlier test's imports left the interpreter
# unable to patch triton.language (every kernel launch failed there, never alone).
kernels=tests/quantcore/kernels
set +e
.venv/bin/python -m pytest --ignore="$kernels" "$@"
rc=$?
interpret=$(.venv/bin/python -c 'import torch; print(0 if torch.cuda.is_available() else 1)')
TRITON_INTERPRET=$interpret .venv/bin/python -m pytest "$kernels" "$@"
rc_kernels=$?
set -e
if [ "$rc" = 5 ] || [ "$rc_kernels" = 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
[ "$rc" = 0 ] || exit "$rc"
exit "$rc_kernels"
