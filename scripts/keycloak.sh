#!/usr/bin/env bash
# A real Keycloak 26 without Docker: Keycloak's own server distribution from Maven Central, run
# with `kc.sh start-dev` on this machine's Java, its data in a PostgreSQL database of its own.
#
#   scripts/keycloak.sh fetch         download (once, into Maven's local repository) with
#                                     `mvn dependency:copy` and unpack the copy it wrote;
#                                     print KEYCLOAK_HOME
#   scripts/keycloak.sh start [REALM_FILE...]
#                                     start on free loopback ports with a bootstrap admin
#                                     (admin/admin), health enabled, the realm files imported
#                                     with --import-realm (default realms/dev-realm.json); wait
#                                     until ready; print the base URL. A fresh database each time
#                                     unless KEYCLOAK_KEEP_DATA=1.
#   scripts/keycloak.sh url           the base URL of the running instance
#   scripts/keycloak.sh stop          stop it (SIGTERM, then SIGKILL after 30 s)
#   scripts/keycloak.sh export ARGS   `kc.sh export ARGS` against the running instance's database
#                                     (for example --realm dev --dir /tmp/out --users different_files)
#   scripts/keycloak.sh logs          the server log
#   scripts/keycloak.sh run-dir       the folder of the version's pid, URL, ports and logs
#
# Environment: KEYCLOAK_VERSION (default below), KEYCLOAK_STATE (default .keycloak/ in the
# repository: keycloak-<version>/, the unpacked distribution, and run-<version>/, the pid, ports
# and logs of that version's instance, so that two versions can be unpacked and run side by side:
# CI runs the pin and then the newest 26.x), KEYCLOAK_DB_ADMIN_URL (a PostgreSQL
# admin URL; default: scripts/local-db.sh admin-url), KEYCLOAK_JAVA_HOME (default: the newest JDK
# of 17 or later under /usr/lib/jvm that runs). Logs go to stderr, results to stdout.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The pin: the newest 26.4 patch Maven Central serves. docker-compose.yml names the same version
# (scripts/check-deploy.sh keeps them equal); the versions tested are listed in docs/testing.md.
version="${KEYCLOAK_VERSION:-26.4.7}"
state="${KEYCLOAK_STATE:-$root/.keycloak}"
home="$state/keycloak-$version"
# Per version: a second version started beside the first (CI: the pin, then the newest 26.x)
# must neither see the first's pid as its own nor overwrite its URL, ports or log.
run="$state/run-$version"
# One database per state folder, so two checkouts (a CI clone beside a working tree) never share
# or drop each other's Keycloak data.
db="keycloak_${version//./_}_$(printf '%s' "$state" | sha256sum | cut -c1-8)"

log() { echo "keycloak: $*" >&2; }
die() { log "$*"; exit "${2:-69}"; }

