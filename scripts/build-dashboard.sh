#!/usr/bin/env bash
# Build dashboard/ into dashboard/dist when it is missing or older than its sources.
set -euo pipefail
cd "$(dirname "$0")/../dashboard"
[ -f package.json ] || exit 0
if [ -d dist ] && [ -z "$(find src package.json -newer dist -print -quit 2>/dev/null)" ]; then
  exit 0
fi
npm ci --no-audit --no-fund --silent
npm run build --silent
