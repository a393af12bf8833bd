#!/usr/bin/env bash
# The test suite in the project's own virtual environment. Extra arguments go to pytest.
# Test files run in PROBATTN_TEST_WORKERS parallel worker processes (default 2, one per
# core of the reference machine; pytest-xdist, one file per worker at a time so a file's
# fixtures are built once); PROBATTN_TEST_WORKERS=0 runs everything in this process.
# The 15 slowest tests are listed at the end (where the suite's time goes).
# Everything the suite writes outside its tests' own folders (TensorFlow's autograph files,
# the converter's scratch, Ray's session) goes to one temporary folder that is removed when
# the suite passes; when it fails the folder stays, with the failed tests' folders, and its
# path is printed. A passed test's folder is removed when the test ends (pyproject.toml).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
SUITE_TMP="$(mktemp -d)"
rc=0
TMPDIR="$SUITE_TMP" python -m pytest -n "${PROBATTN_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@" || rc=$?
if [ "$rc" -eq 0 ]; then
  rm -rf "$SUITE_TMP"
else
  echo "the suite's temporary files, kept for the failures: $SUITE_TMP" >&2
fi
exit "$rc"
