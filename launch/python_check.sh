#!/usr/bin/env bash
# Print the path of a Python >= 3.11 (readme-jax's minimum) or explain how to get one and exit 1.
# Usage: launch/python_check.sh [PYTHON]
#   tries PYTHON if given (only it), else python3.13, python3.12, python3.11, python3 on PATH.
# Used by launch/slurm_train.sbatch and, on every TPU worker, by launch/tpu_pod.sh (stock TPU VM
# images ship Python 3.10).
set -uo pipefail

if [[ $# -gt 0 && -n "$1" ]]; then CANDIDATES=("$1"); else CANDIDATES=(python3.13 python3.12 python3.11 python3); fi
FOUND=()
for py in "${CANDIDATES[@]}"; do
  path="$(command -v "$py" 2>/dev/null)" || continue
  ver="$("$path" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || continue
  if "$path" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "$path"
    exit 0
  fi
  FOUND+=("$path ($ver)")
done
{
  echo "readme-jax needs Python >= 3.11; found: ${FOUND[*]:-no python3 on PATH} (tried ${CANDIDATES[*]})."
  echo "Get one, then rerun (or pass PYTHON=/path/to/python3.11):"
  echo "  uv:         curl -LsSf https://astral.sh/uv/install.sh | sh && ~/.local/bin/uv python install 3.11"
  echo "              (then PYTHON=\$(~/.local/bin/uv python find 3.11))"
  echo "  Ubuntu:     sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11 python3.11-venv"
} >&2
exit 1
