//! The schema as it is, not as it was recorded: each run checks, in one catalog query, that
//! the tables, columns, constraints and indexes seedkeeper relies on exist. A migration is
//! recorded once and never applied again, so an object dropped afterwards (by hand, by a
//! restore of part of a dump, by another tool) would otherwise fail every run with a bare
//! "column does not exist", or, for a unique index or constraint, go unnoticed while duplicates
//! creep in. A missing object is named, with the migration that made it and the repair:
//! `seedkeeper migrate --repair` ([`repair`]) re-creates exactly what is missing, from the
//! embedded migrations, in one transaction.
//!
//! [`EXPECTED`] lists every object the embedded migrations make, each with the migration that
//! makes it (only objects of applied migrations are expected). A test holds it equal to what a
//! freshly migrated database has, so it cannot drift from the migrations: a new migration
//! fails that test until its objects are listed here.

use std::collections::BTreeSet;

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Transaction};

use crate::error::{Error, Result};
use crate::store::db_error;
use crate::store::migrate::MIGRATIONS;

/// What kind of schema object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Table,
    /// `table.column`.
    Column,
    /// `table.constraint`: primary keys, unique, foreign keys, checks.
    Constraint,
    /// An index that backs no constraint (partial unique indexes, plain indexes).
    Index,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Table => "table",
            Kind::Column => "column",
            Kind::Constraint => "constraint",
            Kind::Index => "index",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [Kind::Table, Kind::Column, Kind::Constraint, Kind::Index]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Every object the embedded migrations make in `public`: kind, name, and the version of the
