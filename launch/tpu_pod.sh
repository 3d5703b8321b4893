#!/usr/bin/env bash
# Expert-parallel Read-ME on a Cloud TPU VM pod slice: the same command on every worker at once
# (one JAX process per host); jax.distributed.initialize finds the other hosts from the TPU VM
# metadata (READMEJAX_LAUNCH=tpu; readme_jax.distributed.initialize_from_env).
#
# Usage:
#   TPU_NAME=my-v4-32 ZONE=us-central2-b [PROJECT=my-project] launch/tpu_pod.sh setup
#       copy this checkout (git HEAD) to every worker and `pip install -e '.[tpu]'` there
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh run [CMD ...]
#       run CMD on all workers (default: python -m readme_jax.train.sharded_demo
#       --out runs/ep_tpu --expert $EXPERT --steps 10; EXPERT defaults to 4)
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh kill
#       stop leftover python processes of a failed run (they hold the TPU)
# Environment: GCLOUD (default gcloud), REMOTE_DIR (default readme-jax, relative to $HOME).
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

ACTION="${1:-run}"
[[ $# -gt 0 ]] && shift
case "$ACTION" in
  setup)
    ROOT="$(cd "$(dirname "$0")/.." && pwd)"
    TGZ="$(mktemp -t readme-jax.XXXXXX).tgz"
    git -C "$ROOT" archive --format=tar.gz -o "$TGZ" HEAD
    "$GCLOUD" compute tpus tpu-vm scp "$TGZ" "$TPU_NAME:readme-jax.tgz" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf readme-jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && pip install -q -e '.[tpu]'"
    rm -f "$TGZ"
    ;;
  run)
    if [[ $# -gt 0 ]]; then
      CMD="$(printf '%q ' "$@")"
    else
      CMD="python -m readme_jax.train.sharded_demo --out runs/ep_tpu --expert $EXPERT --steps 10"
    fi
    on_all_workers "cd $REMOTE_DIR && READMEJAX_LAUNCH=tpu $CMD"
    ;;
  kill)
    on_all_workers "pkill -u \$USER -f readme_jax || true"
    ;;
  *)
    echo "tpu_pod.sh: unknown action '$ACTION' (setup | run | kill)" >&2
    exit 2
    ;;
esac
