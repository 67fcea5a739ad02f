# Shared helpers for scripts/* (sourced, not run). Paths are absolute, so every script
# works from any directory; state lives under .data/ in the repository (git-ignored).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="$REPO_ROOT/.data"
NATS_PID_FILE="$DATA_DIR/nats.pid"
NATS_PORT_FILE="$DATA_DIR/nats.port"
NATS_LOG="$DATA_DIR/nats.log"
NATS_STORE="$DATA_DIR/nats"
NODE_PID_FILE="$DATA_DIR/node-1.pid"
NODE_LOG="$DATA_DIR/node-1.log"
CRM_NODE="$REPO_ROOT/target/release/crm-node"

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

# Stops the process recorded in pid file $1 (named $2): SIGTERM, then SIGKILL after
# $3 seconds (default 30). Removes the pid file. Does nothing when it is not running.
stop_pid_file() {
    local pid_file=$1 name=$2 grace_s=${3:-30} pid waited=0
    if ! pid_alive "$pid_file"; then
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

# The NATS URL of the server started by scripts/nats-up (default port 4222).
nats_url() {
    local port=4222
    if [ -f "$NATS_PORT_FILE" ]; then
        port="$(cat "$NATS_PORT_FILE")"
    fi
    echo "nats://127.0.0.1:$port"
}
