#!/usr/bin/env bash
# The compose stack end to end, on a real Docker engine: bring it up, check that it converges and
# follows Keycloak, then take it down with its volume. One line per check with its wall time; any
# failure fails the script (exit 1). `make stack-test` builds the image first; CI runs this too.
#
#   scripts/stack-test.sh
#
# Needs: a Docker engine with Compose v2, the base images and the image seedkeeper:dev
# (scripts/docker-setup.sh, then scripts/image-build.sh), curl and python3, and free loopback
# ports 8080, 8787 and 55432. The stack is always removed at the end (`docker compose down -v`),
# also when a check fails; the logs of a failed stack are printed first.
set -uo pipefail
cd "$(dirname "$0")/.."

image=seedkeeper:dev
# Dev values of docker-compose.yml (admin/admin is Keycloak's bootstrap admin there).
kc=http://127.0.0.1:8080
ready_url=http://127.0.0.1:8787/readyz
metrics_url=http://127.0.0.1:8787/metrics
# The dev realm's users (realms/dev-realm.json; its service account is never synced) and the two
# that hold platform_superadmin: dev-admin through the realm role `admin` (identity.admin_roles),
# dev-platform-admin through the group platform-admins (role platform-admin, identity.role_map).
personas="dev-admin,dev-ops,dev-platform-admin,dev-project-admin,dev-tenant-admin,dev-user"
superadmins="dev-admin,dev-platform-admin"

# shellcheck source=lib/checks.sh
source scripts/lib/checks.sh
t_start=$(date +%s.%N)

dc() { docker compose "$@"; }
# psql as the owner inside the postgres container (local connections are trusted there).
sql() { dc exec -T postgres psql -X -At -v ON_ERROR_STOP=1 -U platform_owner -d platform -c "$1"; }
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1"; }

cleanup() {
    local t
    t=$(now)
    if ((failed)); then
        echo "== logs of the failed stack (last 60 lines per service)"
        dc ps -a 2>&1 | sed 's/^/   /'
        dc logs --no-color --tail 60 2>&1 | sed 's/^/   /'
    fi
    if out=$(dc --profile once down -v --remove-orphans 2>&1); then
        ok "$t" "docker compose down -v"
    else
        fail "$t" "docker compose down -v" "$out"
    fi
    echo "stack-test: $((failed)) failed, $(secs "$t_start" "$(now)") s in all"
    ((failed == 0))
}
# An unexpected exit (an error under set -u, a signal) is a failure too, never a pass.
trap 'rc=$?; if ((rc != 0 && failed == 0)); then echo "FAIL $(basename "$0") stopped early (exit $rc)"; failed=1; fi; cleanup; exit $?' EXIT
trap 'exit 130' INT TERM

for tool in docker curl python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "FAIL $tool is not installed (scripts/docker-setup.sh)"; failed=1; exit 1; }
done
docker compose version >/dev/null 2>&1 || { echo "FAIL docker compose v2 missing (scripts/docker-setup.sh compose)"; failed=1; exit 1; }
docker image inspect "$image" >/dev/null 2>&1 || { echo "FAIL no image $image (scripts/image-build.sh)"; failed=1; exit 1; }
# A stack left by an interrupted run would make every check below meaningless.
dc --profile once down -v --remove-orphans >/dev/null 2>&1

# --- up ---------------------------------------------------------------------------------------
t=$(now)
# The published ports (55432, 8080, 8787) lie in Linux's ephemeral range: a client socket of
# anything else on the machine can hold one for a moment, and the userland proxy's bind then
# fails. Only that failure is tried again, twice, after taking the half-started stack down.
up_ok=""
for attempt in 1 2 3; do
    if out=$(dc up -d --wait --wait-timeout 300 --no-build 2>&1); then
        up_ok=1
        break
    fi
    grep -q "Error starting userland proxy" <<<"$out" || break
    echo "stack-test: a published port was taken for a moment (attempt $attempt): $(grep -o 'listen tcp4 [^ ]*' <<<"$out" | head -n1); taking the stack down and trying again"
    dc --profile once down -v --remove-orphans >/dev/null 2>&1
    sleep 2
done
if [[ -n "$up_ok" ]]; then
    ok "$t" "docker compose up -d --wait (postgres, keycloak, migrate, grants, seedkeeper)"
