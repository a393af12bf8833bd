#!/usr/bin/env bash
# Create the project's virtual environment in .venv from pyproject.toml, or reuse it.
# Sourced by main_job.sh, test.sh and bench.sh; nothing installed by hand is needed.
# It installs only when .venv is new, or pyproject.toml or the interpreter changed, so a
# second run needs no network at all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
VENV="${PROBATTN_VENV:-$ROOT/.venv}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: $PY not found; install Python 3.11 (3.10 to 3.12 work) or set PYTHON=..." >&2
  exit 2
fi
want="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$want" ]; then
  echo "recreating $VENV for Python $want" >&2
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV with $("$PY" --version)" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.probattn-installed"
digest="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-$want"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$digest" ]; then
  echo "installing probattn and its dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"
  echo "$digest" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
