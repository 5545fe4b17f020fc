//! Foreign keys set aside for a bulk write, and put back before it commits.
//!
//! PostgreSQL checks a foreign key row by row: every row inserted runs a lookup of its parent
//! (and locks it) when the statement ends. For the tenants unit of a first run that is most of
//! the time it takes: at 10,000 users, 90 of the 120 ms of the tenant memberships' insert, where
//! adding the same two constraints back to the filled table checks all of its rows in 9 ms, with
//! one join each. PostgreSQL's own advice for populating a database is the same: drop the
//! foreign keys, load, create them again.
//!
//! All of it happens inside the unit's transaction: no other session ever sees the tables
//! without their constraints, because setting them aside takes the tables (and the tables they
//! reference) in `ACCESS EXCLUSIVE` mode until the transaction ends, and the constraints are
//! added back, every row checked, before it commits. A row that breaks one fails the unit, which
//! rolls back. The lock is asked with `NOWAIT`: a table someone else is using, or constraints the
//! session may not drop (tables it does not own), leave the keys in place and the write is
//! checked row by row as usual. Constraints marked `NOT VALID` are left alone (adding them back
//! would check rows they were never meant to check).

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use crate::error::{Error, Result};

const SAVEPOINT: &str = "sk_foreign_keys";

/// The statements that put back the foreign keys [`set_aside`] dropped.
#[derive(Debug)]
pub(crate) struct SetAside {
    restore: String,
    /// How many constraints, for the log.
    constraints: usize,
}

/// Drops the validated foreign keys of `tables` (their own, not those that reference them) in
/// `tx`, after taking those tables and the ones they reference with `NOWAIT`; `None` (nothing
/// changed) when a lock is not free at once or the session may not alter the tables.
pub(crate) async fn set_aside(tx: &Transaction<'_>, tables: &[&str]) -> Result<Option<SetAside>> {
    let context = "setting foreign keys aside for a bulk write";
    tx.batch_execute(&format!("SAVEPOINT {SAVEPOINT}"))
        .await
        .map_err(crate::store::db_error(context))?;
    match drop_them(tx, tables).await {
        Ok(set) => {
            tx.batch_execute(&format!("RELEASE SAVEPOINT {SAVEPOINT}"))
                .await
                .map_err(crate::store::db_error(context))?;
            tracing::info!(
                constraints = set.constraints,
                tables = %tables.join(", "),
                "foreign keys set aside for a bulk write: checked once each when put back"
            );
            Ok(Some(set))
        }
        Err(e)
            if matches!(
                e.code(),
                Some(&SqlState::LOCK_NOT_AVAILABLE | &SqlState::INSUFFICIENT_PRIVILEGE)
            ) =>
        {
            tx.batch_execute(&format!(
                "ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE SAVEPOINT {SAVEPOINT}"
            ))
            .await
            .map_err(crate::store::db_error(context))?;
            let why = crate::error::describe_pg(&e);
            tracing::info!(tables = %tables.join(", "), reason = %why, "foreign keys kept for a bulk write: each row is checked as it is written");
            Ok(None)
        }
        Err(e) => Err(Error::db(context, e)),
    }
}

/// Puts back what [`set_aside`] dropped: each constraint checks every row of its table.
pub(crate) async fn restore(tx: &Transaction<'_>, set: SetAside) -> Result<()> {
    if set.constraints == 0 {
        return Ok(());
    }
    tx.batch_execute(&set.restore)
        .await
        .map_err(crate::store::db_error(
            "adding back the foreign keys set aside for a bulk write",
        ))
}

async fn drop_them(
    tx: &Transaction<'_>,
    tables: &[&str],
) -> std::result::Result<SetAside, tokio_postgres::Error> {
    tx.batch_execute(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE NOWAIT",
        tables.join(", ")
    ))
    .await?;
    // Read once the tables are locked: nobody can change their constraints any more. Each
    // constraint's comment goes back with it.
    let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
    let rows = tx
        .query_typed(
            "SELECT format('ALTER TABLE %s DROP CONSTRAINT %I', c.conrelid::regclass, c.conname),
                    format('ALTER TABLE %s ADD CONSTRAINT %I %s', c.conrelid::regclass, c.conname, pg_get_constraintdef(c.oid))
                      || coalesce(format('; COMMENT ON CONSTRAINT %I ON %s IS %L', c.conname, c.conrelid::regclass,
                                         obj_description(c.oid, 'pg_constraint')), ''),
                    c.confrelid::regclass::text
             FROM pg_constraint c
             WHERE c.contype = 'f' AND c.convalidated AND c.conrelid = ANY($1::text[]::regclass[])
             ORDER BY c.conrelid::regclass::text, c.conname",
            &[(&names, Type::TEXT_ARRAY)],
        )
        .await?;
    let mut referenced: Vec<String> = rows
        .iter()
        .map(|r| r.get::<_, String>(2))
        .filter(|t| !names.contains(t))
        .collect();
    referenced.sort();
    referenced.dedup();
    if !referenced.is_empty() {
        // Dropping a foreign key takes its referenced table exclusively too: without waiting.
        tx.batch_execute(&format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE NOWAIT",
            referenced.join(", ")
        ))
        .await?;
    }
    let drops: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let adds: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    if !drops.is_empty() {
        tx.batch_execute(&drops.join("; ")).await?;
    }
    Ok(SetAside {
        restore: adds.join("; "),
        constraints: rows.len(),
    })
}
