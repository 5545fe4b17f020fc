//! Embedded, ordered schema migrations with checksums.
//!
//! Files `migrations/V<n>__<name>.sql` are compiled into the binary. Each pending one is applied
//! in its own transaction and recorded in `seedkeeper_migrations` with its SHA-256. An applied
//! file whose checksum changed is a hard error: schema files are append-only. A database that
//! has a migration this binary does not know is refused too (an older seedkeeper must not run
//! against a newer schema). Reads `schema.mode`.

use sha2::{Digest, Sha256};
use tokio_postgres::{Client, GenericClient};

use crate::config::SchemaMode;
use crate::error::{Error, Result};
use crate::seed::hex;
use crate::store::{db_error, table_exists};

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "db_schema_v1",
        sql: include_str!("../../migrations/V1__db_schema_v1.sql"),
    },
    Migration {
        version: 2,
        name: "event_follower",
        sql: include_str!("../../migrations/V2__event_follower.sql"),
    },
    Migration {
        version: 3,
        name: "identity_lifecycle",
        sql: include_str!("../../migrations/V3__identity_lifecycle.sql"),
    },
    Migration {
        version: 4,
        name: "unit_states",
        sql: include_str!("../../migrations/V4__unit_states.sql"),
    },
];

impl Migration {
    pub fn checksum(&self) -> String {
        hex(&Sha256::digest(self.sql.as_bytes()))
    }

    pub fn label(&self) -> String {
        format!("V{}__{}", self.version, self.name)
    }
}

/// What `schema` found or did.
#[derive(Debug, Default, Clone)]
pub struct SchemaReport {
    pub applied: Vec<String>,
    pub pending: Vec<String>,
    /// The statements `migrate --repair` ran to re-create missing objects.
    pub repaired: Vec<String>,
}

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS seedkeeper_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)";

/// Checks applied migrations against the embedded ones and returns the pending ones, and
/// whether `seedkeeper_migrations` exists yet.
async fn pending(
    client: &Client,
    migrations: &'static [Migration],
) -> Result<(Vec<&'static Migration>, bool)> {
    if !table_exists(client, "seedkeeper_migrations").await? {
        return Ok((migrations.iter().collect(), false));
    }
    let rows = client
        .query_typed(
            "SELECT version, name, checksum FROM seedkeeper_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(db_error("reading seedkeeper_migrations"))?;
    let mut applied = std::collections::BTreeMap::new();
    for r in rows {
        let v: i32 = r.get(0);
        let name: String = r.get(1);
        let sum: String = r.get(2);
        match migrations.iter().find(|m| m.version == v) {
            None => {
                return Err(Error::Schema(format!(
                    "the database has migration V{v}__{name}, which this seedkeeper does not know: run a seedkeeper at least as new as the one that applied it"
                )))
            }
            Some(m) if m.checksum() != sum => {
                return Err(Error::Schema(format!(
                    "migration {} was changed after it was applied (checksum in database {}…, embedded {}…): schema files are append-only; restore the original file and put the change in a new migration",
                    m.label(),
                    &sum[..sum.len().min(12)],
                    &m.checksum()[..12]
                )))
            }
            Some(_) => {
                applied.insert(v, ());
            }
        }
    }
    let todo = migrations
        .iter()
        .filter(|m| !applied.contains_key(&m.version))
        .collect();
    Ok((todo, true))
}

/// Applies pending migrations (mode apply) or refuses to go on while any are pending (verify).
///
/// `client` is the session, or a transaction around the migrations (a plan's, always rolled back:
/// each migration then runs in a savepoint of it).
pub async fn run<C: GenericClient + Send + Sync>(
    client: &mut C,
    mode: SchemaMode,
    migrations: &'static [Migration],
) -> Result<SchemaReport> {
    let (todo, mut have_table) = pending(client.client(), migrations).await?;
    let mut report = SchemaReport::default();
    if todo.is_empty() {
        return Ok(report);
    }
    if mode == SchemaMode::Verify {
        report.pending = todo.iter().map(|m| m.label()).collect();
        return Err(Error::Schema(format!(
            "{} migration(s) pending ({}) and schema.mode = \"verify\": run `seedkeeper migrate` (or the migration job), or set SEEDKEEPER_SCHEMA__MODE=apply",
            todo.len(),
            report.pending.join(", ")
        )));
    }
    // `seedkeeper_migrations` is created in the first migration's transaction when `pending`
    // did not find it: once, where an `IF NOT EXISTS` in every migration's transaction left a
    // NOTICE of PostgreSQL's for each after the first in the log of a fresh database's first run.
    for m in todo {
        let tx = client
            .transaction()
            .await
            .map_err(db_error("starting a migration"))?;
        if !have_table {
            tx.batch_execute(CREATE_TABLE)
                .await
                .map_err(db_error("creating seedkeeper_migrations"))?;
            have_table = true;
        }
        tx.batch_execute(m.sql).await.map_err(|e| {
            // A standby refuses DDL as it refuses writes: say so, not "migration failed".
            if e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) {
                return Error::db(format!("applying migration {}", m.label()), e);
            }
            Error::Schema(format!(
                "migration {} failed: {}",
                m.label(),
                crate::error::describe_pg(&e)
            ))
        })?;
        tx.query_typed(
            "INSERT INTO seedkeeper_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[
                (&m.version, tokio_postgres::types::Type::INT4),
                (&m.name, tokio_postgres::types::Type::TEXT),
                (&m.checksum(), tokio_postgres::types::Type::TEXT),
            ],
        )
        .await
        .map_err(db_error("recording a migration"))?;
        tx.commit().await.map_err(db_error("committing a migration"))?;
        tracing::info!(migration = %m.label(), "migration applied");
        report.applied.push(m.label());
    }
    Ok(report)
}
