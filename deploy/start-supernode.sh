#!/usr/bin/env bash
# Start a SuperNode: one data owner's client, next to its own LLM server (on a client machine).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG --superlink HOST:PORT (--ca CA_CRT --auth-key KEY | --insecure)
             --partition-id N --num-partitions M [LLM options] [options]

Starts flower-supernode in the background and prints its PID, log and state folder. The
SuperNode connects to the SuperLink (retrying until it is up), runs the ClientApp for each
message it receives, and points it at this site's own LLM endpoint through its node config.

What this site decides, not the run: the site settings (every llm-*, backward-* and judge-*
endpoint, model and API-key variable, data-source, llm-cache-path, leakage-guard, leakage-ngram)
come from this node config or their default. A run whose run config sets one of them to another
value is refused by this client with one line, unless --allow-run-config names it. Other settings
a node may set (e.g. llm-concurrency) override the run's for this client only. The ClientApp
code itself comes with each run (its app bundle): to run only bundles signed by publishers you
trust, pass --trusted-entities (see docs: security model).

Connection:
  --superlink HOST:PORT   the SuperLink's address, e.g. superlink.example.org:9093
  --ca FILE               the CA certificate of the SuperLink (ca.crt from gen-certs.sh)
  --auth-key FILE         this node's private key (gen-node-keys.sh); its .pub must be registered
  --no-node-auth          TLS without a node key (only for a SuperLink started with --no-node-auth)
  --insecure              no TLS and no node authentication (prints a warning); test networks only
Data:
  --partition-id N        this node's share of the data (0-based)
  --num-partitions M      how many shares there are (the number of sites)
  --data-source SRC       this node's data: synthetic (generated, no files), hub (downloaded), or the
                          path of a data file or folder on this machine, e.g. a folder holding
                          object_counting.json (BIG-Bench Hard format), bbh/<task>.json or gsm8k/;
                          a path is checked here and must exist (default: synthetic).
                          The node uses its share of it: --partition-id of --num-partitions
LLM endpoint of this site (all optional; without them: 'sim', the simulated LLM, a test double):
  --llm-base-url URL      OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (sets llm-backend='openai')
  --llm-model NAME        the model name the server knows
  --llm-api-key-env VAR   NAME of the environment variable holding the API key (never the key)
  --backward-base-url URL, --backward-model NAME, --backward-api-key-env VAR
                          the same for the model writing feedback and rewriting the prompt
  --node-config "k=v ..." more node config, appended as given; repeatable. Any setting a node
                          may set (settings reference: "set by"), e.g.
                          --node-config "llm-startup-wait=600" waits up to 10 minutes for an LLM
                          server that is still loading (default 60 s), or
                          --node-config "judge-model='mine' leakage-guard='refuse'"
Site control:
  --allow-run-config KEYS comma-separated site settings a run config may set for this site (its
                          own value is then only the default), e.g. judge-model; default: none
  --trusted-entities FILE run only app bundles (FABs) signed by one of these publishers: Flower's
                          YAML of "fpk_<id>: ssh-ed25519 <key>" lines (flower-supernode
                          --trusted-entities). Flower 1.42 signs only bundles from Flower Hub: a
                          bundle sent with 'flwr run .' carries no signature and is refused
Process:
  --port PORT             port of this SuperNode's local Runtime API (default 9094; 127.0.0.1 only)
  --isolation MODE        subprocess (default: the SuperNode starts its own ClientApp runner) or
                          process (start one with start-superexec.sh, as the compose demo does)
  --name NAME             name of the state folder (default supernode-<partition-id>)
  --state-root DIR        where state folders go (default ./deploy-state, or \$FEDTEXTGRAD_DEPLOY_STATE)
  --state-dir DIR         use exactly this state folder (overrides --name/--state-root)
  --wait-connected SECS   also wait until the SuperLink accepted this node (default 0: do not wait;
                          the node keeps retrying while the SuperLink is down). A node the SuperLink
                          refuses (key not registered, wrong CA) is then reported with the reason
  --max-wait-time SECS    give up reconnecting after SECS (default: retry forever)
  --foreground            run in the foreground as this process (containers, systemd)
  -h, --help              this text
Anything after '--' goes to flower-supernode unchanged.

