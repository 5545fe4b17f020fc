//! The run lock, so two replicas (or an overlapping tick) never reconcile at once: a
//! transaction-level PostgreSQL advisory lock (`pg_try_advisory_xact_lock`) taken in a
//! transaction that a connection of its own keeps open for the whole run.
//!
//! Why a transaction, not a session lock: behind a connection pooler in transaction mode
//! (PgBouncer's `pool_mode = transaction`) each transaction, and each statement outside one, may
//! go to another server backend. A session lock is then taken on one backend and "released" on
//! another, and stays held by an idle pooled backend after the process is gone. An open
//! transaction pins its backend in every pooler mode, and its lock ends with it: at commit or
//! rollback, when the connection closes (the pooler closes a server connection whose client left
//! in a transaction), and when the process is killed (once the server or the pooler notices the
//! closed socket). `idle_in_transaction_session_timeout` is switched off for this transaction only,
//! so a role's setting cannot end the lock of a long run; whatever else ends the lock's session
//! (a server restart, an operator, PostgreSQL 17's `transaction_timeout`) is seen
//! ([`RunLock::cancel_on_loss`]) and stops the run, so a run never goes on without the lock.
//!
//! The key is the same bigint seedkeeper always used, and session and transaction advisory locks
//! on one key exclude each other: a replica of an older version still excludes this one.
//!
//! Most runs only try the lock and are skipped when another session holds it; `--once` waits for
//! it ([`RunLock::acquire_within`]), and when it cannot have it names the session that holds it
//! ([`holder`]), as `pg_locks` and `pg_stat_activity` show it.

use std::fmt;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;
use crate::error::{Error, Result};
use crate::retry::{Limit, Policy, Retry, Stop};
use crate::store::{self, db_error, Db};

/// "seedkeeper" folded into a bigint; fixed so every version and replica agrees.
pub const RUN_LOCK_KEY: i64 = 0x5eed_6ee9_0000_0001;

/// How often a wait for the lock asks again: from 100 ms, doubling up to 1 s, so a lock released
/// a moment after the first try is taken at once, and a long wait costs one query a second.
const WAIT_BASE: Duration = Duration::from_millis(100);
const WAIT_CAP: Duration = Duration::from_secs(1);

/// How long closing the lock's connection may take before it is dropped.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// The run lock, held: an open transaction on a connection of its own. Give it back with
/// [`RunLock::release`]; dropping it closes the connection, which ends the transaction too.
pub(crate) struct RunLock {
    db: Db,
    /// Fired by [`RunLock::release`] before the connection ends, so that an orderly release is
    /// not taken for a lost lock.
    released: CancellationToken,
}

/// One try on a connection made for the lock: `Ok(lock)`, or the connection back when another
/// session holds the lock. One round trip: the transaction, its setting and the try.
async fn take_on(db: Db) -> Result<std::result::Result<RunLock, Db>> {
    let sql = format!(
        "BEGIN; SET LOCAL idle_in_transaction_session_timeout = 0; SELECT pg_try_advisory_xact_lock({RUN_LOCK_KEY})"
    );
    let answer = db
        .client
        .simple_query(&sql)
        .await
        .map_err(db_error("taking the run lock"))?;
    let got = answer.iter().any(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0) == Some("t"),
        _ => false,
    });
    if got {
        return Ok(Ok(RunLock {
            db,
            released: CancellationToken::new(),
        }));
    }
    // The comment is what pg_stat_activity shows of a session waiting for the lock.
    db.client
        .batch_execute(
            "ROLLBACK /* seedkeeper waits for the run lock: pg_try_advisory_xact_lock */",
        )
        .await
        .map_err(db_error("ending a try for the run lock"))?;
    Ok(Err(db))
}

impl RunLock {
    /// Tries to take the lock without waiting, on a new connection; `None` when another session
    /// holds it (the connection is closed again).
    pub(crate) async fn try_take(settings: &DatabaseSettings) -> Result<Option<RunLock>> {
        let db = store::connect(settings).await?;
        match take_on(db).await? {
            Ok(lock) => Ok(Some(lock)),
            Err(db) => {
                db.close(CLOSE_WITHIN).await;
                Ok(None)
            }
        }
    }

