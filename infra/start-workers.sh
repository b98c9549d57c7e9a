#!/usr/bin/env bash
# Start (or stop) this machine's Prefect workers in the background: one per GPU, plus optionally one
# for the CPU pool.
#
#   infra/start-workers.sh [start] [--cpu] [--no-gpu]    start the workers (idempotent)
#   infra/start-workers.sh status                        which workers run
#   infra/start-workers.sh stop                          stop them and their flow runs (TERM, then KILL)
#
# One GPU per flow run: GPU i gets its own worker on the GPU pool with CUDA_VISIBLE_DEVICES=i and
# `--limit 1`, so each generate-shard run sees exactly one GPU and a GPU never runs two shards. The
# pool's concurrency limit (infra/create-pools.sh, GPU_POOL_LIMIT) is the fleet's total GPU count.
# With GPUS_PER_JOB=N > 1 (videos that each run on N GPUs: the 14B models at 720P), the GPUs are taken N
# at a time instead: one worker per group of N, CUDA_VISIBLE_DEVICES listing them and
# WANFLOW_GPUS_PER_JOB=N, so each shard starts one torchrun group of N processes (flows/group.py); the
# pool's concurrency limit then counts groups. The layout comes from WANFLOW_ULYSSES_SIZE / _RING_SIZE /
# _CFG_PARALLEL / _DIT_ZERO3 / _T5_ZERO3 (auto when unset).
# `--cpu` also starts a worker on the CPU pool, for generate-batch runs (one such worker in the fleet
# is enough). Workers run from this checkout, which the deployments' pull step enters through
# WANFLOW_HOME. Everything else the flows need comes from this environment, so export it first (the
# WANFLOW_* settings may instead go into $WANFLOW_HOME/.env; AWS credentials may come from ~/.aws):
#   WANFLOW_CATALOG_URL=postgresql+psycopg://wanflow:...@db-host/wanflow
#   WANFLOW_STORAGE_ROOT=s3://bucket/videos  [WANFLOW_S3_ENDPOINT_URL=...]  AWS_ACCESS_KEY_ID=...
#   AWS_SECRET_ACCESS_KEY=...  WANFLOW_CHECKPOINTS='{"t2v-14B": "/models/Wan2.1-T2V-14B"}'
# Settings (environment variables, defaults in brackets):
#   PREFECT_API_URL    the server's API (required unless a Prefect profile sets it)
#   GPUS               [every GPU `nvidia-smi -L` lists]  GPU indices to serve, e.g. "0,1,2,3"; "" for none
#   GPUS_PER_JOB       [1]  GPUs per video; GPUS is split into consecutive groups of this many
#   GPU_POOL [wanflow-gpu]  CPU_POOL [wanflow-cpu]  CPU_WORKER_LIMIT [4]  batch runs this worker takes at once
#   RUN_DIR            [$WANFLOW_HOME/run]  logs (worker-gpu<i>.log, worker-cpu.log) and PID files
#   STOP_TIMEOUT       [30]  seconds `stop` gives flow runs to exit after SIGTERM before killing them
#   PREFECT_WORKER_QUERY_SECONDS [10]  how often workers poll the server
#   PREFECT [$WANFLOW_HOME/.venv/bin/prefect, else `prefect` on PATH]
set -euo pipefail

WANFLOW_HOME="${WANFLOW_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export WANFLOW_HOME
PREFECT="${PREFECT:-$([[ -x "$WANFLOW_HOME/.venv/bin/prefect" ]] && echo "$WANFLOW_HOME/.venv/bin/prefect" || echo prefect)}"
GPU_POOL="${GPU_POOL:-wanflow-gpu}"
CPU_POOL="${CPU_POOL:-wanflow-cpu}"
CPU_WORKER_LIMIT="${CPU_WORKER_LIMIT:-4}"
RUN_DIR="${RUN_DIR:-$WANFLOW_HOME/run}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PYTHONUNBUFFERED=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

mode=start cpu=0 gpu=1
for arg in "$@"; do
  case "$arg" in
    start|stop|status) mode="$arg" ;;
    --cpu) cpu=1 ;;
    --no-gpu) gpu=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start-workers: unknown argument $arg" >&2; usage >&2; exit 2 ;;
  esac
done

running() {  # true if the process exists and is not a zombie (an exited child nobody reaped yet)
  local state
  state="$(ps -o stat= -p "$1" 2>/dev/null)" && [[ -n "$state" && "$state" != Z* ]]
}
alive() { [[ -f "$1" ]] && running "$(cat "$1")"; }

