#!/usr/bin/env bash
# Shared by run.sh and test.sh: make sure uv exists and the locked environment is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v uv >/dev/null 2>&1; then
  UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
  UV=(python3 -m uv)
else
  echo "exo: installing uv with pip (one time)" >&2
  # A distribution's own Python may be "externally managed" (PEP 668): then --user with
  # --break-system-packages is the least intrusive way to get uv.
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv 2>/dev/null ||
    python3 -m pip install --quiet --user --break-system-packages uv
  UV=(python3 -m uv)
fi
export UV_PYTHON_DOWNLOADS=never
# Bytecode compiled once at install (~40 s on a 2-core machine the first time, ~1 s after):
# without it every daemon, runner and test process compiles torch's Python again wherever
# .pyc files are not written (PYTHONDONTWRITEBYTECODE, a read-only venv), ~7 s of each
# torch runner's start here. uv compiles site-packages; our editable sources are compiled
# beside them (stale .pyc files are ignored by Python, so editing needs no step).
"${UV[@]}" sync --frozen --quiet --compile-bytecode
"${UV[@]}" run --frozen python -m compileall -q src >/dev/null
