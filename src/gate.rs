//! The run gate, [`RunGate`]: the one way a run starts, whatever starts it. It owns the overlap
//! guard (one run at a time in this process; the advisory run lock keeps replicas apart), the
//! tracker of runs started in the background (what shutdown waits for), the backoff of the
//! retries of failed full runs, the full runs the event follower asks for, and one entry point
//! per trigger ([`Trigger`]): [`RunGate::startup`], [`RunGate::scheduled_tick`],
//! [`RunGate::retry_when_due`], [`RunGate::event_batch`], [`RunGate::event_full_run`],
//! [`RunGate::once`] and [`RunGate::plan`]. Each says how it meets a run in flight
//! ([`RunGate::queue`], or [`Admission`] through [`RunGate::admit`]); a full run then goes through
//! [`RunGate::run_admitted`], and every run through [`RunGate::tracked`] to the engine.
//!
//! It must not decide *when* a run happens: the schedule says when a tick comes, the event
//! follower when a batch is ready; the gate decides whether and how it runs. It knows nothing of
//! HTTP or the scheduler, so `http` and `schedule` can read it without reading back `app`.
//! Reads `startup.wait_timeout`, `schedule.cron` (the backoff's cap) and
//! `schedule.retry_initial`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, MutexGuard, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::error::Error;
use crate::identity::{IdentityProvider, FetchedBatch};
use crate::metrics::Metrics;
use crate::reconcile::{Engine, Mode, Outcome, RunReport, Trigger};
use crate::retry::{Limit, Policy};

/// The interval of the default `schedule.cron` (every 5 minutes).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// How long an event batch waits for PostgreSQL: a moment, not `startup.wait_timeout`. A batch
/// that cannot connect fails, its checkpoint stays, and the next poll reads it again; waiting
/// longer would only hold the overlap guard against the schedule's ticks.
const EVENT_BATCH_WAIT: Duration = Duration::from_secs(5);

/// How a trigger that may not run meets a run already in flight. The triggers that must run
/// (`--once`, `plan`, the startup run, a full run the event follower asked for) wait for it,
/// however long, and are always admitted ([`RunGate::queue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Waits for it, unless a shutdown comes first (a retry: no use once stopping).
    QueueUntilShutdown,
    /// Does not run (a tick, which comes again; an event batch, whose checkpoint stays).
    SkipWhenBusy,
}

/// The overlap guard, held by the run in flight.
type Guard<'a> = MutexGuard<'a, ()>;

/// The one way a run starts: see the module's documentation.
pub struct RunGate {
    engine: Engine,
    metrics: Metrics,
    /// Held by the run in flight: the overlap guard, and what shutdown waits for.
    inflight: tokio::sync::Mutex<()>,
    /// The tasks of runs started in the background (the startup run, the schedule's ticks):
    /// closed and waited for at shutdown, rather than left detached.
    tasks: TaskTracker,
    /// When the run in flight started, if one is: liveness reads its age.
    run_started: Mutex<Option<Instant>>,
    /// The outcome of the last full run that was not skipped: readiness reads it.
    last: Mutex<Option<Outcome>>,
    /// Whether a full run has ended, skipped or not: readiness waits for the first.
    first_done: AtomicBool,
    /// Whether systemd listens (`NOTIFY_SOCKET`): each full run then says READY=1 and its outcome.
    notify_systemd: bool,
    retries: Retries,
    /// A full run asked for by the event follower (a structural change, a gap).
    full_run_asked: Notify,
}

/// The retries of failed full runs: how long to wait, and when the next one is due.
struct Retries {
    backoff: Mutex<RetryBackoff>,
    /// When the retry of the last failed full run is due; `None` when none is (the last full
    /// run did not fail, or a run has started since).
    due: watch::Sender<Option<tokio::time::Instant>>,
}

impl RunGate {
    /// The gate around `engine`, counting its runs in `metrics`.
    pub fn new(engine: Engine, metrics: Metrics) -> Arc<Self> {
        let schedule = &engine.settings.schedule;
        // schedule.cron is validated at load (config::validate_cron asks for its interval too);
        // were it to fail here, the default schedule's interval caps the backoff.
        let cap = crate::cron::interval(&schedule.cron).unwrap_or(DEFAULT_INTERVAL);
        let retries = Retries {
            backoff: Mutex::new(RetryBackoff::new(schedule.retry_initial, cap)),
            due: watch::Sender::new(None),
        };
        Arc::new(RunGate {
            engine,
            metrics,
            inflight: tokio::sync::Mutex::new(()),
            tasks: TaskTracker::new(),
            run_started: Mutex::new(None),
            last: Mutex::new(None),
            first_done: AtomicBool::new(false),
            notify_systemd: std::env::var_os("NOTIFY_SOCKET").is_some(),
            retries,
            full_run_asked: Notify::new(),
        })
    }

    /// The daemon's first run: waits for a run in flight, and for the dependencies up to
    /// `startup.wait_timeout`.
    pub async fn startup(&self, cancel: &CancellationToken) -> RunReport {
        let _guard = self.queue().await;
        let wait = self.settings().startup.wait_timeout;
        self.run_admitted(Trigger::Startup, wait, cancel).await
    }

