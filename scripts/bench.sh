#!/usr/bin/env bash
# The benchmark: release build, then realms of 1k/10k/100k users (SEEDKEEPER_BENCH_SIZES, e.g.
# 1000000) synced with both sources (SEEDKEEPER_BENCH_SOURCES=realm-file,keycloak) next to the
# COPY floor. Prints a table; JSON in bench-results/bench.json.
# Then scripts/bench-keycloak.sh: the keycloak source against a real Keycloak 26 next to
# `kc.sh export` (JSON in bench-results/bench-keycloak.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export SEEDKEEPER_TEST_DATABASE_URL="${SEEDKEEPER_TEST_DATABASE_URL:-$(scripts/local-db.sh admin-url)}"
cargo build --release --quiet
cargo bench --quiet --bench sync
SEEDKEEPER_BENCH_KC_SKIP_BUILD=1 bash scripts/bench-keycloak.sh
