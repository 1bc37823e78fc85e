#!/usr/bin/env bash
# Generate a SuperNode's authentication key pair (run it on the SuperNode's machine).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG --name NAME [--out DIR] [--force]

Creates the key pair a SuperNode proves its identity with (Flower node authentication:
an ECDSA P-384 key in OpenSSH format):
  DIR/NAME       the private key: stays on this machine, given to start-supernode.sh --auth-key
  DIR/NAME.pub   the public key: send it to the SuperLink's operator, who registers it with
                 register-node.sh (a SuperLink started with node authentication accepts only
                 registered keys); the node is registered, and named in the results, as NAME

Options:
  --name NAME   file name of the key, e.g. site-0
  --out DIR     where to write (default ./deploy-state/keys)
  --force       replace an existing key pair (the old public key must then be unregistered)
  -h, --help    this text
EOF
}

NAME=""
OUT="$STATE_ROOT/keys"
FORCE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --name) need_value "$1" $#; NAME="$2"; shift 2 ;;
        --out) need_value "$1" $#; OUT="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ -n "$NAME" ]] || die "--name is required (see --help)"
check_name "$NAME"
need_command ssh-keygen "install the OpenSSH client tools (e.g. apt-get install openssh-client)"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [[ -e "$OUT/$NAME" || -e "$OUT/$NAME.pub" ]]; then
    [[ "$FORCE" == 1 ]] || die "$OUT/$NAME exists; keep it, or pass --force to replace it"
    rm -f "$OUT/$NAME" "$OUT/$NAME.pub"
fi

ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedtextgrad-supernode-$NAME" -f "$OUT/$NAME" \
    || die "ssh-keygen could not create the key pair"
chmod 600 "$OUT/$NAME"

say "wrote the SuperNode key pair of '$NAME':"
say "  private key: $OUT/$NAME  (keep it here: start-supernode.sh --auth-key $OUT/$NAME)"
say "  public key:  $OUT/$NAME.pub  (send it to the SuperLink's operator, who saves it as received/$NAME.pub"
say "               and registers it: register-node.sh ... received/$NAME.pub; the node is then named '$NAME')"
