//! The run lock: a session-level PostgreSQL advisory lock, so two replicas (or an overlapping
//! tick) never reconcile at once. It is released when the connection ends, including when the
//! process is killed.

use tokio_postgres::Client;

use crate::error::Result;
use crate::store::ctx;

/// "seedkeeper" folded into a bigint; fixed so every version and replica agrees.
pub const RUN_LOCK_KEY: i64 = 0x5eed_6ee9_0000_0001;

/// Tries to take the lock without waiting. `false` means another run holds it.
pub async fn try_acquire(client: &Client) -> Result<bool> {
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RUN_LOCK_KEY])
        .await
        .map_err(ctx("taking the run lock"))?;
    Ok(row.get(0))
}

pub async fn release(client: &Client) -> Result<()> {
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&RUN_LOCK_KEY])
        .await
        .map_err(ctx("releasing the run lock"))?;
    Ok(())
}
