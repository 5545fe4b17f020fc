//! The daemon's shared state, [`App`]: the engine, the metrics, the overlap guard of runs, the
//! runs in flight (a [`TaskTracker`] that shutdown waits for), liveness and readiness, and the
//! backoff of the retries of failed full runs. `http` and `schedule` read it; the wiring that
//! builds it is [`crate::app`].
//!
//! Liveness ([`App::liveness`]) is what `/healthz` and the systemd watchdog report: the
//! scheduler's heartbeat job ran within [`HEARTBEAT_STALE`], and no run has outlived
//! `run.timeout` (plus [`RUN_OVERRUN`] to end it). Neither depends on PostgreSQL or Keycloak, so
//! an outage of either never makes the daemon look dead; that is readiness (`/readyz`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::error::Error;
use crate::identity::keycloak::KeycloakSource;
use crate::identity::IdentityProvider;
use crate::metrics::Metrics;
use crate::reconcile::{Engine, Mode, Outcome, RunReport, Trigger};
use crate::retry::{Limit, Policy};
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

/// Shared state of a running app.
pub struct App {
    pub engine: Engine,
    pub metrics: Metrics,
    /// Held by the run in flight: the overlap guard, and what shutdown waits for.
    inflight: tokio::sync::Mutex<()>,
    /// The tasks of runs started by the daemon (the startup run, the schedule's ticks): closed
    /// and waited for at shutdown, rather than left detached.
    runs: TaskTracker,
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
    pub(super) keycloak: Option<Arc<KeycloakSource>>,
    /// A full run asked for by the event follower (a structural change, a gap).
    pub(super) full_run: tokio::sync::Notify,
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
        let cap = crate::cron::interval(&schedule.cron).unwrap_or(DEFAULT_INTERVAL);
        let retry_backoff = Mutex::new(RetryBackoff::new(schedule.retry_initial, cap));
        Arc::new(App {
            engine,
            metrics,
            inflight: tokio::sync::Mutex::new(()),
            runs: TaskTracker::new(),
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

    /// Readiness' database check on one kept connection: whether the server answers and takes
    /// writes ([`crate::store::server::read_only`]), reconnecting once when the kept connection
    /// is broken; within `within` (a connection that does not answer is dropped).
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
                // One round trip that also says whether the server takes writes: a replica
                // answers, yet every run against it fails.
                match crate::store::server::read_only(&db.client).await {
                    Ok(None) => {
                        *slot = Some(db);
                        return Ok(());
                    }
                    Ok(Some(why)) => {
                        let reason = crate::store::server::read_only_message(&db.target, &why);
                        *slot = Some(db);
                        return Err(reason);
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

    /// Starts no more tracked runs and waits for those in flight (and an event batch), up to
    /// `grace`. `false` when the grace ran out.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.runs.close();
        tokio::time::timeout(grace, async {
            self.runs.wait().await;
            let _idle = self.inflight.lock().await;
        })
        .await
        .is_ok()
    }

    /// Starts a run's task (the startup run, a tick), tracked: [`App::drain`] waits for it.
    pub fn spawn_run<F>(&self, run: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.runs.spawn(run);
    }
}

/// When the daemon retries a failed full run: after `initial`, doubling with each failure in a
/// row, at most `cap` (the schedule's interval: by then the next tick comes first anyway); each
/// wait jittered down to half of that (the retry policy's equal jitter), so that replicas that
/// failed together do not retry together.
#[derive(Debug, Clone)]
pub struct RetryBackoff {
    policy: Policy,
    /// Failed full runs since the last success.
    failures: u32,
}

impl RetryBackoff {
    pub fn new(initial: Duration, cap: Duration) -> Self {
        RetryBackoff {
            // The limit is not used: retries go on until a run succeeds.
            policy: Policy::new(initial, cap, Limit::Retries(u32::MAX)),
            failures: 0,
        }
    }

    /// After a full run: how long until its retry, if one is due. A success resets the backoff;
    /// a run skipped because another replica holds the run lock needs none (that replica
    /// reconciles); a run ended by a shutdown neither, the daemon is stopping.
    pub fn after(&mut self, report: &RunReport) -> Option<Duration> {
        match report.outcome {
            Outcome::Succeeded => {
                self.failures = 0;
                None
            }
            Outcome::Skipped => None,
            Outcome::Failed if matches!(report.error_value, Some(Error::Cancelled)) => None,
            Outcome::Failed => {
                let delay = self.policy.backoff(self.failures);
                self.failures = self.failures.saturating_add(1);
                Some(delay)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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

    fn report(outcome: Outcome, error: Option<Error>) -> RunReport {
        RunReport {
            id: uuid::Uuid::new_v4(),
            trigger: Trigger::Schedule,
            mode: Mode::Apply,
            outcome,
            seed_digest: String::new(),
            duration_ms: 0,
            units: Vec::new(),
            error: None,
            error_value: error,
        }
    }

    #[test]
    fn retries_double_from_the_initial_delay_up_to_the_interval_and_reset_after_a_success() {
        let s = Duration::from_secs;
        let mut b = RetryBackoff::new(s(10), s(60));
        let failed = || report(Outcome::Failed, Some(Error::Io("down".into())));
        // Each delay is jittered into [ceiling / 2, ceiling] (see crate::retry).
        let within = |d: Option<Duration>, ceiling: Duration| {
            let d = d.unwrap();
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} for {ceiling:?}");
        };
        for ceiling in [s(10), s(20), s(40), s(60), s(60)] {
            within(b.after(&failed()), ceiling);
        }
        assert_eq!(b.after(&report(Outcome::Succeeded, None)), None);
        within(b.after(&failed()), s(10)); // reset by the success
                                           // A lock held by a replica is not a failure; a shutdown retries nothing. Neither resets.
        assert_eq!(b.after(&report(Outcome::Skipped, None)), None);
        assert_eq!(
            b.after(&report(Outcome::Failed, Some(Error::Cancelled))),
            None
        );
        within(b.after(&failed()), s(20));
        // A clash fails the run without an error value: retried like any failure.
        within(b.after(&report(Outcome::Failed, None)), s(40));
        // An initial delay above the interval: the interval caps it too.
        let mut slow = RetryBackoff::new(s(90), s(60));
        within(slow.after(&failed()), s(60));
    }
}
