#!/usr/bin/env bash
# Finds or starts a PostgreSQL for local work and prints URLs on stdout (logs go to stderr).
#
#   scripts/local-db.sh ensure [DB]   ensure database DB exists; print its URL
#   scripts/local-db.sh reset [DB]    drop and recreate DB; print its URL
#   scripts/local-db.sh admin-url     print the server's admin URL (database postgres)
#   scripts/local-db.sh db            print the database ensure/reset use when DB is not given
#   scripts/local-db.sh stop          stop the throwaway cluster, if this script started one
#
# Server choice, in order: $DATABASE_URL (its server); PostgreSQL on 127.0.0.1:5432 as user
# postgres; the system cluster started with pg_ctlcluster; a throwaway cluster in .pgdata/ (or
# /var/tmp/seedkeeper-pgdata-*, for root in a folder the postgres user cannot enter) on
# port 5433 made with the system's initdb/pg_ctl. Exits 69 when none can be had.
#
# The database, when DB is not given: the one $DATABASE_URL names (postgres://…/mydb), else
# seedkeeper. A URL naming postgres, template0 or template1 is the server's admin URL, not a
# database to seed (resetting it could not work): seedkeeper then. The URL's ?parameters
# (sslmode=…) are kept on every URL printed and used.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pgdata="$root/.pgdata"
# Run as root, the cluster belongs to the postgres user, which must reach the folder: a checkout
# under a private folder (mktemp -d makes them 0700) keeps its cluster under /var/tmp instead.
if [[ "$(id -u)" == 0 ]] && id postgres >/dev/null 2>&1 && ! runuser -u postgres -- test -x "$root"; then
    pgdata="/var/tmp/seedkeeper-pgdata-$(printf '%s' "$root" | sha256sum | cut -c1-8)"
fi
throwaway_port=5433

log() { echo "local-db: $*" >&2; }

# $DATABASE_URL in parts, read as libpq does: credentials end at the first '@', the parameters
# start at the first '?' after them, the database is the path.
url_base="" url_db="" url_query=""
if [[ -n "${DATABASE_URL:-}" ]]; then
    rest="${DATABASE_URL#*://}"
    creds=""
    if [[ "$rest" == *@* ]]; then creds="${rest%%@*}@"; rest="${rest#*@}"; fi
    if [[ "$rest" == *\?* ]]; then url_query="?${rest#*\?}"; rest="${rest%%\?*}"; fi
    if [[ "$rest" == */* ]]; then url_db="${rest#*/}"; rest="${rest%%/*}"; fi
    url_base="${DATABASE_URL%%://*}://$creds$rest"
fi

default_db() {
    case "$url_db" in
        "" | postgres | template0 | template1) echo seedkeeper ;;
        *) echo "$url_db" ;;
    esac
}

reachable() { # url
    PGCONNECT_TIMEOUT=3 psql -w "$1" -Atqc 'SELECT 1' >/dev/null 2>&1
}

server_url() {
    if [[ -n "${DATABASE_URL:-}" ]]; then
        # Keep scheme, credentials, host and port; the database is chosen per call.
        echo "$url_base"
        return
    fi
    if reachable "postgres://postgres@127.0.0.1:5432/postgres"; then
        echo "postgres://postgres@127.0.0.1:5432"
        return
    fi
    if command -v pg_lsclusters >/dev/null 2>&1 && [[ -z "${SEEDKEEPER_LOCALDB_FORCE_THROWAWAY:-}" ]]; then
        local ver
        ver="$(pg_lsclusters -h 2>/dev/null | awk '$2 == "main" {print $1; exit}')"
        if [[ -n "$ver" ]]; then
            # Start it if it is down, wait until it accepts connections (pg_isready needs no
            # login), then try one login: a stock Debian cluster wants a password over TCP, and
            # retrying cannot change that, so a refusal goes straight to the throwaway cluster.
            if ! pg_isready -q -h 127.0.0.1 -p 5432; then
                log "starting the system cluster $ver/main"
                pg_ctlcluster --skip-systemctl-redirect "$ver" main start >&2 || true
                pg_isready -q -h 127.0.0.1 -p 5432 -t 10 || true
            fi
            if reachable "postgres://postgres@127.0.0.1:5432/postgres"; then
                echo "postgres://postgres@127.0.0.1:5432"
                return
            fi
            log "the system cluster $ver/main does not trust TCP logins; using a throwaway trust cluster instead"
        fi
    fi
    throwaway
}

throwaway() {
    local url="postgres://postgres@127.0.0.1:$throwaway_port"
    if reachable "$url/postgres"; then
        echo "$url"
        return
    fi
    local bin
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
    if [[ -z "$bin" || ! -x "$bin/initdb" ]]; then
        log "no PostgreSQL found: nothing answers on 127.0.0.1:5432, DATABASE_URL is unset, and initdb is not installed."
        log "install it with: apt-get install -y postgresql   (or set DATABASE_URL=postgres://user@host:5432/seedkeeper)"
        exit 69
    fi
    local run=()
    if [[ "$(id -u)" == 0 ]]; then
        # initdb refuses to run as root: run the cluster as the postgres user.
        id postgres >/dev/null 2>&1 || useradd --system --home-dir "$pgdata" postgres
        mkdir -p "$pgdata"
        chown postgres "$pgdata"
        run=(runuser -u postgres --)
    fi
    if [[ ! -f "$pgdata/PG_VERSION" ]]; then
        log "creating a throwaway cluster in $pgdata"
        "${run[@]}" "$bin/initdb" -D "$pgdata" -U postgres --auth=trust >/dev/null
    fi
    log "starting the throwaway cluster on 127.0.0.1:$throwaway_port"
    "${run[@]}" "$bin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -c port=$throwaway_port -c unix_socket_directories=$pgdata" start >&2
    echo "$url"
}

cmd="${1:-ensure}"
db="${2:-$(default_db)}"
q="$url_query"
case "$cmd" in
    admin-url)
        echo "$(server_url)/postgres$q"
        ;;
    db)
        echo "$db"
        ;;
    ensure)
        server="$(server_url)"
        if ! psql "$server/postgres$q" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
            log "creating database $db"
            psql "$server/postgres$q" -qc "CREATE DATABASE \"$db\"" >&2
        fi
        echo "$server/$db$q"
        ;;
    reset)
        server="$(server_url)"
        psql "$server/postgres$q" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >&2
        psql "$server/postgres$q" -qc "CREATE DATABASE \"$db\"" >&2
        echo "$server/$db$q"
        ;;
    stop)
        bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
        if [[ -f "$pgdata/postmaster.pid" && -n "$bin" ]]; then
            if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$bin/pg_ctl" -D "$pgdata" stop >&2; else "$bin/pg_ctl" -D "$pgdata" stop >&2; fi
        fi
        ;;
    *)
        echo "usage: $0 ensure|reset [DB] | admin-url | db | stop" >&2
        exit 64
        ;;
esac
