#!/usr/bin/env bash
# The main job: train on the bundled real dataset, export every format, verify parity,
# print the parity table. Usage: bash scripts/main_job.sh [OUT_DIR] (default runs/main).
# PROBATTN_TOKENIZER=regex trains with MediaPipe's regex tokenizer (the bundle then has the mediapipe format).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
OUT="${1:-$ROOT/runs/main}"
DATASET="${PROBATTN_DATASET:-rotten_tomatoes}"
TOKENIZER="${PROBATTN_TOKENIZER:-wordlevel}"
echo "== train ($DATASET, $TOKENIZER tokenizer) -> $OUT/run" >&2
probattn train --dataset "$DATASET" --tokenizer "$TOKENIZER" --out "$OUT/run" --overwrite
echo "== export -> $OUT/bundle" >&2
probattn export "$OUT/run" --out "$OUT/bundle" --overwrite
echo "== verify" >&2
probattn verify "$OUT/bundle"
