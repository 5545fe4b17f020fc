#!/usr/bin/env bash
# The test suite against a real PostgreSQL and a real Keycloak 26 (`make test`).
#
# PostgreSQL: scripts/local-db.sh (started if needed). Keycloak: KEYCLOAK_URL when set (an
# existing Keycloak with realms/dev-realm.json imported and admin credentials in
# KEYCLOAK_ADMIN, default admin:admin; the kc.sh export tests then need the local one), else
# scripts/keycloak.sh starts the pinned version (KEYCLOAK_VERSION overrides) while the tests
# compile, and stops it at the end. Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tools the suite runs (PostgreSQL, Java and Maven for Keycloak, pgbouncer, prometheus, ...):
# installed when missing (as root), else the one command to run is printed.
bash scripts/test-deps.sh
db_url="$(scripts/local-db.sh admin-url)"
started=""
if [[ -z "${KEYCLOAK_URL:-}" ]]; then
    bash scripts/keycloak.sh fetch >/dev/null
    kc_out="$(mktemp)"
    bash scripts/keycloak.sh start >"$kc_out" &
    kc_pid=$!
    started=1
    trap 'bash scripts/keycloak.sh stop || true' EXIT
fi
cargo test --no-run --quiet
if [[ -n "$started" ]]; then
    wait "$kc_pid" || { echo "test: the real Keycloak did not start (see $(bash scripts/keycloak.sh run-dir)/server.log)" >&2; exit 69; }
    KEYCLOAK_URL="$(cat "$kc_out")"
    rm -f "$kc_out"
fi
echo "test: PostgreSQL $db_url, Keycloak $KEYCLOAK_URL" >&2
SEEDKEEPER_TEST_DATABASE_URL="$db_url" SEEDKEEPER_TEST_KEYCLOAK_URL="$KEYCLOAK_URL" \
    SEEDKEEPER_TEST_KEYCLOAK_ADMIN="${KEYCLOAK_ADMIN:-admin:admin}" cargo test "$@"
