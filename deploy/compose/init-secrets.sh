#!/usr/bin/env bash
# The compose demo's one-shot "secrets" service: the SuperLink's TLS material and each site's node
# key, made once with the deploy/ scripts into the volumes mounted under /secrets. Later runs keep
# what exists. In a real deployment each site runs gen-node-keys.sh on its own machine instead.
set -euo pipefail
DEPLOY=/app/deploy
SITES=("$@")
[[ ${#SITES[@]} -gt 0 ]] || SITES=(site-0 site-1)

if [[ ! -f /secrets/superlink/server.pem ]]; then
    work="$(mktemp -d)"
    # the name the other containers reach the SuperLink by; 127.0.0.1 and localhost are always in
    "$DEPLOY/gen-certs.sh" --out "$work" --host superlink
    # the CA's private key is not copied anywhere: it signed the server certificate and is deleted
    # with the work folder (a real CA key stays offline, never in the SuperLink's volume)
    cp "$work/server.pem" "$work/server.key" /secrets/superlink/
    cp "$work/ca.crt" /secrets/superlink/ca.crt
    cp "$work/ca.crt" /secrets/ca/ca.crt
    rm -rf "$work"
else
    echo "init-secrets: /secrets/superlink already holds the SuperLink's certificate: kept"
fi

for site in "${SITES[@]}"; do
    if [[ ! -f "/secrets/$site/$site" ]]; then
        "$DEPLOY/gen-node-keys.sh" --name "$site" --out "/secrets/$site"
    else
        echo "init-secrets: /secrets/$site/$site exists: kept"
    fi
    cp "/secrets/$site/$site.pub" "/secrets/pubkeys/$site.pub"
done
