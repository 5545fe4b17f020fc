#!/usr/bin/env bash
# Local STAND-INS for the base images of the Dockerfile and docker-compose.yml, for machines that
# reach the package registries (Debian, crates.io, Maven Central) but no container registry.
#
#   scripts/base-images.sh           every image the two files name: `docker pull` first (20 s
#                                    at most); only what cannot be pulled is built here
#   scripts/base-images.sh --list    the names, one a line, and whether each exists locally
#
# The stand-ins carry exactly the names the files use, so the Dockerfile and the compose file stay
# as they would be with the real images. What each one is (docs/deploy.md says the same):
#   debian:bookworm-slim          debootstrap --variant=minbase bookworm from the machine's Debian
#                                 mirror (/etc/apt/sources.list*), docs and man pages left out as
#                                 in the real slim image, then `docker import`
#   rust:<version>-bookworm       that base + gcc, libc6-dev, pkg-config, ca-certificates and this
#                                 machine's own Rust toolchain of that version (rustc, cargo,
#                                 clippy, rustfmt; no rustup, no docs) in /usr/local/rust
#   postgres:15                   that base + Debian's postgresql-15, an entrypoint for
#                                 POSTGRES_USER / POSTGRES_DB / POSTGRES_PASSWORD(_FILE), data in
#                                 /var/lib/postgresql/data, scram-sha-256 over TCP on 0.0.0.0
#   quay.io/keycloak/keycloak:V   that base + Debian's JRE 17 (headless) + keycloak-quarkus-dist V
#                                 from Maven Central (scripts/keycloak.sh fetch) in /opt/keycloak,
#                                 uid 1000, entrypoint /opt/keycloak/bin/kc.sh
# Every stand-in trusts the CA files of /usr/local/share/ca-certificates (this machine reaches
# the registries through a TLS-inspecting proxy; cargo inside `docker build` needs that). An
# image that already exists locally is kept: `docker rmi NAME` to rebuild it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { echo "base-images: $*" >&2; }
die() { log "$*"; exit 1; }
banner() {
    log "################################################################################"
    log "# STAND-IN: $1 is built locally, it is NOT the official image."
    log "# (No container registry is reachable; see docs/deploy.md, 'Stand-in base images'.)"
    log "################################################################################"
}

# The names, exactly as the two files spell them (seedkeeper's own image, `scratch` and the
# Dockerfile's own stages excluded).
names() {
    local stages
    stages="$(sed -nE 's/^FROM[[:space:]].*[[:space:]][Aa][Ss][[:space:]]+([^[:space:]]+).*/\1/p' Dockerfile)"
    sed -nE 's/^FROM[[:space:]]+(--platform=[^[:space:]]+[[:space:]]+)?([^[:space:]]+).*/\2/p' Dockerfile \
        | grep -vxF -e scratch $(printf -- ' -e %s' $stages)
    sed -nE 's/^[[:space:]]+image:[[:space:]]*"?([^"[:space:]]+)"?.*/\1/p' docker-compose.yml | grep -v '^seedkeeper:'
}
mapfile -t images < <(names | awk '!seen[$0]++')

exists() { docker image inspect "$1" >/dev/null 2>&1; }

if [[ "${1:-}" == --list ]]; then
    for i in "${images[@]}"; do
        if exists "$i"; then echo "$i present"; else echo "$i missing"; fi
    done
    exit 0
fi

ca_files() { find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' 2>/dev/null | sort; }

# A build context with the CA files in ca/ (and a Dockerfile from stdin): $1 = directory.
context() {
    mkdir -p "$1/ca"
    local f
    while read -r f; do cp "$f" "$1/ca/"; done < <(ca_files)
    cat >"$1/Dockerfile"
}

# Debian's mirror as this machine's apt is configured (deb822 or one-line format).
debian_mirror() {
    local m
    m="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
        | grep -v -- '-security' | head -n1)"
    [[ -n "$m" ]] || m="$(grep -hsE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -v -- '-security' | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}')"
    echo "${m:-http://deb.debian.org/debian}"
}

