#!/usr/bin/env bash
# Start a SuperExec: the runner of ServerApp (beside a SuperLink) or ClientApp (beside a SuperNode)
# processes, for a SuperLink or SuperNode started with --isolation process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG --runtime HOST:PORT (--ca CA_CRT | --insecure) --name NAME [options]

A SuperLink or SuperNode started with '--isolation process' does not start app processes
itself: a SuperExec connected to its Runtime API does. Flower 1.42 finds out by itself
whether it serves a SuperLink (it then runs ServerApps) or a SuperNode (ClientApps).

  --runtime HOST:PORT  the Runtime API: the SuperLink's address (e.g. 127.0.0.1:9093), or
                       the SuperNode's --port on 127.0.0.1 (e.g. 127.0.0.1:9094)
  --ca FILE            CA certificate, for a SuperLink with TLS (ca.crt from gen-certs.sh)
  --insecure           plain HTTP: a SuperLink started with --insecure, or a SuperNode's
                       Runtime API (served on 127.0.0.1 only, so it never leaves the machine)
  --name NAME          name of the state folder, e.g. serverapp-runner, supernode-0-runner
  --state-root DIR     where state folders go (default ./deploy-state, or \$FEDTEXTGRAD_DEPLOY_STATE)
  --state-dir DIR      use exactly this state folder
  --foreground         run in the foreground as this process (containers, systemd)
  -h, --help           this text
EOF
}

RUNTIME=""
CA=""
INSECURE=0
NAME=""
STATE=""
FOREGROUND=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runtime) need_value "$1" $#; RUNTIME="$2"; shift 2 ;;
        --ca) need_value "$1" $#; CA="$2"; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        --name) need_value "$1" $#; NAME="$2"; shift 2 ;;
        --state-root) need_value "$1" $#; STATE_ROOT="$2"; shift 2 ;;
        --state-dir) need_value "$1" $#; STATE="$2"; shift 2 ;;
        --foreground) FOREGROUND=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ -n "$RUNTIME" ]] || die "--runtime HOST:PORT is required (see --help)"
split_address "$RUNTIME" --runtime
[[ -n "$NAME" ]] || die "--name is required (see --help)"
check_name "$NAME"
need_command flower-superexec "install the app and Flower on this machine first: pip install ."
check_flwr_version

CMD=(flower-superexec --runtime-api-address "$RUNTIME")
if [[ "$INSECURE" == 1 ]]; then
    [[ -z "$CA" ]] || die "--ca and --insecure exclude each other"
    if [[ "$ADDR_HOST" != 127.* && "$ADDR_HOST" != localhost && "$ADDR_HOST" != "::1" ]]; then
        insecure_warning "the runner's connection to $RUNTIME"
    fi
    CMD+=(--insecure)
else
    [[ -n "$CA" ]] || die "--ca CA_CRT is required for a Runtime API with TLS (or --insecure, see --help)"
    need_file "$CA" "--ca certificate"
    CMD+=(--root-certificates "$(abs_path "$CA")")
fi

STATE="$(state_dir_for "$NAME" "$STATE")"
[[ "$FOREGROUND" == 1 ]] || refuse_if_running "$STATE" "a SuperExec"  # a container restart reuses its old pid file
start_process "$STATE" "$FOREGROUND" "${CMD[@]}"
sleep 1
pid_alive "$STARTED_PID" || { tail -n 20 "$STATE/log" >&2; die "the SuperExec (PID $STARTED_PID) exited at start; see $STATE/log"; }

say "started the SuperExec '$NAME', PID $STARTED_PID, for the Runtime API at $RUNTIME"
say "  log:       $STATE/log"
say "  state:     $STATE (pid file $STATE/pid)"
say "  stop with: $DEPLOY_DIR/stop.sh --state-dir $STATE"
