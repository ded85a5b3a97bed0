#!/usr/bin/env bash
# Set up the environment if needed, then run the main job (or `advantageflow train ARGS`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/advantageflow train "$@"
