//! Builds the object graph once and runs it: `run_once` for `--once`, `plan` and the tests, and
//! [`Application`] for the daemon: `Application::build` validates the inputs, builds the engine
//! and binds `http.listen` (port 0 picks a free port, [`Application::local_addr`] says which);
//! `run_until_stopped` serves HTTP, runs the schedule and the retries of failed full runs
//! (`schedule::spawn_retries`), notifies systemd and shuts down gracefully on one
//! `CancellationToken`. `main` and the test harness both start the daemon this way.
//! Reads every section of the config, through the units.
//!
//! Liveness ([`App::liveness`]) is what `/healthz` and the systemd watchdog report: the
//! scheduler's heartbeat job ran within [`HEARTBEAT_STALE`], and no run has outlived
//! `run.timeout` (plus [`RUN_OVERRUN`] to end it). Neither depends on PostgreSQL or Keycloak, so
//! an outage of either never makes the daemon look dead; that is readiness (`/readyz`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{IdentitySource, Settings};
use crate::error::{Error, Result};
use crate::identity::keycloak::{AdminClient, KeycloakSource};
use crate::identity::realm_file::{RealmFileSource, RealmInput};
use crate::identity::{IdentityProvider, RoleFilter};
use crate::metrics::{Metrics, Series};
use crate::reconcile::{Engine, Mode, Outcome, RunReport, Trigger};
use crate::schedule::RetryBackoff;
use crate::seed::ReferenceSeed;
use crate::store::Db;

/// The scheduler's heartbeat job runs every second; older than this, the scheduler counts as
/// stopped and the daemon as wedged.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(10);

/// How far past `run.timeout` a run may still be in flight (being stopped and recorded, see
/// `reconcile::STOP_BUDGET`) before the daemon counts as wedged.
pub const RUN_OVERRUN: Duration = Duration::from_secs(15);

/// The interval of the default `schedule.cron` (every 5 minutes).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// How long `/readyz` waits for the database.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The parts of one process, built in order: the metrics registry first, then each part with
/// its instruments: the Keycloak admin client (shared by the identity source and the event
/// follower), then the engine.
pub struct Parts {
    pub engine: Engine,
    pub metrics: Metrics,
    /// The Keycloak source, when the identity source is Keycloak: the event follower reads
    /// through its client too, so the two share one token and one set of instruments.
    pub keycloak: Option<Arc<KeycloakSource>>,
}

/// Validates what the config points at (seed, realm source, role map) and builds the parts.
pub fn build(settings: Settings) -> Result<Parts> {
    let seed = ReferenceSeed::load(settings.seed.path.as_deref())?;
    check_role_map(&settings, &seed)?;
    let from_keycloak = settings.identity.source == IdentitySource::Keycloak;
    let metrics = Metrics::new(
        &seed.digest,
        Series {
            keycloak: from_keycloak,
            events: settings.events_enabled(),
        },
    );
    let filter = RoleFilter::new(&settings.identity);
    let batch_size = settings.database.batch_size;
    let keycloak = if from_keycloak {
        let client = AdminClient::new(
            &settings.keycloak,
            settings.startup.wait_timeout,
            metrics.keycloak().clone(),
        )?;
        Some(Arc::new(KeycloakSource::with_client(
            Arc::new(client),
            filter.clone(),
            batch_size,
        )))
    } else {
        None
    };
    let identities: Arc<dyn IdentityProvider> = match &keycloak {
        Some(k) => k.clone(),
        None => {
            let input = RealmInput::from_setting(settings.identity.realm_file.as_deref())?;
            Arc::new(
                RealmFileSource::new(input, filter, batch_size)
                    .with_realm(&settings.keycloak.realm),
            )
        }
    };
    let engine = Engine {
        settings,
        seed,
        identities,
        progress: crate::progress::Display::Log,
    };
    Ok(Parts {
        engine,
        metrics,
        keycloak,
    })
}