    /// A tick of `schedule.cron`: skipped (and counted) when a run is still going.
    pub async fn scheduled_tick(&self, cancel: &CancellationToken) -> Option<RunReport> {
        let Some(_guard) = self.admit(Admission::SkipWhenBusy, cancel).await else {
            tracing::info!("scheduled tick skipped: the previous run is still going");
            self.metrics.record_skipped_tick();
            return None;
        };
        Some(
            self.run_admitted(Trigger::Schedule, Duration::ZERO, cancel)
                .await,
        )
    }

    /// The retry of a failed full run, once it is due: `None` when a full run has started since
    /// it was made due (that run took its place, and decides whether another is due), or on
    /// shutdown.
    pub async fn retry_when_due(&self, cancel: &CancellationToken) -> Option<RunReport> {
        // Waits for a run in flight (an event batch, which leaves the retry due) instead of
        // trying again and again; whatever ran meanwhile is judged by the due time read under
        // the guard. The guard is fair: a shutdown's drain queued behind this wait gets it next.
        let _guard = self.admit(Admission::QueueUntilShutdown, cancel).await?;
        let due = (*self.retries.due.borrow())?;
        if due > tokio::time::Instant::now() {
            return None;
        }
        Some(
            self.run_admitted(Trigger::Retry, Duration::ZERO, cancel)
                .await,
        )
    }

    /// An event batch: the users it touched (and those Keycloak says are gone), through the
    /// same units, as a run with trigger `event`. `None` when a run is in flight: the batch
    /// waits for the next poll, so a full run and an event batch never interleave.
    pub(crate) async fn event_batch(
        &self,
        batch: FetchedBatch,
        cancel: &CancellationToken,
    ) -> Option<RunReport> {
        let _guard = self.admit(Admission::SkipWhenBusy, cancel).await?;
        let users: Arc<dyn IdentityProvider> = Arc::new(batch);
        Some(
            self.tracked(Mode::Apply, Trigger::Event, EVENT_BATCH_WAIT, cancel, users)
                .await,
        )
    }

    /// A full run the event follower asked for ([`RunGate::ask_full_run`]): after the run in
    /// flight, if any.
    pub async fn event_full_run(&self, cancel: &CancellationToken) -> RunReport {
        let _guard = self.queue().await;
        self.run_admitted(Trigger::EventFull, Duration::ZERO, cancel)
            .await
    }

    /// `--once`: one full run, after any run in flight, waiting for the dependencies up to
    /// `startup.wait_timeout`.
    pub async fn once(&self, cancel: &CancellationToken) -> RunReport {
        let _guard = self.queue().await;
        let wait = self.settings().startup.wait_timeout;
        self.run_admitted(Trigger::Once, wait, cancel).await
    }

    /// `plan`: the apply's statements in a transaction that is rolled back. Under the overlap
    /// guard like any run; it neither makes a retry due nor counts for readiness.
    pub(crate) async fn plan(&self, cancel: &CancellationToken) -> RunReport {
        let _guard = self.queue().await;
        let wait = self.settings().startup.wait_timeout;
        let identities = self.engine.identities.clone();
        self.tracked(Mode::Plan, Trigger::Plan, wait, cancel, identities)
            .await
    }

    /// Asks for a full run (trigger `event-full`) as soon as the run in flight, if any, ends;
    /// [`RunGate::spawn_full_runs`] runs it. Asked twice before it starts, it runs once.
    pub(crate) fn ask_full_run(&self) {
        self.full_run_asked.notify_one();
    }

    /// Starts the startup run on a tracked task ([`RunGate::drain`] waits for it).
    pub(crate) fn spawn_startup(self: &Arc<Self>, cancel: &CancellationToken) {
        let (gate, cancel) = (self.clone(), cancel.clone());
        self.tasks.spawn(async move {
            gate.startup(&cancel).await;
        });
    }

    /// Starts a scheduled tick on a tracked task, so that the scheduler never waits for it.
    pub(crate) fn spawn_tick(self: &Arc<Self>, cancel: &CancellationToken) {
        let (gate, cancel) = (self.clone(), cancel.clone());
        self.tasks.spawn(async move {
            gate.scheduled_tick(&cancel).await;
        });
    }

