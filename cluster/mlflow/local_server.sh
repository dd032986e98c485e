#!/usr/bin/env bash
# A real MLflow tracking server on PostgreSQL, on this machine, for tests and local searches.
#
#   cluster/mlflow/local_server.sh start  STATE_DIR [--pg-port N] [--port N] [-- EXTRA_MLFLOW_ARGS...]
#   cluster/mlflow/local_server.sh status STATE_DIR
#   cluster/mlflow/local_server.sh stop   STATE_DIR     # stops MLflow and PostgreSQL, keeps the data
#   cluster/mlflow/local_server.sh purge  STATE_DIR     # stop, then delete the data
#
# `start` prints the tracking URI (http://127.0.0.1:PORT) as the last line of stdout and writes
# STATE_DIR/server.env (MLFLOW_TRACKING_URI=..., PG_PORT=...). Both servers listen on 127.0.0.1
# only; MLFLOW_HOST=ADDRESS binds MLflow to another local address (e.g. a test network's bridge;
# MLflow's default --allowed-hosts admits private addresses). PostgreSQL has no Unix socket and asks for a password (scram-sha-256); the password is
# generated once into STATE_DIR/db_password (mode 600) and reaches MLflow through PGPASSWORD,
# never on a command line. Artifacts go to STATE_DIR/artifacts through MLflow's artifact proxy.
#
# Idempotent: `start` on a running STATE_DIR only checks /health and prints the URI; `start`
# after `stop` reuses the data (ports may change). Ports default to free ones.
#
# Needs: PostgreSQL server binaries (initdb, pg_ctl, createdb; when missing and running as
# root, installs Debian's `postgresql` with apt-get), and a Python with mlflow and psycopg2
# (MLFLOW_PYTHON, else the repo's .venv/bin/python, else python3).
# PostgreSQL refuses to run as root: as root, it runs as the `postgres` user.
set -euo pipefail

die() { echo "local_server.sh: $*" >&2; exit 1; }
log() { echo "local_server.sh: $*" >&2; }

usage() { sed -n '2,8p' "$0" >&2; exit 2; }

[[ $# -ge 2 ]] || usage
CMD=$1
STATE=$2
shift 2
PG_PORT=""
ML_PORT=""
ML_HOST=${MLFLOW_HOST:-127.0.0.1}
EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --pg-port) PG_PORT=${2:?}; shift 2 ;;
        --port) ML_PORT=${2:?}; shift 2 ;;
        --) shift; EXTRA_ARGS=("$@"); break ;;
        *) die "unknown option '$1'" ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ $CMD == start ]]; then
    mkdir -p "$STATE"
elif [[ ! -d $STATE ]]; then
    [[ $CMD == status ]] && { echo "stopped"; exit 1; }
    exit 0  # stop/purge: nothing to do
fi
STATE=$(cd "$STATE" && pwd)
DB_NAME=mlflow
DB_USER=mlflow

# --- which Python runs mlflow -------------------------------------------------------------
pick_python() {
    if [[ -n ${MLFLOW_PYTHON:-} ]]; then echo "$MLFLOW_PYTHON"
    elif [[ -x $REPO/.venv/bin/python ]]; then echo "$REPO/.venv/bin/python"
    else command -v python3 || die "no python3 found (set MLFLOW_PYTHON)"
    fi
}

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- PostgreSQL binaries and the user that runs them -----------------------------------------
find_pg_bin() {
    local d
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"; return 0
    fi
    # Debian keeps the server binaries off PATH, under /usr/lib/postgresql/VERSION/bin.
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r); do
        [[ -x $d/pg_ctl && -x $d/initdb ]] && { echo "$d"; return 0; }
    done
    return 1
}

install_pg() {
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL is not installed and this is not root: install Debian's 'postgresql' package"
    log "PostgreSQL not found: installing Debian's postgresql (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends postgresql >&2 || die "apt-get install postgresql failed"
}

