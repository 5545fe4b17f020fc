//! The run lock: a session-level PostgreSQL advisory lock, so two replicas (or an overlapping
//! tick) never reconcile at once. It is released when the connection ends, including when the
//! process is killed (once the server has noticed: a backend still busy with a killed process's
//! statement holds it until that statement ends).
//!
//! Most runs only try the lock and are skipped when another session holds it; `--once` waits for
//! it ([`acquire_within`]), and when it cannot have it names the session that holds it
//! ([`holder`]), as `pg_locks` and `pg_stat_activity` show it.

use std::fmt;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::retry::{Limit, Policy, Retry, Stop};
use crate::store::ctx;

/// "seedkeeper" folded into a bigint; fixed so every version and replica agrees.
pub const RUN_LOCK_KEY: i64 = 0x5eed_6ee9_0000_0001;

/// How often a wait for the lock asks again: from 100 ms, doubling up to 1 s, so a lock released
/// a moment after the first try is taken at once, and a long wait costs one query a second.
const WAIT_BASE: Duration = Duration::from_millis(100);
const WAIT_CAP: Duration = Duration::from_secs(1);

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

/// The session holding the run lock, as `pg_stat_activity` shows it to this session (a role
/// without `pg_read_all_stats` sees another role's pid, user and application name, not its
/// state or client address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub application_name: String,
    pub user: Option<String>,
    pub client_addr: Option<String>,
    pub state: Option<String>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} (application_name {:?}",
            self.pid, self.application_name
        )?;
        if let Some(u) = &self.user {
            write!(f, ", user {u}")?;
        }
        if let Some(c) = &self.client_addr {
            write!(f, ", client {c}")?;
        }
        if let Some(s) = &self.state {
            write!(f, ", state {s}")?;
        }
        f.write_str(")")
    }
}

/// The session holding the run lock in this database; `None` when none does (any more).
///
/// A bigint advisory key shows in `pg_locks` split in two: its high 32 bits as `classid`, its low
/// 32 bits as `objid`, with `objsubid` 1.
pub async fn holder(client: &Client) -> Result<Option<Holder>> {
    let high = RUN_LOCK_KEY >> 32;
    let low = RUN_LOCK_KEY & 0xffff_ffff;
    let row = client
        .query_opt(
            "SELECT a.pid, coalesce(a.application_name, ''), a.usename::text, host(a.client_addr), a.state \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             LIMIT 1",
            &[&high, &low],
        )
        .await
        .map_err(ctx("looking up the session holding the run lock"))?;
    Ok(row.map(|r| Holder {
        pid: r.get(0),
        application_name: r.get(1),
        user: r.get(2),
        client_addr: r.get(3),
        state: r.get(4),
    }))
}

/// Takes the lock, waiting up to `wait` for the session that holds it to let it go (polling, see
/// [`WAIT_BASE`]); a shutdown (`cancel`) ends the wait at once. When the wait ends without the
/// lock: [`Error::RunLockHeld`], naming the holder.
pub async fn acquire_within(
    client: &Client,
    wait: Duration,
    cancel: &CancellationToken,
) -> Result<()> {
    let started = Instant::now();
    let policy = Policy::new(WAIT_BASE, WAIT_CAP, Limit::Deadline(wait));
    let attempt = |_| async {
        match try_acquire(client).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Retry::Backoff(())),
            Err(e) => Err(Retry::Fail(e)),
        }
    };
    match policy.run(cancel, attempt, |_, _, _| {}).await {
        Ok(()) => Ok(()),
        Err(Stop::Failed(e)) => Err(e),
        Err(Stop::Cancelled) => Err(Error::Cancelled),
        Err(Stop::Spent((), _)) => {
            let holder = match holder(client).await? {
                Some(h) => h.to_string(),
                None => "a session that has let it go since (run again)".to_string(),
            };
            Err(Error::RunLockHeld {
                holder,
                waited_secs: started.elapsed().as_secs(),
            })
        }
    }
}
