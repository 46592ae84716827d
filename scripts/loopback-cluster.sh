#!/usr/bin/env bash
# The distributed deployment on one machine, without containers: PostgreSQL (metadata
# database) and Redis (Celery broker) from Debian's packages on 127.0.0.1, and Airflow on
# CeleryExecutor as separate processes: API server, scheduler, DAG processor, triggerer,
# a CPU worker (queue "default") and a GPU worker (queue "gpu"). What docker/compose.yaml
# runs in containers, here in plain processes.
#
#   scripts/loopback-cluster.sh install          # Debian's postgresql and redis-server (as root)
#   scripts/loopback-cluster.sh start DIR        # everything; DIR/env holds the settings
#   scripts/loopback-cluster.sh stop DIR
#   scripts/loopback-cluster.sh start-worker DIR cpu|gpu
#   scripts/loopback-cluster.sh kill-worker DIR cpu|gpu     # SIGKILL, as a lost machine
#
# The DTM_* locations (and AWS_* / DTM_S3_ENDPOINT for S3) come from the caller's
# environment, as for any Airflow deployment. Logs: DIR/logs/<process>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
cmd=${1:-}
DIR=${2:-}

pg_bin() { ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_proc() {  # name, command...: a detached process group with its pid in DIR/pids/
  local name=$1; shift
  mkdir -p "$DIR/logs" "$DIR/pids"
  # a new file, not the old one truncated: a process left from an earlier start that still
  # writes to the old file writes at its own offset and would bury the fresh log's lines
  rm -f "$DIR/logs/$name.log"
  setsid "$@" >"$DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$name"
}

stop_proc() {  # name [signal]: the process and everything it started, as a lost machine loses them
  local f="$DIR/pids/$1" sig=${2:-TERM}
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  # setsid made the process a session leader. Airflow puts each task process in a process
  # group of its own (so that it can kill the task's tree), so killing the group alone would
  # leave a running task behind; the session holds them all.
  kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
  pkill "-$sig" -s "$pid" 2>/dev/null || true
  for _ in $(seq 50); do pgrep -s "$pid" >/dev/null 2>&1 || kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  pkill -KILL -s "$pid" 2>/dev/null || true
  rm -f "$f"
}

worker() {  # cpu|gpu
  # shellcheck disable=SC1091
  source "$DIR/env"
  local queue=default
  [ "$1" = gpu ] && queue=${DTM_GPU_QUEUE:-gpu}
  DTM_WORKER_NAME="$1-worker" start_proc "worker-$1" "$ROOT/.venv/bin/airflow" celery worker \
    --queues "$queue" --concurrency 2 --celery-hostname "$1@%h" --skip-serve-logs
}

case "$cmd" in
  install)
    if ! command -v redis-server >/dev/null || [ -z "$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null)" ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql redis-server >/dev/null
    fi
    ;;
  start)
    [ -n "$DIR" ] || { echo "usage: $0 start DIR" >&2; exit 2; }
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    PG_PORT=$(free_port); REDIS_PORT=$(free_port); API_PORT=$(free_port)
    # PostgreSQL refuses to run as root: its data folder belongs to the postgres user.
    mkdir -p "$DIR/pgdata" "$DIR/pgrun"
    as_pg=()
    if [ "$(id -u)" = 0 ]; then chown postgres "$DIR/pgdata" "$DIR/pgrun"; as_pg=(runuser -u postgres --); fi
    "${as_pg[@]}" "$(pg_bin)/initdb" -D "$DIR/pgdata" -U airflow --auth=trust >"$DIR/initdb.log" 2>&1
    "${as_pg[@]}" "$(pg_bin)/pg_ctl" -D "$DIR/pgdata" -l "$DIR/pgrun/postgres.log" -w \
      -o "-h 127.0.0.1 -p $PG_PORT -k $DIR/pgrun" start >/dev/null
    "$(pg_bin)/createdb" -h 127.0.0.1 -p "$PG_PORT" -U airflow airflow
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes \
      --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log"
    cat > "$DIR/env" <<EOF
export AIRFLOW_HOME=$DIR/airflow
export AIRFLOW__CORE__EXECUTOR=CeleryExecutor
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://airflow@127.0.0.1:$PG_PORT/airflow
export AIRFLOW__CELERY__BROKER_URL=redis://127.0.0.1:$REDIS_PORT/0
export AIRFLOW__CELERY__RESULT_BACKEND=db+postgresql+psycopg2://airflow@127.0.0.1:$PG_PORT/airflow
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$ROOT/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__HOSTNAME_CALLABLE=dtm_ops.deploy.worker_hostname
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=$API_PORT
export AIRFLOW__API__BASE_URL=http://127.0.0.1:$API_PORT
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$API_PORT/execution/
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=admin:admin
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=$DIR/passwords.json
export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=${DTM_HEARTBEAT_TIMEOUT_S:-20}
export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL=2
export AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL=5
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=5
export GX_ANALYTICS_ENABLED=false
export PATH=$ROOT/.venv/bin:\$PATH
EOF
    [ -f "$DIR/passwords.json" ] || echo '{"admin": "admin"}' > "$DIR/passwords.json"
    # shellcheck disable=SC1091
    source "$DIR/env"
    airflow db migrate >"$DIR/migrate.log" 2>&1
    airflow pools set "${DTM_GPU_POOL:-gpu}" 2 "GPU workers" >/dev/null
    start_proc api-server airflow api-server
    start_proc scheduler airflow scheduler
    start_proc dag-processor airflow dag-processor
    start_proc triggerer airflow triggerer
    worker cpu
    worker gpu
    echo "loopback cluster in $DIR: API http://127.0.0.1:$API_PORT (admin/admin), settings in $DIR/env"
    ;;
  start-worker) worker "${3:?cpu or gpu}" ;;
  kill-worker) stop_proc "worker-${3:?cpu or gpu}" KILL ;;
  stop)
    [ -n "$DIR" ] && [ -d "$DIR" ] || exit 0
    for p in worker-gpu worker-cpu triggerer dag-processor scheduler api-server; do stop_proc "$p"; done
    [ -f "$DIR/redis.pid" ] && kill "$(cat "$DIR/redis.pid")" 2>/dev/null || true
    if [ -d "$DIR/pgdata" ]; then
      as_pg=(); [ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres --)
      "${as_pg[@]}" "$(pg_bin)/pg_ctl" -D "$DIR/pgdata" -m fast stop >/dev/null 2>&1 || true
    fi
    ;;
  *) echo "usage: $0 install | start DIR | stop DIR | start-worker DIR cpu|gpu | kill-worker DIR cpu|gpu" >&2; exit 2 ;;
esac