PG_USER=""
as_pg() {  # run as the PostgreSQL user, from / (its binaries fail in a cwd they cannot read)
    # 9>&-: the server daemons must not inherit (and so hold) the lock on STATE/.lock
    if [[ -n $PG_USER ]]; then (cd / && runuser -u "$PG_USER" -- "$@" 9>&-); else "$@" 9>&-; fi
}

setup_pg_user() {
    if [[ $(id -u) -eq 0 ]]; then
        PG_USER=postgres
        id -u postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    fi
}

# Where the cluster lives: STATE/pg when the PostgreSQL user can write there, else (root, with
# STATE under a private dir such as pytest's /tmp/pytest-of-root) a fixed dir named after STATE.
pg_root() {
    if [[ -f $STATE/pg_root ]]; then cat "$STATE/pg_root"; return; fi
    local root=$STATE/pg
    mkdir -p "$root"
    if [[ -n $PG_USER ]]; then
        chown "$PG_USER": "$root"
        if ! as_pg test -w "$root" 2>/dev/null; then
            rmdir "$root"
            root=${TMPDIR:-/tmp}/biometry-pg-$(printf '%s' "$STATE" | sha1sum | cut -c1-12)
            mkdir -p "$root"
            chown "$PG_USER": "$root"
            chmod 700 "$root"
        fi
    fi
    echo "$root" >"$STATE/pg_root"
    echo "$root"
}

