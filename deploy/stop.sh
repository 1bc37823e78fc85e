#!/usr/bin/env bash
# Stop what a deploy/ script started, by the PID in its state folder.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG (--state-dir DIR | NAME...) [--state-root DIR] [--timeout SECONDS]

Stops the process whose PID is in DIR/pid (or <state-root>/NAME/pid): SIGTERM, then SIGKILL
after the timeout (default 20 s). Run it in the folder the start script ran in (the checkout):
the state root ./deploy-state is relative to it. The app processes it started (its SuperExec, a running
ServerApp/ClientApp) are stopped the same way, by their own PIDs, if they outlive it.
Logs and state stay where they are.

  --state-dir DIR    the state folder printed by the start script; repeatable
  NAME               a state folder name under the state root (superlink, supernode-0, ...)
  --state-root DIR   where state folders are (default ./deploy-state, or \$FEDTEXTGRAD_DEPLOY_STATE)
  --timeout SECONDS  grace period before SIGKILL (default 20)
  -h, --help         this text
EOF
}

DIRS=()
NAMES=()
TIMEOUT=20
while [[ $# -gt 0 ]]; do
    case "$1" in
        --state-dir) need_value "$1" $#; DIRS+=("$2"); shift 2 ;;
        --state-root) need_value "$1" $#; STATE_ROOT="$2"; shift 2 ;;
        --timeout) need_value "$1" $#; TIMEOUT="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown argument '$1' (see --help)" ;;
        *) NAMES+=("$1"); shift ;;
    esac
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout '$TIMEOUT' is not a whole number of seconds"
for name in "${NAMES[@]}"; do
    DIRS+=("$STATE_ROOT/$name")
done
[[ ${#DIRS[@]} -gt 0 ]] || die "nothing to stop: give --state-dir DIR or a NAME (see --help)"

is_flower() {
    # the PID still belongs to a Flower process (guards against a reused PID)
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *flower-* || "$cmdline" == *flwr-* ]]
}

descendants() {
    # PIDs of all descendants of $1, read from /proc
    local parent="$1" pid ppid
    for status in /proc/[0-9]*/status; do
        pid="${status#/proc/}"
        pid="${pid%/status}"
        ppid="$(awk '/^PPid:/ {print $2}' "$status" 2>/dev/null)" || continue
        if [[ "$ppid" == "$parent" ]]; then
            echo "$pid"
            descendants "$pid"
        fi
    done
}

terminate() {
    # terminate PID WHAT: SIGTERM, wait, SIGKILL
    local pid="$1" what="$2" deadline
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + TIMEOUT))
    while pid_alive "$pid"; do
        if ((SECONDS >= deadline)); then
            warn "$what (PID $pid) did not stop within ${TIMEOUT}s: sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.3
    done
}

status=0
for dir in "${DIRS[@]}"; do
    if [[ ! -d "$dir" ]]; then
        warn "no state folder '$dir' (looked from $PWD): run $PROG in the folder the start script ran in (the checkout), or give --state-root DIR / --state-dir DIR"
        status=1
        continue
    fi
    if [[ ! -f "$dir/pid" ]]; then
        warn "no pid file in '$dir': nothing started there, or already stopped"
        status=1
        continue
    fi
    pid="$(cat "$dir/pid")"
    if ! pid_alive "$pid"; then
        say "$(basename "$dir"): PID $pid is not running (already stopped)"
        rm -f "$dir/pid"
        continue
    fi
    if ! is_flower "$pid"; then
        warn "PID $pid in $dir/pid is no longer a Flower process (reused PID?): not touching it"
        rm -f "$dir/pid"
        status=1
        continue
    fi
    children="$(descendants "$pid" | tr '\n' ' ')"
    terminate "$pid" "$(basename "$dir")"
    for child in $children; do
        if pid_alive "$child" && is_flower "$child"; then
            terminate "$child" "$(basename "$dir")'s child"
        fi
    done
    rm -f "$dir/pid"
    say "stopped $(basename "$dir") (PID $pid${children:+; its processes $children}); log kept in $dir/log"
done
exit "$status"
