#!/usr/bin/env bash
# The compose demo's "submit" service: `flwr run` of the app baked into the image against the
# demo's SuperLink, over TLS with the demo's CA. Arguments go to `flwr run` (e.g. --run-config "...").
#   docker compose -f deploy/compose/compose.yaml run --rm submit
#   docker compose -f deploy/compose/compose.yaml run --rm submit --run-config "num-server-rounds=3"
set -euo pipefail
HOME_DIR="$(mktemp -d)"
/app/deploy/add-connection.sh --name compose --superlink superlink:9093 --ca /secrets/ca/ca.crt \
    --flwr-home "$HOME_DIR" --default >/dev/null
# Results go to the serverapp-runner's /results volume: docker compose cp serverapp-runner:/results .
# The clients use their own Ollama (node config); the server merges by concatenation unless given
# its own endpoint (server-backend='openai' server-base-url=... server-model=...).
# A later --run-config of yours overrides these keys.
DEFAULTS="results-dir='/results' num-server-rounds=2 merge='concat' llm-timeout=300"
cd /app
FLWR_HOME="$HOME_DIR" exec flwr run . compose --stream --run-config "$DEFAULTS" "$@"