start_one() {  # name, pid file, log file, then the environment and arguments of `prefect worker start`
  local name="$1" pidfile="$2" log="$3"; shift 3
  if alive "$pidfile"; then
    echo "start-workers: $name already runs (pid $(cat "$pidfile"))"
    return
  fi
  # setsid: the worker leads its own process group, apart from this shell.
  setsid env "$@" >>"$log" 2>&1 < /dev/null &
  echo $! >"$pidfile"
  echo "start-workers: $name started (pid $!, log $log)"
}

tree() {  # a process and all its descendants (flow runs live in sessions of their own, outside the group)
  local pid="$1" child
  echo "$pid"
  for child in $(ps -e -o pid= -o ppid= | awk -v p="$pid" '$2 == p { print $1 }'); do tree "$child"; done
}

wait_gone() {  # seconds, pids...: wait until none of the pids runs, at most that long
  local seconds="$1" p waited busy; shift
  for (( waited = 0; waited < seconds * 5; waited++ )); do
    busy=0
    for p in "$@"; do if running "$p"; then busy=1; break; fi; done
    (( busy )) || return 0
    sleep 0.2
  done
  return 1
}

stop_all() {
  # 1. TERM the flow runs the workers started: each gives its current job back to the catalog (pending)
  #    and ends Crashed in the UI; running the manifest again redoes the job.
  # 2. TERM the workers twice: Prefect's first TERM only stops them from taking new runs (a drain that
  #    never ends here), the second makes them exit at once.
  # Whatever still runs after STOP_TIMEOUT seconds is killed.
  local pidfile pid p names=() workers=() runs=()
  shopt -s nullglob
  for pidfile in "$RUN_DIR"/worker-*.pid; do
    pid="$(cat "$pidfile")"
    if running "$pid"; then
      names+=("$(basename "$pidfile" .pid)")
      workers+=("$pid")
      for p in $(tree "$pid"); do if [[ "$p" != "$pid" ]]; then runs+=("$p"); fi; done
    fi
    rm -f "$pidfile"
  done
  if (( ${#workers[@]} == 0 )); then echo "start-workers: no worker runs"; return; fi
  if (( ${#runs[@]} )); then
    kill -TERM "${runs[@]}" 2>/dev/null || true
    wait_gone "$STOP_TIMEOUT" "${runs[@]}" || kill -KILL "${runs[@]}" 2>/dev/null || true
  fi
  kill -TERM "${workers[@]}" 2>/dev/null || true
  sleep 1
  kill -TERM "${workers[@]}" 2>/dev/null || true
  wait_gone 10 "${workers[@]}" || kill -KILL "${workers[@]}" 2>/dev/null || true
  echo "start-workers: stopped ${names[*]}"
}

case "$mode" in
  stop) stop_all; exit 0 ;;
  status)
    shopt -s nullglob
    for pidfile in "$RUN_DIR"/worker-*.pid; do
      name="$(basename "$pidfile" .pid)"
      if alive "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: dead"; fi
    done
    exit 0 ;;
esac

command -v "$PREFECT" >/dev/null 2>&1 || { echo "start-workers: $PREFECT not found" >&2; exit 1; }
mkdir -p "$RUN_DIR"
cd "$WANFLOW_HOME"
host="$(hostname -s 2>/dev/null || hostname)"

if (( gpu )); then
  if [[ -z "${GPUS+set}" ]]; then
    GPUS="$( (nvidia-smi -L 2>/dev/null || true) | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p' | paste -sd, -)"
  fi
  if [[ -z "$GPUS" ]]; then
    echo "start-workers: no GPU found (nvidia-smi -L) and GPUS is empty: no GPU-pool worker started" >&2
  fi
  IFS=, read -r -a gpu_list <<<"$GPUS"
  per_job="${GPUS_PER_JOB:-1}"
  if (( ${#gpu_list[@]} % per_job )); then
    echo "start-workers: ${#gpu_list[@]} GPUs ($GPUS) do not split into groups of GPUS_PER_JOB=$per_job" >&2
    exit 2
  fi
  for (( g = 0; g < ${#gpu_list[@]}; g += per_job )); do
    devices="$(IFS=,; echo "${gpu_list[*]:g:per_job}")"
    name="gpu${devices//,/-}"
    start_one "$name" "$RUN_DIR/worker-$name.pid" "$RUN_DIR/worker-$name.log" \
      CUDA_VISIBLE_DEVICES="$devices" WANFLOW_GPUS_PER_JOB="$per_job" \
      "$PREFECT" worker start --pool "$GPU_POOL" --name "$host-$name" --limit 1
  done
fi
if (( cpu )); then
  start_one cpu "$RUN_DIR/worker-cpu.pid" "$RUN_DIR/worker-cpu.log" \
    CUDA_VISIBLE_DEVICES= \
    "$PREFECT" worker start --pool "$CPU_POOL" --name "$host-cpu" --limit "$CPU_WORKER_LIMIT"
fi