/// The engine alone, for the commands that run without a daemon (`plan`, `check`) and tests.
pub fn build_engine(settings: Settings) -> Result<Engine> {
    Ok(build(settings)?.engine)
}

/// Every mapped platform role must be one the seed defines, and the seed must define
/// `platform_superadmin`.
fn check_role_map(settings: &Settings, seed: &ReferenceSeed) -> Result<()> {
    let roles = seed.role_names();
    let mut problems = Vec::new();
    for (realm_role, platform_role) in &settings.identity.role_map {
        if !roles.contains(platform_role.as_str()) {
            problems.push(format!(
                "identity.role_map maps realm role {realm_role:?} to {platform_role:?}, which is not a platform role of the seed ({}): fix SEEDKEEPER_IDENTITY__ROLE_MAP or the seed",
                roles.iter().copied().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    if !roles.contains("platform_superadmin") {
        problems.push("the reference seed must define platform role platform_superadmin (admins are bound to it)".into());
    }
    if !problems.is_empty() {
        return Err(Error::Config(crate::error::Problems(problems)));
    }
    Ok(())
}

/// Shared state of a running app.
pub struct App {
    pub engine: Engine,
    pub metrics: Metrics,
    /// Held by the run in flight: the overlap guard, and what shutdown waits for.
    inflight: tokio::sync::Mutex<()>,
    last: Mutex<Option<Outcome>>,
    first_done: AtomicBool,
    pub notify_systemd: bool,
    /// When the scheduler's heartbeat job last ran (the app's creation before it first does).
    heartbeat: Mutex<Instant>,
    /// When the run in flight started, if one is.
    run_started: Mutex<Option<Instant>>,
    /// The connection `/readyz` keeps and reuses; replaced when broken.
    probe: tokio::sync::Mutex<Option<Db>>,
    /// The Keycloak event follower's state (why it does not follow, if it does not).
    pub events: Arc<crate::events::FollowerState>,
    /// The Keycloak source, whose client the event follower shares.
    keycloak: Option<Arc<KeycloakSource>>,
    /// A full run asked for by the event follower (a structural change, a gap).
    full_run: tokio::sync::Notify,
    /// The backoff of the retries of failed full runs.
    retry_backoff: Mutex<RetryBackoff>,
    /// When the retry of the last failed full run is due; `None` when none is (the last full
    /// run did not fail, or a run has started since). Watched by `schedule::spawn_retries`.
    retry_due: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
}

/// Whether the daemon is alive, and the figures behind the verdict.
#[derive(Debug, Clone)]
pub struct Liveness {
    pub heartbeat_age: Duration,
    pub run_age: Option<Duration>,
    /// Why the daemon is not alive; `None` when it is.
    pub problem: Option<String>,
}

/// The liveness verdict from the heartbeat's age and the age of the run in flight.
pub fn judge(
    heartbeat_age: Duration,
    run_age: Option<Duration>,
    run_timeout: Duration,
) -> Option<String> {
    if heartbeat_age > HEARTBEAT_STALE {
        return Some(format!(
            "the scheduler has not ticked for {}s (its heartbeat runs every second; stale after {}s)",
            heartbeat_age.as_secs(),
            HEARTBEAT_STALE.as_secs()
        ));
    }
    match run_age {
        Some(age) if age > run_timeout + RUN_OVERRUN => Some(format!(
            "a run has been going for {}s, past run.timeout ({}s) and the {}s allowed to stop it",
            age.as_secs(),
            run_timeout.as_secs(),
            RUN_OVERRUN.as_secs()
        )),
        _ => None,
    }
}

impl App {
    pub fn new(parts: Parts) -> Arc<Self> {
        let Parts {
            engine,
            metrics,
            keycloak,
        } = parts;
        let events = Arc::new(crate::events::FollowerState::default());
        let schedule = &engine.settings.schedule;
        // schedule.cron is validated at load (config::validate_cron asks for its interval too);
        // were it to fail here, the default schedule's interval caps the backoff.
        let cap = crate::schedule::interval(&schedule.cron).unwrap_or(DEFAULT_INTERVAL);
        let retry_backoff = Mutex::new(RetryBackoff::new(schedule.retry_initial, cap));
        Arc::new(App {
            engine,
            metrics,
            inflight: tokio::sync::Mutex::new(()),
            last: Mutex::new(None),
            first_done: AtomicBool::new(false),
            notify_systemd: std::env::var_os("NOTIFY_SOCKET").is_some(),
            heartbeat: Mutex::new(Instant::now()),
            run_started: Mutex::new(None),
            probe: tokio::sync::Mutex::new(None),
            events,
            keycloak,
            full_run: tokio::sync::Notify::new(),
            retry_backoff,
            retry_due: tokio::sync::watch::Sender::new(None),
        })
    }

    /// An event batch: the users it touched (and those Keycloak says are gone), through the
    /// same units, as a run with trigger `event`. `None` when a run is in flight: the batch
    /// waits for the next poll, so a full run and an event batch never interleave (the run lock
    /// keeps replicas apart too).
    pub async fn run_event_batch(
        &self,
        batch: crate::identity::SomeUsers,
        cancel: &CancellationToken,
    ) -> Option<RunReport> {
        let _guard = self.inflight.try_lock().ok()?;
        let users = Arc::new(batch);
        Some(
            self.run_tracked(Trigger::Event, Duration::from_secs(5), cancel, users)
                .await,
        )
    }

    /// A run under the overlap guard the caller holds, through `engine.run_with`: marked in
    /// flight for liveness while it goes, counted in the metrics when it ends. What else a run
    /// means (the last outcome for readiness, READY=1 to systemd) is the caller's to add.
    async fn run_tracked(
        &self,
        trigger: Trigger,
        wait: Duration,
        cancel: &CancellationToken,
        identities: Arc<dyn IdentityProvider>,
    ) -> RunReport {
        if let Ok(mut s) = self.run_started.lock() {
            *s = Some(Instant::now());
        }
        let report = self
            .engine
            .run_with(Mode::Apply, trigger, wait, cancel, identities)
            .await;
        if let Ok(mut s) = self.run_started.lock() {
            *s = None;
        }
        self.metrics
            .record_run(&report, self.engine.identities.name());
        report
    }

    /// Asks for a full run as soon as the run in flight, if any, ends.
    pub fn ask_full_run(&self) {
        self.full_run.notify_one();
    }

    /// Called by the scheduler's heartbeat job: the scheduler is alive.
    pub fn heartbeat(&self) {
        if let Ok(mut h) = self.heartbeat.lock() {
            *h = Instant::now();
        }
    }

    /// Liveness: the scheduler ticks and no run has outlived its deadline. PostgreSQL and
    /// Keycloak play no part in it.
    pub fn liveness(&self) -> Liveness {
        let heartbeat_age = self
            .heartbeat
            .lock()
            .map(|h| h.elapsed())
            .unwrap_or(Duration::MAX);
        let run_age = self
            .run_started
            .lock()
            .ok()
            .and_then(|s| s.map(|t| t.elapsed()));
        Liveness {
            heartbeat_age,
            run_age,
            problem: judge(heartbeat_age, run_age, self.settings().run.timeout),
        }
    }

    /// Readiness' database check on one kept connection: `SELECT 1`, reconnecting once when the
    /// kept connection is broken; within `within` (a connection that does not answer is dropped).
    pub async fn probe_database(&self, within: Duration) -> std::result::Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        let late = || format!("database did not answer within {}s", within.as_secs());
        let Ok(mut slot) = tokio::time::timeout_at(deadline, self.probe.lock()).await else {
            return Err(late());
        };
        let probed = tokio::time::timeout_at(deadline, async {
            let mut last = String::new();
            for _ in 0..2 {
                let db = match slot.take() {
                    Some(db) if !db.client.is_closed() => db,
                    _ => {
                        let db = crate::store::connect(&self.settings().database)
                            .await
                            .map_err(|e| format!("database unreachable: {}", e.kind()))?;
                        // Told apart from the runs' sessions in pg_stat_activity.
                        let _ = db
                            .client
                            .batch_execute("SET application_name = 'seedkeeper-readyz'")
                            .await;
                        db
                    }
                };
                match db.client.simple_query("SELECT 1").await {
                    Ok(_) => {
                        *slot = Some(db);
                        return Ok(());
                    }
                    Err(e) => last = crate::error::describe_pg(&e),
                }
            }
            Err(format!("database unreachable: {last}"))
        })
        .await;
        probed.unwrap_or_else(|_| Err(late()))
    }

    /// Closes the connection `/readyz` keeps.
    pub async fn close_probe(&self) {
        *self.probe.lock().await = None;
    }

    pub fn settings(&self) -> &Settings {
        &self.engine.settings
    }

    /// One run, waiting for the previous one to finish if needed.
    pub async fn run_once(
        &self,
        trigger: Trigger,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> RunReport {
        let _guard = self.inflight.lock().await;
        self.run_locked(trigger, wait, cancel).await
    }

    /// A full run under the overlap guard the caller holds: it takes the place of a retry due,
    /// and when it fails, the next retry is due after the backoff.
    async fn run_locked(
        &self,
        trigger: Trigger,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> RunReport {
        self.retry_due.send_replace(None);
        let report = self
            .run_tracked(trigger, wait, cancel, self.engine.identities.clone())
            .await;
        if trigger.is_retried() {
            self.make_retry_due(&report);
        }
        if report.outcome != Outcome::Skipped {
            if let Ok(mut l) = self.last.lock() {
                *l = Some(report.outcome);
            }
        }
        self.first_done.store(true, Ordering::SeqCst);
        if self.notify_systemd {
            let status = format!("last run {} ({})", report.outcome.as_str(), report.id);
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&status),
            ]);
        }
        report
    }

    /// After a full run: the retry it calls for, if any, made due (see [`RetryBackoff::after`]).
    fn make_retry_due(&self, report: &RunReport) {
        let delay = match self.retry_backoff.lock() {
            Ok(mut b) => b.after(report),
            Err(_) => None,
        };
        if let Some(delay) = delay {
            tracing::info!(run.id = %report.id, retry_in_ms = delay.as_millis() as u64, "the run failed: retrying it without waiting for the schedule");
            self.retry_due
                .send_replace(Some(tokio::time::Instant::now() + delay));
        }
    }

    /// When the retry of the last failed full run is due, watched (`None`: no retry is due).
    pub fn retry_due(&self) -> tokio::sync::watch::Receiver<Option<tokio::time::Instant>> {
        self.retry_due.subscribe()
    }

    /// The retry of a failed full run, once it is due: `None` when a full run has started since
    /// it was made due (that run took its place, and decides whether another is due), or on
    /// shutdown.
    pub async fn retry(&self, cancel: &CancellationToken) -> Option<RunReport> {
        // Waits for a run in flight (an event batch, which leaves the retry due) instead of
        // trying again and again; whatever ran meanwhile is judged by the due time read under
        // the guard. The guard is fair: a shutdown's drain queued behind this wait gets it next.
        let _guard = tokio::select! {
            guard = self.inflight.lock() => guard,
            _ = cancel.cancelled() => return None,
        };
        if cancel.is_cancelled() {
            return None;
        }
        let due = (*self.retry_due.borrow())?;
        if due > tokio::time::Instant::now() {
            return None;
        }
        Some(
            self.run_locked(Trigger::Retry, Duration::ZERO, cancel)
                .await,
        )
    }

    /// A scheduled tick: skipped (and counted) when a run is still going.
    pub async fn tick(&self, cancel: &CancellationToken) -> Option<RunReport> {
        match self.inflight.try_lock() {
            Ok(_guard) => Some(
                self.run_locked(Trigger::Schedule, Duration::ZERO, cancel)
                    .await,
            ),
            Err(_) => {
                tracing::info!("scheduled tick skipped: the previous run is still going");
                self.metrics.record_skipped_tick();
                None
            }
        }
    }

    pub fn last_outcome(&self) -> Option<Outcome> {
        self.last.lock().ok().and_then(|l| *l)
    }

    pub fn first_run_done(&self) -> bool {
        self.first_done.load(Ordering::SeqCst)
    }

    /// Waits for the run in flight, up to `grace`. `false` when the grace ran out.
    pub async fn drain(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.inflight.lock())
            .await
            .is_ok()
    }
}

/// What keeps the daemon from being built: its inputs (as `--once` reports them), or its
/// listen address.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Invalid(#[from] Error),
    #[error("cannot listen on http.listen {listen} ({reason}): pick a free address with SEEDKEEPER_HTTP__LISTEN")]
    Listen {
        listen: String,
        reason: std::io::Error,
    },
}

