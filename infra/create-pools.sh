#!/usr/bin/env bash
# Create (or update) wanflow's two work pools and their concurrency limits.
#
#   PREFECT_API_URL=http://prefect-host:4200/api GPU_POOL_LIMIT=16 infra/create-pools.sh
#   PREFECT_API_URL=... GPU_POOL_TYPE=kubernetes WANFLOW_IMAGE=registry/wanflow:0.1.0 GPU_POOL_LIMIT=8 \
#     infra/create-pools.sh
#
#   wanflow-cpu  type process: runs generate-batch (planning, submitting shards, waiting); light
#   wanflow-gpu  type process (infra/pools/process-gpu.json) or kubernetes (infra/pools/kubernetes-gpu.json):
#                runs generate-shard, one GPU per flow run
# The GPU pool's concurrency limit is the number of GPUs in the whole fleet: Prefect starts no more
# shard runs than that at once, whatever the number of workers. Running it again updates templates and
# limits (a pool's type cannot change: delete it first with `prefect work-pool delete wanflow-gpu`).
# It also installs infra/automations/crash-silent-runs.yaml, which marks runs of dead machines Crashed.
# Settings (environment variables, defaults in brackets):
#   PREFECT_API_URL     the server's API (required unless a Prefect profile sets it)
#   GPU_POOL_LIMIT      [GPUs on this machine per `nvidia-smi -L`, else 1]  GPUs in the fleet
#   GPU_POOL_TYPE       [process]  or kubernetes (then WANFLOW_IMAGE is required)
#   WANFLOW_IMAGE       kubernetes: container image with CUDA, PyTorch and wanflow at $WANFLOW_HOME
#   K8S_NAMESPACE       [wanflow]  kubernetes: namespace of the job pods
#   CPU_POOL_LIMIT      [4]  batch runs at once
#   GPU_POOL [wanflow-gpu]  CPU_POOL [wanflow-cpu]  pool names (prefect.yaml names these two)
#   PREFECT [$WANFLOW_HOME/.venv/bin/prefect, else `prefect` on PATH]
set -euo pipefail

WANFLOW_HOME="${WANFLOW_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PREFECT="${PREFECT:-$([[ -x "$WANFLOW_HOME/.venv/bin/prefect" ]] && echo "$WANFLOW_HOME/.venv/bin/prefect" || echo prefect)}"
PYTHON="$([[ -x "$WANFLOW_HOME/.venv/bin/python" ]] && echo "$WANFLOW_HOME/.venv/bin/python" || echo python3)"
GPU_POOL="${GPU_POOL:-wanflow-gpu}"
CPU_POOL="${CPU_POOL:-wanflow-cpu}"
GPU_POOL_TYPE="${GPU_POOL_TYPE:-process}"
CPU_POOL_LIMIT="${CPU_POOL_LIMIT:-4}"
if [[ -z "${GPU_POOL_LIMIT:-}" ]]; then
  GPU_POOL_LIMIT="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)"
  [[ "$GPU_POOL_LIMIT" -gt 0 ]] || GPU_POOL_LIMIT=1
  echo "create-pools: GPU_POOL_LIMIT not set; using $GPU_POOL_LIMIT (GPUs on this machine)"
fi

case "$GPU_POOL_TYPE" in
  process)
    template="$WANFLOW_HOME/infra/pools/process-gpu.json"
    ;;
  kubernetes)
    : "${WANFLOW_IMAGE:?GPU_POOL_TYPE=kubernetes needs WANFLOW_IMAGE (the image of the job pods)}"
    # The image and namespace become the template's defaults (deployments may still override them).
    template="$(mktemp --suffix=.json)"
    trap 'rm -f "$template"' EXIT
    "$PYTHON" - "$WANFLOW_HOME/infra/pools/kubernetes-gpu.json" "$template" "$WANFLOW_IMAGE" \
      "${K8S_NAMESPACE:-wanflow}" <<'PY'
import json, sys
source, target, image, namespace = sys.argv[1:]
doc = json.load(open(source))
doc["variables"]["properties"]["image"]["default"] = image
doc["variables"]["properties"]["namespace"]["default"] = namespace
json.dump(doc, open(target, "w"), indent=2)
PY
    ;;
  *)
    echo "create-pools: GPU_POOL_TYPE must be process or kubernetes, not $GPU_POOL_TYPE" >&2
    exit 2
    ;;
esac

"$PREFECT" work-pool create "$CPU_POOL" --type process --overwrite
"$PREFECT" work-pool set-concurrency-limit "$CPU_POOL" "$CPU_POOL_LIMIT"
"$PREFECT" work-pool create "$GPU_POOL" --type "$GPU_POOL_TYPE" --base-job-template "$template" --overwrite
"$PREFECT" work-pool set-concurrency-limit "$GPU_POOL" "$GPU_POOL_LIMIT"
# Runs whose machine died stop sending heartbeats: this automation marks them Crashed (replaced if present).
automation="$WANFLOW_HOME/infra/automations/crash-silent-runs.yaml"
automation_name="$(sed -n 's/^name: *//p' "$automation")"
if "$PREFECT" automation inspect "$automation_name" >/dev/null 2>&1; then
  "$PREFECT" --no-prompt automation delete "$automation_name" >/dev/null
fi
"$PREFECT" automation create --from-file "$automation"
echo "create-pools: $CPU_POOL (process, limit $CPU_POOL_LIMIT), $GPU_POOL ($GPU_POOL_TYPE, limit $GPU_POOL_LIMIT)," \
  "automation $automation_name"
