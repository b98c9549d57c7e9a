#!/usr/bin/env bash
# Screenshot a page of the Prefect UI with headless Chromium (for docs and reports).
#
#   infra/screenshot.sh [OUT.png] [URL]
#
# Without URL: the page of the newest finished generate-batch flow run, found through the API
# ($PREFECT_UI/runs/flow-run/<id>: its shard runs on a timeline, then its logs). The runs list is
# $PREFECT_UI/v2/runs. Chromium: Debian's package `chromium` (`apt-get install chromium`).
# Settings (environment variables, defaults in brackets):
#   PREFECT_API_URL  [http://127.0.0.1:4200/api]  the server's API
#   PREFECT_UI       [PREFECT_API_URL without /api]  where the UI is served
#   FLOW_RUN_ID      a flow run to show instead of the newest generate-batch run
#   OUT              [docs/prefect-run.png]  also the first argument
#   WINDOW_SIZE [1400,900]  VIRTUAL_TIME_BUDGET [8000]  ms of page time before the shot
#   CHROMIUM         [chromium, chromium-browser or google-chrome, whichever is on PATH]
set -euo pipefail

WANFLOW_HOME="${WANFLOW_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
API="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
API="${API%/}"
UI="${PREFECT_UI:-${API%/api}}"
OUT="${1:-${OUT:-$WANFLOW_HOME/docs/prefect-run.png}}"
URL="${2:-}"

if [[ -z "${CHROMIUM:-}" ]]; then
  for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null 2>&1; then CHROMIUM="$candidate"; break; fi
  done
fi
if [[ -z "${CHROMIUM:-}" ]]; then
  echo "screenshot: no Chromium found; install it with: apt-get install -y chromium" >&2
  exit 1
fi

if [[ -z "$URL" ]]; then
  if [[ -z "${FLOW_RUN_ID:-}" ]]; then
    query='{"flows": {"name": {"any_": ["generate-batch"]}},
            "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]}}},
            "sort": "END_TIME_DESC", "limit": 1}'
    FLOW_RUN_ID="$(curl -fsS -X POST "$API/flow_runs/filter" -H 'Content-Type: application/json' -d "$query" |
      python3 -c 'import json, sys; runs = json.load(sys.stdin); print(runs[0]["id"] if runs else "")')"
    if [[ -z "$FLOW_RUN_ID" ]]; then
      echo "screenshot: no finished generate-batch run at $API" >&2
      exit 1
    fi
  fi
  URL="$UI/runs/flow-run/$FLOW_RUN_ID"
fi

mkdir -p "$(dirname "$OUT")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --virtual-time-budget="${VIRTUAL_TIME_BUDGET:-8000}" --window-size="${WINDOW_SIZE:-1400,900}" \
  --screenshot="$OUT" "$URL" >/dev/null 2>&1
[[ -s "$OUT" ]] || { echo "screenshot: Chromium wrote nothing for $URL" >&2; exit 1; }
echo "screenshot: $URL -> $OUT"
