# shellcheck shell=bash
# Shared helpers of the deploy/ scripts. Sourced, never run on its own.
#
# Every process a script starts gets a state folder <state-root>/<name>/ holding
#   pid        the process id (the scripts stop it by this id only)
#   log        everything the process prints
#   command    the exact command line, for the record
#   flwr-home  its own FLWR_HOME
# The state root is ./deploy-state unless --state-root or $FEDTEXTGRAD_DEPLOY_STATE says otherwise.

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="$(basename "$0")"
# Flower versions these scripts were written against (the flags changed in 1.42:
# one HTTP port per SuperLink, --host/--port, SuperExec without --plugin-type).
FLWR_TESTED_SERIES="1.42"

# Nothing leaves the machine by itself: no telemetry, no update check, and the app's
# dependencies are installed on every machine beforehand (no `uv sync` at run time).
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# logs are written as they happen (a block-buffered log loses its last lines when the process dies)
export PYTHONUNBUFFERED=1

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

say() {
    echo "$PROG: $*"
}

warn() {
    echo "$PROG: WARNING: $*" >&2
}

insecure_warning() {
    # $1: what runs without TLS
    warn "--insecure: $1 runs WITHOUT TLS and WITHOUT node authentication. Everything, prompts included,"
    warn "travels in clear text and any process that reaches the port is accepted. Use it only on a"
    warn "trusted loopback or private test network, never across the internet."
}

need_value() {
    # $1 flag, $2 number of remaining args (including the flag)
    [[ "$2" -ge 2 ]] || die "$1 needs a value (see --help)"
}

need_command() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is not on PATH: $2"
}

need_file() {
    # $1 path, $2 what it is (for the message)
    [[ -n "$1" ]] || die "$2: no file given"
    [[ -e "$1" ]] || die "$2 '$1' does not exist"
    [[ -f "$1" ]] || die "$2 '$1' is not a file"
    [[ -r "$1" ]] || die "$2 '$1' is not readable"
}

abs_path() {
    # absolute path of an existing or future file (its folder must exist)
    local dir base
    dir="$(dirname "$1")"
    base="$(basename "$1")"
    [[ -d "$dir" ]] || die "folder '$dir' does not exist"
    echo "$(cd "$dir" && pwd)/$base"
}