else
    fail "$t" "docker compose up -d --wait" "$(tail -n 20 <<<"$out")"
    exit 1
fi

# --- the dev personas, their superadmin bindings and personal tenants ---------------------------
t=$(now)
got=$(sql "SELECT string_agg(username, ',' ORDER BY username) FROM users WHERE username LIKE 'dev-%'" 2>&1)
if [[ "$got" == "$personas" ]]; then ok "$t" "users: the six dev personas ($personas)"
else fail "$t" "users: the six dev personas" "want $personas, got: $got"; fi

t=$(now)
got=$(sql "SELECT string_agg(u.username, ',' ORDER BY u.username) FROM platform_role_bindings b
           JOIN users u ON u.id = b.user_id
           WHERE b.role_name = 'platform_superadmin' AND b.status = 'active' AND b.granted_by = 'seedkeeper'" 2>&1)
if [[ "$got" == "$superadmins" ]]; then ok "$t" "role_bindings: active platform_superadmin for $superadmins"
else fail "$t" "role_bindings: active platform_superadmin" "want $superadmins, got: $got"; fi

# A personal tenant owned by the user, its default project, and active owner memberships in both.
owned_sql() { # username pattern
    echo "SELECT count(*) FROM users u
          JOIN tenants t ON t.owner_user_id = u.id AND t.kind = 'personal'
          JOIN projects p ON p.tenant_id = t.id AND p.is_default
          JOIN tenant_memberships tm ON tm.tenant_id = t.id AND tm.user_id = u.id
               AND tm.role = 'owner' AND tm.status = 'active'
          JOIN project_memberships pm ON pm.project_id = p.id AND pm.user_id = u.id
               AND pm.role = 'owner' AND pm.status = 'active'
          WHERE u.username LIKE '$1'"
}
t=$(now)
got=$(sql "$(owned_sql 'dev-%')" 2>&1)
if [[ "$got" == 6 ]]; then ok "$t" "tenants: each persona has a personal tenant and default project, owner of both"
else fail "$t" "tenants: each persona has a personal tenant and default project" "want 6, got: $got"; fi

# --- a user created in Keycloak arrives through the events (within 5 s) --------------------------
t=$(now)
token=$(curl -sf --max-time 10 -d grant_type=password -d client_id=admin-cli -d username=admin -d password=admin \
    "$kc/realms/master/protocol/openid-connect/token" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])' 2>/dev/null)
newuser="stack-test-$(date +%s)"
created=""
if [[ -n "$token" ]]; then
    # The new user's id is the last path segment of the Location header.
    created=$(curl -s --max-time 10 -o /dev/null -D - -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        -d "{\"username\":\"$newuser\",\"enabled\":true,\"email\":\"$newuser@example.com\",\"firstName\":\"Stack\",\"lastName\":\"Test\"}" \
        "$kc/admin/realms/dev/users" | tr -d '\r' | sed -n 's|^[Ll]ocation: .*/users/\([^/]*\)$|\1|p')
fi
unset token
if [[ -z "$created" ]]; then
    fail "$t" "Keycloak admin API: POST /admin/realms/dev/users as admin (master realm token)"
else
    t_created=$(now)
    deadline=$(awk -v a="$t_created" 'BEGIN { printf "%.3f", a + 5 }')
    arrived="" got="" owned=""
    while awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n < d) }'; do
        got=$(sql "SELECT count(*) FROM users WHERE keycloak_sub = '$created'")
        owned=$(sql "$(owned_sql "$newuser")")
        if [[ "$got" == 1 && "$owned" == 1 ]]; then arrived=1; break; fi
        sleep 0.2
    done
    if [[ -n "$arrived" ]]; then
        ok "$t" "events: user $newuser created in Keycloak has its row, tenant and project $(secs "$t_created" "$(now)") s later (limit 5 s)"
    else
        fail "$t" "events: user $newuser created in Keycloak has its row, tenant and project within 5 s" \
            "users row: $got, personal tenant + default project: $owned"
    fi
fi

# --- health, readiness, labels ---------------------------------------------------------------
t=$(now)
cid=$(dc ps -q seedkeeper)
health=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$cid" 2>&1)
if [[ "$health" == healthy ]]; then ok "$t" "docker inspect: seedkeeper is healthy"
else fail "$t" "docker inspect: seedkeeper is healthy" "status: $health"; fi