    /// The task that runs the retries of failed full runs: it sleeps until one is due and starts
    /// it ([`RunGate::retry_when_due`]). Ends with `cancel`; a retry in flight is stopped like
    /// any run (see [`RunGate::drain`]).
    pub(crate) fn spawn_retries(self: &Arc<Self>, cancel: &CancellationToken) -> JoinHandle<()> {
        let (gate, cancel) = (self.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut due = gate.retry_due();
            loop {
                let at = *due.borrow_and_update();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = due.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    _ = sleep_until(at) => {
                        gate.retry_when_due(&cancel).await;
                    }
                }
            }
        })
    }

    /// The task that runs the full runs the event follower asks for. Ends with `cancel`.
    pub(crate) fn spawn_full_runs(self: &Arc<Self>, cancel: &CancellationToken) -> JoinHandle<()> {
        let (gate, cancel) = (self.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = gate.full_run_asked.notified() => {}
                }
                gate.event_full_run(&cancel).await;
            }
        })
    }

    /// Starts no more background runs and waits for those in flight (and an event batch), up
    /// to `grace`. `false` when the grace ran out.
    pub(crate) async fn drain(&self, grace: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, async {
            self.tasks.wait().await;
            let _idle = self.inflight.lock().await;
        })
        .await
        .is_ok()
    }

    /// When the retry of the last failed full run is due, watched (`None`: no retry is due).
    pub fn retry_due(&self) -> watch::Receiver<Option<tokio::time::Instant>> {
        self.retries.due.subscribe()
    }

    /// How long the run in flight has been going, if one is.
    pub fn run_age(&self) -> Option<Duration> {
        self.run_started
            .lock()
            .ok()
            .and_then(|s| s.map(|t| t.elapsed()))
    }

    /// The outcome of the last full run that was not skipped.
    pub(crate) fn last_outcome(&self) -> Option<Outcome> {
        self.last.lock().ok().and_then(|l| *l)
    }

    pub(crate) fn first_run_done(&self) -> bool {
        self.first_done.load(Ordering::SeqCst)
    }

    /// Whether systemd listens for notifications (`NOTIFY_SOCKET`).
    pub(crate) fn notifies_systemd(&self) -> bool {
        self.notify_systemd
    }

    pub fn settings(&self) -> &Settings {
        &self.engine.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The overlap guard for a trigger that must run: after the run in flight, if any. The
    /// guard is fair: whoever waits first runs first.
    async fn queue(&self) -> Guard<'_> {
        self.inflight.lock().await
    }

    /// The overlap guard, taken as `how` says; `None` when the run is not to happen.
    async fn admit(&self, how: Admission, cancel: &CancellationToken) -> Option<Guard<'_>> {
        let guard = match how {
            Admission::QueueUntilShutdown => tokio::select! {
                guard = self.inflight.lock() => guard,
                _ = cancel.cancelled() => return None,
            },
            Admission::SkipWhenBusy => self.inflight.try_lock().ok()?,
        };
        if how == Admission::QueueUntilShutdown && cancel.is_cancelled() {
            return None;
        }
        Some(guard)
    }

    /// A full run under the overlap guard the caller holds: it takes the place of a retry due,
    /// and when it fails, the next retry is due after the backoff; its outcome is readiness',
    /// and systemd hears READY=1 with it.
    async fn run_admitted(
        &self,
        trigger: Trigger,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> RunReport {
        self.retries.due.send_replace(None);
        let identities = self.engine.identities.clone();
        let report = self
            .tracked(Mode::Apply, trigger, wait, cancel, identities)
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

    /// A run through the engine, marked in flight for liveness while it goes and counted in
    /// the metrics when it ends.
    async fn tracked(
        &self,
        mode: Mode,
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
            .run(mode, trigger, wait, cancel, identities)
            .await;
        if let Ok(mut s) = self.run_started.lock() {
            *s = None;
        }
        self.metrics
            .record_run(&report, self.engine.identities.name());
        report
    }

    /// After a full run: the retry it calls for, if any, made due (see [`RetryBackoff::after`]).
    fn make_retry_due(&self, report: &RunReport) {
        let delay = match self.retries.backoff.lock() {
            Ok(mut b) => b.after(report),
            Err(_) => None,
        };
        if let Some(delay) = delay {
            tracing::info!(run.id = %report.id, retry_in_ms = delay.as_millis() as u64, "the run failed: retrying it without waiting for the schedule");
            self.retries
                .due
                .send_replace(Some(tokio::time::Instant::now() + delay));
        }
    }
}

/// Sleeps until `at`; forever when there is no `at`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When the daemon retries a failed full run: after `initial`, doubling with each failure in a
/// row, at most `cap` (the schedule's interval: by then the next tick comes first anyway); each
/// wait jittered down to half of that (the retry policy's equal jitter), so that replicas that
/// failed together do not retry together.
#[derive(Debug, Clone)]
pub(crate) struct RetryBackoff {
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
    pub(crate) fn after(&mut self, report: &RunReport) -> Option<Duration> {
        match report.outcome {
            Outcome::Succeeded => {
                self.failures = 0;
                None
            }
            Outcome::Skipped => None,
            Outcome::Failed if matches!(report.error, Some(Error::Cancelled)) => None,
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
    use crate::error::ErrorKind;

    fn report(outcome: Outcome, error: Option<Error>) -> RunReport {
        let mut r = RunReport::new(Trigger::Schedule, Mode::Apply, String::new());
        r.outcome = outcome;
        r.error = error;
        r
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
        // A clash fails the run with its findings as the error: retried like any failure.
        let clash = Error::Findings {
            kind: ErrorKind::IdentityClash,
            message: "username held".into(),
        };
        within(b.after(&report(Outcome::Failed, Some(clash))), s(40));
        // An initial delay above the interval: the interval caps it too.
        let mut slow = RetryBackoff::new(s(90), s(60));
        within(slow.after(&failed()), s(60));
    }
}
