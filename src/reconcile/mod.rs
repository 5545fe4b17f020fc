//! Reconcile: the difference between what should exist (`seed`, `identity`) and the database,
//! and the writes that close it.
//!
//! Units run in order: `schema`, `reference_seed`, `identities`, `role_bindings`, `tenants`.
//! Each can `plan` (compute the difference, no writes) or `apply` (write only the difference,
//! set-based, in its own transaction, so an interrupted run never leaves half a unit). A run
//! holds the advisory lock; a run that cannot take it is recorded as skipped. Every run leaves
//! one `seed_runs` row.
//!
//! A run is bounded by `run.timeout`: past it the run is dropped where it stands (a Keycloak
//! request in flight, a retry sleep, a statement waiting for a lock), its session is ended from a
//! second connection (which rolls back its open transaction and releases the advisory lock at
//! once, even while the server is blocked), and the run is recorded `failed` with an error naming
//! the key. A shutdown cuts a run short the same way when it would outlast `shutdown.grace`.
//! Reads `schema.mode`, `run.timeout`, `shutdown.grace`, `identity.*`, `evidence.retention`.

pub mod bindings;
pub mod identities;
pub mod reference;
pub mod tenants;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::{duration_str, SchemaMode, Settings};
use crate::error::{Error, Result};
use crate::identity::{BoxFuture, Identity, IdentityProvider, SourceStats};
use crate::seed::ReferenceSeed;
use crate::store::{self, lock, migrate, runs, Db};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plan,
    Apply,
}

/// Findings listed per kind are capped so a 100,000-user re-import does not make a 100,000-entry
/// evidence row; the counts stay exact.
pub const FINDINGS_PER_KIND: usize = 50;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub unit: &'static str,
    pub kind: String,
    pub entity: String,
    pub detail: String,
}

impl Finding {
    pub fn new(
        unit: &'static str,
        kind: &str,
        entity: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Finding {
            unit,
            kind: kind.to_string(),
            entity: entity.into(),
            detail: detail.into(),
        }
    }
}

/// What one unit found (plan) or did (apply).
#[derive(Debug, Clone, Serialize)]
pub struct UnitReport {
    pub unit: &'static str,
    pub counts: BTreeMap<String, i64>,
    pub findings: Vec<Finding>,
    /// Plan only: the changes apply would make, capped like findings.
    pub changes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Findings that make the run's outcome failed (e.g. a username clash).
    #[serde(skip)]
    pub blocking: Vec<String>,
}

impl UnitReport {
    pub fn new(unit: &'static str) -> Self {
        UnitReport {
            unit,
            counts: BTreeMap::new(),
            findings: Vec::new(),
            changes: Vec::new(),
            error: None,
            blocking: Vec::new(),
        }
    }

    pub fn bump(&mut self, key: &str, n: i64) {
        *self.counts.entry(key.to_string()).or_insert(0) += n;
    }

    pub fn get(&self, key: &str) -> i64 {
        self.counts.get(key).copied().unwrap_or(0)
    }

    pub fn add_finding(&mut self, f: Finding) {
        let same = self.findings.iter().filter(|x| x.kind == f.kind).count();
        if same < FINDINGS_PER_KIND {
            self.findings.push(f);
        }
    }

    pub fn add_change(&mut self, c: String) {
        if self.changes.len() < FINDINGS_PER_KIND * 4 {
            self.changes.push(c);
        }
    }

    /// Rows apply would write (plan) or wrote (apply).
    pub fn writes(&self) -> i64 {
        ["inserted", "updated", "revoked", "realigned", "applied"]
            .iter()
            .map(|k| self.get(k))
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Succeeded,
    Failed,
    Skipped,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The result of one run (apply) or plan.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub id: Uuid,
    pub trigger: String,
    pub mode: &'static str,
    pub outcome: Outcome,
    pub seed_digest: String,
    pub duration_ms: u64,
    pub units: Vec<UnitReport>,
    pub error: Option<String>,
    #[serde(skip)]
    pub error_value: Option<Error>,
}

impl RunReport {
    pub fn counts_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for u in &self.units {
            m.insert(u.unit.to_string(), json!(u.counts));
        }
        Value::Object(m)
    }