    /// Takes the lock, waiting up to `wait` for the session that holds it to let it go (polling
    /// on one connection, see `WAIT_BASE`); a shutdown (`cancel`) ends the wait at once. When
    /// the wait ends without the lock: [`Error::RunLockHeld`], naming the holder.
    pub(crate) async fn acquire_within(
        settings: &DatabaseSettings,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> Result<RunLock> {
        let started = Instant::now();
        let policy = Policy::new(WAIT_BASE, WAIT_CAP, Limit::Deadline(wait));
        // One connection for every try, kept between them (a new one if a try lost it).
        let conn: tokio::sync::Mutex<Option<Db>> = tokio::sync::Mutex::new(None);
        let attempt = |_| async {
            let mut slot = conn.lock().await;
            let db = match slot.take() {
                Some(db) => db,
                None => store::connect(settings).await.map_err(Retry::Fail)?,
            };
            match take_on(db).await {
                Ok(Ok(lock)) => Ok(lock),
                Ok(Err(db)) => {
                    *slot = Some(db);
                    Err(Retry::Backoff(()))
                }
                Err(e) => Err(Retry::Fail(e)),
            }
        };
        let taken = policy.run(cancel, attempt, |_, _, _| {}).await;
        let db = conn.into_inner();
        match taken {
            Ok(lock) => Ok(lock),
            Err(Stop::Failed(e)) => Err(e),
            Err(Stop::Cancelled) => Err(Error::Cancelled),
            Err(Stop::Spent((), _)) => {
                let named = match &db {
                    Some(db) => holder(&db.client).await?,
                    None => None,
                };
                let holder = match named {
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

    /// Cancels `lost` when the lock is lost while held: its connection ended without
    /// [`RunLock::release`] (the server restarted, an operator or a timeout ended the session, the
    /// pooler closed it). The run must stop then: another may take the lock.
    pub(crate) fn cancel_on_loss(&self, lost: CancellationToken) {
        let (ended, released) = (self.db.ended(), self.released.clone());
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = released.cancelled() => {}
                _ = ended.cancelled() => lost.cancel(),
            }
        });
    }

    /// Whether the lock's connection is still open (the lock is held while it is).
    pub(crate) fn is_held(&self) -> bool {
        !self.db.client.is_closed()
    }

    /// The lock's connection, for statements that belong under the lock and must not wait for
    /// the run's own connection (recording a stopped run): they run inside the lock's
    /// transaction and are committed with its release.
    pub(crate) fn client(&self) -> &Client {
        &self.db.client
    }

    /// Gives the lock back: commits its transaction (and whatever [`RunLock::client`] wrote in
    /// it) and closes its connection. When the commit fails, closing the connection still ends
    /// the transaction and the lock.
    pub(crate) async fn release(self) -> Result<()> {
        self.released.cancel();
        let committed = self
            .db
            .client
            .batch_execute("COMMIT")
            .await
            .map_err(db_error("releasing the run lock"));
        self.db.close(CLOSE_WITHIN).await;
        committed
    }
}

/// The session holding the run lock, as `pg_stat_activity` shows it to this session (a role
/// without `pg_read_all_stats` sees another role's pid, user and application name, not its
/// state or client address). Behind a pooler, the server backend the pooler gave that session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
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
/// 32 bits as `objid`, with `objsubid` 1 (session and transaction locks alike).
pub(crate) async fn holder(client: &Client) -> Result<Option<Holder>> {
    let high = RUN_LOCK_KEY >> 32;
    let low = RUN_LOCK_KEY & 0xffff_ffff;
    let row = client
        .query_typed_opt(
            "SELECT a.pid, coalesce(a.application_name, ''), a.usename::text, host(a.client_addr), a.state \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             LIMIT 1",
            &[(&high, Type::INT8), (&low, Type::INT8)],
        )
        .await
        .map_err(db_error("looking up the session holding the run lock"))?;
    Ok(row.map(|r| Holder {
        pid: r.get(0),
        application_name: r.get(1),
        user: r.get(2),
        client_addr: r.get(3),
        state: r.get(4),
    }))
}
