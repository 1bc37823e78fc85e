#!/usr/bin/env bash
# Add (or replace) a SuperLink connection in $FLWR_HOME/config.toml, for `flwr run . NAME`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG --name NAME --superlink HOST:PORT (--ca CA_CRT | --insecure) [--flwr-home DIR] [--default]

Writes the connection [superlink.NAME] into DIR/config.toml (default: \$FLWR_HOME, else
~/.flwr), keeping every other connection. A config.toml that does not exist yet starts as the
one Flower itself writes (with the connection 'local' that 'flwr run . local' uses, and Flower's
default connection); a config without 'local' gets it back. Then, from the app's folder:
  flwr run . NAME --stream --run-config "..."
and the same connection serves 'flwr supernode register/list', 'flwr ls', 'flwr log', 'flwr stop'.

Options:
  --name NAME            connection name (letters, digits, '.', '_', '-')
  --superlink HOST:PORT  the SuperLink's address (its one port serves runs and SuperNodes)
  --ca FILE              the CA certificate that signed the SuperLink's certificate (TLS)
  --insecure             no TLS (prints a warning; only for a SuperLink started with --insecure)
  --flwr-home DIR        the FLWR_HOME to write into
  --default              also make NAME the default connection (otherwise the default stays
                         as it is: 'local' in a new config)
  -h, --help             this text
EOF
}

NAME=""
SUPERLINK=""
CA=""
INSECURE=0
HOME_DIR="${FLWR_HOME:-$HOME/.flwr}"
MAKE_DEFAULT=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --name) need_value "$1" $#; NAME="$2"; shift 2 ;;
        --superlink) need_value "$1" $#; SUPERLINK="$2"; shift 2 ;;
        --ca) need_value "$1" $#; CA="$2"; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        --flwr-home) need_value "$1" $#; HOME_DIR="$2"; shift 2 ;;
        --default) MAKE_DEFAULT=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ -n "$NAME" ]] || die "--name is required (see --help)"
check_name "$NAME"
[[ -n "$SUPERLINK" ]] || die "--superlink HOST:PORT is required (see --help)"
split_address "$SUPERLINK" --superlink
if [[ "$INSECURE" == 1 ]]; then
    [[ -z "$CA" ]] || die "--ca and --insecure exclude each other"
    insecure_warning "the connection '$NAME' to $SUPERLINK"
else
    [[ -n "$CA" ]] || die "--ca CA_CRT is required for a TLS connection (or --insecure, see --help)"
    need_file "$CA" "--ca"
    CA="$(abs_path "$CA")"
fi

mkdir -p "$HOME_DIR"
HOME_DIR="$(cd "$HOME_DIR" && pwd)"
python3 - "$HOME_DIR/config.toml" "$NAME" "$SUPERLINK" "$CA" "$INSECURE" "$MAKE_DEFAULT" <<'EOF' || die "could not update the Flower config"
import sys
from pathlib import Path

import tomli
import tomli_w

path, name, address, ca, insecure, make_default = sys.argv[1:]
LOCAL = ":local:"
try:  # the config Flower writes into a fresh FLWR_HOME (flwr/cli/constant.py)
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML, LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE as LOCAL
except ImportError:  # another Flower layout: the same content as Flower 1.42 writes
    DEFAULT_FLOWER_CONFIG_TOML = ('[superlink]\ndefault = "local"\n\n[superlink.supergrid]\naddress = "api.flower.ai"\n\n'
                                  '[superlink.local]\naddress = ":local:"\n')
text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else DEFAULT_FLOWER_CONFIG_TOML
config = tomli.loads(text)
links = config.setdefault("superlink", {})
if name != "local" and "local" not in links:
    # `flwr run . local` (the simulation) needs it; Flower only writes it into a fresh FLWR_HOME
    links["local"] = {"address": LOCAL}
connection = {"address": address}
if insecure == "1":
    connection["insecure"] = True
else:
    connection["root-certificates"] = ca
links[name] = connection
if make_default == "1" or "default" not in links:
    links["default"] = name
Path(path).write_text(tomli_w.dumps(config), encoding="utf-8")
EOF

say "connection '$NAME' -> $SUPERLINK ($([[ "$INSECURE" == 1 ]] && echo "no TLS" || echo "TLS, CA $CA")) written to $HOME_DIR/config.toml"
say "use it with: FLWR_HOME=$HOME_DIR flwr run . $NAME --stream"
