#!/usr/bin/env bash
# The test suite in the project's own virtual environment. Extra arguments go to pytest.
# Test files run in PROBATTN_TEST_WORKERS parallel worker processes (default 2, one per
# core of the reference machine; pytest-xdist, one file per worker at a time so a file's
# fixtures are built once); PROBATTN_TEST_WORKERS=0 runs everything in this process.
# The 15 slowest tests are listed at the end (where the suite's time goes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest -n "${PROBATTN_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
