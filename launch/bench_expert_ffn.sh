#!/usr/bin/env bash
# Expert-FFN benchmark (impls vs lax.ragged_dot x3, device copy/matmul peaks measured in the same run).
#   launch/bench_expert_ffn.sh                 # full sweep (GPU/TPU): SmolLM2 + Llama-2-7B experts
#   launch/bench_expert_ffn.sh --quick         # CPU-sized subset
# Extra args go to `python -m readme_jax.bench.expert_ffn` (--json FILE, --dtype bfloat16|float32).
# Writes the markdown table to stdout and the JSON to ${OUT_DIR:-runs/bench}/expert_ffn_<backend>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${OUT_DIR:-runs/bench}
mkdir -p "$OUT_DIR"
BACKEND=$("$PY" -c 'import jax; print(jax.default_backend())')
exec "$PY" -m readme_jax.bench.expert_ffn --json "$OUT_DIR/expert_ffn_${BACKEND}.json" "$@"