Example (site 0 of 2, its data in /data/fedtextgrad, its vLLM server on the same machine):
  $PROG --superlink superlink.example.org:9093 --ca certs/ca.crt --auth-key keys/site-0 \\
    --partition-id 0 --num-partitions 2 --data-source /data/fedtextgrad \\
    --llm-base-url http://127.0.0.1:8000/v1 --llm-model Qwen/Qwen2.5-7B-Instruct \\
    --node-config "llm-startup-wait=600" --wait-connected 120
EOF
}

SUPERLINK=""
CA=""
AUTH_KEY=""
NODE_AUTH=1
INSECURE=0
PARTITION=""
NUM_PARTITIONS=""
DATA_SOURCE=""
LLM_URL=""
LLM_MODEL=""
LLM_KEY_ENV=""
BW_URL=""
BW_MODEL=""
BW_KEY_ENV=""
ALLOW_RUN_CONFIG=""
TRUSTED_ENTITIES=""
EXTRA_NODE_CONFIG=""
PORT=9094
ISOLATION=subprocess
NAME=""
STATE=""
WAIT_CONNECTED=0
MAX_WAIT=""
FOREGROUND=0
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --superlink) need_value "$1" $#; SUPERLINK="$2"; shift 2 ;;
        --ca) need_value "$1" $#; CA="$2"; shift 2 ;;
        --auth-key) need_value "$1" $#; AUTH_KEY="$2"; shift 2 ;;
        --no-node-auth) NODE_AUTH=0; shift ;;
        --insecure) INSECURE=1; shift ;;
        --partition-id) need_value "$1" $#; PARTITION="$2"; shift 2 ;;
        --num-partitions) need_value "$1" $#; NUM_PARTITIONS="$2"; shift 2 ;;
        --data-source) need_value "$1" $#; DATA_SOURCE="$2"; shift 2 ;;
        --llm-base-url) need_value "$1" $#; LLM_URL="$2"; shift 2 ;;
        --llm-model) need_value "$1" $#; LLM_MODEL="$2"; shift 2 ;;
        --llm-api-key-env) need_value "$1" $#; LLM_KEY_ENV="$2"; shift 2 ;;
        --backward-base-url) need_value "$1" $#; BW_URL="$2"; shift 2 ;;
        --backward-model) need_value "$1" $#; BW_MODEL="$2"; shift 2 ;;
        --backward-api-key-env) need_value "$1" $#; BW_KEY_ENV="$2"; shift 2 ;;
        --node-config) need_value "$1" $#; EXTRA_NODE_CONFIG+="${EXTRA_NODE_CONFIG:+ }$2"; shift 2 ;;
        --allow-run-config) need_value "$1" $#; ALLOW_RUN_CONFIG="$2"; shift 2 ;;
        --trusted-entities) need_value "$1" $#; TRUSTED_ENTITIES="$2"; shift 2 ;;
        --port) need_value "$1" $#; PORT="$2"; shift 2 ;;
        --isolation) need_value "$1" $#; ISOLATION="$2"; shift 2 ;;
        --name) need_value "$1" $#; NAME="$2"; shift 2 ;;
        --state-root) need_value "$1" $#; STATE_ROOT="$2"; shift 2 ;;
        --state-dir) need_value "$1" $#; STATE="$2"; shift 2 ;;
        --wait-connected) need_value "$1" $#; WAIT_CONNECTED="$2"; shift 2 ;;
        --max-wait-time) need_value "$1" $#; MAX_WAIT="$2"; shift 2 ;;
        --foreground) FOREGROUND=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# --- checks: everything that can be wrong is said here, before anything starts ------