    pub fn findings_json(&self) -> Value {
        json!(self
            .units
            .iter()
            .flat_map(|u| u.findings.iter())
            .collect::<Vec<_>>())
    }

    pub fn unit(&self, name: &str) -> Option<&UnitReport> {
        self.units.iter().find(|u| u.unit == name)
    }

    /// Plan: whether apply would change anything.
    pub fn changes_pending(&self) -> bool {
        self.units.iter().any(|u| u.writes() > 0)
    }
}

/// Everything a run needs, built once.
pub struct Engine {
    pub settings: Settings,
    pub seed: ReferenceSeed,
    pub identities: std::sync::Arc<dyn IdentityProvider>,
}

impl Engine {
    /// One run: connect (waiting up to `wait`), lock, units in order, evidence.
    pub async fn run(
        &self,
        mode: Mode,
        trigger: &str,
        wait: std::time::Duration,
        cancel: &CancellationToken,
    ) -> RunReport {
        self.run_with(mode, trigger, wait, cancel, self.identities.clone())
            .await
    }

    /// A run whose identities come from `source` instead of the configured one: the users an
    /// event batch touched ([`crate::identity::SomeUsers`]), through the same units and rules.
    pub async fn run_with(
        &self,
        mode: Mode,
        trigger: &str,
        wait: std::time::Duration,
        cancel: &CancellationToken,
        identities: Arc<dyn IdentityProvider>,
    ) -> RunReport {
        let started = Instant::now();
        let mut report = RunReport {
            id: Uuid::new_v4(),
            trigger: trigger.to_string(),
            mode: if mode == Mode::Plan { "plan" } else { "apply" },
            outcome: Outcome::Failed,
            seed_digest: self.seed.digest.clone(),
            duration_ms: 0,
            units: Vec::new(),
            error: None,
            error_value: None,
        };
        // Every line of the run, the source's included, carries the run's id and trigger.
        let span = tracing::info_span!("run", run.id = %report.id, trigger, mode = report.mode);
        span.in_scope(
            || tracing::info!(run.id = %report.id, trigger, mode = report.mode, "seeding_started"),
        );
        let result = self
            .run_inner(mode, &mut report, wait, cancel, identities)
            .instrument(span.clone())
            .await;
        if let Err(e) = result {
            let e = self.explain(e);
            report.outcome = Outcome::Failed;
            report.error = Some(e.to_string());
            report.error_value = Some(e);
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        let counts = report.counts_json();
        // No await from here on: the span can be entered.
        let _in_run = span.enter();
        match report.outcome {
            Outcome::Failed => tracing::error!(
                run.id = %report.id, trigger, outcome = report.outcome.as_str(), duration_ms = report.duration_ms,
                counts = %counts, error = report.error.as_deref().unwrap_or(""), "seeding_completed"
            ),
            _ => tracing::info!(
                run.id = %report.id, trigger, outcome = report.outcome.as_str(), duration_ms = report.duration_ms,
                counts = %counts, "seeding_completed"
            ),
        }
        report
    }

    /// The run under its deadline: [`Engine::run_body`], stopped by `run.timeout` or by a
    /// shutdown that would outlast `shutdown.grace`.
    async fn run_inner(
        &self,
        mode: Mode,
        report: &mut RunReport,
        wait: Duration,
        cancel: &CancellationToken,
        identities: Arc<dyn IdentityProvider>,
    ) -> Result<()> {
        let grace = self.settings.shutdown.grace;
        let stopped = async {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.run.timeout) => Stop::Deadline,
                _ = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(grace.saturating_sub(self.stop_budget())).await;
                } => Stop::Shutdown,
            }
        };
        // The source may run its listing on a task of its own, which dropping the run does not
        // stop: this token does, whichever way the run ends.
        let listing = CancellationToken::new();
        let _end_listing = listing.clone().drop_guard();
        let source: Arc<dyn IdentityProvider> = Arc::new(Cancellable {
            inner: identities,
            token: listing.clone(),
        });
        let mut session = None;
        let stop = tokio::select! {
            r = self.run_body(mode, report, wait, cancel, source, &mut session) => return r,
            stop = stopped => stop,
        };
        listing.cancel();
        Err(self.stop_run(stop, mode, report, session).await)
    }

    /// How long ending a stopped run may take (a second connection, ending the session,
    /// recording the run): 5 s, or half of `shutdown.grace` when that is shorter.
    fn stop_budget(&self) -> Duration {
        STOP_BUDGET.min(self.settings.shutdown.grace / 2)
    }

    async fn run_body(
        &self,
        mode: Mode,
        report: &mut RunReport,
        wait: Duration,
        cancel: &CancellationToken,
        source: Arc<dyn IdentityProvider>,
        session: &mut Option<Session>,
    ) -> Result<()> {
        // Validate the identity input before anything is written: a bad realm file must leave the
        // database untouched (C1). Nothing is written yet, so a shutdown stops it at once.
        tokio::select! {
            r = source.clone().preflight() => r?,
            _ = cancel.cancelled() => return Err(Error::Cancelled),
        }

        let db = store::connect_with_wait(&self.settings.database, wait, cancel).await?;
        // The backend's pid, so a run stopped at its deadline can be ended from another session.
        let pid: i32 = db
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(store::ctx("reading the session's backend pid"))?
            .get(0);
        let db = &mut session.insert(Session { db, pid }).db;
        if !lock::try_acquire(&db.client).await? {
            report.outcome = Outcome::Skipped;
            report.error = Some(
                "another run holds the run lock (a second replica or an overlapping tick)".into(),
            );
            if mode == Mode::Apply && store::table_exists(&db.client, "seed_runs").await? {
                runs::insert(
                    &db.client,
                    report.id,
                    &report.trigger,
                    Utc::now(),
                    "skipped",
                    &report.seed_digest,
                )
                .await?;
                runs::finish(
                    &db.client,
                    report.id,
                    "skipped",
                    &json!({}),
                    &json!([]),
                    report.error.as_deref(),
                )
                .await?;
            }
            return Ok(());
        }
        let result = self
            .units(mode, report, db, source, cancel)
            .await
            .map_err(|e| self.explain(e));
        let outcome_error = match &result {
            Ok(()) => {
                let blocking: Vec<String> = report
                    .units
                    .iter()
                    .flat_map(|u| u.blocking.iter().cloned())
                    .collect();
                if blocking.is_empty() {
                    report.outcome = Outcome::Succeeded;
                    None
                } else {
                    report.outcome = Outcome::Failed;
                    let msg = blocking.join("; ");
                    report.error = Some(msg.clone());
                    Some(msg)
                }
            }
            Err(e) => Some(e.to_string()),
        };
        if mode == Mode::Apply
            && store::table_exists(&db.client, "seed_runs")
                .await
                .unwrap_or(false)
        {
            let outcome = if result.is_err() {
                "failed"
            } else {
                report.outcome.as_str()
            };
            let finished = async {
                // The row may be missing when the schema unit itself failed.
                runs::insert_if_missing(
                    &db.client,
                    report.id,
                    &report.trigger,
                    &report.seed_digest,
                )
                .await?;
                runs::finish(
                    &db.client,
                    report.id,
                    outcome,
                    &report.counts_json(),
                    &report.findings_json(),
                    outcome_error.as_deref(),
                )
                .await?;
                runs::prune(&db.client, self.settings.evidence.retention).await
            }
            .await;
            if let Err(e) = finished {
                tracing::error!(run.id = %report.id, error = %e, "could not record the run in seed_runs");
            }
        }
        let _ = lock::release(&db.client).await;
        result
    }

    async fn units(
        &self,
        mode: Mode,
        report: &mut RunReport,
        db: &mut Db,
        source: Arc<dyn IdentityProvider>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        // schema
        let mut schema = UnitReport::new("schema");
        let pending = migrate::pending(&db.client, migrate::MIGRATIONS).await?;
        match mode {
            Mode::Plan => {
                for m in &pending {
                    schema.add_change(format!("apply migration {}", m.label()));
                }
                schema.bump("applied", pending.len() as i64);
                schema.bump(
                    "unchanged",
                    (migrate::MIGRATIONS.len() - pending.len()) as i64,
                );
                let blocked = !pending.is_empty();
                report.units.push(schema);
                if blocked {
                    // The other units compare against tables that do not exist yet.
                    for unit in ["reference_seed", "identities", "role_bindings", "tenants"] {
                        let mut u = UnitReport::new(unit);
                        u.add_change("everything (the schema is not applied yet)".into());
                        u.bump("inserted", 1);
                        report.units.push(u);
                    }
                    return Ok(());
                }
            }
            Mode::Apply => {
                let applied = migrate::run(
                    &mut db.client,
                    self.settings.schema.mode,
                    migrate::MIGRATIONS,
                )
                .instrument(tracing::info_span!("unit", unit = "schema"))
                .await;
                match applied {
                    Ok(r) => {
                        schema.bump("applied", r.applied.len() as i64);
                        schema.bump(
                            "unchanged",
                            (migrate::MIGRATIONS.len() - r.applied.len()) as i64,
                        );
                        report.units.push(schema);
                    }
                    Err(e) => {
                        schema.error = Some(e.to_string());
                        report.units.push(schema);
                        return Err(e);
                    }
                }
                runs::insert(
                    &db.client,
                    report.id,
                    &report.trigger,
                    Utc::now(),
                    "running",
                    &report.seed_digest,
                )
                .await?;
                let closed = runs::close_abandoned(&db.client, report.id).await?;
                if closed > 0 {
                    tracing::warn!(run.id = %report.id, closed, "closed runs left running by a process that died");
                }
            }
        }
        let _ = self.settings.schema.mode == SchemaMode::Apply;

        // Each unit in its own transaction; a failing unit does not stop the ones after it, whose
        // inputs are the database's committed state.
        let mut first_error: Option<Error> = None;
        for unit in ["reference_seed", "identities", "role_bindings", "tenants"] {
            // A shutdown does not cut the run short: the run in flight finishes within
            // shutdown.grace, or it is stopped and rolled back (see `run_inner`).
            let r = async {
                match unit {
                    "reference_seed" => self.unit_reference(db, mode).await,
                    "identities" => {
                        identities::reconcile(
                            &mut db.client,
                            source.clone(),
                            &self.settings,
                            mode,
                            cancel,
                        )
                        .await
                    }
                    "role_bindings" => self.unit_bindings(db, mode).await,
                    _ => self.unit_tenants(db, mode).await,
                }
            }
            .instrument(tracing::info_span!("unit", unit))
            .await;
            match r {
                Ok(u) => report.units.push(u),
                Err(e) => {
                    let e = self.explain(e);
                    let mut u = UnitReport::new(unit);
                    u.error = Some(e.to_string());
                    report.units.push(u);
                    let wrapped = match e {
                        Error::Database { context, message } => Error::Unit {
                            unit,
                            message: format!("{context}: {message}"),
                        },
                        other => other,
                    };
                    tracing::error!(unit, error = %wrapped, "unit failed");
                    first_error.get_or_insert(wrapped);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Ends a run stopped at its deadline or by a shutdown: its session is ended from a second
    /// connection (which rolls back its open transaction and releases the run lock at once, even
    /// while the server is blocked on a lock), and the run is recorded `failed`. Bounded by
    /// [`Engine::stop_budget`]; when that runs out, or no second connection can be made, the
    /// session ends when the server notices the closed connection, bounded by
    /// `database.lock_timeout` and `database.statement_timeout`.
    async fn stop_run(
        &self,
        stop: Stop,
        mode: Mode,
        report: &mut RunReport,
        session: Option<Session>,
    ) -> Error {
        const ORDER: [&str; 5] = [
            "schema",
            "reference_seed",
            "identities",
            "role_bindings",
            "tenants",
        ];
        let at = match (&session, ORDER.get(report.units.len())) {
            (None, _) => "before its database session was open (Keycloak preflight or waiting for PostgreSQL)".to_string(),
            (Some(_), Some(unit)) => format!("in unit {unit}"),
            (Some(_), None) => "while recording its outcome".to_string(),
        };
        let (error, message) = match stop {
            Stop::Deadline => {
                let m = format!(
                    "run.timeout ({}) exceeded {at}: the run was cancelled and rolled back. Look for what held it up (a lock another session holds: pg_locks; a slow Keycloak: the warnings before this), or raise run.timeout (SEEDKEEPER_RUN__TIMEOUT) if runs are this long",
                    duration_str::format(&self.settings.run.timeout)
                );
                (Error::Timeout(m.clone()), m)
            }
            Stop::Shutdown => (
                Error::Cancelled,
                format!(
                    "shutdown: the run was still going {at} near the end of shutdown.grace ({}), so it was cancelled and rolled back; the next run converges",
                    duration_str::format(&self.settings.shutdown.grace)
                ),
            ),
        };
        tracing::error!(run.id = %report.id, error = %message, "stopping the run");
        if let Some(Session { db, pid }) = session {
            let ended = tokio::time::timeout(
                self.stop_budget(),
                self.end_session(db, pid, mode, report, &message),
            )
            .await;
            let problem = match ended {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "no answer within {}",
                    duration_str::format(&self.stop_budget())
                )),
            };
            if let Some(p) = problem {
                tracing::error!(run.id = %report.id, error = %p, "could not end the stopped run's session and record it; PostgreSQL ends the session when it notices the closed connection (database.lock_timeout and database.statement_timeout bound the wait), and the next run closes its seed_runs row");
            }
        }
        error
    }

    async fn end_session(
        &self,
        db: Db,
        pid: i32,
        mode: Mode,
        report: &RunReport,
        message: &str,
    ) -> Result<()> {
        let side = store::connect(&self.settings.database).await?;
        side.client
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .map_err(store::ctx("ending the stopped run's session"))?;
        drop(db);
        loop {
            let gone: bool = side
                .client
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                    &[&pid],
                )
                .await
                .map_err(store::ctx("waiting for the stopped run's session to end"))?
                .get(0);
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if mode == Mode::Apply && store::table_exists(&side.client, "seed_runs").await? {
            runs::insert_if_missing(
                &side.client,
                report.id,
                &report.trigger,
                &report.seed_digest,
            )
            .await?;
            runs::finish(
                &side.client,
                report.id,
                "failed",
                &report.counts_json(),
                &report.findings_json(),
                Some(message),
            )
            .await?;
        }
        Ok(())
    }

    /// Names the key behind a PostgreSQL timeout: `database.lock_timeout` (SQLSTATE 55P03) or
    /// `database.statement_timeout` (57014 "statement timeout").
    fn explain(&self, e: Error) -> Error {
        let hint = |message: &str| -> Option<String> {
            if message.contains("database.lock_timeout")
                || message.contains("database.statement_timeout")
            {
                None
            } else if message.contains("SQLSTATE 55P03") {
                Some(format!(
                    " [database.lock_timeout ({}) ran out waiting for a lock another session holds: find it in pg_locks and pg_stat_activity; the next run retries. SEEDKEEPER_DATABASE__LOCK_TIMEOUT]",
                    duration_str::format(&self.settings.database.lock_timeout)
                ))
            } else if message.contains("statement timeout") && message.contains("SQLSTATE 57014") {
                Some(format!(
                    " [database.statement_timeout ({}) ran out: one statement took longer (the identities COPY lasts as long as the Keycloak listing). SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT]",
                    duration_str::format(&self.settings.database.statement_timeout)
                ))
            } else {
                None
            }
        };
        match e {
            Error::Database { context, message } => {
                let message = match hint(&message) {
                    Some(h) => message + &h,
                    None => message,
                };
                Error::Database { context, message }
            }
            Error::Unit { unit, message } => {
                let message = match hint(&message) {
                    Some(h) => message + &h,
                    None => message,
                };
                Error::Unit { unit, message }
            }
            other => other,
        }
    }

    async fn unit_reference(&self, db: &mut Db, mode: Mode) -> Result<UnitReport> {
        let tx = begin(&mut db.client, mode).await?;
        let r = reference::reconcile(&tx, &self.seed, mode).await?;
        finish(tx, mode).await?;
        Ok(r)
    }

    async fn unit_bindings(&self, db: &mut Db, mode: Mode) -> Result<UnitReport> {
        let tx = begin(&mut db.client, mode).await?;
        let r = bindings::reconcile(&tx, &self.settings.identity, mode).await?;
        finish(tx, mode).await?;
        Ok(r)
    }

    async fn unit_tenants(&self, db: &mut Db, mode: Mode) -> Result<UnitReport> {
        let tx = begin(&mut db.client, mode).await?;
        let r = tenants::reconcile(&tx, mode).await?;
        finish(tx, mode).await?;
        Ok(r)
    }
}

/// How long ending a stopped run may take at most (see [`Engine::stop_run`]).
pub const STOP_BUDGET: Duration = Duration::from_secs(5);

/// Why a run was stopped before it ended.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Deadline,
    Shutdown,
}

