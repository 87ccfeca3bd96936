#!/usr/bin/env bash
# Prepare this machine for the fleet: Docker Engine, Redis, Node.js, the
# Python environment in .venv and the local images. Safe to run again: each
# step is skipped when its result is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
DOCKERD_LOG=/var/log/acp-fleet-dockerd.log

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    # The test image is FROM scratch, so its busybox must be the static one.
    if ! [ -x /usr/bin/busybox ] || ldd /usr/bin/busybox >/dev/null 2>&1; then
        missing+=(busybox-static)
    fi
    # promtool, which the tests evaluate the shipped alert rules with, comes
    # with Debian's Prometheus; its recommended node exporter is not wanted.
    local lean=()
    command -v promtool >/dev/null || lean+=(prometheus)
    [ "${#missing[@]}" -eq 0 ] && [ "${#lean[@]}" -eq 0 ] && return
    echo "setup: installing ${missing[*]} ${lean[*]}"
    as_root apt-get update -qq
    if [ "${#missing[@]}" -gt 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ "${#lean[@]}" -gt 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null
    fi
}

start_docker() {
    docker info >/dev/null 2>&1 && return
    echo "setup: starting dockerd (log: $DOCKERD_LOG)"
    as_root sh -c "nohup dockerd >$DOCKERD_LOG 2>&1 &"
    for _ in $(seq 120); do
        docker info >/dev/null 2>&1 && return
        sleep 0.5
    done
    echo "setup: dockerd did not answer within 60 s; see $DOCKERD_LOG" >&2
    tail -n 20 "$DOCKERD_LOG" >&2 || true
    exit 1
}

python_env() {
    local stamp="$VENV/.installed" want
    want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return
    echo "setup: installing the Python environment in .venv"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$ROOT[test]"
    echo "$want" >"$stamp"
}

install_packages
start_docker
python_env
bash "$ROOT/images/build.sh"