[[ -n "$SUPERLINK" ]] || die "--superlink HOST:PORT is required (see --help)"
split_address "$SUPERLINK" --superlink
resolves "$ADDR_HOST" || die "--superlink '$SUPERLINK': the host name '$ADDR_HOST' does not resolve on this machine (a typo? use its DNS name or IP address)"
[[ "$PARTITION" =~ ^[0-9]+$ ]] || die "--partition-id is required: a whole number from 0 (got '${PARTITION}')"
if ! [[ "$NUM_PARTITIONS" =~ ^[0-9]+$ ]] || ((10#$NUM_PARTITIONS < 1)); then
    die "--num-partitions is required: a whole number of at least 1 (got '${NUM_PARTITIONS}')"
fi
PARTITION=$((10#$PARTITION))
NUM_PARTITIONS=$((10#$NUM_PARTITIONS))
((PARTITION < NUM_PARTITIONS)) \
    || die "--partition-id $PARTITION must be below --num-partitions $NUM_PARTITIONS (ids start at 0)"
check_port "$PORT" --port
[[ "$ISOLATION" == subprocess || "$ISOLATION" == process ]] \
    || die "--isolation '$ISOLATION' is not accepted; expected subprocess or process"
[[ "$WAIT_CONNECTED" =~ ^[0-9]+$ ]] || die "--wait-connected '$WAIT_CONNECTED' is not a whole number of seconds"
[[ -z "$MAX_WAIT" || "$MAX_WAIT" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--max-wait-time '$MAX_WAIT' is not a number of seconds"
for pair in "--llm-base-url:$LLM_URL" "--backward-base-url:$BW_URL"; do
    url="${pair#*:}"
    [[ -z "$url" || "$url" =~ ^https?://[^[:space:]]+$ ]] \
        || die "${pair%%:*} '$url' is not an http(s) URL, e.g. http://127.0.0.1:8000/v1"
done
for pair in "--llm-api-key-env:$LLM_KEY_ENV" "--backward-api-key-env:$BW_KEY_ENV"; do
    var="${pair#*:}"
    [[ -z "$var" || "$var" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] \
        || die "${pair%%:*} takes the NAME of an environment variable (letters, digits, '_'), never the key itself"
done
if [[ -n "$DATA_SOURCE" && "$DATA_SOURCE" != synthetic && "$DATA_SOURCE" != hub ]]; then
    # a path: it must be there now (the ClientApp would only find out when a run starts)
    if [[ ! -e "$DATA_SOURCE" ]]; then
        die "--data-source '$DATA_SOURCE' does not exist on this machine: give the file or folder holding this site's data (e.g. a folder with object_counting.json), or synthetic / hub"
    fi
    [[ -f "$DATA_SOURCE" || -d "$DATA_SOURCE" ]] || die "--data-source '$DATA_SOURCE' is neither a file nor a folder"
    [[ -r "$DATA_SOURCE" ]] || die "--data-source '$DATA_SOURCE' is not readable by this user"
    DATA_SOURCE="$(cd "$(dirname "$DATA_SOURCE")" && pwd)/$(basename "$DATA_SOURCE")"  # the ClientApp runs elsewhere
fi
[[ -z "$ALLOW_RUN_CONFIG" || "$ALLOW_RUN_CONFIG" =~ ^[a-z][a-z0-9-]*(,[a-z][a-z0-9-]*)*$ ]] \
    || die "--allow-run-config '$ALLOW_RUN_CONFIG' is not a comma-separated list of setting names, e.g. judge-model,leakage-ngram"
if [[ -n "$TRUSTED_ENTITIES" ]]; then
    need_file "$TRUSTED_ENTITIES" "--trusted-entities file"
    TRUSTED_ENTITIES="$(abs_path "$TRUSTED_ENTITIES")"
    grep -Eq '^fpk_[A-Za-z0-9-]+: *ssh-ed25519 ' "$TRUSTED_ENTITIES" \
        || die "--trusted-entities '$TRUSTED_ENTITIES' holds no line 'fpk_<id>: ssh-ed25519 <key>' (Flower's trusted-entities YAML)"
fi
NAME="${NAME:-supernode-$PARTITION}"
check_name "$NAME"
need_command flower-supernode "install the app and Flower on this machine first: pip install ."
check_flwr_version
python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("client_app") is None)' 2>/dev/null \
    || die "the FedTextGrad ClientApp is not importable here: install the app on this machine (pip install .)"

CMD=(flower-supernode --superlink "$SUPERLINK" --host 127.0.0.1 --port "$PORT" --isolation "$ISOLATION")
if [[ "$INSECURE" == 1 ]]; then
    [[ -z "$CA" && -z "$AUTH_KEY" ]] || die "--insecure excludes --ca and --auth-key"
    insecure_warning "this SuperNode's connection to $SUPERLINK"
    CMD+=(--insecure)
else
    [[ -n "$CA" ]] || die "--ca CA_CRT is required: the certificate of the CA that signed the SuperLink's certificate (ca.crt from gen-certs.sh); or --insecure for a loopback test"
    [[ -e "$CA" ]] || die "--ca certificate '$CA' does not exist: put the ca.crt the SuperLink's operator sent you there (gen-certs.sh made it on the server)"
    need_file "$CA" "--ca certificate"
    CA="$(abs_path "$CA")"
    grep -q "BEGIN CERTIFICATE" "$CA" || die "--ca '$CA' is not a PEM certificate"
    CMD+=(--root-certificates "$CA")
    if [[ "$NODE_AUTH" == 1 ]]; then
        [[ -n "$AUTH_KEY" ]] || die "--auth-key KEY is required: this node's private key (gen-node-keys.sh), registered with the SuperLink; or --no-node-auth if the SuperLink runs without node authentication"
        need_file "$AUTH_KEY" "--auth-key private key"
        AUTH_KEY="$(abs_path "$AUTH_KEY")"
        grep -q "BEGIN OPENSSH PRIVATE KEY" "$AUTH_KEY" \
            || die "--auth-key '$AUTH_KEY' is not an OpenSSH private key: create one with gen-node-keys.sh (give the private key, not the .pub)"
        CMD+=(--auth-supernode-private-key "$AUTH_KEY")
    else
        [[ -z "$AUTH_KEY" ]] || die "--no-node-auth excludes --auth-key"
    fi
fi
[[ -z "$MAX_WAIT" ]] || CMD+=(--max-wait-time "$MAX_WAIT")
[[ -z "$TRUSTED_ENTITIES" ]] || CMD+=(--trusted-entities "$TRUSTED_ENTITIES")

NODE_CONFIG="partition-id=$PARTITION num-partitions=$NUM_PARTITIONS"
[[ -z "$DATA_SOURCE" ]] || NODE_CONFIG+=" data-source=$(node_config_value --data-source "$DATA_SOURCE")"
if [[ -n "$LLM_URL" ]]; then
    NODE_CONFIG+=" llm-backend='openai' llm-base-url=$(node_config_value --llm-base-url "$LLM_URL")"
    [[ -n "$LLM_MODEL" ]] || die "--llm-base-url needs --llm-model (the model name the server serves)"
fi
[[ -z "$LLM_MODEL" ]] || NODE_CONFIG+=" llm-model=$(node_config_value --llm-model "$LLM_MODEL")"
[[ -z "$LLM_KEY_ENV" ]] || NODE_CONFIG+=" llm-api-key-env='$LLM_KEY_ENV'"
if [[ -n "$BW_URL" ]]; then
    NODE_CONFIG+=" backward-backend='openai' backward-base-url=$(node_config_value --backward-base-url "$BW_URL")"
    [[ -n "$BW_MODEL" ]] || die "--backward-base-url needs --backward-model"
fi
[[ -z "$BW_MODEL" ]] || NODE_CONFIG+=" backward-model=$(node_config_value --backward-model "$BW_MODEL")"
[[ -z "$BW_KEY_ENV" ]] || NODE_CONFIG+=" backward-api-key-env='$BW_KEY_ENV'"
[[ -z "$ALLOW_RUN_CONFIG" ]] || NODE_CONFIG+=" allow-run-config='$ALLOW_RUN_CONFIG'"
[[ -z "$EXTRA_NODE_CONFIG" ]] || NODE_CONFIG+=" $EXTRA_NODE_CONFIG"
CMD+=(--node-config "$NODE_CONFIG" "${EXTRA[@]}")

STATE="$(state_dir_for "$NAME" "$STATE")"
[[ "$FOREGROUND" == 1 ]] || refuse_if_running "$STATE" "a SuperNode"  # a container restart reuses its old pid file
if [[ "$FOREGROUND" == 0 ]] && ! port_bindable 127.0.0.1 "$PORT"; then
    die "--port $PORT is in use on 127.0.0.1: every SuperNode on a machine needs its own --port"
fi
if [[ "$FOREGROUND" == 0 ]] && ! port_open "$ADDR_HOST" "$ADDR_PORT"; then
    warn "nothing answers on $SUPERLINK yet; the SuperNode starts anyway and keeps retrying until the SuperLink is up"
fi

explain_exit() {
    # explain_exit STATE_DIR: one line saying why this SuperNode stopped, read from the lines
    # its log got since this start (empty when the log does not tell).
    local lines
    lines="$(tail -n +"$((LOG_START + 1))" "$1/log" 2>/dev/null)" || return 0
    if [[ "$lines" == *"Failed to activate SuperNode"* || "$lines" == *"No SuperNode found with the given public key"* ]]; then
        if [[ -n "$AUTH_KEY" ]]; then
            echo "the SuperLink refused this node's key: it is not registered there (or a SuperNode with this key is still connected; after a crash, start again in a minute). Send $AUTH_KEY.pub (the public key, never the private one) to the SuperLink's operator, who saves it as received/$(basename "$AUTH_KEY").pub and registers it: deploy/register-node.sh --superlink 127.0.0.1:$ADDR_PORT --ca certs/ca.crt received/$(basename "$AUTH_KEY").pub; then start this SuperNode again"
        else
            echo "the SuperLink refused this node: it requires node authentication; start with --auth-key KEY (gen-node-keys.sh) and have KEY.pub registered by the SuperLink's operator (register-node.sh)"
        fi
    elif [[ "$lines" == *"must be registered via the CLI"* ]]; then
        echo "the SuperLink requires node authentication: start with --auth-key KEY (gen-node-keys.sh) and have KEY.pub registered by the SuperLink's operator (register-node.sh)"
    elif [[ "$lines" == *"trusted entities"* || "$lines" == *"Trusted entities"* ]]; then
        echo "Flower refused the --trusted-entities file $TRUSTED_ENTITIES (exit code 304): each line must be 'fpk_<id>: ssh-ed25519 <base64 key>'"
    elif [[ "$lines" == *CERTIFICATE_VERIFY_FAILED* ]]; then
        echo "the TLS handshake failed: --ca $CA is not the CA that signed the SuperLink's certificate, or that certificate does not name '$ADDR_HOST' (gen-certs.sh --host); get the right ca.crt from the SuperLink's operator"
    fi
}

LOG_START=0
[[ -f "$STATE/log" ]] && LOG_START="$(wc -l <"$STATE/log")"
start_process "$STATE" "$FOREGROUND" "${CMD[@]}"
wait_for_port "$STARTED_PID" 127.0.0.1 "$PORT" 120 "the SuperNode" "$STATE"

say "started SuperNode '$NAME', PID $STARTED_PID, for SuperLink $SUPERLINK ($([[ "$INSECURE" == 1 ]] && echo "NO TLS" || echo "TLS$([[ "$NODE_AUTH" == 1 ]] && echo ", node key $AUTH_KEY")"), isolation $ISOLATION)"
say "  node config: $NODE_CONFIG"
say "  log:       $STATE/log"
say "  state:     $STATE (pid file $STATE/pid, FLWR_HOME $STATE/flwr-home, Runtime API 127.0.0.1:$PORT)"
say "  stop with: $DEPLOY_DIR/stop.sh --state-dir $STATE"
if [[ "$ISOLATION" == process ]]; then
    say "  next: start its ClientApp runner: $DEPLOY_DIR/start-superexec.sh --runtime 127.0.0.1:$PORT --insecure --name $NAME-runner"
fi

if ((WAIT_CONNECTED > 0)); then
    deadline=$((SECONDS + WAIT_CONNECTED))
    while ! tail -n +"$((LOG_START + 1))" "$STATE/log" | grep -q "SuperNode ID:"; do
        if ! pid_alive "$STARTED_PID"; then
            echo "--- last lines of $STATE/log:" >&2
            tail -n 15 "$STATE/log" >&2
            die "SuperNode '$NAME' (PID $STARTED_PID) stopped before the SuperLink accepted it; see $STATE/log$(exit_reason "$STATE")"
        fi
        if ((SECONDS >= deadline)); then
            die "SuperNode '$NAME' (PID $STARTED_PID) is not connected after ${WAIT_CONNECTED}s (it keeps retrying); see $STATE/log"
        fi
        sleep 0.5
    done
    say "  connected: $(tail -n +"$((LOG_START + 1))" "$STATE/log" | grep -m1 -o "SuperNode ID: [0-9]*")"
fi
