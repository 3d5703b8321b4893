#!/usr/bin/env bash
# The prepared device check of the expert FFN (peaks, pallas correctness, decode/prefill speed vs
# ragged_dot x3 and xla, a block-size sweep), sized to finish in <= 8 minutes on a lent H100/H200:
#   PYTHONPATH=. bash launch/device_check.sh "$OUT"             # on the device (its own python3/jax)
#   bash launch/device_check.sh runs/device_check --quick      # CPU dry run (interpret, tiny shapes)
# Writes OUT_DIR/device_check.json, device_check.md and device_check.log. Extra args go to
# `python -m readme_jax.bench.device_check` (--shapes, --tokens, --dtypes, --quick, --budget-s).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/device_check}
shift || true
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT_DIR"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
# The python budget (420 s by default) skips work that would not fit; timeout is the backstop.
timeout 480 "$PY" -m readme_jax.bench.device_check --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/device_check.log"
