#!/usr/bin/env bash
# Set up the environment if needed, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check advantageflow tests benchmarks
# Two workers (pytest-xdist): the tests run on one torch thread each (tests/conftest.py), so one
# process left a core idle; tests that need both cores share one worker (marker two_cores).
exec .venv/bin/python -m pytest -n "${AF_TEST_WORKERS:-2}" --dist loadgroup "$@"
