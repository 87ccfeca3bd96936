#!/usr/bin/env bash
# Build the fleet's local images without any registry:
#   acp-fleet/claude-code-acp:0.16.2  from images/agent/Dockerfile.local
#   acp-fleet/busybox:test            from images/busybox/Dockerfile
#   acp-fleet/nosh:test               from images/nosh/Dockerfile
# An image that already exists is skipped unless --force is given.
#
# Usage: images/build.sh [--force] [--only agent|busybox|nosh]
set -euo pipefail

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD_DIR="$(dirname "$IMAGES_DIR")/build/images"
AGENT_TAG=acp-fleet/claude-code-acp:0.16.2
BUSYBOX_TAG=acp-fleet/busybox:test
NOSH_TAG=acp-fleet/nosh:test
NODE_BIN=/usr/bin/node
BUSYBOX_BIN=/usr/bin/busybox

# Docker CLI 28 has no buildx here; the legacy builder handles FROM scratch.
export DOCKER_BUILDKIT=0

usage() {
    echo "usage: $0 [--force] [--only agent|busybox|nosh]" >&2
    exit 2
}

image_id() {
    docker image inspect --format '{{.Id}}' "$1" 2>/dev/null
}

# Copy a file to the same absolute path under a root, following symlinks,
# because /lib is a symlink on merged-/usr Debian but not in a scratch image.
copy_into() {
    install -D -m "$3" "$(readlink -f "$1")" "$2$1"
}

assemble_agent_rootfs() {
    local root="$BUILD_DIR/agent/rootfs" lib

    # Start clean except for opt/, where npm ci is kept until the lock changes.
    mkdir -p "$root"
    find "$root" -mindepth 1 -maxdepth 1 ! -name opt -exec rm -rf {} +
    install -D -m 0755 "$NODE_BIN" "$root/usr/local/bin/node"
    # ldd prints absolute paths for every library and for the loader.
    for lib in $(ldd "$NODE_BIN" | grep -o '/[^ ]*'); do
        copy_into "$lib" "$root" 0755
    done
    # Not needed to answer initialize or session/new; a shell for tests and
    # `docker exec`. Claude Code's Bash tool wants bash or zsh, absent here.
    install -D -m 0755 "$BUSYBOX_BIN" "$root/bin/sh"
    install -D -m 0644 -t "$root/etc" "$IMAGES_DIR"/etc/*
    copy_into /etc/ssl/certs/ca-certificates.crt "$root" 0644
    install -d -m 0755 "$root/tmp" "$root/home/agent" "$root/workspace" \
        "$root/run"
    install_agent_package "$root/opt/agent"
}

# npm ci wipes node_modules first, so it only runs when the lock changed.
install_agent_package() {
    local dest="$1" lock="$IMAGES_DIR/agent/package-lock.json"

    if cmp -s "$lock" "$dest/package-lock.json" \
        && [[ -d "$dest/node_modules" ]]; then
        return
    fi
    install -D -m 0644 -t "$dest" "$IMAGES_DIR/agent/package.json" "$lock"
    (cd "$dest" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
        --loglevel=error >&2)
}

build_agent() {
    assemble_agent_rootfs
    docker build --quiet --tag "$AGENT_TAG" \
        --file "$IMAGES_DIR/agent/Dockerfile.local" "$BUILD_DIR/agent" >/dev/null
}

build_busybox() {
    local context="$BUILD_DIR/busybox"

    mkdir -p "$context/etc"
    install -m 0755 "$BUSYBOX_BIN" "$context/busybox"
    install -m 0644 -t "$context/etc" "$IMAGES_DIR"/etc/passwd \
        "$IMAGES_DIR"/etc/group
    docker build --quiet --tag "$BUSYBOX_TAG" \
        --file "$IMAGES_DIR/busybox/Dockerfile" "$context" >/dev/null
}

build_nosh() {
    local context="$BUILD_DIR/nosh"

    mkdir -p "$context/etc" "$context/dirs"
    install -m 0755 "$BUSYBOX_BIN" "$context/busybox"
    install -m 0644 -t "$context/etc" "$IMAGES_DIR"/etc/passwd \
        "$IMAGES_DIR"/etc/group
    install -d -m 0755 "$context/dirs/tmp" "$context/dirs/workspace" \
        "$context/dirs/run" "$context/dirs/home/agent"
    docker build --quiet --tag "$NOSH_TAG" \
        --file "$IMAGES_DIR/nosh/Dockerfile" "$context" >/dev/null
}

ensure() {
    local name="$1" tag="$2" state=built

    if [[ -n "$(image_id "$tag")" && "$force" == 0 ]]; then
        state=exists
    else
        "build_$name"
    fi
    printf '%-34s %s (%s)\n' "$tag" "$(image_id "$tag")" "$state"
}

force=0
only=""
while (($#)); do
    case "$1" in
        --force) force=1 ;;
        --only) [[ $# -ge 2 ]] || usage; only="$2"; shift ;;
        -h|--help) usage ;;
        *) usage ;;
    esac
    shift
done
case "$only" in
    ""|agent|busybox|nosh) ;;
    *) usage ;;
esac

[[ -z "$only" || "$only" == agent ]] && ensure agent "$AGENT_TAG"
[[ -z "$only" || "$only" == busybox ]] && ensure busybox "$BUSYBOX_TAG"
[[ -z "$only" || "$only" == nosh ]] && ensure nosh "$NOSH_TAG"
exit 0