impl BuildError {
    /// The process exit code: a listen address that cannot be bound is a configuration error.
    pub fn exit_code(&self) -> u8 {
        match self {
            BuildError::Invalid(e) => e.exit_code(),
            BuildError::Listen { .. } => crate::error::exit::CONFIG,
        }
    }

    /// The error's kind, as log lines and metrics name it.
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            BuildError::Invalid(e) => e.kind(),
            BuildError::Listen { .. } => crate::error::ErrorKind::Config,
        }
    }
}

/// The daemon, built and not yet running: its [`App`] and its bound HTTP listener.
pub struct Application {
    app: Arc<App>,
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl Application {
    /// Validates what the config points at, builds the engine, its metrics and shared state,
    /// and binds `http.listen`. Nothing is asked of PostgreSQL or Keycloak yet.
    pub async fn build(settings: Settings) -> std::result::Result<Application, BuildError> {
        let listen = settings.http.listen.clone();
        let parts = build(settings)?;
        let bound = TcpListener::bind(&listen)
            .await
            .and_then(|l| Ok((l.local_addr()?, l)));
        let (local_addr, listener) =
            bound.map_err(|reason| BuildError::Listen { listen, reason })?;
        Ok(Application {
            app: App::new(parts),
            listener,
            local_addr,
        })
    }

    /// The address the HTTP listener is bound to (the port picked when `http.listen` says 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// The shared state: the engine, the metrics, liveness and readiness.
    pub fn app(&self) -> Arc<App> {
        self.app.clone()
    }

    /// The daemon: HTTP, a run at start, then the schedule, until `cancel` fires.
    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<()> {
        let Application { app, listener, .. } = self;
        let http = tokio::spawn(crate::http::serve(app.clone(), listener, cancel.clone()));

        if let Some(interval) = sd_notify::watchdog_enabled() {
            tokio::spawn(watchdog(app.clone(), interval / 2, cancel.clone(), || {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }));
        }

        // The first run waits for the dependencies; it never ends the daemon.
        let first = {
            let app = app.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let wait = app.settings().startup.wait_timeout;
                app.run_once(Trigger::Startup, wait, &cancel).await
            })
        };

