#!/usr/bin/env bash
# Set everything up and run lint, types and every test (the slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
echo "== ruff"
"${UV[@]}" run --frozen ruff check .
"${UV[@]}" run --frozen ruff format --check .
echo "== basedpyright (strict)"
"${UV[@]}" run --frozen basedpyright
echo "== pytest"
"${UV[@]}" run --frozen pytest -q "$@"
