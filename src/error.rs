//! The error type of the library and the process exit codes it maps to.
//!
//! Every variant names the input that failed and how to fix it, and never carries a secret:
//! connection errors are rendered from the host and port only, HTTP errors from the URL path.
//! `exit_code()` gives the sysexits-style code documented in the README and `--help`;
//! `kind()` gives the bounded label for `/metrics` and the logs.
//!
//! Errors are typed where a caller decides by them: a database error carries its SQLSTATE, a
//! Keycloak error its path and HTTP status. Nothing in the crate decides by an error's text.

use std::fmt;

use tokio_postgres::error::SqlState;

use crate::names::named;

/// Exit codes (sysexits where one fits) relied on by operators and systemd's
/// `RestartPreventExitStatus=78`.
pub mod exit {
    pub(crate) const OK: u8 = 0;
    pub(crate) const RECONCILE_FAILED: u8 = 1;
    pub(crate) const CHANGES_PENDING: u8 = 2;
    pub(crate) const USAGE: u8 = 64;
    pub const UNAVAILABLE: u8 = 69;
    /// EX_OSERR: the operating system refused a resource (too many open files).
    pub(crate) const OS_ERROR: u8 = 71;
    /// EX_IOERR: a command's own output (stdout) could not be written.
    pub(crate) const IO_ERROR: u8 = 74;
    pub const CONFIG: u8 = 78;
}

/// A list of problems found while validating one input, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration ({count} problem{s}):\n{problems}", count = .0.0.len(), s = if .0.0.len() == 1 { "" } else { "s" }, problems = .0)]
    Config(Problems),

    #[error("invalid reference seed {source_name} ({count} problem{s}):\n{problems}", count = .problems.0.len(), s = if .problems.0.len() == 1 { "" } else { "s" })]
    Seed {
        source_name: String,
        problems: Problems,
    },

    #[error("invalid realm file {path}: {message}")]
    RealmFile { path: String, message: String },

    #[error("PostgreSQL at {target} is unavailable after waiting {waited_secs}s: {reason}. Check that it runs and that database.url (SEEDKEEPER_DATABASE__URL) points at it")]
    DatabaseUnavailable {
        target: String,
        waited_secs: u64,
        reason: String,
    },

    #[error("Keycloak at {target} is unavailable after waiting {waited_secs}s: {reason}. Check keycloak.base_url (SEEDKEEPER_KEYCLOAK__BASE_URL) and that Keycloak is up")]
    KeycloakUnavailable {
        target: String,
        waited_secs: u64,
        reason: String,
    },

    /// `--once` waited `startup.wait_timeout` for the run lock and another session still held it.
    #[error("the run lock is held by another session, {holder}, which did not let it go within startup.wait_timeout ({waited_secs}s): most likely another seedkeeper run (a replica, a CronJob pod, or a process just killed whose backend is still finishing its statement). Run again once it is done, raise SEEDKEEPER_STARTUP__WAIT_TIMEOUT, or end a stuck session with SELECT pg_terminate_backend(pid)")]
    RunLockHeld { holder: String, waited_secs: u64 },

    #[error("Keycloak refused seedkeeper: {0}")]
    KeycloakAuth(Refusal),

    #[error("Keycloak API error: {message}")]
    Keycloak {
        /// The admin API path asked (`users/{id}`), without the query.
        path: String,
        /// The HTTP status Keycloak answered, when the failure was an answer.
        status: Option<u16>,
        message: String,
    },

    /// The server refuses writes: a hot standby, or `default_transaction_read_only` on.
    /// `context` says where it was seen, `why` what the server said or showed.
    #[error("{context}: a read-only server (a replica?): {why}. Point database.url (SEEDKEEPER_DATABASE__URL) at the primary; if it is the primary, turn default_transaction_read_only off (ALTER DATABASE … SET default_transaction_read_only = off, or for the role or the server)")]
    ReadOnly { context: String, why: String },

    #[error("schema: {0}")]
    Schema(String),

    #[error("database error in {0}")]
    Database(DbFailure),

    /// A unit's database error, named by its unit.
    #[error("unit {unit} failed: {failure}")]
    Unit {
        unit: &'static str,
        failure: DbFailure,
    },

    /// A run whose units ended without an error but failed: its blocking findings (username
    /// clashes, offboarding stopped at `identity.offboard_limit`), `kind` saying which came first.
    #[error("{message}")]
    Findings { kind: ErrorKind, message: String },

    /// `--allow-offboard N` was given and the run would offboard another number: nothing of the
    /// identities unit was applied.
    #[error("--allow-offboard {allowed} was given, but this run would offboard {would} user(s): nothing was offboarded and the identities unit was rolled back. Review the users with `seedkeeper plan`, then run again with --allow-offboard {would} if they are meant to go")]
    OffboardMismatch { allowed: i64, would: i64 },

    #[error("{0}")]
    Io(String),

    /// EMFILE or ENFILE: the process (or the system) is out of file descriptors. Not a
    /// dependency being down: waiting for PostgreSQL would not help, raising the limit would.
    #[error("too many open files while {doing}: seedkeeper reached its limit of open file descriptors. Raise it (LimitNOFILE= in the systemd unit, `ulimit -n` in a shell, the container's nofile ulimit) or lower http.max_connections (SEEDKEEPER_HTTP__MAX_CONNECTIONS), which bounds the descriptors the HTTP endpoints may hold")]
    TooManyOpenFiles { doing: String },

    #[error("shutdown requested before the run finished")]
    Cancelled,

    /// A run stopped at its deadline (`run.timeout`); the message names the key and its value.
    #[error("{0}")]
    Timeout(String),
}

