#!/usr/bin/env bash
# Run NPROC CPU processes on this machine as ONE JAX job: jax.distributed over 127.0.0.1,
# gloo CPU collectives, DEVICES fake CPU devices per process (NPROC x DEVICES global devices).
# The same code path as a multi-node cluster, for testing without one.
#
# Usage: launch/local_multiprocess.sh [-n NPROC] [-d DEVICES] [-p PORT] [-l LOGDIR] [-t SECONDS] [-- CMD ...]
#   default CMD: $PYTHON -m readme_jax.train.sharded_demo --out runs/ep_local --expert DEVICES
# Every process gets READMEJAX_LAUNCH=explicit, READMEJAX_COORDINATOR=127.0.0.1:PORT,
# READMEJAX_NUM_PROCESSES, READMEJAX_PROCESS_ID (read by readme_jax.distributed.initialize_from_env).
# If one process fails (or the time limit passes) the others are stopped; the exit status is
# the first failure's. Logs: LOGDIR/proc<i>.log; process 0's log is printed at the end.
set -euo pipefail

NPROC=2
DEVICES=4
PORT=""
LOGDIR=""
TIMEOUT=600
PYTHON="${PYTHON:-python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) NPROC="$2"; shift 2 ;;
    -d) DEVICES="$2"; shift 2 ;;
    -p) PORT="$2"; shift 2 ;;
    -l) LOGDIR="$2"; shift 2 ;;
    -t) TIMEOUT="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "local_multiprocess.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $# -gt 0 ]]; then
  CMD=("$@")
else
  CMD=("$PYTHON" -m readme_jax.train.sharded_demo --out runs/ep_local --expert "$DEVICES")
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ && "$DEVICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multiprocess.sh: -n and -d must be positive integers, got -n $NPROC -d $DEVICES" >&2; exit 2
fi
if [[ -z "$PORT" ]]; then  # a free port, chosen by the OS
  PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
LOGDIR="${LOGDIR:-$(mktemp -d -t readmejax-mp.XXXXXX)}"
mkdir -p "$LOGDIR"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES ${XLA_FLAGS:-}"
export READMEJAX_LAUNCH=explicit READMEJAX_COORDINATOR="127.0.0.1:$PORT" READMEJAX_NUM_PROCESSES="$NPROC"

echo "local_multiprocess: $NPROC processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOGDIR"
PIDS=()
for ((i = 0; i < NPROC; i++)); do
  READMEJAX_PROCESS_ID=$i "${CMD[@]}" >"$LOGDIR/proc$i.log" 2>&1 &
  PIDS+=($!)
done

stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM

STATUS=0
DEADLINE=$((SECONDS + TIMEOUT))
declare -A DONE=()
while [[ ${#DONE[@]} -lt $NPROC ]]; do
  for i in "${!PIDS[@]}"; do
    [[ -n "${DONE[$i]:-}" ]] && continue
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      rc=0; wait "${PIDS[$i]}" || rc=$?
      DONE[$i]=1
      if [[ $rc -ne 0 && $STATUS -eq 0 ]]; then
        STATUS=$rc
        echo "local_multiprocess: process $i exited with status $rc; stopping the others" >&2
        tail -n 30 "$LOGDIR/proc$i.log" >&2
        stop_all
      fi
    fi
  done
  if [[ $SECONDS -ge $DEADLINE && ${#DONE[@]} -lt $NPROC ]]; then
    echo "local_multiprocess: time limit ${TIMEOUT}s reached; stopping all processes" >&2
    stop_all
    [[ $STATUS -eq 0 ]] && STATUS=124
  fi
  sleep 0.2
done

echo "---- process 0 ($LOGDIR/proc0.log) ----"
grep -v -e '^\[Gloo\]' "$LOGDIR/proc0.log" || true
exit $STATUS
