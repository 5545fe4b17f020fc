#!/usr/bin/env bash
# A Docker engine, Compose v2 and the base images, on a Debian 12 machine that reaches the
# package registries but no container registry (CI, or a developer's VM). Idempotent: each part
# is skipped when already in place. Root needed (apt-get, dockerd).
#
#   scripts/docker-setup.sh            engine + compose + base images
#   scripts/docker-setup.sh engine     only the engine (Debian's docker.io, dockerd started)
#   scripts/docker-setup.sh compose    only Compose v2 (built from the Go module proxy, cached)
#   scripts/docker-setup.sh images     only the base images (scripts/base-images.sh)
#
# - Engine: Debian's docker.io when `dockerd` is missing; dockerd is started in the background
#   (overlay2, log in $DOCKERD_LOG, default /var/log/seedkeeper-dockerd.log) unless `docker info`
#   already answers. Any docker client on PATH works with it: the client negotiates the API
#   version down to the daemon's (20.10 speaks API 1.41).
# - Compose v2 is not packaged in Debian 12 (its docker-compose is v1, which cannot read our
#   compose file). `go install` refuses github.com/docker/compose (exclude directives in its
#   go.mod), so it is built in an empty module and installed as the CLI plugin
#   /usr/local/lib/docker/cli-plugins/docker-compose. The binary is cached in
#   ~/.cache/seedkeeper/docker-compose-$COMPOSE_VERSION, so only the first run builds it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_VERSION="${COMPOSE_VERSION:-v5.6.0}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/seedkeeper-dockerd.log}"
cache="${SEEDKEEPER_CACHE:-$HOME/.cache/seedkeeper}"
plugin_dir=/usr/local/lib/docker/cli-plugins

log() { echo "docker-setup: $*" >&2; }
die() { log "$*"; exit 1; }
timed() { # label command...: runs it, prints its wall time
    local t0=$SECONDS
    "${@:2}"
    log "$1: $((SECONDS - t0)) s"
}

engine() {
    if ! command -v dockerd >/dev/null 2>&1; then
        log "installing Debian's docker.io"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            docker.io iptables >/dev/null
    fi
    if docker info >/dev/null 2>&1; then
        log "engine: $(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}, client {{.Client.Version}}')"
        return
    fi
    log "starting dockerd (overlay2), log in $DOCKERD_LOG"
    # setsid + nohup: the daemon outlives this script and the CI step that started it.
    setsid nohup dockerd --storage-driver=overlay2 >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { tail -n 30 "$DOCKERD_LOG" >&2; die "dockerd did not answer within 60 s"; }
        sleep 1
    done
    log "engine: $(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}, client {{.Client.Version}}')"
}

compose() {
    local bin="$cache/docker-compose-$COMPOSE_VERSION"
    if [[ ! -x "$bin" ]]; then
        command -v go >/dev/null 2>&1 || die "go is not on PATH: Compose v2 is built from the Go module proxy (Go 1.24 or later)"
        log "building Compose $COMPOSE_VERSION from the Go module proxy (about a minute, once)"
        local tmp
        tmp="$(mktemp -d)"
        (
            cd "$tmp"
            go mod init local/compose >/dev/null 2>&1
            go get "github.com/docker/compose/v5/cmd@$COMPOSE_VERSION" >/dev/null 2>&1 \
                || { echo "go get github.com/docker/compose/v5/cmd@$COMPOSE_VERSION failed" >&2; exit 1; }
            go build -trimpath -ldflags "-s -w -X github.com/docker/compose/v5/internal.Version=$COMPOSE_VERSION" \
                -o docker-compose github.com/docker/compose/v5/cmd
        ) || { rm -rf "$tmp"; die "building Compose $COMPOSE_VERSION failed"; }
        mkdir -p "$cache"
        mv "$tmp/docker-compose" "$bin.partial" && mv "$bin.partial" "$bin"
        rm -rf "$tmp"
    fi
    mkdir -p "$plugin_dir"
    if ! cmp -s "$bin" "$plugin_dir/docker-compose"; then
        install -m 0755 "$bin" "$plugin_dir/docker-compose"
    fi
    log "compose: $(docker compose version)"
}

images() {
    bash "$root/scripts/base-images.sh"
}

case "${1:-all}" in
    engine) timed "docker engine" engine ;;
    compose) timed "compose" compose ;;
    images) timed "base images" images ;;
    all)
        timed "docker engine" engine
        timed "compose" compose
        timed "base images" images
        ;;
    *) echo "usage: $0 [engine | compose | images]" >&2; exit 64 ;;
esac
