//! PostgreSQL: connecting (with a bounded wait), embedded migrations, the run lock and the
//! evidence table. One function per statement; SQL lives next to the function that runs it.
//!
//! Each run opens its own connections: a connection broken by a restart or `pg_terminate_backend`
//! is simply replaced by the next run, and the run lock, held in an open transaction of a
//! connection of its own ([`lock`]), dies with it (so a killed process never leaves it held).
//!
//! Everything here works behind a connection pooler (PgBouncer in session or transaction mode):
//! statements go as unnamed ones ([`Client::query_typed`], `batch_execute`), so no named prepared
//! statement outlives its transaction on a backend the pooler hands to someone else. Reads
//! `database.*`.

pub(crate) mod cancel;
pub(crate) mod foreign_keys;
pub mod lock;
pub mod migrate;
pub(crate) mod runs;
pub mod schema_check;
pub(crate) mod server;
pub(crate) mod tls;

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use tracing::Instrument;

use crate::config::describe_target;
use crate::config::{DatabaseSettings, SslMode};
use crate::error::{describe_pg, Error, Result};
use crate::retry::{Limit, Policy, Retry};

/// An open connection and where it goes (for messages: never the credentials).
pub struct Db {
    pub client: Client,
    pub target: String,
    conn_task: Option<tokio::task::JoinHandle<()>>,
    ended: CancellationToken,
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some(task) = &self.conn_task {
            task.abort();
        }
    }
}

impl Db {
    /// Fires when the connection has ended, for whatever reason (closed here, or by the server,
    /// a pooler or the network): the run lock watches its own connection with it.
    pub(crate) fn ended(&self) -> CancellationToken {
        self.ended.clone()
    }

    /// Closes the connection the orderly way (a Terminate message, which the server or pooler
    /// acts on at once) and waits up to `within` for it to be closed, rather than dropping the
    /// socket and leaving the server to notice.
    pub(crate) async fn close(mut self, within: Duration) {
        let task = self.conn_task.take();
        // Dropping the last client handle makes the connection send Terminate and end.
        drop(self);
        if let Some(task) = task {
            let abort = task.abort_handle();
            if tokio::time::timeout(within, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Whether an error is worth waiting out (server down, starting, database not there yet) rather
/// than a configuration mistake (bad password, unknown role).
fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let c = code.code();
            // 28xxx: authentication; 42xxx: e.g. unknown role. Neither heals by waiting.
            !(c.starts_with("28") || c.starts_with("42"))
        }
        None => true,
    }
}

/// Connects once, over TLS as `sslmode` in `database.url` says (see [`tls`]).
pub(crate) async fn connect(settings: &DatabaseSettings) -> Result<Db> {
    let (cfg, tls_params) = settings.connection()?;
    let target = describe_target(&cfg);
    let connector = tls::connector(&tls_params)?;
    let e = match cfg.connect(connector).await {
        Ok((client, connection)) => {
            let ended = CancellationToken::new();
            let on_end = ended.clone().drop_guard();
            // In the span of whoever connects (a run): the server's notices carry its run id.
            let conn_task = tokio::spawn(
                async move {
                    // Fires however the task ends, an abort included.
                    let _on_end = on_end;
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %describe_pg(&e), "database connection ended");
                    }
                }
                .in_current_span(),
            );
            return Ok(Db {
                client,
                target,
                conn_task: Some(conn_task),
                ended,
            });
        }
        Err(e) => e,
    };
    // A certificate that does not verify will not verify on retry: exit 78 like a refused
    // credential, naming TLS and the fix rather than the URL's syntax.
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => String::new(),
    };
    if let Some(why) = tls::refusal(&e, &tls_params, &host) {
        return Err(Error::config(format!(
            "TLS to PostgreSQL at {target} failed: {why}"
        )));
    }
    // Out of descriptors is this process's problem, not the server's: waiting would not help.
    if crate::error::is_too_many_open_files(&e) {
        return Err(Error::TooManyOpenFiles {
            doing: format!("connecting to PostgreSQL at {target}"),
        });
    }
    if let Some(refused) = pooler_refused_options(&e, &target) {
        return Err(refused);
    }
    if is_transient(&e) {
        return Err(Error::DatabaseUnavailable {
            target,
            waited_secs: 0,
            reason: describe_pg(&e),
        });
    }
    let reason = describe_pg(&e);
    // 28000 (invalid_authorization_specification) is pg_hba.conf saying no: with hostssl lines
    // only, TLS is the fix; with cert lines, a client certificate; a wrong password is 28P01.
    let refused_by_hba = e.code() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    let fix = if refused_by_hba && tls_params.mode == SslMode::Disable {
        format!(
            "if the server accepts only TLS connections (hostssl lines in pg_hba.conf), sslmode={} sent none: set sslmode=verify-full (with sslrootcert=/path/ca.pem) or sslmode=require in database.url (SEEDKEEPER_DATABASE__URL)",
            tls_params.mode.as_str()
        )
    } else if refused_by_hba && tls_params.client_cert.is_none() {
        "if pg_hba.conf says cert for this role, the server wants a client certificate: set sslcert=/path/client.crt and sslkey=/path/client.key in database.url (SEEDKEEPER_DATABASE__URL), a certificate its ssl_ca_file trusts whose CN is the role; otherwise fix the role, database or host pg_hba.conf allows".to_string()
    } else {
        "fix database.url / database.password (SEEDKEEPER_DATABASE__URL, SEEDKEEPER_DATABASE__PASSWORD)".to_string()
    };
    Err(Error::config(format!(
        "PostgreSQL at {target} refused the connection: {reason}: {fix}"
    )))
}

