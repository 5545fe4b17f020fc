#!/usr/bin/env bash
# The compose service seedkeeper-grants (postgres image, after seedkeeper-migrate): as the owner,
# apply the grant block of docs/configuration.md (grants.sql, verbatim), then set the seedkeeper role's password
# from its secret. It runs at every `docker compose up`: GRANT ... ON ALL TABLES has to follow
# each migration, and CREATE ROLE is left out once the role exists (PostgreSQL has no
# CREATE ROLE IF NOT EXISTS). PGHOST, PGUSER and PGDATABASE come from the service.
set -euo pipefail
secrets="${SECRETS_DIR:-/run/secrets}"
sql="${GRANTS_SQL:-/grants/grants.sql}"
PGPASSWORD="$(cat "$secrets/postgres_password")"
export PGPASSWORD
psql=(psql -X -q -v ON_ERROR_STOP=1)

if [[ "$("${psql[@]}" -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'seedkeeper'")" == 1 ]]; then
    grep -v '^CREATE ROLE ' "$sql" | "${psql[@]}"
    echo "seedkeeper-grants: role seedkeeper exists; grants applied again"
else
    "${psql[@]}" -f "$sql"
    echo "seedkeeper-grants: role seedkeeper created with the grants of docs/configuration.md"
fi
# The password never reaches a command line: psql reads the file itself.
"${psql[@]}" -v pwfile="$secrets/seedkeeper_db_password" <<'SQL'
\set pw `cat :'pwfile'`
ALTER ROLE seedkeeper PASSWORD :'pw';
SQL
