#!/usr/bin/env bash
# Screenshot a page of the Prefect UI with headless Chromium (for docs and reports).
#
#   infra/screenshot.sh [--update | --force] [OUT.png] [URL]
#
# Nothing is ever overwritten unless asked:
#   (no OUT)   a new file, run/screenshots/prefect-run-<UTC time>.png (run/ is git-ignored)
#   OUT.png    that file; refused when it exists, unless --force
#   --update   replaces the picture the README shows, docs/prefect-run.png (the only way to write it)
# URL: an argument that starts with http:// or https://. Without one: the page of the newest finished
# generate-batch flow run, found through the API ($PREFECT_UI/runs/flow-run/<id>: its shard runs on a
# timeline, then its logs). The runs list is $PREFECT_UI/v2/runs. Chromium: Debian's package `chromium` (`apt-get install chromium`).
# Settings (environment variables, defaults in brackets):
#   PREFECT_API_URL  [http://127.0.0.1:4200/api]  the server's API
#   PREFECT_UI       [PREFECT_API_URL without /api]  where the UI is served
#   FLOW_RUN_ID      a flow run to show instead of the newest generate-batch run
#   RUN_DIR          [$WANFLOW_HOME/run]  where screenshots go without OUT (in screenshots/)
#   WINDOW_SIZE [1400,900]  VIRTUAL_TIME_BUDGET [15000]  ms of page time before the shot
#   CHROMIUM         [chromium, chromium-browser or google-chrome, whichever is on PATH]
set -euo pipefail

WANFLOW_HOME="${WANFLOW_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
DOCS_PICTURE="$WANFLOW_HOME/docs/prefect-run.png"
API="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
API="${API%/}"
UI="${PREFECT_UI:-${API%/api}}"

update=0
force=0
OUT=""
URL=""
for arg in "$@"; do
  case "$arg" in
    --update) update=1 ;;
    --force) force=1 ;;
    -h | --help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "screenshot: unknown option $arg (see --help)" >&2; exit 2 ;;
    http://* | https://*) URL="$arg" ;;
    *)
      if [[ -n "$OUT" ]]; then echo "screenshot: one OUT only ($OUT, $arg)" >&2; exit 2; fi
      OUT="$arg" ;;
  esac
done
if ((update)); then
  if [[ -n "$OUT" ]]; then
    echo "screenshot: --update writes $DOCS_PICTURE: give no OUT" >&2
    exit 2
  fi
  OUT="$DOCS_PICTURE"
elif [[ -z "$OUT" ]]; then  # a new file: the time it was taken, and a number if that is taken too
  base="${RUN_DIR:-$WANFLOW_HOME/run}/screenshots/prefect-run-$(date -u +%Y%m%d-%H%M%S)"
  OUT="$base.png"
  n=1
  while [[ -e "$OUT" ]]; do n=$((n + 1)); OUT="$base-$n.png"; done
else
  # The committed picture changes only with --update, whatever path leads to it.
  if [[ "$(realpath -m "$OUT")" == "$(realpath -m "$DOCS_PICTURE")" ]]; then
    echo "screenshot: $OUT is the picture the README shows: pass --update to replace it" >&2
    exit 2
  fi
  if [[ -e "$OUT" ]] && ((!force)); then
    echo "screenshot: $OUT exists: pass --force to overwrite it, or give another path" >&2
    exit 2
  fi
fi

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
work="$(mktemp -d)"
partial="$(dirname "$OUT")/.$(basename "$OUT").$$.partial"
trap 'rm -rf "$work" "$partial"' EXIT
# Chromium writes into a scratch folder; the picture replaces OUT (by a rename) only once it is whole.
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$work/profile" \
  --virtual-time-budget="${VIRTUAL_TIME_BUDGET:-15000}" --window-size="${WINDOW_SIZE:-1400,900}" \
  --screenshot="$work/shot.png" "$URL" >/dev/null 2>&1 || true
[[ -s "$work/shot.png" ]] || { echo "screenshot: Chromium wrote nothing for $URL" >&2; exit 1; }
cp "$work/shot.png" "$partial"
mv -f "$partial" "$OUT"
echo "screenshot: $URL -> $OUT"
