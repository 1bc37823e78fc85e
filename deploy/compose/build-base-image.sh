#!/usr/bin/env bash
# Build the compose demo's base image without any image registry: a Debian root file system made
# with debootstrap from the Debian package mirror, imported into the local Docker engine.
set -euo pipefail
PROG="$(basename "$0")"

# Bump when the package list changes: --if-missing then rebuilds an image of an older version.
VERSION=1
PACKAGES="python3,python3-venv,ca-certificates,libgomp1,openssl,openssh-client"

usage() {
    cat <<EOF
Usage: $PROG [--tag NAME:TAG] [--suite SUITE] [--mirror URL] [--if-missing]

Makes the image the compose demo builds FROM where Docker Hub cannot be reached:
  debootstrap --variant=minbase --include=$PACKAGES SUITE ROOTFS MIRROR
  tar -C ROOTFS -c . | docker import - NAME:TAG
(python3 is the suite's own: 3.11.2 in bookworm; build-wheelhouse.sh resolves for it;
libgomp1 is what xllamacpp's llama.cpp needs; openssl and ssh-keygen make the demo's
certificates and node keys.) Then build the demo with it:
  BASE_IMAGE=NAME:TAG docker compose -f deploy/compose/compose.yaml --profile cpu build

Needs root, debootstrap (apt-get install debootstrap), a running Docker engine and the Debian
mirror (about 60 MB of packages, about a minute). The image is about 200 MB.

Options:
  --tag NAME:TAG   the image to make (default fedtextgrad-base:bookworm)
  --suite SUITE    the Debian release (default bookworm)
  --mirror URL     the Debian mirror (default: this machine's apt source, else http://deb.debian.org/debian)
  --if-missing     do nothing when the image exists and is of this script's version ($VERSION)
  -h, --help       this text
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

TAG=fedtextgrad-base:bookworm
SUITE=bookworm
MIRROR=""
IF_MISSING=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) [[ $# -ge 2 ]] || die "--tag needs a value (see --help)"; TAG="$2"; shift 2 ;;
        --suite) [[ $# -ge 2 ]] || die "--suite needs a value (see --help)"; SUITE="$2"; shift 2 ;;
        --mirror) [[ $# -ge 2 ]] || die "--mirror needs a value (see --help)"; MIRROR="$2"; shift 2 ;;
        --if-missing) IF_MISSING=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$TAG" =~ ^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?$ ]] || die "--tag '$TAG' is not an image name (name:tag, lower case)"
[[ "$SUITE" =~ ^[a-z]+$ ]] || die "--suite '$SUITE' is not a Debian release name (e.g. bookworm)"
command -v docker >/dev/null || die "'docker' is not on PATH (apt-get install docker.io)"
docker version >/dev/null 2>&1 || die "no Docker engine answers 'docker version' (start dockerd first, e.g. .ci/docker.sh)"

LABEL="org.fedtextgrad.base-image"
if [[ "$IF_MISSING" == 1 ]]; then
    have="$(docker image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$TAG" 2>/dev/null || true)"
    if [[ "$have" == "$VERSION" ]]; then
        say "$TAG exists (version $VERSION): kept"
        exit 0
    fi
    [[ -z "$have" ]] || say "$TAG is of version '${have}', not $VERSION: rebuilding it"
fi
[[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "'debootstrap' is not on PATH (apt-get install debootstrap)"

if [[ -z "$MIRROR" ]]; then
    MIRROR="$(sed -n 's|^URIs:[[:space:]]*\(http[^[:space:]]*/debian\)[[:space:]]*$|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 || true)"
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi
[[ "$MIRROR" =~ ^(https?|file):// ]] || die "--mirror '$MIRROR' is not a URL (http://, https:// or file://)"

ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/fedtextgrad-rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
say "debootstrap $SUITE from $MIRROR into $ROOTFS (about a minute)"
began=$SECONDS
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -n 20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; die "debootstrap failed (the lines above say why)"; }
rm -f "$ROOTFS.log"
# apt's package cache and lists are of no use in the image (about 100 MB)
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log
: >"$ROOTFS/etc/resolv.conf"   # Docker puts its own in at run time; the host's stays out
say "importing it as $TAG"
tar -C "$ROOTFS" -c . | docker import \
    --change "LABEL $LABEL=$VERSION" \
    --change "ENV LANG=C.UTF-8" \
    --change 'CMD ["/bin/bash"]' \
    - "$TAG" >/dev/null
python_version="$(docker run --rm --network none "$TAG" python3 -c 'import platform; print(platform.python_version())')" \
    || die "the new image $TAG does not run python3"
size="$(docker image inspect --format '{{.Size}}' "$TAG")"
say "built $TAG in $((SECONDS - began)) s: Python $python_version, $((size / 1000000)) MB"
