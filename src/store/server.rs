//! What the server itself says about taking writes: a hot standby (`pg_is_in_recovery()`) or
//! `default_transaction_read_only` on (for the server, the database or the role) makes every
//! write fail with SQLSTATE 25006, which on its own reads as "cannot execute INSERT in a
//! read-only transaction" and says nothing of replicas. One round trip, by the simple query
//! protocol (no prepared statement: safe behind any pooler), asked by a run before it writes,
//! by `/readyz` on its kept connection and by `status`.

use tokio_postgres::{GenericClient, SimpleQueryMessage};

use crate::error::{Error, Result};

/// Both facts at once; `transaction_read_only` is the session's default
/// (`default_transaction_read_only`, and always on during recovery).
const PROBE: &str = "SELECT pg_is_in_recovery()::text, current_setting('transaction_read_only')";

/// Why the server takes no writes, in words; `None` when it takes them.
pub(crate) fn read_only_reason(in_recovery: bool, read_only: bool) -> Option<String> {
    if in_recovery {
        Some("it is a hot standby in recovery (pg_is_in_recovery() is true)".to_string())
    } else if read_only {
        Some(
            "default_transaction_read_only is on (for the server, this database or this role)"
                .to_string(),
        )
    } else {
        None
    }
}

/// Asks the server whether it takes writes: `Some(why)` when it does not.
pub(crate) async fn read_only<C: GenericClient + Sync>(
    client: &C,
) -> std::result::Result<Option<String>, tokio_postgres::Error> {
    let messages = client.simple_query(PROBE).await?;
    let row = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some((
            r.get(0).unwrap_or_default() == "true",
            r.get(1).unwrap_or_default() == "on",
        )),
        _ => None,
    });
    Ok(row.and_then(|(recovery, ro)| read_only_reason(recovery, ro)))
}

/// The message a read-only server gets wherever it is shown (`/readyz`, `status`).
pub(crate) fn read_only_message(target: &str, why: &str) -> String {
    Error::ReadOnly {
        context: format!("PostgreSQL at {target}"),
        why: why.to_string(),
    }
    .to_string()
}

/// A run's check before it writes: [`Error::ReadOnly`] naming the server and why.
pub(crate) async fn ensure_writable<C: GenericClient + Sync>(client: &C, target: &str) -> Result<()> {
    match read_only(client).await {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(Error::ReadOnly {
            context: format!("PostgreSQL at {target}"),
            why,
        }),
        Err(e) => Err(Error::db("asking whether the server takes writes", e)),
    }
}
