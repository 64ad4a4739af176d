#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head node and NUM_WORKERS worker
# nodes, each its own raylet with its own ports and resources, all on
# 127.0.0.1. It is the cheapest way to try `cdm submit`, the Jobs API, token
# authentication and multi-node placement before paying for real machines.
#
#   cluster/local_cluster.sh start     # head + 2 workers, dashboard on 127.0.0.1:8265
#   cdm submit -- cdm run configs/demo.toml
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop
#
# Settings (environment variables, defaults in brackets):
#   NUM_WORKERS [2]         worker nodes besides the head
#   CPUS_PER_NODE [1]       logical CPUs each node advertises (head and workers)
#   GPUS_PER_WORKER [0]     GPUs per worker node; worker i gets CUDA_VISIBLE_DEVICES
#                           i*G .. i*G+G-1 so two nodes never share a device
#   GCS_PORT [6379]         the head's GCS port (what `ray start --address` joins)
#   DASHBOARD_PORT [8265]   the dashboard and Jobs API (what `cdm submit` talks to)
#   PORT_BASE [20000]       node i uses ports PORT_BASE+100*i .. +99 for its raylet,
#                           object manager, agents and workers
#   OBJECT_STORE_MB [512]   object store per node (Ray's default, 30% of RAM per node, adds up fast)
#   STOP_GRACE_S [15]       how long `stop` waits after SIGTERM before SIGKILL
#   CLUSTER_DIR [${TMPDIR:-/tmp}/cdm-local-cluster]  Ray's temp dir, logs, session id
#   RAY [ray next to this repo's .venv, else ray on PATH]
#   RAY_AUTH_MODE [token]   `disabled` turns token authentication off
#
# `stop` ends only the processes this script started (it records their
# session id), never other Ray sessions on the machine: plain `ray stop`
# would kill every Ray process of every user session here.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

NUM_WORKERS="${NUM_WORKERS:-2}"
CPUS_PER_NODE="${CPUS_PER_NODE:-1}"
GPUS_PER_WORKER="${GPUS_PER_WORKER:-0}"
GCS_PORT="${GCS_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
PORT_BASE="${PORT_BASE:-20000}"
OBJECT_STORE_MB="${OBJECT_STORE_MB:-512}"
STOP_GRACE_S="${STOP_GRACE_S:-15}"
CLUSTER_DIR="${CLUSTER_DIR:-${TMPDIR:-/tmp}/cdm-local-cluster}"
# Token authentication on by default, as `ray start --head` does when a token exists.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$repo/.venv/bin/ray" ]]; then RAY="$repo/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
if [[ -z "$RAY" || ! -x "$RAY" ]]; then
    echo "error: no 'ray' executable; run 'make install' or set RAY=/path/to/ray" >&2
    exit 2
fi
# Job entrypoints run with the raylet's PATH: put this Python environment first
# so `python` and `cdm` in an entrypoint are the ones Ray itself runs from.
export PATH="$(dirname "$RAY"):$PATH"

session_file="$CLUSTER_DIR/session_id"
log_file="$CLUSTER_DIR/start.log"

session_id() {
    # The recorded session id, if that session still runs Ray from our temp dir
    # (a stale file after a reboot could name a reused id of someone else's session).
    [[ -f "$session_file" ]] || return 0
    local sid
    sid="$(cat "$session_file")"
    [[ "$sid" =~ ^[0-9]+$ ]] || return 0
    local members
    members="$(ps -o args= -s "$sid" 2>/dev/null || true)"
    if grep -qF -- "$CLUSTER_DIR/ray" <<<"$members"; then echo "$sid"; fi
}

session_pids() {
    # Every live process of session $1: daemons, raylets, agents, workers.
    # (zombies are already dead and cannot be signalled: leave them out)
    [[ -n "$1" ]] || return 0
    ps -o pid=,stat= -s "$1" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}' || true
}

ensure_token() {
    [[ "$RAY_AUTH_MODE" == "token" ]] || return 0
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then return 0; fi
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        [[ -s "$RAY_AUTH_TOKEN_PATH" ]] && return 0
        echo "error: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty" >&2
        exit 2
    fi
    # Creates ~/.ray/auth_token only if there is none; the token itself goes nowhere.
    "$RAY" get-auth-token --generate >/dev/null 2>&1
}