build_debian() { # name
    command -v debootstrap >/dev/null 2>&1 || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    local mirror rootfs
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d /var/tmp/seedkeeper-rootfs.XXXXXX)"
    log "debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; rm -rf "$rootfs"; die "debootstrap failed"; }
    rm -f "$rootfs.log"
    # As the real slim image: no docs, man pages or locales from later installs either.
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    rm -rf "$rootfs"/usr/share/{man,info,groff,lintian,linda,locale}/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # The suites the real image lists, on the same mirror.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Trusted once ca-certificates is installed (update-ca-certificates reads this directory).
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    local f
    while read -r f; do cp "$f" "$rootfs/usr/local/share/ca-certificates/"; done < <(ca_files)
    tar -C "$rootfs" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "seedkeeper stand-in for $1 (debootstrap minbase bookworm, $mirror)" - "$1" >/dev/null
    rm -rf "$rootfs"
}

# The directory of an installed toolchain whose rustc is version $1 (1.95 or 1.95.0).
toolchain_dir() {
    local want="$1" d
    for d in "$(rustc --print sysroot 2>/dev/null)" "${RUSTUP_HOME:-$HOME/.rustup}"/toolchains/*; do
        [[ -x "$d/bin/rustc" && -x "$d/bin/cargo" ]] || continue
        if "$d/bin/rustc" --version 2>/dev/null | grep -qE "^rustc ${want//./\\.}([. ]|$)"; then
            readlink -f "$d"
            return
        fi
    done
    return 1
}

build_rust() { # name (rust:<version>-bookworm)
    local version="${1#rust:}"
    version="${version%-bookworm}"
    local tc
    tc="$(toolchain_dir "$version")" || die "no Rust $version toolchain on this machine (rustup toolchain list)"
    log "Rust toolchain $("$tc/bin/rustc" --version) from $tc"
    local ctx
    ctx="$(mktemp -d /var/tmp/seedkeeper-rust.XXXXXX)"
    # Hard links when possible: the context is the toolchain without its docs (~0.6 GB).
    mkdir -p "$ctx/rust"
    cp -al "$tc/." "$ctx/rust/" 2>/dev/null || cp -a "$tc/." "$ctx/rust/"
    rm -rf "$ctx/rust/share/doc" "$ctx/rust/share/man"
    context "$ctx" <<'EOF'
FROM debian:bookworm-slim
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev pkg-config ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY rust/ /usr/local/rust/
# As the official image: CARGO_HOME in /usr/local/cargo; the toolchain's own bin holds cargo,
# rustc, clippy and rustfmt (no rustup).
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && chmod -R a+w /usr/local/cargo && rustc --version && cargo --version
EOF
    docker build -q -t "$1" "$ctx" >/dev/null || { rm -rf "$ctx"; die "docker build of $1 failed"; }
    rm -rf "$ctx"
}

build_postgres() { # name (postgres:<major>)
    local major="${1#postgres:}"
    local ctx
    ctx="$(mktemp -d /var/tmp/seedkeeper-postgres.XXXXXX)"
    cat >"$ctx/docker-entrypoint.sh" <<'EOF'
#!/bin/bash
# Stand-in for the official postgres image's entrypoint: POSTGRES_USER (default postgres),
# POSTGRES_DB (default the user), POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE; a new cluster in
# $PGDATA on the first start; local connections trusted, TCP with scram-sha-256 on 0.0.0.0.
set -euo pipefail
if [[ "${1:-}" != postgres ]]; then exec "$@"; fi
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
if [[ "$(id -u)" == 0 ]]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    if [[ -n "${POSTGRES_PASSWORD_FILE:-}" ]]; then
        [[ -z "${POSTGRES_PASSWORD:-}" ]] || { echo "set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE, not both" >&2; exit 1; }
        POSTGRES_PASSWORD="$(<"$POSTGRES_PASSWORD_FILE")"
    fi
    [[ -n "${POSTGRES_PASSWORD:-}" ]] || { echo "POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE is required" >&2; exit 1; }
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    if [[ "$db" != postgres ]]; then
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
        psql -X -q -v ON_ERROR_STOP=1 -U "$user" -d postgres -v db="$db" <<'SQL'
CREATE DATABASE :"db";
SQL
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    echo "postgres stand-in: cluster initialised in $PGDATA (user $user, database $db)"
fi
exec postgres -D "$PGDATA" "${@:2}"
EOF
    context "$ctx" <<EOF
FROM debian:bookworm-slim
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-common ca-certificates \\
    && sed -ri 's/#?(create_main_cluster) .*\$/\\1 = false/' /etc/postgresql-common/createcluster.conf \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-$major \\
    && rm -rf /var/lib/apt/lists/* \\
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \\
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \\
    && chmod 700 /var/lib/postgresql/data
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/$major/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PGDATA=/var/lib/postgresql/data
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
EOF
    chmod 0755 "$ctx/docker-entrypoint.sh"
    docker build -q -t "$1" "$ctx" >/dev/null || { rm -rf "$ctx"; die "docker build of $1 failed"; }
    rm -rf "$ctx"
}

build_keycloak() { # name (quay.io/keycloak/keycloak:<version>)
    local version="${1##*:}"
    local home
    home="$(KEYCLOAK_VERSION="$version" bash scripts/keycloak.sh fetch)" || die "scripts/keycloak.sh fetch failed"
    local ctx
    ctx="$(mktemp -d /var/tmp/seedkeeper-keycloak.XXXXXX)"
    mkdir -p "$ctx/keycloak"
    cp -a "$home/." "$ctx/keycloak/"
    # Nothing from a local run of scripts/keycloak.sh (its data, its build of the server).
    rm -rf "$ctx/keycloak/data"
    context "$ctx" <<'EOF'
FROM debian:bookworm-slim
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && mkdir -p /usr/share/man/man1 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openjdk-17-jre-headless ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --gid 0 --home-dir /opt/keycloak --no-create-home --shell /bin/bash keycloak
COPY --chown=1000:0 keycloak/ /opt/keycloak/
RUN mkdir -p /opt/keycloak/data && chown 1000:0 /opt/keycloak/data && chmod -R g+rwX /opt/keycloak
ENV LANG=C.UTF-8
USER 1000
WORKDIR /opt/keycloak
EXPOSE 8080 8443 9000
ENTRYPOINT ["/opt/keycloak/bin/kc.sh"]
EOF
    docker build -q -t "$1" "$ctx" >/dev/null || { rm -rf "$ctx"; die "docker build of $1 failed"; }
    rm -rf "$ctx"
}

builder_for() {
    case "$1" in
        debian:bookworm-slim) echo build_debian ;;
        rust:*-bookworm) echo build_rust ;;
        postgres:*) echo build_postgres ;;
        quay.io/keycloak/keycloak:*) echo build_keycloak ;;
        *) return 1 ;;
    esac
}

# The Debian base first: the other stand-ins are built on it.
ordered=()
for i in "${images[@]}"; do [[ "$i" == debian:bookworm-slim ]] && ordered+=("$i"); done
for i in "${images[@]}"; do [[ "$i" != debian:bookworm-slim ]] && ordered+=("$i"); done
needs_base=0
for i in "${ordered[@]}"; do
    [[ "$i" != debian:bookworm-slim ]] && ! exists "$i" && needs_base=1
done
if ((needs_base)) && [[ ! " ${ordered[*]} " =~ " debian:bookworm-slim " ]]; then
    ordered=(debian:bookworm-slim "${ordered[@]}")
fi

for i in "${ordered[@]}"; do
    t0=$SECONDS
    if exists "$i"; then
        log "$i: present locally"
        continue
    fi
    if timeout 20 docker pull -q "$i" >/dev/null 2>&1; then
        log "$i: pulled ($((SECONDS - t0)) s)"
        continue
    fi
    builder="$(builder_for "$i")" || die "$i cannot be pulled and has no stand-in here"
    banner "$i"
    "$builder" "$i"
    log "$i: STAND-IN built ($((SECONDS - t0)) s)"
done
