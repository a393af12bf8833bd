#!/usr/bin/env bash
# Benchmarks for the bundle the main job made: bash scripts/bench.sh [BUNDLE] [probattn bench options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
BUNDLE="${1:-$ROOT/runs/main/bundle}"
shift || true
probattn bench "$BUNDLE" "$@"