node_ports() {
    # Ports of node $1 (0 = head): each node owns a block of 100.
    local base=$((PORT_BASE + 100 * $1))
    echo "--object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024))" \
         "--node-manager-port=$base --object-manager-port=$((base + 1))" \
         "--dashboard-agent-listen-port=$((base + 2)) --dashboard-agent-grpc-port=$((base + 3))" \
         "--runtime-env-agent-port=$((base + 4)) --metrics-export-port=$((base + 5))" \
         "--min-worker-port=$((base + 10)) --max-worker-port=$((base + 99))"
}

start_nodes() {
    # Runs inside its own session (see `start`): its pid is the session id.
    echo $$ >"$session_file"
    # shellcheck disable=SC2046
    "$RAY" start --head --disable-usage-stats \
        --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --ray-client-server-port=$((PORT_BASE + 6)) \
        --temp-dir="$CLUSTER_DIR/ray" \
        --num-cpus="$CPUS_PER_NODE" --num-gpus=0 --resources='{"head": 1}' \
        $(node_ports 0)
    for ((i = 1; i <= NUM_WORKERS; i++)); do
        local gpus=""
        if ((GPUS_PER_WORKER > 0)); then
            gpus="$(seq -s, $(((i - 1) * GPUS_PER_WORKER)) $((i * GPUS_PER_WORKER - 1)))"
        fi
        # shellcheck disable=SC2046
        CUDA_VISIBLE_DEVICES="${gpus:-${CUDA_VISIBLE_DEVICES:-}}" "$RAY" start --disable-usage-stats \
            --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 \
            --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_WORKER" \
            --resources="{\"worker\": 1, \"worker_$i\": 1}" \
            $(node_ports "$i")
    done
}

cmd_start() {
    if [[ -n "$(session_id)" ]]; then
        echo "a local cluster from $CLUSTER_DIR is already running; '$0 stop' first" >&2
        exit 1
    fi
    mkdir -p "$CLUSTER_DIR"
    ensure_token
    echo "starting a head and $NUM_WORKERS worker node(s) on 127.0.0.1 (log: $log_file)"
    # A fresh session holds every process Ray starts, so `stop` can end exactly these.
    if ! setsid -w "$0" _start_nodes >"$log_file" 2>&1; then
        echo "error: ray start failed; the end of $log_file:" >&2
        tail -n 25 "$log_file" >&2
        cmd_stop >/dev/null 2>&1 || true
        exit 1
    fi
    echo "cluster up: $((NUM_WORKERS + 1)) nodes, dashboard and Jobs API at http://127.0.0.1:$DASHBOARD_PORT"
    echo "submit with:  cdm submit --address http://127.0.0.1:$DASHBOARD_PORT -- cdm run configs/demo.toml"
    echo "stop with:    $0 stop"
}

cmd_stop() {
    local sid pids
    sid="$(session_id)"
    pids="$(session_pids "$sid")"
    if [[ -z "$pids" ]]; then
        echo "no local cluster running from $CLUSTER_DIR"
        rm -f "$session_file"
        return 0
    fi
    # SIGTERM first so raylets flush logs; GCS and raylets can take a few seconds.
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 $((STOP_GRACE_S * 2))); do
        sleep 0.5
        pids="$(session_pids "$sid")"
        [[ -z "$pids" ]] && break
    done
    if [[ -n "$pids" ]]; then kill -KILL $pids 2>/dev/null || true; fi
    rm -f "$session_file"
    echo "local cluster stopped"
}

cmd_status() {
    if [[ -z "$(session_id)" ]]; then
        echo "no local cluster running from $CLUSTER_DIR"
        return 3
    fi
    "$RAY" status --address="127.0.0.1:$GCS_PORT"
    echo "dashboard and Jobs API: http://127.0.0.1:$DASHBOARD_PORT"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    _start_nodes) start_nodes ;;
    *)
        echo "usage: $0 start|stop|status   (settings: see the top of this file)" >&2
        exit 2
        ;;
esac