impl Error {
    /// The process exit code for this error (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Seed { .. } | Error::RealmFile { .. } => exit::CONFIG,
            Error::OffboardMismatch { .. } => exit::CONFIG,
            Error::KeycloakAuth(_) => exit::CONFIG,
            Error::TooManyOpenFiles { .. } => exit::OS_ERROR,
            Error::DatabaseUnavailable { .. }
            | Error::KeycloakUnavailable { .. }
            | Error::RunLockHeld { .. } => exit::UNAVAILABLE,
            // Not 78: a failover heals it without a config change (the standby is promoted, the
            // service name moves to the new primary), and 78 would stop systemd's restarts.
            Error::ReadOnly { .. } => exit::UNAVAILABLE,
            _ => exit::RECONCILE_FAILED,
        }
    }

    /// The bounded label of `/metrics` (`seedkeeper_run_errors_total{kind}`) and of the
    /// logs' `kind`: one per variant, never data.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::Config,
            Error::Seed { .. } => ErrorKind::Seed,
            Error::RealmFile { .. } => ErrorKind::RealmFile,
            Error::DatabaseUnavailable { .. } => ErrorKind::DatabaseUnavailable,
            Error::KeycloakUnavailable { .. } => ErrorKind::KeycloakUnavailable,
            Error::RunLockHeld { .. } => ErrorKind::RunLockHeld,
            Error::KeycloakAuth(_) => ErrorKind::KeycloakAuth,
            Error::Keycloak { .. } => ErrorKind::Keycloak,
            Error::ReadOnly { .. } => ErrorKind::DatabaseReadOnly,
            Error::Schema(_) => ErrorKind::Schema,
            Error::Database(_) => ErrorKind::Database,
            Error::Unit { .. } => ErrorKind::Unit,
            Error::Findings { kind, .. } => *kind,
            Error::OffboardMismatch { .. } => ErrorKind::OffboardMismatch,
            Error::Io(_) => ErrorKind::Io,
            Error::TooManyOpenFiles { .. } => ErrorKind::TooManyOpenFiles,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Timeout(_) => ErrorKind::Timeout,
        }
    }

    /// The HTTP status of a Keycloak API answer about the resource asked for. A refusal
    /// ([`Error::KeycloakAuth`]: 401, 403, or 404 for the realm itself) has none: a caller asking
    /// whether a user is gone must not take a missing realm for a missing user.
    pub(crate) fn keycloak_status(&self) -> Option<u16> {
        match self {
            Error::Keycloak { status, .. } => *status,
            _ => None,
        }
    }

    /// A Keycloak API error that is not an answer to act on (a malformed document, a paging
    /// server that ignores `first`).
    pub fn keycloak(path: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Keycloak {
            path: path.into(),
            status: None,
            message: message.into(),
        }
    }

    pub(crate) fn config(problem: impl Into<String>) -> Self {
        Error::Config(Problems(vec![problem.into()]))
    }

    /// Wraps a tokio-postgres error. Its Display never contains the connection string, but the
    /// server's message can quote data, so only the SQLSTATE message and detail are kept.
    pub(crate) fn db(context: impl Into<String>, e: tokio_postgres::Error) -> Self {
        // 25006 read_only_sql_transaction: whatever statement met it, the fix is the URL.
        if e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) {
            return Error::ReadOnly {
                context: context.into(),
                why: describe_pg(&e),
            };
        }
        Error::Database(DbFailure {
            context: context.into(),
            code: e.code().cloned(),
            message: describe_pg(&e),
            hint: None,
        })
    }
}

