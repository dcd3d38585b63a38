#!/usr/bin/env bash
# Set everything up and start an exo node serving the built-in model on port 52415.
# Extra arguments go to `exo` (see `exo --help`), e.g. --api-port 8000 -v.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ -f dashboard/package.json ] && command -v npm >/dev/null 2>&1; then
  bash scripts/build-dashboard.sh || echo "exo: dashboard build failed; the API still runs" >&2
fi
exec "${UV[@]}" run --frozen exo --model smollm2-135m-instruct "$@"
