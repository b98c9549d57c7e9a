#!/usr/bin/env bash
# Start the Prefect server (API + UI) on PostgreSQL, in the foreground.
#
#   infra/start-server.sh
#
# Creates the database if it does not exist (psql/createdb), points Prefect at it, turns analytics
# off and runs `prefect server start`. Run it under systemd, tmux or nohup on the orchestration host.
# Settings (environment variables, defaults in brackets):
#   PREFECT_SERVER_HOST [0.0.0.0]    address to listen on (the workers and browsers must reach it)
#   PREFECT_SERVER_PORT [4200]       port of the API (/api) and the UI (/)
#   PREFECT_PUBLIC_URL  [http://<this host's name>:<port>]  how browsers reach this server (the UI
#                                    calls the API at PREFECT_PUBLIC_URL/api)
#   PG_HOST [127.0.0.1]  PG_PORT [5432]  PG_USER [postgres]  PG_PASSWORD [unset: trust or ~/.pgpass]
#   PG_DATABASE [prefect]            Prefect's own database (not the wanflow catalog)
#   PREFECT_HOME [$WANFLOW_HOME/.prefect]  Prefect's local files
#   PREFECT [$WANFLOW_HOME/.venv/bin/prefect, else `prefect` on PATH]
# Workers and clients then use PREFECT_API_URL=$PREFECT_PUBLIC_URL/api.
set -euo pipefail

WANFLOW_HOME="${WANFLOW_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PREFECT="${PREFECT:-$([[ -x "$WANFLOW_HOME/.venv/bin/prefect" ]] && echo "$WANFLOW_HOME/.venv/bin/prefect" || echo prefect)}"
HOST="${PREFECT_SERVER_HOST:-0.0.0.0}"
PORT="${PREFECT_SERVER_PORT:-4200}"
PG_HOST="${PG_HOST:-127.0.0.1}"
PG_PORT="${PG_PORT:-5432}"
PG_USER="${PG_USER:-postgres}"
PG_DATABASE="${PG_DATABASE:-prefect}"

if [[ -z "${PREFECT_PUBLIC_URL:-}" ]]; then
  if [[ "$HOST" == "0.0.0.0" || "$HOST" == "::" ]]; then
    PREFECT_PUBLIC_URL="http://$(hostname -f 2>/dev/null || hostname):$PORT"
  else
    PREFECT_PUBLIC_URL="http://$HOST:$PORT"
  fi
fi

for tool in psql createdb "$PREFECT"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "start-server: $tool not found" >&2; exit 1; }
done

# The database: created once, migrated by the server itself at start.
if [[ -n "${PG_PASSWORD:-}" ]]; then export PGPASSWORD="$PG_PASSWORD"; fi
pg=(-h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")
if ! psql "${pg[@]}" -d postgres -tAc "SELECT 1" >/dev/null; then
  echo "start-server: PostgreSQL at $PG_HOST:$PG_PORT is not reachable as $PG_USER" >&2
  exit 1
fi
if [[ "$(psql "${pg[@]}" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")" != 1 ]]; then
  createdb "${pg[@]}" "$PG_DATABASE"
  echo "start-server: created database $PG_DATABASE on $PG_HOST:$PG_PORT"
fi

auth="$PG_USER"
if [[ -n "${PG_PASSWORD:-}" ]]; then
  # Percent-encode the password for the URL.
  auth="$PG_USER:$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$PG_PASSWORD")"
fi
export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$auth@$PG_HOST:$PG_PORT/$PG_DATABASE"
export PREFECT_HOME="${PREFECT_HOME:-$WANFLOW_HOME/.prefect}"
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-$PREFECT_PUBLIC_URL/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false
export DO_NOT_TRACK=1
# The server's own settings must not point it at another API.
unset PREFECT_API_URL

echo "start-server: Prefect on postgresql://$PG_HOST:$PG_PORT/$PG_DATABASE, UI $PREFECT_PUBLIC_URL," \
  "workers use PREFECT_API_URL=$PREFECT_PUBLIC_URL/api"
exec "$PREFECT" server start --host "$HOST" --port "$PORT"
