#!/usr/bin/env bash
# The built image as a user meets it (CI runs this after scripts/image-build.sh):
#   - `docker run --rm IMAGE --help` works; `seedkeeper config` works (production + keycloak source);
#   - it runs as a numeric non-root user and its labels carry Cargo.toml's version and a revision;
#   - secure default: given only a database URL (a throwaway PostgreSQL container), it refuses to
#     start, exit 78, naming identity.source, and writes nothing to that database.
# One line per check with its wall time; exit 1 when any failed.
#
#   scripts/image-test.sh [IMAGE]        default seedkeeper:dev
set -uo pipefail
cd "$(dirname "$0")/.."
image="${1:-seedkeeper:dev}"
run_id="sk-image-test-$$"
net="$run_id"
pg="$run_id-pg"
pg_image=postgres:15

# shellcheck source=lib/checks.sh
source scripts/lib/checks.sh
cleanup() {
    docker rm -f "$pg" >/dev/null 2>&1
    docker network rm "$net" >/dev/null 2>&1
    echo "image-test: $failed failed"
    ((failed == 0))
}
# An unexpected exit (an error under set -u, a signal) is a failure too, never a pass.
trap 'rc=$?; if ((rc != 0 && failed == 0)); then echo "FAIL $(basename "$0") stopped early (exit $rc)"; failed=1; fi; cleanup; exit $?' EXIT
trap 'exit 130' INT TERM

docker image inspect "$image" >/dev/null 2>&1 || { echo "FAIL no image $image (scripts/image-build.sh)"; failed=1; exit 1; }

t=$(now)
out=$(docker run --rm "$image" --help 2>&1)
rc=$?
if [[ $rc == 0 && "$out" == *Usage:* ]]; then ok "$t" "docker run --rm $image --help"
else fail "$t" "docker run --rm $image --help" "exit $rc: $(head -n 5 <<<"$out")"; fi

# `config` as an operator would run it: the image's production default, the keycloak source, a
# database with TLS. Dummy values; nothing is contacted.
t=$(now)
out=$(docker run --rm \
    -e SEEDKEEPER_DATABASE__URL='postgres://seedkeeper@db.example.com:5432/platform?sslmode=require' \
    -e SEEDKEEPER_IDENTITY__SOURCE=keycloak \
    -e SEEDKEEPER_KEYCLOAK__BASE_URL=https://keycloak.example.com \
    -e SEEDKEEPER_KEYCLOAK__CLIENT_SECRET=dummy-not-a-secret \
    "$image" config 2>&1)
rc=$?
if [[ $rc == 0 && "$out" == *'environment = "production"'* && "$out" != *dummy-not-a-secret* ]]; then
    ok "$t" "docker run $image config: exit 0, environment = \"production\", the secret redacted"
else
    fail "$t" "docker run $image config" "exit $rc: $(grep -v dummy-not-a-secret <<<"$out" | head -n 10)"
fi

t=$(now)
user=$(docker image inspect --format '{{.Config.User}}' "$image")
labels=$(docker image inspect --format '{{index .Config.Labels "org.opencontainers.image.version"}} {{index .Config.Labels "org.opencontainers.image.revision"}}' "$image")
version=$(sed -nE '/^\[package\]/,/^\[/ s/^version[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' Cargo.toml | head -n1)
if [[ "$user" =~ ^[1-9][0-9]*:[0-9]+$ && "$labels" =~ ^${version//./\\.}\ [0-9a-f]{40}$ ]]; then
    ok "$t" "image: user $user, labels version and revision: $labels"
else
    fail "$t" "image: numeric non-root user, labels version $version and a revision" "user '$user', labels '$labels'"
fi

# --- secure default against a real, empty PostgreSQL ----------------------------------------
t=$(now)
pw="image-test-$RANDOM$RANDOM"
docker network create "$net" >/dev/null
docker run -d --name "$pg" --network "$net" -e POSTGRES_PASSWORD="$pw" "$pg_image" >/dev/null
ready=""
for _ in $(seq 1 60); do
    if docker exec "$pg" pg_isready -U postgres -q 2>/dev/null \
        && docker exec "$pg" psql -X -At -U postgres -c 'SELECT 1' >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.5
done
if [[ -z "$ready" ]]; then
    fail "$t" "throwaway PostgreSQL ($pg_image) ready within 30 s" "$(docker logs --tail 20 "$pg" 2>&1)"
    exit 1
fi
ok "$t" "throwaway PostgreSQL ($pg_image) ready"

db_state() {
    docker exec "$pg" psql -X -At -U postgres -d postgres -c \
        "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast'))
             || ' relations, ' || (SELECT count(*) FROM pg_roles WHERE rolname NOT LIKE 'pg\_%') || ' roles'"
}
before=$(db_state)
for cmd in "(default: run)" --once; do
    t=$(now)
    args=()
    [[ "$cmd" == --once ]] && args=(--once)
    # Only a database URL: nothing else is configured.
    out=$(docker run --rm --network "$net" \
        -e SEEDKEEPER_DATABASE__URL="postgres://postgres:$pw@$pg:5432/postgres" \
        "$image" "${args[@]}" 2>&1)
    rc=$?
    after=$(db_state)
    if [[ $rc == 78 && "$out" == *identity.source* && "$before" == "$after" ]]; then
        ok "$t" "docker run $image $cmd with only a database URL: exit 78 naming identity.source, the database untouched ($after)"
    else
        fail "$t" "docker run $image $cmd with only a database URL: exit 78 naming identity.source, nothing written" \
            "exit $rc; database before: $before, after: $after
$(grep -v -- "$pw" <<<"$out" | tail -n 8)"
    fi
done