/// migration that makes it.
pub const EXPECTED: &[(Kind, &str, i32)] = &[
    (Kind::Table, "app_catalog", 1),
    (Kind::Table, "app_catalog_versions", 1),
    (Kind::Table, "platform_role_bindings", 1),
    (Kind::Table, "platform_role_versions", 1),
    (Kind::Table, "platform_roles", 1),
    (Kind::Table, "policy_definitions", 1),
    (Kind::Table, "policy_values", 1),
    (Kind::Table, "pricing_plans", 1),
    (Kind::Table, "project_memberships", 1),
    (Kind::Table, "projects", 1),
    (Kind::Table, "seed_runs", 1),
    (Kind::Table, "sku_catalog", 1),
    (Kind::Table, "tenant_memberships", 1),
    (Kind::Table, "tenants", 1),
    (Kind::Table, "users", 1),
    (Kind::Column, "app_catalog.created_at", 1),
    (Kind::Column, "app_catalog.display_name", 1),
    (Kind::Column, "app_catalog.runtime_backend", 1),
    (Kind::Column, "app_catalog.slug", 1),
    (Kind::Column, "app_catalog.updated_at", 1),
    (Kind::Column, "app_catalog_versions.app_slug", 1),
    (Kind::Column, "app_catalog_versions.created_at", 1),
    (Kind::Column, "app_catalog_versions.is_active", 1),
    (Kind::Column, "app_catalog_versions.version", 1),
    (Kind::Column, "platform_role_bindings.basis", 1),
    (Kind::Column, "platform_role_bindings.granted_at", 1),
    (Kind::Column, "platform_role_bindings.granted_by", 1),
    (Kind::Column, "platform_role_bindings.id", 1),
    (Kind::Column, "platform_role_bindings.revoked_at", 1),
    (Kind::Column, "platform_role_bindings.revoked_by", 1),
    (Kind::Column, "platform_role_bindings.role_name", 1),
    (Kind::Column, "platform_role_bindings.status", 1),
    (Kind::Column, "platform_role_bindings.user_id", 1),
    (Kind::Column, "platform_role_versions.created_at", 1),
    (Kind::Column, "platform_role_versions.is_active", 1),
    (Kind::Column, "platform_role_versions.role_name", 1),
    (Kind::Column, "platform_role_versions.version", 1),
    (Kind::Column, "platform_roles.created_at", 1),
    (Kind::Column, "platform_roles.description", 1),
    (Kind::Column, "platform_roles.name", 1),
    (Kind::Column, "platform_roles.updated_at", 1),
    (Kind::Column, "policy_definitions.allowed_values", 1),
    (Kind::Column, "policy_definitions.created_at", 1),
    (Kind::Column, "policy_definitions.default_value", 1),
    (Kind::Column, "policy_definitions.description", 1),
    (Kind::Column, "policy_definitions.key", 1),
    (Kind::Column, "policy_definitions.max_value", 1),
    (Kind::Column, "policy_definitions.min_value", 1),
    (Kind::Column, "policy_definitions.updated_at", 1),
    (Kind::Column, "policy_definitions.value_type", 1),
    (Kind::Column, "policy_values.created_at", 1),
    (Kind::Column, "policy_values.id", 1),
    (Kind::Column, "policy_values.policy_key", 1),
    (Kind::Column, "policy_values.scope_id", 1),
    (Kind::Column, "policy_values.scope_type", 1),
    (Kind::Column, "policy_values.updated_at", 1),
    (Kind::Column, "policy_values.value", 1),
    (Kind::Column, "pricing_plans.created_at", 1),
    (Kind::Column, "pricing_plans.currency", 1),
    (Kind::Column, "pricing_plans.description", 1),
    (Kind::Column, "pricing_plans.display_name", 1),
    (Kind::Column, "pricing_plans.id", 1),
    (Kind::Column, "pricing_plans.is_default", 1),
    (Kind::Column, "pricing_plans.name", 1),
    (Kind::Column, "pricing_plans.updated_at", 1),
    (Kind::Column, "project_memberships.created_at", 1),
    (Kind::Column, "project_memberships.project_id", 1),
    (Kind::Column, "project_memberships.role", 1),
    (Kind::Column, "project_memberships.status", 1),
    (Kind::Column, "project_memberships.user_id", 1),
    (Kind::Column, "projects.created_at", 1),
    (Kind::Column, "projects.id", 1),
    (Kind::Column, "projects.is_default", 1),
    (Kind::Column, "projects.name", 1),
    (Kind::Column, "projects.slug", 1),
    (Kind::Column, "projects.tenant_id", 1),
    (Kind::Column, "seed_runs.counts", 1),
    (Kind::Column, "seed_runs.error", 1),
    (Kind::Column, "seed_runs.findings", 1),
    (Kind::Column, "seed_runs.finished_at", 1),
    (Kind::Column, "seed_runs.host", 1),
    (Kind::Column, "seed_runs.id", 1),
    (Kind::Column, "seed_runs.outcome", 1),
    (Kind::Column, "seed_runs.seed_digest", 1),
    (Kind::Column, "seed_runs.started_at", 1),
    (Kind::Column, "seed_runs.trigger", 1),
    (Kind::Column, "sku_catalog.created_at", 1),
    (Kind::Column, "sku_catalog.display_name", 1),
    (Kind::Column, "sku_catalog.gpu_hourly_price_minor", 1),
    (Kind::Column, "sku_catalog.gpus", 1),
    (Kind::Column, "sku_catalog.resource_profile", 1),
    (Kind::Column, "sku_catalog.sku", 1),
    (Kind::Column, "sku_catalog.updated_at", 1),
    (Kind::Column, "sku_catalog.vendor", 1),
    (Kind::Column, "tenant_memberships.created_at", 1),
    (Kind::Column, "tenant_memberships.role", 1),
    (Kind::Column, "tenant_memberships.status", 1),
    (Kind::Column, "tenant_memberships.tenant_id", 1),
    (Kind::Column, "tenant_memberships.user_id", 1),
    (Kind::Column, "tenants.created_at", 1),
    (Kind::Column, "tenants.id", 1),
    (Kind::Column, "tenants.kind", 1),
    (Kind::Column, "tenants.name", 1),
    (Kind::Column, "tenants.owner_user_id", 1),
    (Kind::Column, "tenants.slug", 1),
    (Kind::Column, "users.created_at", 1),
    (Kind::Column, "users.email", 1),
    (Kind::Column, "users.first_name", 1),
    (Kind::Column, "users.id", 1),
    (Kind::Column, "users.is_active", 1),
    (Kind::Column, "users.keycloak_sub", 1),
    (Kind::Column, "users.last_name", 1),
    (Kind::Column, "users.realm_roles", 1),
    (Kind::Column, "users.role", 1),
    (Kind::Column, "users.synced_at", 1),
    (Kind::Column, "users.updated_at", 1),
    (Kind::Column, "users.username", 1),
    (Kind::Constraint, "app_catalog.app_catalog_pkey", 1),
    (
        Kind::Constraint,
        "app_catalog.app_catalog_runtime_backend_check",
        1,
    ),
    (
        Kind::Constraint,
        "app_catalog_versions.app_catalog_versions_app_slug_fkey",
        1,
    ),
    (
        Kind::Constraint,
        "app_catalog_versions.app_catalog_versions_pkey",
        1,
    ),
    (
        Kind::Constraint,
        "platform_role_bindings.platform_role_bindings_check",
        1,
    ),
    (
        Kind::Constraint,
        "platform_role_bindings.platform_role_bindings_pkey",
        1,
    ),
    (
        Kind::Constraint,
        "platform_role_bindings.platform_role_bindings_role_name_fkey",
        1,
    ),
    (
        Kind::Constraint,
        "platform_role_bindings.platform_role_bindings_status_check",
        1,
    ),
    (
        Kind::Constraint,
        "platform_role_bindings.platform_role_bindings_user_id_fkey",
        1,
    ),
    (
        Kind::Constraint,
        "platform_role_versions.platform_role_versions_pkey",
        1,
    ),
    (
        Kind::Constraint,
        "platform_role_versions.platform_role_versions_role_name_fkey",
        1,
    ),
    (
        Kind::Constraint,
        "platform_role_versions.platform_role_versions_version_check",
        1,
    ),
    (Kind::Constraint, "platform_roles.platform_roles_pkey", 1),
    (
        Kind::Constraint,
        "policy_definitions.policy_definitions_check",
        1,
    ),
    (
        Kind::Constraint,
        "policy_definitions.policy_definitions_pkey",
        1,
    ),
    (
        Kind::Constraint,
        "policy_definitions.policy_definitions_value_type_check",
        1,
    ),
    (Kind::Constraint, "policy_values.policy_values_check", 1),
    (Kind::Constraint, "policy_values.policy_values_pkey", 1),
    (
        Kind::Constraint,
        "policy_values.policy_values_policy_key_fkey",
        1,
    ),
    (
        Kind::Constraint,
        "policy_values.policy_values_scope_type_check",
        1,
    ),
    (
        Kind::Constraint,
        "pricing_plans.pricing_plans_currency_check",
        1,
    ),
    (Kind::Constraint, "pricing_plans.pricing_plans_name_key", 1),
    (Kind::Constraint, "pricing_plans.pricing_plans_pkey", 1),
    (
        Kind::Constraint,
        "project_memberships.project_memberships_pkey",
        1,
    ),
    (
        Kind::Constraint,
        "project_memberships.project_memberships_project_id_fkey",
        1,
    ),
    (
        Kind::Constraint,
        "project_memberships.project_memberships_role_check",
        1,
    ),
    (
        Kind::Constraint,
        "project_memberships.project_memberships_status_check",
        1,
    ),
    (
        Kind::Constraint,
        "project_memberships.project_memberships_user_id_fkey",
        1,
    ),
    (Kind::Constraint, "projects.projects_pkey", 1),
    (Kind::Constraint, "projects.projects_tenant_id_fkey", 1),
    (Kind::Constraint, "projects.projects_tenant_id_slug_key", 1),
    (Kind::Constraint, "seed_runs.seed_runs_outcome_check", 1),
    (Kind::Constraint, "seed_runs.seed_runs_pkey", 1),
    (
        Kind::Constraint,
        "sku_catalog.sku_catalog_gpu_hourly_price_minor_check",
        1,
    ),
    (Kind::Constraint, "sku_catalog.sku_catalog_gpus_check", 1),
    (Kind::Constraint, "sku_catalog.sku_catalog_pkey", 1),
    (
        Kind::Constraint,
        "tenant_memberships.tenant_memberships_pkey",
        1,
    ),
    (
        Kind::Constraint,
        "tenant_memberships.tenant_memberships_role_check",
        1,
    ),
    (
        Kind::Constraint,
        "tenant_memberships.tenant_memberships_status_check",
        1,
    ),
    (
        Kind::Constraint,
        "tenant_memberships.tenant_memberships_tenant_id_fkey",
        1,
    ),
    (
        Kind::Constraint,
        "tenant_memberships.tenant_memberships_user_id_fkey",
        1,
    ),
    (Kind::Constraint, "tenants.tenants_check", 1),
    (Kind::Constraint, "tenants.tenants_kind_check", 1),
    (Kind::Constraint, "tenants.tenants_owner_user_id_fkey", 1),
    (Kind::Constraint, "tenants.tenants_pkey", 1),
    (Kind::Constraint, "tenants.tenants_slug_key", 1),
    (Kind::Constraint, "users.users_email_check", 1),
    (Kind::Constraint, "users.users_first_name_check", 1),
    (Kind::Constraint, "users.users_keycloak_sub_check", 1),
    (Kind::Constraint, "users.users_keycloak_sub_key", 1),
    (Kind::Constraint, "users.users_last_name_check", 1),
    (Kind::Constraint, "users.users_pkey", 1),
    (Kind::Constraint, "users.users_role_check", 1),
    (Kind::Constraint, "users.users_username_check", 1),
    (Kind::Constraint, "users.users_username_key", 1),
    (Kind::Index, "app_catalog_versions_one_active", 1),
    (Kind::Index, "platform_role_bindings_one_active", 1),
    (Kind::Index, "platform_role_versions_one_active", 1),
    (Kind::Index, "policy_values_one_global_per_key", 1),
    (Kind::Index, "policy_values_one_per_scope", 1),
    (Kind::Index, "pricing_plans_one_default", 1),
    (Kind::Index, "project_memberships_user", 1),
    (Kind::Index, "projects_one_default_per_tenant", 1),
    (Kind::Index, "seed_runs_started_at", 1),
    (Kind::Index, "tenant_memberships_user", 1),
    (Kind::Index, "tenants_one_personal_per_owner", 1),
    (Kind::Table, "event_follower", 2),
    (Kind::Column, "event_follower.admin_ids", 2),
    (Kind::Column, "event_follower.admin_time", 2),
    (Kind::Column, "event_follower.following", 2),
    (Kind::Column, "event_follower.realm", 2),
    (Kind::Column, "event_follower.reason", 2),
    (Kind::Column, "event_follower.updated_at", 2),
    (Kind::Column, "event_follower.user_ids", 2),
    (Kind::Column, "event_follower.user_time", 2),
    (Kind::Constraint, "event_follower.event_follower_pkey", 2),
    (Kind::Column, "platform_role_bindings.revoked_reason", 3),
    (Kind::Column, "users.offboarded_at", 3),
    (Kind::Column, "seed_runs.unit_states", 4),
    (
        Kind::Constraint,
        "platform_role_bindings.platform_role_bindings_revoked_reason_check",
        3,
    ),
];

