#!/usr/bin/env bash
# Start the federation's SuperLink (on the server machine).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG [--certs DIR | --insecure] [--host HOST] [--port PORT] [options]

Starts flower-superlink in the background (TLS and SuperNode authentication on by default)
and prints its PID, log and state folder. Flower 1.42 serves everything on one port: the
SuperNodes (Fleet API), 'flwr run' / 'flwr supernode register' (Control API) and the
ServerApp runner (Runtime API). Open only that port, and only to the sites and operators
that need it (see docs/deploy.md).

Options:
  --certs DIR         folder with ca.crt, server.pem, server.key (from gen-certs.sh)
                      (default ./deploy-state/certs)
  --host HOST         address to listen on (default 127.0.0.1; 0.0.0.0 for other machines)
  --port PORT         the SuperLink's port (default 9093)
  --no-node-auth      TLS, but accept any SuperNode (node authentication is on by default:
                      only SuperNodes whose public key was registered with register-node.sh)
  --insecure          no TLS and no node authentication (prints a warning); test networks only
  --isolation MODE    subprocess (default: the SuperLink starts its own ServerApp runner) or
                      process (start one yourself with start-superexec.sh, as the compose demo does)
  --database FILE     SQLite file of the SuperLink's state; registered SuperNodes and runs then
                      survive a restart (default: <state>/state.db; ':flwr-in-memory:' for none)
  --name NAME         name of the state folder (default superlink)
  --state-root DIR    where state folders go (default ./deploy-state, or \$FEDTEXTGRAD_DEPLOY_STATE)
  --state-dir DIR     use exactly this state folder (overrides --name/--state-root)
  --wait SECONDS      how long to wait for the port to accept connections (default 120)
  --foreground        run in the foreground as this process (containers, systemd)
  -h, --help          this text
Anything after '--' goes to flower-superlink unchanged.

Examples:
  $PROG --certs certs --host 0.0.0.0 --port 9093
  $PROG --insecure --port 9093          # loopback tests only
EOF
}

CERTS="$STATE_ROOT/certs"
CERTS_GIVEN=0
HOST=127.0.0.1
PORT=9093
NODE_AUTH=1
INSECURE=0
ISOLATION=subprocess
DATABASE=""
NAME=superlink
STATE=""
WAIT=120
FOREGROUND=0
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --certs) need_value "$1" $#; CERTS="$2"; CERTS_GIVEN=1; shift 2 ;;
        --host) need_value "$1" $#; HOST="$2"; shift 2 ;;
        --port) need_value "$1" $#; PORT="$2"; shift 2 ;;
        --no-node-auth) NODE_AUTH=0; shift ;;
        --insecure) INSECURE=1; shift ;;
        --isolation) need_value "$1" $#; ISOLATION="$2"; shift 2 ;;
        --database) need_value "$1" $#; DATABASE="$2"; shift 2 ;;
        --name) need_value "$1" $#; NAME="$2"; shift 2 ;;
        --state-root) need_value "$1" $#; STATE_ROOT="$2"; shift 2 ;;
        --state-dir) need_value "$1" $#; STATE="$2"; shift 2 ;;
        --wait) need_value "$1" $#; WAIT="$2"; shift 2 ;;
        --foreground) FOREGROUND=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

check_port "$PORT" --port
check_name "$NAME"
[[ "$WAIT" =~ ^[0-9]+$ ]] || die "--wait '$WAIT' is not a whole number of seconds"
[[ "$ISOLATION" == subprocess || "$ISOLATION" == process ]] \
    || die "--isolation '$ISOLATION' is not accepted; expected subprocess or process"
[[ -n "$HOST" ]] || die "--host is empty"
need_command flower-superlink "install the app and Flower on this machine first: pip install ."
check_flwr_version

CMD=(flower-superlink --host "$HOST" --port "$PORT" --isolation "$ISOLATION"
     --disable-runtime-dependency-installation)
if [[ "$INSECURE" == 1 ]]; then
    [[ "$CERTS_GIVEN" == 0 ]] || die "--certs and --insecure exclude each other"
    insecure_warning "the SuperLink on $HOST:$PORT"
    CMD+=(--insecure)
else
    [[ -d "$CERTS" ]] || die "certificate folder '$CERTS' does not exist: create it with $DEPLOY_DIR/gen-certs.sh --out $CERTS --host <server name or IP>, or pass --certs DIR (or --insecure for a loopback test)"
    for file in ca.crt server.pem server.key; do
        need_file "$CERTS/$file" "certificate file"
    done
    CERTS="$(cd "$CERTS" && pwd)"
    openssl verify -CAfile "$CERTS/ca.crt" "$CERTS/server.pem" >/dev/null 2>&1 \
        || die "$CERTS/server.pem is not signed by $CERTS/ca.crt (or has expired): regenerate with gen-certs.sh"
    CMD+=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key")
    if [[ "$NODE_AUTH" == 1 ]]; then
        CMD+=(--enable-supernode-auth)
    else
        warn "--no-node-auth: TLS is on, but the SuperLink accepts any SuperNode that trusts its CA"
    fi
fi

STATE="$(state_dir_for "$NAME" "$STATE")"
[[ "$FOREGROUND" == 1 ]] || refuse_if_running "$STATE" "a SuperLink"  # a container restart reuses its old pid file
if [[ "$FOREGROUND" == 0 ]] && ! port_bindable "$HOST" "$PORT"; then
    die "cannot listen on $HOST:$PORT: the port is in use (or the address is not on this machine)"
fi
CMD+=(--database "${DATABASE:-$STATE/state.db}")
CMD+=("${EXTRA[@]}")

start_process "$STATE" "$FOREGROUND" "${CMD[@]}"
wait_for_port "$STARTED_PID" "$HOST" "$PORT" "$WAIT" "the SuperLink" "$STATE"

case "$HOST" in
    0.0.0.0|::|127.0.0.1|localhost) LOCAL_ADDRESS="127.0.0.1:$PORT" ;;
    *:*) LOCAL_ADDRESS="[$HOST]:$PORT" ;;
    *) LOCAL_ADDRESS="$HOST:$PORT" ;;
esac
say "started the SuperLink, PID $STARTED_PID, on $HOST:$PORT ($([[ "$INSECURE" == 1 ]] && echo "NO TLS" || echo "TLS$([[ "$NODE_AUTH" == 1 ]] && echo ", node authentication on")"), isolation $ISOLATION)"
say "  log:       $STATE/log"
say "  state:     $STATE (pid file $STATE/pid, FLWR_HOME $STATE/flwr-home, database ${DATABASE:-$STATE/state.db})"
say "  stop with: $DEPLOY_DIR/stop.sh --state-dir $STATE"
if [[ "$ISOLATION" == process ]]; then
    say "  next: start its ServerApp runner: $DEPLOY_DIR/start-superexec.sh --runtime $LOCAL_ADDRESS $([[ "$INSECURE" == 1 ]] && echo "--insecure" || echo "--ca $CERTS/ca.crt") --name serverapp-runner"
fi
if [[ "$INSECURE" == 0 && "$NODE_AUTH" == 1 ]]; then
    say "  next: register each site's public key: $DEPLOY_DIR/register-node.sh --superlink $LOCAL_ADDRESS --ca $CERTS/ca.crt SITE.pub"
fi
