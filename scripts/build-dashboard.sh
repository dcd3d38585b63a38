#!/usr/bin/env bash
# Build dashboard/ into dashboard/dist when it is missing or older than its sources.
# Installs the locked npm packages first when node_modules is missing or stale.
set -euo pipefail
cd "$(dirname "$0")/../dashboard"
[ -f package.json ] || exit 0
if ! command -v npm >/dev/null 2>&1; then
  echo "exo: npm is not installed; the dashboard is not built (the daemon says so at /)" >&2
  exit 1
fi
sources=(src index.html package.json package-lock.json vite.config.ts svelte.config.js tsconfig.json)
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
if [ -f dist/index.html ] && [ -z "$(find "${sources[@]}" -newer dist/index.html -print -quit 2>/dev/null)" ]; then
  exit 0
fi
npm run build --silent
