#!/usr/bin/env bash
# A real Label Studio on 127.0.0.1 for tests and the demo, in its own virtual environment
# (it pins other numpy / JWT versions than Airflow).
#
#   scripts/label-studio.sh install              venv in $DTM_LS_VENV (default .cache/label-studio)
#   scripts/label-studio.sh start DIR PORT TOKEN data in DIR (the first start migrates: ~60 s)
#   scripts/label-studio.sh stop DIR
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DTM_LS_VENV:-$PWD/.cache/label-studio}
VERSION=1.23.2

case "${1:-}" in
  install)
    if [ ! -x "$VENV/bin/label-studio" ]; then
      python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
      "$VENV/bin/pip" install --quiet "label-studio==$VERSION" 2>&1 | grep -v "^WARNING: Location" || true
    fi
    "$VENV/bin/python" -c "import label_studio" ;;
  start)
    dir=${2:?start DIR PORT TOKEN}; port=${3:?}; token=${4:?}
    mkdir -p "$dir"
    (
      export LABEL_STUDIO_USERNAME=dtm@example.com LABEL_STUDIO_PASSWORD=dtm-test-password
      export LABEL_STUDIO_USER_TOKEN="$token" LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true
      export LABEL_STUDIO_BASE_DATA_DIR="$dir" LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false
      export SENTRY_DSN= FRONTEND_SENTRY_DSN=
      # The test S3 server listens on loopback, which Label Studio's SSRF protection refuses
      # as a storage endpoint. Off for this local test server only; a production server
      # reaches S3 at a routable address and keeps the protection on.
      export SSRF_PROTECTION_ENABLED=false
      setsid "$VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 --port "$port" \
        >>"$dir/server.log" 2>&1 &
      echo $! >"$dir/server.pid"
    )
    for _ in $(seq 300); do
      curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" 2>/dev/null | grep -q 200 && exit 0
      sleep 1
    done
    echo "label-studio: not healthy on port $port (see $dir/server.log)" >&2; exit 1 ;;
  stop)
    dir=${2:?stop DIR}
    [ -f "$dir/server.pid" ] || exit 0
    pid=$(cat "$dir/server.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$dir/server.pid" ;;
  *) echo "usage: label-studio.sh install | start DIR PORT TOKEN | stop DIR" >&2; exit 2 ;;
esac
