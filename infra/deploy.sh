#!/usr/bin/env bash
# Register the deployments of prefect.yaml (generate-batch, generate-shard) with the Prefect server.
#
#   PREFECT_API_URL=http://prefect-host:4200/api infra/deploy.sh
#
# Runs `prefect --no-prompt deploy --all` from the repository root; run it again after changing
# prefect.yaml or a flow's parameters. Extra arguments go to `prefect deploy`. The pools must exist
# first (infra/create-pools.sh).
# Settings (environment variables, defaults in brackets):
#   PREFECT_API_URL  the server's API (required unless a Prefect profile sets it)
#   PREFECT [$WANFLOW_HOME/.venv/bin/prefect, else `prefect` on PATH]
set -euo pipefail

WANFLOW_HOME="${WANFLOW_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PREFECT="${PREFECT:-$([[ -x "$WANFLOW_HOME/.venv/bin/prefect" ]] && echo "$WANFLOW_HOME/.venv/bin/prefect" || echo prefect)}"
cd "$WANFLOW_HOME"
# prefect.yaml's pull step is `{{ $WANFLOW_HOME }}`: with the variable unset here it is stored as is
# and each worker resolves it to its own checkout when a run starts (set, it would be baked in).
unset WANFLOW_HOME
exec "$PREFECT" --no-prompt deploy --all "$@"