/// The database session of a run, and its backend's pid to end it from another session.
struct Session {
    db: Db,
    pid: i32,
}

/// The identity source of one run: its preflight and listing end when the run ends, even when
/// the listing runs on a task of its own (the in-flight request and any retry sleep are dropped).
struct Cancellable {
    inner: Arc<dyn IdentityProvider>,
    token: CancellationToken,
}

impl IdentityProvider for Cancellable {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn complete(&self) -> bool {
        self.inner.complete()
    }

    fn preflight(self: Arc<Self>) -> BoxFuture<'static, Result<()>> {
        let work = self.inner.clone().preflight();
        Box::pin(async move {
            tokio::select! {
                r = work => r,
                _ = self.token.cancelled() => Err(Error::Cancelled),
            }
        })
    }

    fn stream(
        self: Arc<Self>,
        out: tokio::sync::mpsc::Sender<Vec<Identity>>,
    ) -> BoxFuture<'static, Result<SourceStats>> {
        let work = self.inner.clone().stream(out);
        Box::pin(async move {
            tokio::select! {
                r = work => r,
                _ = self.token.cancelled() => Err(Error::Cancelled),
            }
        })
    }
}

/// Apply: a read-write transaction. Plan: read only, so a plan cannot write by construction.
pub async fn begin(
    client: &mut tokio_postgres::Client,
    mode: Mode,
) -> Result<tokio_postgres::Transaction<'_>> {
    let mut b = client.build_transaction();
    if mode == Mode::Plan {
        b = b.read_only(true);
    }
    b.start()
        .await
        .map_err(store::ctx("starting a transaction"))
}

pub async fn finish(tx: tokio_postgres::Transaction<'_>, mode: Mode) -> Result<()> {
    match mode {
        Mode::Apply => tx.commit().await.map_err(store::ctx("committing")),
        Mode::Plan => tx.rollback().await.map_err(store::ctx("ending a plan")),
    }
}
