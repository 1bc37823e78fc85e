#!/usr/bin/env bash
# The compose demo's "submit" service: `flwr run` of the app baked into the image against the
# demo's SuperLink, over TLS with the demo's CA, streamed. Arguments go to `flwr run`; a
# --run-config of yours comes after the defaults below and overrides the keys it names:
#   docker compose -f deploy/compose/compose.yaml run --rm submit
#   docker compose -f deploy/compose/compose.yaml run --rm submit --run-config "num-server-rounds=3 run-name='r3'"
set -euo pipefail
HOME_DIR="$(mktemp -d)"
trap 'rm -rf "$HOME_DIR"' EXIT
/app/deploy/add-connection.sh --name compose --superlink superlink:9093 --ca /secrets/ca/ca.crt \
    --flwr-home "$HOME_DIR" --default >/dev/null
# Results go to the serverapp-runner's /results (the volume `results`); copy them out with
#   docker compose -f deploy/compose/compose.yaml cp serverapp-runner:/results/. ./results
# The clients use their own site's LLM server (node config); the server merges by concatenation
# unless given its own endpoint (server-backend='openai' server-base-url=... server-model=...).
# Sized for SmolLM2-135M on a CPU: small splits, one local step, short replies.
DEFAULTS="results-dir='/results' num-server-rounds=2 merge='concat' local-steps=1 batch-size=2"
DEFAULTS+=" synthetic-size=30 max-val-examples=6 max-test-examples=6 llm-max-tokens=256"
cd /app
FLWR_HOME="$HOME_DIR" flwr run . compose --stream --run-config "$DEFAULTS" "$@"
