//! PostgreSQL: connecting (with a bounded wait), embedded migrations, the advisory lock and the
//! evidence table. One function per statement; SQL lives next to the function that runs it.
//!
//! Each run opens its own connection: a connection broken by a restart or `pg_terminate_backend`
//! is simply replaced by the next run, and the session-level advisory lock dies with it (so a
//! killed process never leaves the lock held). Reads `database.*`.

pub mod lock;
pub mod migrate;
pub mod runs;
pub mod schema_check;
pub mod server;
pub mod tls;
pub mod url;

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use tracing::Instrument;

use self::url::describe_target;
use crate::config::{DatabaseSettings, SslMode};
use crate::error::{describe_pg, Error, Result};
use crate::retry::{Limit, Policy, Retry};

/// An open connection and where it goes (for messages: never the credentials).
pub struct Db {
    pub client: Client,
    pub target: String,
    conn_task: tokio::task::JoinHandle<()>,
}

impl Drop for Db {
    fn drop(&mut self) {
        self.conn_task.abort();
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
pub async fn connect(settings: &DatabaseSettings) -> Result<Db> {
    let (cfg, tls_params) = settings.connection()?;
    let target = describe_target(&cfg);
    let connector = tls::connector(&tls_params)?;
    let e = match cfg.connect(connector).await {
        Ok((client, connection)) => {
            // In the span of whoever connects (a run): the server's notices carry its run id.
            let conn_task = tokio::spawn(
                async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %describe_pg(&e), "database connection ended");
                    }
                }
                .in_current_span(),
            );
            return Ok(Db {
                client,
                target,
                conn_task,
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
pub fn ctx(context: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| Error::db(context, e)
}

/// Whether a table exists (used before the schema is known to be there).
pub async fn table_exists(client: &Client, table: &str) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("public.{table}")],
        )
        .await
        .map_err(ctx("checking the schema"))?;
    Ok(row.get(0))
}