pg_running() { [[ -d $PGDATA ]] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

ml_pid() {
    local pid
    [[ -f $STATE/mlflow.pid ]] || return 1
    pid=$(cat "$STATE/mlflow.pid")
    # The pid must still be our mlflow server, not a recycled pid.
    [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "mlflow" || return 1
    echo "$pid"
}

health() {  # health URL -> 0 when it answers 200 OK
    "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

read_env() { [[ -f $STATE/server.env ]] && sed -n "s/^$1=//p" "$STATE/server.env"; }

# --- commands -------------------------------------------------------------------------------
start_pg() {
    if [[ ! -f $PGDATA/PG_VERSION ]]; then
        local pw pwfile
        [[ -f $STATE/db_password ]] || (umask 077; "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' >"$STATE/db_password")
        pw=$(cat "$STATE/db_password")
        pwfile=$PGROOT/pwfile
        (umask 077; printf '%s\n' "$pw" >"$pwfile")
        [[ -z $PG_USER ]] || chown "$PG_USER": "$pwfile"
        as_pg "$PGBIN/initdb" -D "$PGDATA" -U "$DB_USER" --pwfile="$pwfile" -E UTF8 --locale=C \
            --auth-local=scram-sha-256 --auth-host=scram-sha-256 --no-sync >"$PGROOT/initdb.log" 2>&1 \
            || { rm -f "$pwfile"; cat "$PGROOT/initdb.log" >&2; die "initdb failed"; }
        rm -f "$pwfile"
        cat >>"$PGDATA/postgresql.conf" <<'EOF'
# local_server.sh: loopback TCP only, no Unix socket
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
synchronous_commit = off
EOF
    fi
    if pg_running; then
        PG_PORT=$(read_env PG_PORT)
        [[ -n $PG_PORT ]] || die "PostgreSQL runs in $PGDATA but $STATE/server.env has no PG_PORT"
        return 0
    fi
    [[ -n $PG_PORT ]] || PG_PORT=$(free_port)
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGROOT/postgres.log" -o "-p $PG_PORT" -w -t 60 start >/dev/null \
        || { tail -n 20 "$PGROOT/postgres.log" >&2; die "PostgreSQL did not start on 127.0.0.1:$PG_PORT"; }
    if ! PGPASSWORD=$(cat "$STATE/db_password") as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" \
            -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB_NAME'" | grep -q 1; then
        PGPASSWORD=$(cat "$STATE/db_password") as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" "$DB_NAME" \
            || die "createdb $DB_NAME failed"
    fi
}

start_mlflow() {
    local uri pid
    [[ -n $ML_PORT ]] || ML_PORT=$(free_port)
    mkdir -p "$STATE/artifacts"
    local backend="postgresql+psycopg2://$DB_USER@127.0.0.1:$PG_PORT/$DB_NAME"
    # setsid: MLflow and its uvicorn workers get their own process group, which `stop` ends.
    cd "$STATE"  # MLflow's relative defaults (e.g. basic-auth's basic_auth.db) land in STATE
    # Job execution (GenAI evaluation jobs, a pool of huey consumers) is not needed for
    # tracking and costs seconds of start-up on a small machine: off unless asked for.
    PGPASSWORD=$(cat "$STATE/db_password") \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
        setsid "$PY" -m mlflow server \
        --backend-store-uri "$backend" \
        --artifacts-destination "$STATE/artifacts" \
        --host "$ML_HOST" --port "$ML_PORT" --workers 1 \
        "${EXTRA_ARGS[@]}" >"$STATE/mlflow.log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$STATE/mlflow.pid"
    uri="http://$ML_HOST:$ML_PORT"
    cat >"$STATE/server.env" <<EOF
MLFLOW_TRACKING_URI=$uri
PG_PORT=$PG_PORT
MLFLOW_PORT=$ML_PORT
BACKEND_STORE_URI=$backend
EOF
    local deadline=$((SECONDS + ${MLFLOW_START_TIMEOUT:-180}))
    until health "$uri/health"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$STATE/mlflow.log" >&2
            stop_all
            die "mlflow server exited (log: $STATE/mlflow.log)"
        fi
        ((SECONDS < deadline)) || { tail -n 30 "$STATE/mlflow.log" >&2; stop_all; die "no answer from $uri/health"; }
        sleep 0.3
    done
}

stop_all() {
    local pid i
    if pid=$(ml_pid); then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/mlflow.pid"
    if [[ -n $PGBIN ]] && pg_running; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
    fi
}

PY=$(pick_python)
setup_pg_user
PGBIN=$(find_pg_bin || true)

case $CMD in
    start)
        exec 9>"$STATE/.lock"
        flock 9
        if [[ -z $PGBIN ]]; then install_pg; PGBIN=$(find_pg_bin) || die "no initdb/pg_ctl after installing postgresql"; fi
        PGROOT=$(pg_root)
        PGDATA=$PGROOT/data
        if pid=$(ml_pid) && pg_running && uri=$(read_env MLFLOW_TRACKING_URI) && health "$uri/health"; then
            echo "$uri"
            exit 0
        fi
        "$PY" -c 'import mlflow, psycopg2' 2>/dev/null \
            || die "$PY cannot import mlflow and psycopg2: pip install the project's test extras (psycopg2-binary), or set MLFLOW_PYTHON"
        # Half-running (one server died): restart cleanly.
        if ml_pid >/dev/null; then stop_all; fi
        start_pg
        start_mlflow
        read_env MLFLOW_TRACKING_URI
        ;;
    status)
        PGROOT=$(cat "$STATE/pg_root" 2>/dev/null || echo "$STATE/pg")
        PGDATA=$PGROOT/data
        uri=$(read_env MLFLOW_TRACKING_URI || true)
        if [[ -n $uri ]] && ml_pid >/dev/null && health "$uri/health" && [[ -n $PGBIN ]] && pg_running; then
            echo "running $uri"
        else
            echo "stopped"; exit 1
        fi
        ;;
    stop|purge)
        [[ -f $STATE/pg_root ]] || [[ -f $STATE/mlflow.pid ]] || { [[ $CMD == purge ]] && rm -rf "$STATE"; exit 0; }
        exec 9>"$STATE/.lock"
        flock 9
        PGROOT=$(cat "$STATE/pg_root" 2>/dev/null || echo "$STATE/pg")
        PGDATA=$PGROOT/data
        stop_all
        if [[ $CMD == purge ]]; then
            rm -rf "$PGROOT" "$STATE"
        fi
        ;;
    *) usage ;;
esac