t=$(now)
code=$(http_code "$ready_url")
if [[ "$code" == 200 ]]; then ok "$t" "/readyz answers 200"
else fail "$t" "/readyz answers 200" "got $code"; fi

t=$(now)
label=$(docker image inspect --format '{{index .Config.Labels "org.opencontainers.image.version"}}' "$image")
metric=$(curl -s --max-time 5 "$metrics_url" | sed -n 's/^seedkeeper_build_info{.*version="\([^"]*\)".*/\1/p')
if [[ -n "$label" && "$label" == "$metric" ]]; then ok "$t" "image label version = seedkeeper_build_info version ($label)"
else fail "$t" "image label version = seedkeeper_build_info version" "label '$label', metric '$metric'"; fi
t=$(now)
label=$(docker image inspect --format '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$image")
metric=$(curl -s --max-time 5 "$metrics_url" | sed -n 's/^seedkeeper_build_info{.*revision="\([^"]*\)".*/\1/p')
if [[ -n "$label" && "$label" != unknown && "$label" == "$metric" ]]; then ok "$t" "image label revision = seedkeeper_build_info revision ($label)"
else fail "$t" "image label revision = seedkeeper_build_info revision" "label '$label', metric '$metric'"; fi

# --- a one-shot run on the converged database writes nothing ----------------------------------
# A no-op run still records its seed_runs row (docs/evidence.md): outcome succeeded, and no
# write in its counts (every inserted, updated, revoked, realigned, applied and *_inserted,
# *_updated count 0).
tables="users tenants projects tenant_memberships project_memberships platform_role_bindings"
counts_sql="SELECT concat_ws(' ', $(for x in $tables; do printf "(SELECT count(*) FROM %s)," "$x"; done | sed 's/,$//'))"
t=$(now)
before=$(sql "$counts_sql")
since=$(sql "SELECT now()")
out=$(dc run --rm seedkeeper-once 2>&1)
rc=$?
after=$(sql "$counts_sql")
run=$(sql "SELECT r.outcome || ' ' || coalesce(sum((c.value)::text::bigint)
              FILTER (WHERE c.key ~ '(^|_)(inserted|updated|revoked|realigned|applied)$'
                      AND jsonb_typeof(c.value) = 'number'), 0)
           FROM seed_runs r
           LEFT JOIN LATERAL jsonb_each(r.counts) u ON true
           LEFT JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(u.value) = 'object' THEN u.value ELSE '{}' END) c ON true
           WHERE r.trigger = 'once' AND r.started_at >= '$since'
           GROUP BY r.id, r.outcome, r.started_at ORDER BY r.started_at")
if [[ $rc == 0 && "$before" == "$after" && "$run" == "succeeded 0" ]]; then
    ok "$t" "docker compose run --rm seedkeeper-once: exit 0, one succeeded run with 0 writes, row counts unchanged ($after)"
else
    fail "$t" "docker compose run --rm seedkeeper-once: exit 0 and writes nothing" \
        "exit $rc; its seed_runs rows (outcome, writes): ${run:-none}; row counts of $tables before: $before, after: $after
$(tail -n 5 <<<"$out")"
fi

# --- PostgreSQL restarts: ready again within 30 s -------------------------------------------
t=$(now)
if out=$(dc restart postgres 2>&1); then
    t_back=$(now)
    deadline=$(awk -v a="$t_back" 'BEGIN { printf "%.3f", a + 30 }')
    streak=0
    code=""
    # Ready means ready for good: three 200s in a row, a second apart (a 200 answered before a
    # failed run is noticed would not count).
    while awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n < d) }'; do
        code=$(http_code "$ready_url")
        if [[ "$code" == 200 ]]; then
            ((streak == 0)) && t_ready=$(now)
            streak=$((streak + 1))
        else
            streak=0
        fi
        ((streak == 3)) && break
        sleep 1
    done
    if ((streak == 3)); then
        ok "$t" "docker compose restart postgres: /readyz 200 again $(secs "$t_back" "$t_ready") s after the restart (limit 30 s)"
    else
        fail "$t" "docker compose restart postgres: /readyz 200 again within 30 s" "last answer: $code"
    fi
else
    fail "$t" "docker compose restart postgres" "$out"
fi