/// Every table, column, constraint and index-without-constraint of `public`, as `(kind, name)`
/// in the forms of [`EXPECTED`]. One catalog query.
const CATALOG: &str = "
SELECT 'table', c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
UNION ALL
SELECT 'column', c.relname || '.' || a.attname FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', t.relname || '.' || con.conname FROM pg_constraint con
  JOIN pg_class t ON t.oid = con.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
 WHERE n.nspname = 'public' AND con.contype IN ('p', 'u', 'f', 'c', 'x')
UNION ALL
SELECT 'index', i.relname::text FROM pg_class i JOIN pg_namespace n ON n.oid = i.relnamespace
  JOIN pg_index x ON x.indexrelid = i.oid
 WHERE n.nspname = 'public'
   AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.oid)";

/// The objects `public` has, in the forms of [`EXPECTED`].
pub async fn present<C: GenericClient + Sync>(client: &C) -> Result<BTreeSet<(Kind, String)>> {
    let rows = client
        .query_typed(CATALOG, &[])
        .await
        .map_err(db_error("reading the catalog (schema check)"))?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((Kind::parse(r.get::<_, &str>(0))?, r.get::<_, String>(1))))
        .collect())
}

/// The expected objects of applied migrations that the database lacks, in [`EXPECTED`]'s order.
pub async fn missing<C: GenericClient + Sync>(
    client: &C,
) -> Result<Vec<&'static (Kind, &'static str, i32)>> {
    let have = present(client).await?;
    if !have.contains(&(Kind::Table, "seedkeeper_migrations".to_string())) {
        return Ok(Vec::new());
    }
    let applied: BTreeSet<i32> = client
        .query_typed("SELECT version FROM seedkeeper_migrations", &[])
        .await
        .map_err(db_error("reading seedkeeper_migrations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(EXPECTED
        .iter()
        .filter(|(kind, name, v)| {
            applied.contains(v) && !have.contains(&(*kind, (*name).to_string()))
        })
        .collect())
}

/// `V3__identity_lifecycle` for a version.
fn migration_label(version: i32) -> String {
    MIGRATIONS
        .iter()
        .find(|m| m.version == version)
        .map(|m| m.label())
        .unwrap_or_else(|| format!("V{version}"))
}

/// The error that names every missing object, the migration that made it, and the repair.
pub(crate) fn missing_error(missing: &[&(Kind, &str, i32)]) -> Error {
    let named: Vec<String> = missing
        .iter()
        .map(|(kind, name, v)| {
            format!("{} {name} (made by {})", kind.as_str(), migration_label(*v))
        })
        .collect();
    Error::Schema(format!(
        "{} object(s) seedkeeper relies on are missing, though the migrations that made them are recorded as applied: {}. Repair: run `seedkeeper migrate --repair` as the schema's owner (it re-creates exactly the missing objects from the embedded migrations, in one transaction; a unique constraint or index is refused while duplicate rows remain), or restore the database from a backup",
        named.len(),
        named.join(", ")
    ))
}

/// The schema unit's check, after its migrations: in apply mode, that the server takes writes
/// ([`crate::store::server::ensure_writable`], before anything is written); in every mode,
/// that no object of an applied migration is missing.
/// Generic over the client so it runs on a session or inside a transaction alike.
pub async fn check<C: GenericClient + Sync>(client: &C, target: &str, writes: bool) -> Result<()> {
    if writes {
        crate::store::server::ensure_writable(client, target).await?;
    }
    let missing = missing(client).await?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing_error(&missing))
    }
}

