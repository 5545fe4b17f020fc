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
//! request in flight, a retry sleep, a statement waiting for a lock), the statement in flight is
//! cancelled through its own connection (a cancel request, which a pooler forwards to the backend
//! that runs it) and its transaction rolled back, the run is recorded `failed` with an error
//! naming the key, and the run lock is given back. A shutdown cuts a run short the same way when
//! it would outlast `shutdown.grace`, and so does losing the run lock (another run may take it).
//! Reads `schema.mode`, `run.timeout`, `shutdown.grace`, `identity.*`, `evidence.retention`.

pub(crate) mod bindings;
pub(crate) mod identities;
pub(crate) mod reference;
pub(crate) mod tenants;

/// The vocabulary of a run ([`crate::model`]), where the engine's callers have always found it.
pub use crate::model::{
    Action, Count, FindingKind, Mode, Outcome, RunReport, Scope, Tally, Trigger, Unit, UnitReport,
    FINDINGS_PER_KIND,
};
#[cfg(feature = "testing")]
pub use crate::model::{Counts, Finding};

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::{duration_str, Settings};
use crate::error::{Error, Result};
use crate::identity::{BoxFuture, IdentityProvider, SourceStats};
use crate::progress::{self, Progress, Reporter};
use crate::seed::ReferenceSeed;
use crate::store::lock::{self, RunLock};
use crate::store::{self, migrate, runs, Db};

/// Everything a run needs, built once.
pub struct Engine {
    pub settings: Settings,
    pub seed: ReferenceSeed,
    pub identities: std::sync::Arc<dyn IdentityProvider>,
    /// How a run shows its progress: log lines unless a command on a terminal asks for bars.
    pub progress: progress::Display,
    /// Whether an apply lists every row it writes in its report, as a plan always does (up to
    /// [`crate::model::CHANGES_LISTED`] per unit); off in the daemon, whose runs report counts.
    pub list_changes: bool,
    /// `--allow-offboard N`: let exactly N users be offboarded by this run, whatever
    /// `identity.offboard_limit` says; any other number offboards nobody and fails the run.
    pub allow_offboard: Option<i64>,
}

