#!/usr/bin/env bash
# Set everything up and run lint, types and every test (the slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
echo "== ruff"
"${UV[@]}" run --frozen ruff check .
"${UV[@]}" run --frozen ruff format --check src tests bench
echo "== basedpyright (strict)"
"${UV[@]}" run --frozen basedpyright
echo "== dashboard (build, svelte-check, Vitest)"
if [ -f dashboard/package.json ] && command -v npm >/dev/null 2>&1; then
  bash scripts/build-dashboard.sh
  (cd dashboard && npm run check --silent && npm test --silent)
else
  echo "exo: npm not found: the dashboard is not built or unit-tested (its browser test skips)" >&2
fi
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian's chromium for the dashboard's browser test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "exo: chromium did not install; the dashboard's browser test will skip" >&2
fi
echo "== pytest"
"${UV[@]}" run --frozen pytest -q "$@"