/// The scratch schema the embedded migrations are applied into, to read the missing objects'
/// definitions from the catalog (rolled back or dropped with the repair's transaction).
const REFERENCE: &str = "seedkeeper_repair_reference";

/// `seedkeeper migrate --repair`: re-creates every missing object of an applied migration, as
/// the embedded migrations define it, in one transaction (all or nothing). The definitions are
/// read from the catalog of a scratch schema the migrations are applied into, so they are
/// exactly the migrations' own. Order: tables (columns and defaults), columns, keys and checks,
/// foreign keys, indexes. A foreign key or check re-added to a table with rows is `NOT VALID`:
/// enforced from now on, its old rows for the operator to `VALIDATE`. Returns the statements
/// run.
///
/// `client` is the session (`migrate --repair`, a run in apply mode), or a plan's transaction
/// (the repair is then a savepoint of it, rolled back with the plan).
pub(crate) async fn repair<C: GenericClient + Send + Sync>(client: &mut C) -> Result<Vec<String>> {
    let mut todo = missing(&*client).await?;
    if todo.is_empty() {
        return Ok(Vec::new());
    }
    let tx = client
        .transaction()
        .await
        .map_err(db_error("starting the repair"))?;
    apply_migrations_to_scratch_schema(&tx).await?;
    todo.sort_by_key(|(kind, _, _)| *kind);
    let statements = repair_statements(&tx, &todo).await?;
    tx.batch_execute("SET LOCAL search_path = public")
        .await
        .map_err(db_error("leaving the repair's scratch schema"))?;
    for s in &statements {
        tx.batch_execute(s).await.map_err(|e| {
            Error::Schema(format!(
                "repair: `{s}` failed: {}; nothing was changed (the repair is one transaction). Fix what the server names (for a unique constraint or index: the duplicate rows) and repair again",
                crate::error::describe_pg(&e)
            ))
        })?;
    }
    tx.batch_execute(&format!("DROP SCHEMA {REFERENCE} CASCADE"))
        .await
        .map_err(db_error("dropping the repair's scratch schema"))?;
    tx.commit().await.map_err(db_error("committing the repair"))?;
    for s in &statements {
        tracing::info!(statement = %s, "schema object re-created");
    }
    Ok(statements)
}