impl Engine {
    /// One run of `identities` (the configured source, or the users of an event batch,
    /// [`crate::identity::FetchedBatch`]) through the units: connect (waiting up to `wait`), lock,
    /// units in order, evidence. The daemon and the commands start runs through
    /// [`crate::gate::RunGate`], which owns the overlap guard; tests of the units call this.
    pub async fn run(
        &self,
        mode: Mode,
        trigger: Trigger,
        wait: Duration,
        cancel: &CancellationToken,
        identities: Arc<dyn IdentityProvider>,
    ) -> RunReport {
        let started = Instant::now();
        let mut report = RunReport::new(trigger, mode, self.seed.digest.clone());
        // Every line of the run, the source's included, carries the run's id and trigger.
        let trigger = trigger.as_str();
        let span =
            tracing::info_span!("run", run.id = %report.id, trigger, mode = report.mode.as_str());
        let progress = Progress::new();
        let reporter = span.in_scope(|| {
            tracing::info!(run.id = %report.id, trigger, mode = report.mode.as_str(), "seeding_started");
            let every = self.settings.progress_interval;
            Reporter::start(self.progress, progress.clone(), Some(report.id), every)
        });
        let result = self
            .run_bounded(mode, &mut report, wait, cancel, identities, &progress)
            .instrument(span.clone())
            .await;
        // The bars are cleared before the run's last line and what the command prints next.
        reporter.finish().await;
        if let Err(e) = result {
            report.fail(self.explain(e));
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        let counts = report.counts_json();
        let error = report.error.as_ref().map(ToString::to_string);
        // No await from here on: the span can be entered.
        let _in_run = span.enter();
        match report.outcome {
            Outcome::Failed => tracing::error!(
                run.id = %report.id, trigger, outcome = report.outcome.as_str(), duration_ms = report.duration_ms,
                counts = %counts, error = error.as_deref().unwrap_or(""), "seeding_completed"
            ),
            _ => tracing::info!(
                run.id = %report.id, trigger, outcome = report.outcome.as_str(), duration_ms = report.duration_ms,
                counts = %counts, "seeding_completed"
            ),
        }
        report
    }

    /// The run under its deadline: [`Engine::run_locked`], stopped by `run.timeout` or by a
    /// shutdown that would outlast `shutdown.grace`.
    async fn run_bounded(
        &self,
        mode: Mode,
        report: &mut RunReport,
        wait: Duration,
        cancel: &CancellationToken,
        identities: Arc<dyn IdentityProvider>,
        progress: &Progress,
    ) -> Result<()> {
        let grace = self.settings.shutdown.grace;
        // Fired when the run lock's connection ends while the run holds it.
        let lock_lost = CancellationToken::new();
        let stopped = async {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.run.timeout) => Stop::Deadline,
                _ = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(grace.saturating_sub(self.stop_budget())).await;
                } => Stop::Shutdown,
                _ = lock_lost.cancelled() => Stop::LockLost,
            }
        };
        // The source may run its listing on a task of its own, which dropping the run does not
        // stop: this token does, whichever way the run ends.
        let listing = CancellationToken::new();
        let _end_listing = listing.clone().drop_guard();
        let source: Arc<dyn IdentityProvider> = Arc::new(Cancellable(identities));
        let mut session = None;
        let body = self.run_locked(
            mode,
            report,
            wait,
            cancel,
            RunInputs {
                provider: source,
                listing: &listing,
                progress,
                lock_lost: &lock_lost,
                started: std::sync::Mutex::new(None),
            },
            &mut session,
        );
        let stop = tokio::select! {
            r = body => return r,
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

    /// The run itself: the identity input checked, the session opened, the run lock taken (or
    /// the run skipped, or the lock waited for), the units, the evidence, the lock given back.
    async fn run_locked(
        &self,
        mode: Mode,
        report: &mut RunReport,
        wait: Duration,
        cancel: &CancellationToken,
        source: RunInputs<'_>,
        session: &mut Option<Session>,
    ) -> Result<()> {
        // Validate the identity input before anything is written: a bad realm file must leave the
        // database untouched. Nothing is written yet, so a shutdown stops it at once.
        tokio::select! {
            r = source.provider.clone().preflight(source.listing.clone()) => r?,
            _ = cancel.cancelled() => return Err(Error::Cancelled),
        }

        let db = store::connect_with_wait(&self.settings.database, wait, cancel).await?;
        store::warn_unless_session_timeouts(&db.client, &self.settings.database).await;
        let session = session.insert(Session { db, lock: None });
        let lock = match RunLock::try_take(&self.settings.database).await? {
            Some(lock) => lock,
            None if !report.trigger.waits_for_the_run_lock() => {
                return self.skip_locked_out(mode, report, &session.db).await;
            }
            None => {
                self.wait_for_the_run_lock(mode, report, &session.db, cancel)
                    .await?
            }
        };
        // `run_bounded` stops the run when it fires.
        lock.cancel_on_loss(source.lock_lost.clone());
        session.lock = Some(lock);
        // A source that must be listed to be known (Keycloak) starts its listing now, beside the
        // schema and reference seed units; a realm file is read by the identities unit only when
        // its fingerprint says it must be.
        if source.provider.fingerprint().is_none() {
            let span = tracing::info_span!("unit", unit = Unit::Identities.as_str());
            let controls = source.listing_controls();
            let listing = identities::Listing::start(source.provider.clone(), controls, span);
            if let Ok(mut started) = source.started.lock() {
                *started = Some(listing);
            }
        }
        let db = &mut session.db;
        let result = match mode {
            Mode::Apply => self.units(mode, report, &mut db.client, &source).await,
            // A plan runs the apply's own statements in one transaction that is always rolled
            // back: each unit sees what the units before it would have written, and what it
            // lists is what the apply would write, by construction.
            Mode::Plan => {
                let mut outer = db
                    .client
                    .transaction()
                    .await
                    .map_err(store::db_error("starting the plan's transaction"))?;
                let planned = self.units(mode, report, &mut outer, &source).await;
                outer
                    .rollback()
                    .await
                    .map_err(store::db_error("rolling back the plan"))?;
                planned
            }
        }
        .map_err(|e| self.explain_for(e, mode));
        let error = match &result {
            Ok(()) => {
                report.settle();
                report.error.as_ref().map(ToString::to_string)
            }
            Err(e) => Some(e.to_string()),
        };
        if mode == Mode::Apply {
            let outcome = match result {
                Ok(()) => report.outcome,
                Err(_) => Outcome::Failed,
            };
            self.record(db, report, outcome, error.as_deref()).await;
        }
        if let Some(lock) = session.lock.take() {
            if let Err(e) = lock.release().await {
                tracing::warn!(run.id = %report.id, error = %e, "could not commit the run lock's transaction; closing its connection released the lock");
            }
        }
        result
    }

    /// A run that could not take the run lock: skipped, and recorded so when the schema exists.
    async fn skip_locked_out(&self, mode: Mode, report: &mut RunReport, db: &Db) -> Result<()> {
        report.outcome = Outcome::Skipped;
        let why = SKIPPED_LOCKED_OUT;
        if mode == Mode::Apply && store::table_exists(&db.client, "seed_runs").await? {
            let (id, trigger, digest) = (report.id, report.trigger.as_str(), &report.seed_digest);
            runs::insert(&db.client, id, trigger, Utc::now(), "skipped", digest).await?;
            runs::finish(&db.client, id, "skipped", &json!({}), &json!([]), Some(why)).await?;
        }
        Ok(())
    }

    /// A run that must not be skipped (`--once`) and found the run lock held: waits for it up to
    /// `startup.wait_timeout`. When the wait ends without it, the run is recorded `failed` naming
    /// the session that holds it (and nothing else is written); a shutdown ends the wait at once,
    /// before anything is written.
    async fn wait_for_the_run_lock(
        &self,
        mode: Mode,
        report: &RunReport,
        db: &Db,
        cancel: &CancellationToken,
    ) -> Result<RunLock> {
        let wait = self.settings.startup.wait_timeout;
        // Named now for the operator watching the log; named again if the wait runs out.
        let holder = lock::holder(&db.client).await?;
        let holder = holder.map_or_else(
            || "a session that has just let it go".into(),
            |h| h.to_string(),
        );
        tracing::warn!(run.id = %report.id, holder = %holder, wait = %duration_str::format(&wait), "the run lock is held by another session: waiting for it (startup.wait_timeout)");
        let started = Instant::now();
        match RunLock::acquire_within(&self.settings.database, wait, cancel).await {
            Ok(lock) => {
                let waited_ms = started.elapsed().as_millis() as u64;
                tracing::info!(run.id = %report.id, waited_ms, "run lock taken");
                Ok(lock)
            }
            Err(e @ Error::RunLockHeld { .. }) => {
                // Only its own row: pruning is left to the run that holds the lock.
                if mode == Mode::Apply {
                    let error = e.to_string();
                    let recorded =
                        close_run_row(&db.client, report, Outcome::Failed, Some(&error)).await;
                    if let Err(why) = recorded {
                        tracing::error!(run.id = %report.id, error = %why, "could not record the run in seed_runs");
                    }
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Closes the run's `seed_runs` row and prunes old rows. A failure here is logged: the
    /// run's own outcome stands.
    async fn record(&self, db: &Db, report: &RunReport, outcome: Outcome, error: Option<&str>) {
        let finished = async {
            if close_run_row(&db.client, report, outcome, error).await? {
                runs::prune(&db.client, self.settings.evidence.retention).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = finished {
            tracing::error!(run.id = %report.id, error = %e, "could not record the run in seed_runs");
        }
    }

    /// The units in order, each in a transaction of its own opened on `base`: the session
    /// (apply: each unit commits with its counts in the run's `seed_runs` row, so a committed
    /// write is never missing from the evidence) or the plan's outer transaction (a savepoint
    /// each, released, and everything rolled back at the end). A failing unit does not stop the
    /// ones after it, except `schema` (the others compare against its tables) and an
    /// `--allow-offboard` that does not match. A shutdown does not cut a unit short: the run in
    /// flight finishes within `shutdown.grace`, or it is stopped and rolled back (see `run_bounded`).
    async fn units<C: GenericClient + Send + Sync>(
        &self,
        mode: Mode,
        report: &mut RunReport,
        base: &mut C,
        source: &RunInputs<'_>,
    ) -> Result<()> {
        source.progress.enter(Unit::Schema);
        let span = tracing::info_span!("unit", unit = Unit::Schema.as_str());
        match self.unit_schema(base).instrument(span).await {
            Ok(u) => report.units.push(self.listed(u, mode)),
            Err(e) => {
                report.units.push(UnitReport::failed(Unit::Schema, &e));
                return Err(e);
            }
        }
        if mode == Mode::Apply {
            self.open_run_row(base.client(), report).await?;
        }
        let mut first_error: Option<Error> = None;
        for &unit in &Unit::ALL[1..] {
            source.progress.enter(unit);
            let span = tracing::info_span!("unit", unit = unit.as_str());
            let run = (mode == Mode::Apply).then_some(report.id);
            let result = self
                .unit_in_transaction(unit, mode, base, source, run)
                .instrument(span)
                .await;
            match result {
                Ok(u) => report.units.push(self.listed(u, mode)),
                Err(e @ Error::OffboardMismatch { .. }) => {
                    report.units.push(UnitReport::failed(unit, &e));
                    return Err(e);
                }
                Err(e) => {
                    let e = self.explain_for(e, mode);
                    report.units.push(UnitReport::failed(unit, &e));
                    let e = in_unit(e, unit);
                    tracing::error!(unit = unit.as_str(), error = %e, "unit failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether the run lists its changes one by one: a plan always, an apply when asked.
    fn lists_changes(&self, mode: Mode) -> bool {
        self.list_changes || mode == Mode::Plan
    }

    /// How many of a unit's changes each statement lists: every one (up to
    /// [`crate::model::CHANGES_LISTED`]) in a plan or when asked; else the findings' sample.
    fn list_limit(&self, mode: Mode) -> i64 {
        if self.lists_changes(mode) {
            crate::model::CHANGES_LISTED as i64
        } else {
            FINDINGS_PER_KIND as i64
        }
    }

    /// A unit's report as the run keeps it: without its list of changes when the run does not
    /// list them (the daemon's runs: counts and findings are their evidence).
    fn listed(&self, mut u: UnitReport, mode: Mode) -> UnitReport {
        if !self.lists_changes(mode) {
            u.changes = Vec::new();
            u.changes_unlisted = 0;
        }
        u
    }

    /// One unit after `schema`, in its own transaction: committed with its counts in `seed_runs`
    /// (`run`, apply), or released into the plan's outer transaction.
    async fn unit_in_transaction<C: GenericClient + Send + Sync>(
        &self,
        unit: Unit,
        mode: Mode,
        base: &mut C,
        source: &RunInputs<'_>,
        run: Option<Uuid>,
    ) -> Result<UnitReport> {
        let tx = base
            .transaction()
            .await
            .map_err(store::db_error("starting a transaction"))?;
        if matches!(unit, Unit::Identities | Unit::RoleBindings | Unit::Tenants) {
            no_jit(&tx).await?;
        }
        let listed = self.list_limit(mode);
        let report = match unit {
            // Never here: the schema unit runs on the session itself (see `units`).
            Unit::Schema => UnitReport::new(Unit::Schema),
            Unit::ReferenceSeed => reference::reconcile(&tx, &self.seed, listed).await?,
            Unit::Identities => {
                let listing = source.listing_controls();
                let rules = identities::Rules {
                    settings: &self.settings,
                    allow_offboard: self.allow_offboard,
                    listed,
                    record: mode == Mode::Apply,
                };
                identities::reconcile(&tx, source.provider.clone(), listing, rules).await?
            }
            Unit::RoleBindings => {
                let scope = Scope::of(&tx, source.provider.batch()).await?;
                let record = mode == Mode::Apply;
                bindings::reconcile(&tx, &self.settings.identity, &scope, listed, record).await?
            }
            Unit::Tenants => {
                let scope = Scope::of(&tx, source.provider.batch()).await?;
                tenants::reconcile(&tx, &scope, listed, mode == Mode::Apply).await?
            }
        };
        if let Some(id) = run {
            runs::record_unit(&tx, id, &report).await?;
        }
        tx.commit().await.map_err(store::db_error("committing"))?;
        Ok(report)
    }

    /// Unit `schema`: the pending migrations applied (in a plan too: inside the plan's outer
    /// transaction, so the units after it compare against the schema the apply would have).
    async fn unit_schema<C: GenericClient + Send + Sync>(
        &self,
        base: &mut C,
    ) -> Result<UnitReport> {
        let mut report = UnitReport::new(Unit::Schema);
        let schema_mode = self.settings.schema.mode;
        let done = migrate::run(base, schema_mode, migrate::MIGRATIONS).await?;
        let applied = done.applied.len();
        let listed = done.applied.iter().map(|m| format!("migration:{m}"));
        report.add_changes("apply", applied as i64, listed);
        // In apply mode the schema is seedkeeper's: an object of an applied migration dropped
        // since (a column a revocation reads, a unique index) is re-created before any unit
        // relies on it, and said so. In verify mode the check names it and the repair.
        let target = self.settings.database.target();
        if schema_mode == crate::config::SchemaMode::Apply {
            store::server::ensure_writable(&*base, &target).await?;
            // The repair starts with the check's own catalog query and does nothing when nothing
            // is missing; only what it re-created is checked again.
            let repaired = store::schema_check::repair(base).await?;
            for statement in &repaired {
                tracing::warn!(statement = %statement, "a schema object of an applied migration was missing: re-created");
                let detail = format!(
                    "missing, though its migration is recorded: re-created with `{statement}`"
                );
                report.find(FindingKind::DriftCorrected, "schema", detail);
                report.add_change("repair", format!("schema:{statement}"));
            }
            report.bump(Tally::Drift, repaired.len() as i64);
            report.bump(Action::Applied, repaired.len() as i64);
            if !repaired.is_empty() {
                store::schema_check::check(base, &target, false).await?;
            }
        } else {
            store::schema_check::check(base, &target, true).await?;
        }
        report.bump(Action::Applied, applied as i64);
        let unchanged = migrate::MIGRATIONS.len() - applied;
        report.bump(Tally::Unchanged, unchanged as i64);
        Ok(report)
    }

    /// Apply, once the schema is there: the run's `seed_runs` row with the schema unit's counts,
    /// and closing rows a process that died left `running`.
    async fn open_run_row(
        &self,
        client: &tokio_postgres::Client,
        report: &RunReport,
    ) -> Result<()> {
        let (id, trigger, digest) = (report.id, report.trigger.as_str(), &report.seed_digest);
        runs::insert(client, id, trigger, Utc::now(), "running", digest).await?;
        if let Some(schema) = report.unit(Unit::Schema) {
            runs::record_unit(client, id, schema).await?;
        }
        let closed = runs::close_abandoned(client, id).await?;
        if closed > 0 {
            tracing::warn!(run.id = %id, closed, "closed runs left running by a process that died");
        }
        Ok(())
    }

    /// Ends a run stopped at its deadline, by a shutdown or by losing the run lock: see
    /// [`Engine::end_session`]. Bounded by [`Engine::stop_budget`]; when that runs out, both
    /// connections are dropped, and the server ends the session when it notices, bounded by
    /// `database.lock_timeout` and `database.statement_timeout`.
    async fn stop_run(
        &self,
        stop: Stop,
        mode: Mode,
        report: &mut RunReport,
        session: Option<Session>,
    ) -> Error {
        let at = match (&session, Unit::ALL.get(report.units.len())) {
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
            Stop::LockLost => {
                let m = format!(
                    "the run lost the run lock {at}: the connection holding it ended (the server restarted, an operator or a pooler closed it, or a timeout of the role such as transaction_timeout ended its transaction), so the run was cancelled and rolled back rather than go on beside a run that may take the lock; the next run converges"
                );
                (Error::Database(crate::error::DbFailure {
                    context: "holding the run lock".into(),
                    code: None,
                    message: m.clone(),
                    hint: None,
                }), m)
            }
        };
        tracing::error!(run.id = %report.id, error = %message, "stopping the run");
        if let Some(session) = session {
            let ended = tokio::time::timeout(
                self.stop_budget(),
                self.end_session(session, mode, report, &message),
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

    /// Ends a stopped run's session through its own connection, never by a backend pid (behind a
    /// pooler that pid may serve another client by now): a cancel request for the statement in
    /// flight (a pooler forwards it to the backend running it), a rollback of its transaction
    /// (answered once the cancelled statement has ended), the run recorded `failed`, the
    /// connection closed and the run lock given back. A rollback that does not answer within half
    /// the budget leaves the connection to be dropped; `statement_timeout` bounds the rest.
    async fn end_session(
        &self,
        session: Session,
        mode: Mode,
        report: &RunReport,
        message: &str,
    ) -> Result<()> {
        let Session { db, lock } = session;
        // Undelivered (the network gone), the rollback below waits for the statement instead,
        // within its bound.
        let cancelled = tokio::time::timeout(
            self.stop_budget() / 4,
            store::cancel::cancel_statement(&db.client, &self.settings.database),
        )
        .await;
        match cancelled {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(run.id = %report.id, error = %e, "could not cancel the stopped run's statement")
            }
            Err(_) => {
                tracing::warn!(run.id = %report.id, "the cancel request for the stopped run's statement was not answered in time")
            }
        }
        // A ROLLBACK outside a transaction only draws a warning.
        let rolled_back =
            tokio::time::timeout(self.stop_budget() / 2, db.client.batch_execute("ROLLBACK")).await;
        let db_usable = matches!(rolled_back, Ok(Ok(())));
        let budget = self.stop_budget() / 4;
        // A lost lock has no connection left to record on, nor a lock to give back.
        let lock = lock.filter(RunLock::is_held);
        let recorded = if mode != Mode::Apply {
            Ok(())
        } else if let Some(lock) = &lock {
            // Inside the lock's transaction: committed with its release, under the lock.
            close_run_row(lock.client(), report, Outcome::Failed, Some(message))
                .await
                .map(|_| ())
        } else if db_usable {
            close_run_row(&db.client, report, Outcome::Failed, Some(message))
                .await
                .map(|_| ())
        } else {
            Ok(())
        };
        db.close(budget).await;
        if let Some(lock) = lock {
            lock.release().await?;
        }
        recorded
    }

    /// Names the key behind a PostgreSQL timeout, by its SQLSTATE: `database.lock_timeout`
    /// (55P03 lock_not_available) or `database.statement_timeout` (57014 query_canceled; the only
    /// statements seedkeeper cancels itself are those of a run it stops, which end as a deadline
    /// or a shutdown, not as this error; an operator's pg_cancel_backend shares the code, which
    /// the hint says). Added once, however many layers explain the error.
    fn explain(&self, mut e: Error) -> Error {
        if let Error::Database(f) | Error::Unit { failure: f, .. } = &mut e {
            if f.hint.is_none() {
                f.hint = self.timeout_hint(f.code.as_ref());
            }
        }
        e
    }

    /// [`Engine::explain`], and in a plan, a refused privilege says why a plan needs it.
    fn explain_for(&self, e: Error, mode: Mode) -> Error {
        let mut e = self.explain(e);
        if mode == Mode::Plan {
            if let Error::Database(f) | Error::Unit { failure: f, .. } = &mut e {
                if f.code.as_ref() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) && f.hint.is_none() {
                    f.hint = Some("plan runs the apply's own statements in a transaction it always rolls back, so its role needs the privileges of a run (docs/configuration.md, the database role it needs); it commits nothing".into());
                }
            }
        }
        e
    }

    fn timeout_hint(&self, code: Option<&SqlState>) -> Option<String> {
        let db = &self.settings.database;
        match code? {
            c if *c == SqlState::LOCK_NOT_AVAILABLE => Some(format!(
                "database.lock_timeout ({}) ran out waiting for a lock another session holds: find it in pg_locks and pg_stat_activity; the next run retries. SEEDKEEPER_DATABASE__LOCK_TIMEOUT",
                duration_str::format(&db.lock_timeout)
            )),
            c if *c == SqlState::QUERY_CANCELED => Some(format!(
                "database.statement_timeout ({}) ran out: one statement took longer (the identities COPY lasts as long as the Keycloak listing). SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT. (The same SQLSTATE, 57014, is a statement cancelled from another session with pg_cancel_backend.)",
                duration_str::format(&db.statement_timeout)
            )),
            _ => None,
        }
    }
}

/// Closes a run's `seed_runs` row, inserting it when the schema unit itself failed before the
/// row was opened. `false` when there is no `seed_runs` table to record in (no schema yet).
async fn close_run_row(
    client: &tokio_postgres::Client,
    report: &RunReport,
    outcome: Outcome,
    error: Option<&str>,
) -> Result<bool> {
    if !store::table_exists(client, "seed_runs").await? {
        return Ok(false);
    }
    let (id, trigger, digest) = (report.id, report.trigger.as_str(), &report.seed_digest);
    runs::insert_if_missing(client, id, trigger, digest).await?;
    let (counts, findings) = (report.counts_json(), report.findings_json());
    runs::finish(client, id, outcome.as_str(), &counts, &findings, error).await?;
    Ok(true)
}

/// A unit's database error, named by its unit (the other errors name their input already).
fn in_unit(e: Error, unit: Unit) -> Error {
    match e {
        Error::Database(failure) => Error::Unit {
            unit: unit.as_str(),
            failure,
        },
        other => other,
    }
}

/// Why a run was skipped: the text its `seed_runs` row holds, and `--once` would say.
pub(crate) const SKIPPED_LOCKED_OUT: &str =
    "another run holds the run lock (a second replica or an overlapping tick)";

/// How long ending a stopped run may take at most (see [`Engine::stop_run`]).
pub(crate) const STOP_BUDGET: Duration = Duration::from_secs(5);

/// Why a run was stopped before it ended.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Deadline,
    Shutdown,
    /// The run lock's connection ended while the run held it.
    LockLost,
}

/// The database session of a run, and the run lock once taken (its own connection, see
/// [`crate::store::lock`]).
struct Session {
    db: Db,
    lock: Option<RunLock>,
}

/// What the units of one run are given besides the database: the identity source of the run,
/// the token that ends its calls when the run ends, the run's progress counters, and the token
/// that stops the run when it loses the run lock.
struct RunInputs<'a> {
    provider: Arc<dyn IdentityProvider>,
    listing: &'a CancellationToken,
    progress: &'a Progress,
    lock_lost: &'a CancellationToken,
    /// The listing when the run started it ahead of the identities unit.
    started: std::sync::Mutex<Option<identities::Listing>>,
}

impl RunInputs<'_> {
    fn listing_controls(&self) -> identities::ListingControls<'_> {
        identities::ListingControls {
            cancel: self.listing,
            progress: self.progress,
            started: &self.started,
        }
    }
}

/// A source whose calls end as soon as their token fires, even when the listing runs on a task
/// of its own: a request in flight is dropped, and any retry wait ends (the source also gets the
/// token).
struct Cancellable(Arc<dyn IdentityProvider>);

impl IdentityProvider for Cancellable {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn batch(&self) -> Option<Vec<String>> {
        self.0.batch()
    }

    fn gone(&self) -> Vec<String> {
        self.0.gone()
    }

    fn unique_keys(&self) -> crate::identity::UniqueKeys {
        self.0.unique_keys()
    }

    fn refuse_duplicates(&self, found: Vec<crate::identity::Duplicate>, total: u64) -> Error {
        self.0.refuse_duplicates(found, total)
    }

    fn fingerprint(&self) -> Option<crate::identity::Fingerprint> {
        self.0.fingerprint()
    }

    fn preflight(self: Arc<Self>, cancel: CancellationToken) -> BoxFuture<'static, Result<()>> {
        let work = self.0.clone().preflight(cancel.clone());
        Box::pin(async move {
            tokio::select! {
                r = work => r,
                _ = cancel.cancelled() => Err(Error::Cancelled),
            }
        })
    }

    fn stream(
        self: Arc<Self>,
        out: crate::identity::StageSender,
        cancel: CancellationToken,
        progress: Progress,
    ) -> BoxFuture<'static, Result<SourceStats>> {
        let work = self.0.clone().stream(out, cancel.clone(), progress);
        Box::pin(async move {
            tokio::select! {
                r = work => r,
                _ = cancel.cancelled() => Err(Error::Cancelled),
            }
        })
    }
}

/// The row of `digest_sql` (`params` its parameters, its first column the digest of `unit`'s
/// inputs) when the state the latest run recorded for `unit` (its entry in
/// `seed_runs.unit_states`) is `prefix` then that digest; `None` when nothing is recorded, the
/// prefix differs (then the digest is not read) or the digest does. `context` names the read.
///
/// A unit records a state only when it ends settled: nothing left to change, nothing to report,
/// and what it compared read in one snapshot with the digest it records. The same inputs over
/// rows with the same digest would then change nothing again, so a run that gets the row here
/// skips the row-by-row comparison (docs/seeding.md, "what a settled run skips"), and says so
/// at debug. Digests are sums of 64-bit row hashes (`hash_record_extended`) with the row count:
/// equal for different rows by a chance of about 2^-64.
pub(crate) async fn settled_row(
    tx: &tokio_postgres::Transaction<'_>,
    unit: Unit,
    prefix: &str,
    (digest_sql, params): (&str, &[(&(dyn tokio_postgres::types::ToSql + Sync), tokio_postgres::types::Type)]),
    context: &'static str,
) -> Result<Option<tokio_postgres::Row>> {
    let recorded = runs::recorded_state(tx, unit.as_str()).await?;
    let Some(expected) = recorded.as_deref().and_then(|r| r.strip_prefix(prefix)) else {
        return Ok(None);
    };
    let row = tx
        .query_typed_one(digest_sql, params)
        .await
        .map_err(store::db_error(context))?;
    if row.get::<_, &str>(0) != expected {
        return Ok(None);
    }
    tracing::debug!(
        unit = unit.as_str(),
        "unit_settled: inputs as the last settled run recorded them, not compared row by row"
    );
    Ok(Some(row))
}

/// A whole-table digest ([`settled_row`]'s: per table its row count and the sum of its rows'
/// hashes, separated by spaces) with rows added: `added[i]` the rows added to the i-th table
/// and what they added to its sum (hashes of rows written less those of rows they replaced).
/// `None` when `digest` is not a list of as many tables.
pub(crate) fn digest_with(digest: &str, added: &[(i64, i128)]) -> Option<String> {
    let parts: Vec<&str> = digest.split(' ').collect();
    if parts.len() != 2 * added.len() {
        return None;
    }
    let mut out = Vec::with_capacity(parts.len());
    for (table, (rows, sum)) in parts.chunks(2).zip(added) {
        let count: i64 = table[0].parse().ok()?;
        out.push((count + rows).to_string());
        out.push((hash_sum(table[1])? + sum).to_string());
    }
    Some(out.join(" "))
}

/// The digest of `digest_sql` (one row, the digest first) when it is `expected`: the digest
/// the unit's check read before its writes, with what the writes added ([`digest_with`]). The
/// writes return the hashes of the rows they write (and an update, of the rows it replaces), so
/// a digest that came out as expected proves that no other session changed the tables between
/// the check and now: they are the rows the check read plus those written. A unit calls it
/// when its writes, so applied to those rows, leave nothing to change, and records the digest
/// as settled without checking every row again; says so at debug. `None` otherwise, and the
/// unit checks again.
pub(crate) async fn settled_as_written(
    tx: &tokio_postgres::Transaction<'_>,
    unit: Unit,
    digest_sql: &str,
    expected: &str,
    context: &'static str,
) -> Result<Option<String>> {
    let now: String = tx
        .query_typed_one(digest_sql, &[])
        .await
        .map_err(store::db_error(context))?
        .get(0);
    if now != expected {
        return Ok(None);
    }
    tracing::debug!(
        unit = unit.as_str(),
        "unit_settled_as_written: the rows compared plus those written, unchanged by anyone else"
    );
    Ok(Some(now))
}

/// A sum of 64-bit row hashes as PostgreSQL gives it (a `numeric` as text; a million rows' sum
/// needs about 84 bits). `None` if it is not an integer.
pub(crate) fn hash_sum(text: &str) -> Option<i128> {
    text.parse().ok()
}

/// Rows an applied unit writes before it analyzes the tables it wrote.
const ANALYZE_AFTER_WRITES: i64 = 10_000;

/// `ANALYZE columns` when a unit wrote at least [`ANALYZE_AFTER_WRITES`] rows (`writes`), before
/// its commit (ANALYZE counts the transaction's own rows). The units that write users and their
/// derived rows call it themselves, before the check that proves them settled, which the next
/// run's whole-table comparisons then share: autovacuum can be a minute behind a bulk load, and
/// a plan made from the statistics of a table that was empty picks nested loops over a million
/// rows (docs/benchmark.md). An apply's only: ANALYZE would change `pg_class` even in a plan's
/// rolled-back transaction.
///
/// `columns` names each table with the columns the units join and filter on (`users (id,
/// keycloak_sub, ...)`): the row counts are taken all the same, in a third of the time of every
/// column (0.4 s instead of 1.3 s for the users and tenants tables at a million rows). Such an
/// ANALYZE leaves the tables' count of changed rows as it is, so autovacuum still analyzes every
/// column afterwards, for the platform's own queries.
pub(crate) async fn analyze_if_written(
    tx: &tokio_postgres::Transaction<'_>,
    columns: &str,
    writes: i64,
) -> Result<()> {
    if writes < ANALYZE_AFTER_WRITES {
        return Ok(());
    }
    tx.batch_execute(&format!("ANALYZE {columns}"))
        .await
        .map_err(store::db_error("analyzing the tables the unit wrote"))
}

/// Turns JIT compilation off for the rest of the unit's transaction. The whole-table statements
/// of the identity units cost more than `jit_above_cost` at a hundred thousand rows, and
/// PostgreSQL then compiles each of them again in every run: 0.1 to 0.7 s a statement at a
/// million rows, measured against the tenants check, for hash joins and counts that compiled
/// expressions do not speed up.
async fn no_jit(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    tx.batch_execute("SET LOCAL jit = off")
        .await
        .map_err(store::db_error("turning JIT off for the unit"))
}

#[cfg(test)]
mod tests {
    use super::digest_with;

    #[test]
    fn a_digest_with_rows_added_adds_each_tables_rows_and_hashes() {
        // Sums past 64 bits, and negative ones, as PostgreSQL's numeric prints them.
        let before = "2 -12 1000000 36893488147419103232";
        assert_eq!(
            digest_with(before, &[(3, 20), (5, -36893488147419103232)]).as_deref(),
            Some("5 8 1000005 0")
        );
        assert_eq!(digest_with("0 0", &[(0, 0)]).as_deref(), Some("0 0"));
        // Not a digest of as many tables: no expectation at all.
        assert_eq!(digest_with(before, &[(1, 1)]), None);
        assert_eq!(digest_with("2 x", &[(1, 1)]), None);
        assert_eq!(digest_with("{admin} 2 3", &[(1, 1)]), None);
    }
}