        let mut scheduler = crate::schedule::start(app.clone(), cancel.clone()).await?;
        let retries = crate::schedule::spawn_retries(app.clone(), cancel.clone());
        let events = start_following(&app, &cancel)?;
        cancel.cancelled().await;
        let stopping = Instant::now();
        tracing::info!("shutting down: no new runs; waiting for the run in flight");
        let _ = scheduler.shutdown().await;
        let grace = app.settings().shutdown.grace;
        if app.drain(grace).await {
            tracing::info!("shutdown complete");
        } else {
            tracing::warn!(grace_secs = grace.as_secs(), "the run in flight did not finish within shutdown.grace; its open transaction is rolled back");
        }
        first.abort();
        retries.abort();
        // The event follower may be waiting on Keycloak (a poll, a check): its batches ran under the
        // run guard drained above, so it gets a moment within the grace, then is dropped, request and
        // all; its checkpoint makes the next start read again what it had not applied.
        let moment = grace
            .saturating_sub(stopping.elapsed())
            .min(Duration::from_secs(1));
        for mut task in events {
            if tokio::time::timeout(moment, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        let _ = http.await;
        app.close_probe().await;
        if app.notify_systemd {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        }
        Ok(())
    }
}

/// With the keycloak source and `events.enabled`: the event follower, and the task that runs
/// the full runs it asks for (trigger `event-full`). Both end with `cancel`.
fn start_following(
    app: &Arc<App>,
    cancel: &CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let settings = app.settings();
    if !settings.events_enabled() {
        return Ok(Vec::new());
    }
    // The identity source's client: one token, one set of seedkeeper_keycloak_* series.
    let Some(kc) = app.keycloak.clone() else {
        return Ok(Vec::new());
    };
    let batch_app = app.clone();
    let ask_app = app.clone();
    let follower = crate::events::Follower {
        kc,
        apply: Arc::new(move |users, cancel: CancellationToken| {
            let app = batch_app.clone();
            Box::pin(async move { app.run_event_batch(users, &cancel).await })
        }),
        database: settings.database.clone(),
        realm: settings.keycloak.realm.clone(),
        poll_interval: settings.events.poll_interval,
        full_run: Arc::new(move |_why: &str| ask_app.ask_full_run()),
        state: app.events.clone(),
        metrics: app.metrics.events().clone(),
    };
    let follow = tokio::spawn(follower.run(cancel.clone()));
    let full_runs = {
        let app = app.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = app.full_run.notified() => {}
                }
                app.run_once(Trigger::EventFull, Duration::ZERO, &cancel)
                    .await;
            }
        })
    };
    Ok(vec![follow, full_runs])
}