/// Creates [`REFERENCE`], makes it the transaction's search path and applies every embedded
/// migration in it, so the catalog holds the migrations' own definitions to copy from.
async fn apply_migrations_to_scratch_schema(tx: &Transaction<'_>) -> Result<()> {
    tx.batch_execute(&format!(
        "CREATE SCHEMA {REFERENCE}; SET LOCAL search_path = {REFERENCE}"
    ))
    .await
    .map_err(db_error("creating the repair's scratch schema"))?;
    for m in MIGRATIONS {
        tx.batch_execute(m.sql).await.map_err(|e| {
            Error::Schema(format!(
                "repair: migration {} does not apply to a scratch schema: {}",
                m.label(),
                crate::error::describe_pg(&e)
            ))
        })?;
    }
    Ok(())
}

/// The statements that re-create the `missing` objects (sorted by kind) from [`REFERENCE`]'s
/// definitions: tables, columns, keys and checks, then foreign keys (they may reference a
/// table re-created here), then indexes. An object the scratch schema lacks is skipped.
async fn repair_statements(
    tx: &Transaction<'_>,
    missing: &[&(Kind, &str, i32)],
) -> Result<Vec<String>> {
    let mut statements = Vec::new();
    let mut fks = Vec::new();
    for (kind, name, _) in missing.iter().copied() {
        let (table, member) = name.split_once('.').unwrap_or((name, ""));
        match kind {
            Kind::Table => statements.push(format!(
                "CREATE TABLE public.{table} (LIKE {REFERENCE}.{table} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING GENERATED)"
            )),
            Kind::Column => statements.extend(add_column_statement(tx, table, member).await?),
            Kind::Constraint => match add_constraint_statement(tx, table, member).await? {
                Some((statement, true)) => fks.push(statement),
                Some((statement, false)) => statements.push(statement),
                None => {}
            },
            Kind::Index => {
                statements.append(&mut fks);
                statements.extend(create_index_statement(tx, name).await?);
            }
        }
    }
    statements.append(&mut fks);
    Ok(statements)
}