/// A connection pooler that refuses the `options` startup parameter (PgBouncer by default:
/// 08P01 "unsupported startup parameter: options"), which carries `database.statement_timeout`
/// and `database.lock_timeout`. It refuses every connection the same way however long one waits,
/// so it is a configuration error (78) at once, not an outage.
fn pooler_refused_options(e: &tokio_postgres::Error, target: &str) -> Option<Error> {
    let db = e.as_db_error()?;
    if db.code() != &SqlState::PROTOCOL_VIOLATION
        || !db.message().contains("unsupported startup parameter")
    {
        return None;
    }
    Some(Error::config(format!(
        "the server at {target} (a connection pooler such as PgBouncer) refused the connection: {}: seedkeeper sends the startup parameter `options` to set database.statement_timeout and database.lock_timeout. Either add `ignore_startup_parameters = options` to the [pgbouncer] section of pgbouncer.ini (PgBouncer then drops those timeouts: set them on the role instead, ALTER ROLE <role> SET statement_timeout = '5min', and seedkeeper warns while the server's values differ from its keys), or set database.statement_timeout = \"0s\" and database.lock_timeout = \"0s\" (SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT=0, SEEDKEEPER_DATABASE__LOCK_TIMEOUT=0), remove `options` from database.url, and set the timeouts on the role",
        db.message()
    )))
}

/// Connects, retrying transient failures with exponential backoff (100 ms doubling up to 5 s)
/// until `wait` has passed; a shutdown ends the wait at once.
pub async fn connect_with_wait(
    settings: &DatabaseSettings,
    wait: Duration,
    cancel: &CancellationToken,
) -> Result<Db> {
    let policy = Policy::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
        Limit::Deadline(wait),
    );
    // Only an unavailable server is worth waiting for (see `is_transient`).
    let attempt = |_| async {
        match connect(settings).await {
            Err(Error::DatabaseUnavailable { target, reason, .. }) => {
                Err(Retry::Backoff((target, reason)))
            }
            other => other.map_err(Retry::Fail),
        }
    };
    policy
        .run(cancel, attempt, |(target, reason), n, d| {
            tracing::warn!(db.target = %target, attempt = n + 1, error = %reason, retry_in_ms = d.as_millis() as u64, "waiting for PostgreSQL");
        })
        .await
        .map_err(|stop| {
            stop.into_error(|(target, reason), spent| Error::DatabaseUnavailable {
                target,
                waited_secs: spent.waited.as_secs(),
                reason,
            })
        })
}

/// Maps a statement error to an `Error::Database` with the context of what was being done.
pub(crate) fn db_error(context: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| Error::db(context, e)
}

/// Whether a table exists (used before the schema is known to be there).
pub(crate) async fn table_exists(client: &Client, table: &str) -> Result<bool> {
    let row = client
        .query_typed_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[(&format!("public.{table}"), Type::TEXT)],
        )
        .await
        .map_err(db_error("checking the schema"))?;
    Ok(row.get(0))
}

/// Warns when the session does not have the `statement_timeout` and `lock_timeout` seedkeeper
/// asked for in the startup parameter `options`: a pooler told to ignore it
/// (`ignore_startup_parameters = options`) drops them without a word, and the stop of a run
/// relies on them to bound what a cancelled statement leaves behind. A zero key asks nothing.
pub(crate) async fn warn_unless_session_timeouts(client: &Client, settings: &DatabaseSettings) {
    let asked = [
        ("statement_timeout", settings.statement_timeout),
        ("lock_timeout", settings.lock_timeout),
    ];
    if asked.iter().all(|(_, d)| d.is_zero()) {
        return;
    }
    // Both are in milliseconds in pg_settings.
    let rows = client
        .query_typed(
            "SELECT name, setting::bigint FROM pg_settings WHERE name IN ('statement_timeout', 'lock_timeout')",
            &[],
        )
        .await;
    let Ok(rows) = rows else { return };
    for (name, want) in asked {
        if want.is_zero() {
            continue;
        }
        let have = rows
            .iter()
            .find(|r| r.get::<_, String>(0) == name)
            .map(|r| r.get::<_, i64>(1));
        if have != Some(want.as_millis() as i64) {
            let key = format!("database.{name}");
            let fix = format!("a connection pooler drops the startup parameter `options` (PgBouncer's ignore_startup_parameters = options): set it on the role (ALTER ROLE <role> SET {name} = '{}ms') and set {key} to 0 to stop asking", want.as_millis());
            tracing::warn!(
                key = %key,
                wanted_ms = want.as_millis() as u64,
                server_ms = have.unwrap_or(-1),
                fix = %fix,
                "a timeout seedkeeper asked for is not in effect in its session"
            );
        }
    }
}
