#!/usr/bin/env bash
# The event follower's figures: `cargo bench --bench events` with a release build, the
# real Keycloak 26 of scripts/keycloak.sh (the running one, else one started here and stopped at
# the end) and the local PostgreSQL. Prints tables; JSON in bench-results/bench-events.json.
#
#   1. change-to-database latency of the daemon over 50 changes (25 users created, 25 admin
#      grants revoked) on a realm of its own, events.poll_interval = 2s, schedule a year away;
#   2. Keycloak requests in an idle minute of that daemon;
#   3. one new user against a full no-op run, on the Keycloak emulator at 1k/10k/100k users.
#
# Knobs (see benches/events.rs): SEEDKEEPER_BENCH_EVENTS_CHANGES, SEEDKEEPER_BENCH_EVENTS_IDLE_SECS,
# SEEDKEEPER_BENCH_EVENTS_SIZES, SEEDKEEPER_BENCH_EVENTS_PARTS (keycloak,emulator).
# The realm (sk-bench-events-*) and databases (sk_bench_events_*) it creates are deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

started=""
if [[ "${SEEDKEEPER_BENCH_EVENTS_PARTS:-keycloak}" == *keycloak* ]]; then
    if ! base="$(bash scripts/keycloak.sh url 2>/dev/null)"; then
        base="$(bash scripts/keycloak.sh start)"
        started=1
    fi
    export SEEDKEEPER_TEST_KEYCLOAK_URL="$base"
fi
stop_ours() { if [[ -n "$started" ]]; then bash scripts/keycloak.sh stop; fi; }
trap stop_ours EXIT

export SEEDKEEPER_TEST_DATABASE_URL="${SEEDKEEPER_TEST_DATABASE_URL:-$(scripts/local-db.sh admin-url)}"
cargo build --release --quiet
cargo bench --quiet --bench events