/// `ALTER TABLE .. ADD COLUMN IF NOT EXISTS` with the reference column's type, default and
/// `NOT NULL` (`IF NOT EXISTS`: a table re-created by the repair has its columns already).
async fn add_column_statement(
    tx: &Transaction<'_>,
    table: &str,
    column: &str,
) -> Result<Option<String>> {
    let row = tx
        .query_typed(
            "SELECT format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = to_regclass($1) AND a.attname = $2",
            &[
                (&format!("{REFERENCE}.{table}"), Type::TEXT),
                (&column, Type::TEXT),
            ],
        )
        .await
        .map_err(db_error("reading a column's definition"))?;
    let Some(row) = row.first() else {
        return Ok(None);
    };
    let (ty, not_null, default): (String, bool, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    Ok(Some(format!(
        "ALTER TABLE public.{table} ADD COLUMN IF NOT EXISTS {column} {ty}{}{}",
        default.map(|d| format!(" DEFAULT {d}")).unwrap_or_default(),
        if not_null { " NOT NULL" } else { "" }
    )))
}

/// `ALTER TABLE .. ADD CONSTRAINT` with the reference definition, and whether it is a foreign
/// key. A foreign key or check is `NOT VALID`: enforced from now on, the rows already there
/// left for the operator to `VALIDATE`.
async fn add_constraint_statement(
    tx: &Transaction<'_>,
    table: &str,
    constraint: &str,
) -> Result<Option<(String, bool)>> {
    let row = tx
        .query_typed(
            "SELECT pg_get_constraintdef(oid), contype::text FROM pg_constraint
              WHERE conrelid = to_regclass($1) AND conname = $2",
            &[
                (&format!("{REFERENCE}.{table}"), Type::TEXT),
                (&constraint, Type::TEXT),
            ],
        )
        .await
        .map_err(db_error("reading a constraint's definition"))?;
    let Some(row) = row.first() else {
        return Ok(None);
    };
    let (def, contype): (String, String) = (row.get(0), row.get(1));
    let statement = format!("ALTER TABLE public.{table} ADD CONSTRAINT {constraint} {def}");
    Ok(Some(match contype.as_str() {
        "f" => (format!("{statement} NOT VALID"), true),
        "c" => (format!("{statement} NOT VALID"), false),
        _ => (statement, false),
    }))
}

/// The reference index's `CREATE INDEX`, moved onto the `public` table.
async fn create_index_statement(tx: &Transaction<'_>, index: &str) -> Result<Option<String>> {
    let row = tx
        .query_typed(
            "SELECT pg_get_indexdef(to_regclass($1))",
            &[(&format!("{REFERENCE}.{index}"), Type::TEXT)],
        )
        .await
        .map_err(db_error("reading an index's definition"))?;
    Ok(row
        .first()
        .and_then(|r| r.get::<_, Option<String>>(0))
        .map(|def| def.replace(&format!(" ON {REFERENCE}."), " ON public.")))
}
