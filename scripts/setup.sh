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
"${UV[@]}" sync --frozen --quiet