java_home() {
    if [[ -n "${KEYCLOAK_JAVA_HOME:-}" ]]; then echo "$KEYCLOAK_JAVA_HOME"; return; fi
    local j want
    # Keycloak 26 supports Java 17 and 21: prefer those, then anything newer.
    for want in '21' '17' '(2[2-9]|[3-9][0-9])'; do
        for j in $(ls -d /usr/lib/jvm/*/ 2>/dev/null | sort -rV); do
            if [[ -x "$j/bin/java" ]] && "$j/bin/java" -version 2>&1 | grep -qE "version \"$want[.\"]"; then
                echo "${j%/}"; return
            fi
        done
    done
    die "no Java 17 or later under /usr/lib/jvm: install one (apt-get install -y openjdk-17-jre-headless)"
}

fetch() {
    if [[ -x "$home/bin/kc.sh" ]]; then echo "$home"; return; fi
    command -v mvn >/dev/null || die "mvn is not installed: apt-get install -y maven"
    # Unpack what dependency:copy wrote, never a path guessed in Maven's local repository: Maven
    # finds that repository from the account's home (not $HOME) or settings.xml's
    # localRepository, so under sudo, a CI runner or a container with another HOME, a guess
    # misses. With the artifact already in the local repository nothing is downloaded.
    local dl="$state/download-$version"
    local zip="$dl/keycloak-quarkus-dist-$version.zip"
    rm -rf "$dl"
    mkdir -p "$dl"
    log "fetching org.keycloak:keycloak-quarkus-dist:$version (about 160 MB the first time; Maven's local repository keeps it)"
    mvn -q -B -Dstyle.color=never dependency:copy -DoutputDirectory="$dl" \
        -Dartifact="org.keycloak:keycloak-quarkus-dist:$version:zip" >&2 ||
        die "could not fetch org.keycloak:keycloak-quarkus-dist:$version:zip from Maven Central"
    [[ -f "$zip" ]] || die "mvn dependency:copy wrote no $zip (its output folder holds: $(ls "$dl" | tr '\n' ' '))"
    local tmp
    tmp="$(mktemp -d "$state/unpack.XXXXXX")"
    unzip -q "$zip" -d "$tmp"
    mv "$tmp/keycloak-$version" "$home"
    rmdir "$tmp"
    rm -rf "$dl" # the unpacked tree is what is kept; the zip stays in Maven's local repository
    echo "$home"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

running() { [[ -f "$run/pid" ]] && kill -0 "$(cat "$run/pid")" 2>/dev/null; }

db_admin() { echo "${KEYCLOAK_DB_ADMIN_URL:-$("$root/scripts/local-db.sh" admin-url)}"; }

# Keycloak's database options, shared by start and export. PostgreSQL rather than the dev-file
# H2: an H2 file is locked by the running server, so `kc.sh export` could not read it.
db_opts() {
    local admin rest hostport user
    admin="$(db_admin)"
    rest="${admin#*://}"
    user="${rest%%@*}"; user="${user%%:*}"
    hostport="${rest#*@}"; hostport="${hostport%%/*}"
    # The database the running instance was started on (older starts used another name).
    local name="$db"
    [[ -f "$run/db" ]] && name="$(cat "$run/db")"
    echo "--db-url=jdbc:postgresql://$hostport/$name --db-username=$user --db-password=${KEYCLOAK_DB_PASSWORD:-unused}"
}

start() {
    if running; then log "already running"; cat "$run/url"; return; fi
    fetch >/dev/null
    local files=("$@")
    [[ ${#files[@]} -gt 0 ]] || files=("$root/realms/dev-realm.json")
    local admin
    admin="$(db_admin)"
    if [[ -z "${KEYCLOAK_KEEP_DATA:-}" ]]; then
        psql -w "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >&2
    fi
    if ! psql -w "$admin" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
        psql -w "$admin" -qc "CREATE DATABASE $db" >&2
    fi
    rm -rf "$home/data/import"
    mkdir -p "$home/data/import"
    local f
    for f in "${files[@]}"; do
        [[ -f "$f" ]] || die "no realm file $f" 78
        cp "$f" "$home/data/import/"
    done
    local port mport jh
    port="${KEYCLOAK_PORT:-$(free_port)}"
    mport="$(free_port)"
    jh="$(java_home)"
    mkdir -p "$run"
    echo "http://127.0.0.1:$port" >"$run/url"
    echo "$db" >"$run/db"
    echo "$mport" >"$run/management-port"
    log "starting Keycloak $version on 127.0.0.1:$port (management $mport, Java $jh)"
    # shellcheck disable=SC2046
    (
        cd "$home"
        JAVA_HOME="$jh" KC_BOOTSTRAP_ADMIN_USERNAME=admin KC_BOOTSTRAP_ADMIN_PASSWORD=admin \
            exec setsid bin/kc.sh start-dev --import-realm \
            --http-host=127.0.0.1 --http-port="$port" --http-management-port="$mport" \
            --health-enabled=true --db=postgres $(db_opts) \
            >"$run/server.log" 2>&1 </dev/null
    ) &
    echo $! >"$run/pid"
    local deadline=$((SECONDS + ${KEYCLOAK_START_TIMEOUT:-300}))
    until curl -fsS "http://127.0.0.1:$mport/health/ready" >/dev/null 2>&1; do
        if ! running; then
            tail -20 "$run/server.log" >&2
            die "Keycloak exited during start; the log is $run/server.log"
        fi
        ((SECONDS < deadline)) || { tail -20 "$run/server.log" >&2; stop; die "Keycloak was not ready after ${KEYCLOAK_START_TIMEOUT:-300} s"; }
        sleep 1
    done
    log "ready after ${SECONDS}s: $(cat "$run/url") (admin/admin)"
    cat "$run/url"
}

stop() {
    if ! running; then rm -f "$run/pid"; return; fi
    local pid
    pid="$(cat "$run/pid")"
    # setsid made the server a process group leader: signal the whole group (kc.sh and its java).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$run/pid"; log "stopped"; return; }
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$run/pid"
    log "killed after 30 s"
}

export_realm() {
    running || die "Keycloak is not running (scripts/keycloak.sh start)"
    # One export at a time: the build start-dev made exposes health on the management interface,
    # so every `kc.sh export` opens one too, by default on 9000, and two at once (tests run in
    # parallel) failed with "Address already in use". Each export also gets a free port of its
    # own, so a 9000 taken by anything else does not fail it either. The log of the last failed
    # export is kept as export.log.
    exec 9>"$run/export.lock"
    flock 9
    local logf="$run/export-$$.log"
    # The server's build (start-dev) is reused; only runtime options are given.
    # shellcheck disable=SC2046
    (cd "$home" && JAVA_HOME="$(java_home)" bin/kc.sh export --optimized $(db_opts) \
        --http-management-port="$(free_port)" "$@" </dev/null >"$logf" 2>&1) ||
        { mv "$logf" "$run/export.log"; tail -20 "$run/export.log" >&2; die "kc.sh export failed; the log is $run/export.log" 1; }
    rm -f "$logf"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    fetch) fetch ;;
    start) start "$@" ;;
    stop) stop ;;
    url) running || die "Keycloak is not running"; cat "$run/url" ;;
    export) export_realm "$@" ;;
    logs) cat "$run/server.log" ;;
    run-dir) echo "$run" ;;
    *) echo "usage: $0 fetch | start [REALM_FILE...] | url | stop | export ARGS | logs | run-dir" >&2; exit 64 ;;
esac