named!(
    /// Why a run failed (`seedkeeper_run_errors_total`): one per [`Error`] variant, given by
    /// [`Error::kind`]; `identity_clash` is a run that finished but failed because of username
    /// clashes ([`Error::Findings`]).
    pub enum ErrorKind {
        Config => "config",
        Seed => "seed",
        RealmFile => "realm_file",
        DatabaseUnavailable => "database_unavailable",
        KeycloakUnavailable => "keycloak_unavailable",
        RunLockHeld => "run_lock_held",
        KeycloakAuth => "keycloak_auth",
        Keycloak => "keycloak",
        DatabaseReadOnly => "database_read_only",
        Schema => "schema",
        Database => "database",
        Unit => "unit",
        Io => "io",
        TooManyOpenFiles => "too_many_open_files",
        Cancelled => "cancelled",
        Timeout => "timeout",
        IdentityClash => "identity_clash",
        OffboardLimit => "offboard_limit",
        OffboardMismatch => "offboard_mismatch",
    }
);

/// A statement that failed: what was being done, the server's SQLSTATE, its message, and the
/// key behind it when a configured timeout ran out.
#[derive(Debug, Clone)]
pub struct DbFailure {
    pub context: String,
    pub code: Option<SqlState>,
    pub message: String,
    /// Which setting to look at, added once by the engine (see `reconcile::Engine::explain`).
    pub hint: Option<String>,
}

impl fmt::Display for DbFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " [{h}]")?;
        }
        Ok(())
    }
}

/// Whether `e` or one of its sources is an I/O error saying the process (EMFILE, 24) or the
/// system (ENFILE, 23) has no file descriptor left.
pub(crate) fn is_too_many_open_files(e: &(dyn std::error::Error + 'static)) -> bool {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(EMFILE | ENFILE)) {
                return true;
            }
        }
        next = err.source();
    }
    false
}

/// An error and its sources, `: `-joined: what each layer said, innermost last.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A one-line description of a PostgreSQL error without secrets.
pub(crate) fn describe_pg(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(": ");
            s.push_str(d);
        }
        s
    } else if e.is_closed() {
        "connection closed".to_string()
    } else {
        // tokio-postgres' own messages ("error connecting to server: ...", "timeout ...") hold no
        // credentials: the config is never formatted into them.
        chain(e)
    }
}

/// Why Keycloak refused seedkeeper, with the fix, and the HTTP status that said so when one did:
/// a caller that knows better what a 403 means there (the events endpoints need `view-events`)
/// matches the status, not the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: Option<u16>,
    pub message: String,
}

impl Refusal {
    /// A refusal an HTTP answer with this status made.
    pub(crate) fn http(status: u16, message: String) -> Self {
        Refusal {
            status: Some(status),
            message,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A refusal no status of its own said (a token without the roles, a client the token endpoint
/// refused).
impl From<String> for Refusal {
    fn from(message: String) -> Self {
        Refusal {
            status: None,
            message,
        }
    }
}

impl From<&str> for Refusal {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_realm_is_no_missing_user() {
        let gone = Error::Keycloak {
            path: "users/u1".into(),
            status: Some(404),
            message: "GET users/u1: 404 User not found".into(),
        };
        assert_eq!(gone.keycloak_status(), Some(404));
        let no_realm = Error::KeycloakAuth(Refusal::http(404, "realm \"x\" not found".into()));
        assert_eq!(no_realm.keycloak_status(), None);
        assert_eq!(Error::keycloak("users", "paging").keycloak_status(), None);
    }

    #[test]
    fn too_many_open_files_is_found_anywhere_in_the_chain_and_nothing_else_is() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("connecting")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let emfile = Outer(std::io::Error::from_raw_os_error(24));
        assert!(is_too_many_open_files(&emfile));
        assert!(is_too_many_open_files(&std::io::Error::from_raw_os_error(
            23
        )));
        let refused = Outer(std::io::Error::from_raw_os_error(111));
        assert!(!is_too_many_open_files(&refused));
        let e = Error::TooManyOpenFiles {
            doing: "accepting an HTTP connection".into(),
        };
        assert_eq!(
            (e.exit_code(), e.kind().as_str()),
            (71, "too_many_open_files")
        );
        let text = e.to_string();
        for part in ["LimitNOFILE", "ulimit -n", "http.max_connections"] {
            assert!(text.contains(part), "{part} in {text}");
        }
    }
}