/// The systemd watchdog: every `every`, `ping` (WATCHDOG=1) while the daemon is alive
/// ([`App::liveness`]), nothing while it is not, so that systemd's `WatchdogSec=` restarts a
/// daemon whose scheduler stopped or whose run outlived its deadline. Ends with `cancel`.
pub async fn watchdog(
    app: Arc<App>,
    every: Duration,
    cancel: CancellationToken,
    ping: impl Fn() + Send + 'static,
) {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut silent = false;
    loop {
        tokio::select! {
            _ = t.tick() => {}
            _ = cancel.cancelled() => return,
        }
        match app.liveness().problem {
            None => {
                if silent {
                    tracing::info!("watchdog: alive again, pinging systemd");
                    silent = false;
                }
                ping();
            }
            Some(problem) if !silent => {
                tracing::error!(%problem, "watchdog: the daemon is wedged; no longer pinging systemd, whose WatchdogSec= restarts it");
                silent = true;
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_until_the_heartbeat_is_stale_or_a_run_outlives_its_deadline() {
        let s = Duration::from_secs;
        let timeout = s(60);
        assert_eq!(judge(s(1), None, timeout), None);
        assert_eq!(judge(HEARTBEAT_STALE, Some(s(70)), timeout), None);
        let stale = judge(HEARTBEAT_STALE + s(1), None, timeout).unwrap_or_default();
        assert!(
            stale.contains("scheduler has not ticked for 11s"),
            "{stale}"
        );
        assert_eq!(judge(s(1), Some(timeout + RUN_OVERRUN), timeout), None);
        let overrun = judge(s(1), Some(timeout + RUN_OVERRUN + s(1)), timeout).unwrap_or_default();
        assert!(overrun.contains("past run.timeout (60s)"), "{overrun}");
    }
}
