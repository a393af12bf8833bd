#!/usr/bin/env bash
# Peak memory (sum of RSS over the process tree: exporter + TFLite converter child) and
# wall time of a full export. Usage: bash scripts/export_memory.sh [RUN_DIR] [OUT]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
RUN="${1:-$ROOT/runs/main/run}"
OUT="${2:-$(mktemp -d)/bundle}"
start=$(date +%s.%N)
probattn export "$RUN" --out "$OUT" --overwrite >/dev/null 2>&1 &
pid=$!
peak=0
tree() { echo "$1"; for c in $(pgrep -P "$1" || true); do tree "$c"; done; }
while kill -0 "$pid" 2>/dev/null; do
  pids=$(tree "$pid" | paste -sd, -)
  kb=$( (ps -o rss= -p "$pids" 2>/dev/null || true) | awk '{s+=$1} END {print s+0}')
  [ "$kb" -gt "$peak" ] && peak=$kb
  sleep 0.1
done
wait "$pid"
end=$(date +%s.%N)
printf 'full export: %.1f s wall, peak RSS of the process tree %d MB -> %s\n' \
  "$(echo "$end - $start" | bc)" "$((peak / 1024))" "$OUT"
