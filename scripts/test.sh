#!/usr/bin/env bash
# Set up the environment if needed, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check advantageflow tests benchmarks
exec .venv/bin/python -m pytest "$@"
