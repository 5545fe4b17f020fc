#!/usr/bin/env bash
# The compose stack without Docker (`make dev-stack`): a local PostgreSQL (scripts/local-db.sh),
# the real Keycloak with realms/dev-realm.json imported (scripts/keycloak.sh, the same
# `start-dev --import-realm` as docker-compose.yml), and the seedkeeper daemon on the keycloak
# source, reconciling every 30 s and serving http://127.0.0.1:8787. Ctrl-C stops all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
db="${DB:-}" # empty: the database DATABASE_URL names, else seedkeeper (scripts/local-db.sh)
seedkeeper="${SEEDKEEPER:-target/debug/seedkeeper}"

url="$(scripts/local-db.sh ensure ${db:+"$db"})"
kc="$(KEYCLOAK_KEEP_DATA="${KEYCLOAK_KEEP_DATA-1}" bash scripts/keycloak.sh start)"
trap 'bash scripts/keycloak.sh stop' EXIT
echo "dev-stack: Keycloak $kc (admin console: $kc/admin, admin/admin), database $url" >&2
SEEDKEEPER_DATABASE__URL="$url" \
SEEDKEEPER_IDENTITY__SOURCE=keycloak \
SEEDKEEPER_KEYCLOAK__BASE_URL="$kc" \
SEEDKEEPER_KEYCLOAK__REALM=dev \
SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE=deploy/compose/secrets/keycloak-client-secret \
SEEDKEEPER_SCHEDULE__CRON="${SEEDKEEPER_SCHEDULE__CRON:-*/30 * * * * *}" \
    "$seedkeeper" run
