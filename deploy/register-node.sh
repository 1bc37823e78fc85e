#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink that runs with node authentication.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG --superlink HOST:PORT --ca CA_CRT PUBLIC_KEY...
       $PROG --connection NAME [--flwr-home DIR] PUBLIC_KEY...

Registers each SuperNode public key (NAME.pub from gen-node-keys.sh, e.g. received/site-0.pub)
with the SuperLink (Flower: 'flwr supernode register'), so a SuperNode holding the matching
private key is accepted. The node is registered under the file's NAME (site-0.pub -> site-0),
and the server labels that site's client by it in its output and results, e.g. "0 (site-0)"
(a site cannot pose as another: the name is bound to its key). A key that is already
registered is reported and left as it is. Run it where the SuperLink's port is reachable,
usually on the server machine. 'flwr supernode list' (with the same connection) shows the
registered nodes; 'flwr supernode unregister ID' removes one.

  --superlink HOST:PORT  the SuperLink (a connection 'deployment' is written for it into
                         <state-root>/admin/flwr-home/config.toml)
  --ca FILE              the CA certificate that signed the SuperLink's certificate
  --connection NAME      use an existing connection of \$FLWR_HOME/config.toml instead
  --flwr-home DIR        the FLWR_HOME holding that connection
  --state-root DIR       where state folders go (default ./deploy-state, or \$FEDTEXTGRAD_DEPLOY_STATE)
  -h, --help             this text
EOF
}

SUPERLINK=""
CA=""
CONNECTION=""
HOME_DIR=""
KEYS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --superlink) need_value "$1" $#; SUPERLINK="$2"; shift 2 ;;
        --ca) need_value "$1" $#; CA="$2"; shift 2 ;;
        --connection) need_value "$1" $#; CONNECTION="$2"; shift 2 ;;
        --flwr-home) need_value "$1" $#; HOME_DIR="$2"; shift 2 ;;
        --state-root) need_value "$1" $#; STATE_ROOT="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown argument '$1' (see --help)" ;;
        *) KEYS+=("$1"); shift ;;
    esac
done
[[ ${#KEYS[@]} -gt 0 ]] || die "give at least one public key file (NAME.pub from gen-node-keys.sh)"
need_command flwr "install the app and Flower on this machine first: pip install ."

if [[ -n "$CONNECTION" ]]; then
    [[ -z "$SUPERLINK" && -z "$CA" ]] || die "--connection excludes --superlink and --ca"
    [[ -z "$HOME_DIR" ]] || export FLWR_HOME="$HOME_DIR"
else
    [[ -n "$SUPERLINK" ]] || die "--superlink HOST:PORT (with --ca) or --connection NAME is required (see --help)"
    [[ -n "$CA" ]] || die "--ca CA_CRT is required: node authentication works only over TLS"
    HOME_DIR="${HOME_DIR:-$STATE_ROOT/admin/flwr-home}"
    "$DEPLOY_DIR/add-connection.sh" --name deployment --superlink "$SUPERLINK" --ca "$CA" \
        --flwr-home "$HOME_DIR" --default >/dev/null
    FLWR_HOME="$(cd "$HOME_DIR" && pwd)"
    export FLWR_HOME
    CONNECTION=deployment
fi

status=0
for key in "${KEYS[@]}"; do
    need_file "$key" "public key"
    if grep -q "PRIVATE KEY" "$key"; then
        die "'$key' is a PRIVATE key: register the public one ($key.pub); the private key never leaves its site"
    fi
    name="$(basename "$key" .pub)"
    [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
        || die "'$key': the node is registered under the file's name, and '$name' may hold only letters, digits, '.', '_' and '-' (rename the file, e.g. site-0.pub)"
    if output="$(flwr supernode register "$key" "$CONNECTION" --name "$name" 2>&1)"; then
        if [[ "$output" =~ SuperNode\ ([0-9]+)\ registered ]]; then
            say "registered $key as '$name': SuperNode ID ${BASH_REMATCH[1]}"
            continue
        fi
    fi
    if [[ "$output" == *"already in use"* || "$output" == *"already registered"* || "$output" == *ALREADY* ]]; then
        say "$key is already registered: left as it is"
        continue
    fi
    echo "$output" >&2
    warn "could not register $key with the SuperLink of connection '$CONNECTION' (see the lines above)"
    status=1
done
exit "$status"