check_port() {
    # $1 port, $2 flag name
    if ! [[ "$1" =~ ^[0-9]{1,5}$ ]] || ((10#$1 < 1 || 10#$1 > 65535)); then
        die "$2 '$1' is not a port number (1-65535)"
    fi
}

check_name() {
    [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
        || die "name '$1' may hold only letters, digits, '.', '_' and '-'"
}

# shellcheck disable=SC2034  # ADDR_HOST and ADDR_PORT are read by the scripts that source this
split_address() {
    # "$1" = HOST:PORT (IPv6 as [::1]:PORT) -> sets ADDR_HOST and ADDR_PORT, or dies.
    local address="$1" flag="$2"
    [[ -n "$address" ]] || die "$flag is empty; expected HOST:PORT, e.g. 127.0.0.1:9093"
    if [[ "$address" == *"://"* ]]; then
        die "$flag '$address' must be HOST:PORT without a scheme (drop '${address%%://*}://'), e.g. 127.0.0.1:9093"
    fi
    if [[ "$address" =~ ^\[([0-9A-Fa-f:.]+)\]:([0-9]+)$ ]]; then
        ADDR_HOST="${BASH_REMATCH[1]}"
        ADDR_PORT="${BASH_REMATCH[2]}"
    elif [[ "$address" =~ ^([A-Za-z0-9._-]+):([0-9]+)$ ]]; then
        ADDR_HOST="${BASH_REMATCH[1]}"
        ADDR_PORT="${BASH_REMATCH[2]}"
    else
        die "$flag '$address' is not HOST:PORT (e.g. 127.0.0.1:9093, superlink.example.org:9093, [::1]:9093)"
    fi
    check_port "$ADDR_PORT" "the port in $flag '$address'"
}

resolves() {
    # true when host name or address $1 resolves on this machine
    python3 - "$1" <<'EOF' >/dev/null 2>&1
import socket, sys
socket.getaddrinfo(sys.argv[1], None)
EOF
}

port_open() {
    # true when something accepts TCP connections on $1:$2 (within 1 s)
    python3 - "$1" "$2" <<'EOF' >/dev/null 2>&1
import socket, sys
host = sys.argv[1]
host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
socket.create_connection((host, int(sys.argv[2])), timeout=1).close()
EOF
}

port_bindable() {
    # true when $1:$2 can be bound now (nothing else listens there)
    python3 - "$1" "$2" <<'EOF' >/dev/null 2>&1
import socket, sys
host = sys.argv[1]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.bind((host, int(sys.argv[2])))
EOF
}

check_flwr_version() {
    local version
    version="$(python3 -c 'from importlib.metadata import version; print(version("flwr"))' 2>/dev/null)" \
        || die "Flower (flwr) is not installed in this Python: install the app first (pip install .)"
    if [[ "$version" != "$FLWR_TESTED_SERIES".* ]]; then
        warn "flwr $version is installed; these scripts were written and tested for flwr $FLWR_TESTED_SERIES.x"
    fi
}

# --- state folders and processes -------------------------------------------------

STATE_ROOT="${FEDTEXTGRAD_DEPLOY_STATE:-./deploy-state}"

state_dir_for() {
    # $1 name, $2 optional --state-dir -> absolute state folder, created
    local dir="${2:-$STATE_ROOT/$1}"
    mkdir -p "$dir/flwr-home" || die "cannot create state folder '$dir'"
    # logs, keys' copies and Flower's state are the operator's alone
    chmod 700 "$dir" "$dir/flwr-home" || die "cannot make state folder '$dir' private (chmod 700)"
    (cd "$dir" && pwd)
}

pid_alive() {
    # the process exists and is not a zombie (exited, not yet reaped)
    [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null \
        && [[ "$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null)" != Z ]]
}

refuse_if_running() {
    # $1 state folder, $2 what
    local pid
    if [[ -f "$1/pid" ]]; then
        pid="$(cat "$1/pid")"
        if pid_alive "$pid"; then
            die "$2 already runs with PID $pid (state $1); stop it first: $DEPLOY_DIR/stop.sh --state-dir $1"
        fi
    fi
}

start_process() {
    # start_process STATE_DIR FOREGROUND(0/1) CMD... : runs CMD with FLWR_HOME=STATE_DIR/flwr-home,
    # its output appended to STATE_DIR/log, and records its PID in STATE_DIR/pid.
    # Sets STARTED_PID. With FOREGROUND=1 the script becomes the process (exec; for containers).
    local state="$1" foreground="$2"
    shift 2
    export FLWR_HOME="$state/flwr-home"
    printf '%q ' "$@" >"$state/command"
    echo >>"$state/command"
    if [[ "$foreground" == 1 ]]; then
        echo $$ >"$state/pid"
        say "running in the foreground as PID $$: $*"
        exec "$@"
    fi
    {
        echo
        echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $PROG: $*"
    } >>"$state/log"
    nohup "$@" >>"$state/log" 2>&1 </dev/null &
    STARTED_PID=$!
    echo "$STARTED_PID" >"$state/pid"
}

wait_for_port() {
    # wait_for_port PID HOST PORT SECONDS WHAT STATE_DIR: until the port accepts connections;
    # dies with the log's tail if the process exits first or time runs out.
    local pid="$1" host="$2" port="$3" seconds="$4" what="$5" state="$6"
    local deadline=$((SECONDS + seconds))
    while ! port_open "$host" "$port"; do
        if ! pid_alive "$pid"; then
            echo "--- last lines of $state/log:" >&2
            tail -n 25 "$state/log" >&2
            die "$what (PID $pid) exited during start; see $state/log$(exit_reason "$state")"
        fi
        if ((SECONDS >= deadline)); then
            echo "--- last lines of $state/log:" >&2
            tail -n 25 "$state/log" >&2
            die "$what (PID $pid) does not accept connections on $host:$port after ${seconds}s; it is still running: see $state/log, stop it with $DEPLOY_DIR/stop.sh --state-dir $state"
        fi
        sleep 0.5
    done
}

exit_reason() {
    # exit_reason STATE_DIR: a second message line (newline first) saying why the process just
    # started has exited, when the script defines explain_exit STATE_DIR and it finds a reason.
    local why=""
    if declare -F explain_exit >/dev/null; then
        why="$(explain_exit "$1")" || why=""
    fi
    [[ -z "$why" ]] || printf '\n%s: %s' "$PROG" "$why"
}

node_config_value() {
    # a node-config value in single quotes; refuses quotes inside
    [[ "$2" != *"'"* ]] || die "$1 must not contain a single quote: '$2'"
    printf "'%s'" "$2"
}
