#!/usr/bin/env bash
# Generate the TLS material of a SuperLink: a private CA and a server certificate it signs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG [--out DIR] [--host NAME_OR_IP]... [--days N] [--force]

Creates, in DIR (default ./deploy-state/certs):
  ca.crt      the CA certificate: give it to every SuperNode site and to whoever runs 'flwr run'
  ca.key      the CA's private key: keep it on the server machine (or offline), never share it
  server.pem  the SuperLink's certificate, signed by the CA
  server.key  the SuperLink's private key: stays on the server machine

The certificate names 127.0.0.1 and localhost (the SuperLink's own ServerApp runner
connects there) plus every --host you give: the address the SuperNodes and 'flwr run'
use to reach the SuperLink, as an IP address or a DNS name (give each one you use).

Options:
  --out DIR     where to write the files (created if missing)
  --host NAME   an extra name or IP address of the SuperLink; repeatable
  --days N      validity of both certificates in days (default 365)
  --force       overwrite existing files in DIR (otherwise they are kept and this fails)
  -h, --help    this text

Example (server reachable as superlink.example.org and 203.0.113.7):
  $PROG --out certs --host superlink.example.org --host 203.0.113.7
EOF
}

OUT="$STATE_ROOT/certs"
HOSTS=()
DAYS=365
FORCE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) need_value "$1" $#; OUT="$2"; shift 2 ;;
        --host) need_value "$1" $#; HOSTS+=("$2"); shift 2 ;;
        --days) need_value "$1" $#; DAYS="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

need_command openssl "install OpenSSL (e.g. apt-get install openssl)"
if ! [[ "$DAYS" =~ ^[0-9]+$ ]] || ((10#$DAYS < 1)); then
    die "--days '$DAYS' is not a whole number of days"
fi

SAN="IP:127.0.0.1,DNS:localhost"
for host in "${HOSTS[@]}"; do
    [[ ",$SAN," == *",IP:$host,"* || ",$SAN," == *",DNS:$host,"* ]] && continue
    if [[ "$host" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$host" == *:* ]]; then
        SAN="$SAN,IP:$host"
    elif [[ "$host" =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
        SAN="$SAN,DNS:$host"
    else
        die "--host '$host' is neither an IP address nor a DNS name"
    fi
done

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
for file in ca.crt ca.key server.pem server.key; do
    if [[ -e "$OUT/$file" && "$FORCE" != 1 ]]; then
        die "$OUT/$file exists; keep it, or pass --force to replace the whole set (every site then needs the new ca.crt)"
    fi
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
umask 077

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -days "$DAYS" -subj "/CN=FedTextGrad SuperLink CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>"$WORK/openssl.log" \
    || { cat "$WORK/openssl.log" >&2; die "openssl could not create the CA"; }

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -subj "/CN=${HOSTS[0]:-localhost}" -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>"$WORK/openssl.log" \
    || { cat "$WORK/openssl.log" >&2; die "openssl could not create the server key"; }

cat >"$WORK/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EOF
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial \
    -days "$DAYS" -sha256 -extfile "$WORK/server.ext" -out "$WORK/server.pem" 2>"$WORK/openssl.log" \
    || { cat "$WORK/openssl.log" >&2; die "openssl could not sign the server certificate"; }

openssl verify -CAfile "$WORK/ca.crt" "$WORK/server.pem" >/dev/null \
    || die "the new server certificate does not verify against the new CA"

install -m 0644 "$WORK/ca.crt" "$OUT/ca.crt"
install -m 0600 "$WORK/ca.key" "$OUT/ca.key"
install -m 0644 "$WORK/server.pem" "$OUT/server.pem"
install -m 0600 "$WORK/server.key" "$OUT/server.key"

say "wrote the SuperLink's TLS material to $OUT:"
say "  ca.crt      -> copy to every SuperNode site (--ca) and to where 'flwr run' is used"
say "  ca.key      -> keep private (needed only to issue a new server certificate)"
say "  server.pem, server.key -> the SuperLink: start-superlink.sh --certs $OUT"
say "  valid $DAYS days for: ${SAN//,/, }"
