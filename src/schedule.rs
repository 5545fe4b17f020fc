//! The schedule: a `tokio-cron-scheduler` job on `schedule.cron` (six fields, seconds first,
//! UTC) that triggers a run. Overlapping ticks are skipped by the app's overlap guard; across
//! replicas the advisory lock decides. A second job, the heartbeat, runs every second and marks
//! the scheduler alive ([`App::heartbeat`]): liveness and the systemd watchdog rest on it.
//!
//! A failed full run is retried without waiting for the next tick ([`spawn_retries`]): after
//! `schedule.retry_initial`, doubling after each failure in a row, capped at the schedule's
//! [`interval`], so a database restarted for two seconds costs seconds of staleness rather than
//! an interval. A retry is a run like any other (overlap guard, run lock, `run.timeout`, stopped
//! by a shutdown) with trigger `retry`; any run that starts first (a tick) takes its place, and a
//! success resets the backoff ([`RetryBackoff`]).
//! Reads `schedule.cron` and `schedule.retry_initial`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use croner::parser::{CronParser, Seconds};
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::error::{Error, Result};
use crate::reconcile::{Outcome, RunReport};
use crate::retry::{Limit, Policy};

/// Every second.
const HEARTBEAT_CRON: &str = "* * * * * *";

pub async fn start(app: Arc<App>, cancel: CancellationToken) -> Result<JobScheduler> {
    let cron = app.settings().schedule.cron.clone();
    let heartbeat_app = app.clone();
    let sched = JobScheduler::new()
        .await
        .map_err(|e| Error::Io(format!("cannot start the scheduler: {e}")))?;
    let job = Job::new_async(cron.as_str(), move |_id, _lock| {
        let app = app.clone();
        let cancel = cancel.clone();
        Box::pin(async move {
            if cancel.is_cancelled() {
                return;
            }
            // The run goes on its own task so the scheduler's tick never waits for it.
            tokio::spawn(async move {
                app.tick(&cancel).await;
            });
        })
    })
    .map_err(|e| Error::config(format!("schedule.cron {cron:?} is invalid: {e}")))?;
    sched
        .add(job)
        .await
        .map_err(|e| Error::Io(format!("cannot schedule the job: {e}")))?;
    let beat = heartbeat_app;
    let heartbeat = Job::new_async(HEARTBEAT_CRON, move |_id, _lock| {
        beat.heartbeat();
        Box::pin(async {})
    })
    .map_err(|e| Error::Io(format!("cannot schedule the heartbeat: {e}")))?;
    sched
        .add(heartbeat)
        .await
        .map_err(|e| Error::Io(format!("cannot schedule the heartbeat: {e}")))?;
    sched
        .start()
        .await
        .map_err(|e| Error::Io(format!("cannot start the scheduler: {e}")))?;
    Ok(sched)
}

/// The schedule's interval: the time between its next two fire times (for an irregular
/// expression such as `0 0 9,17 * * *`, the gap that comes next). Parsed as the scheduler parses
/// it. An error when the expression does not parse or never fires again.
pub fn interval(cron: &str) -> std::result::Result<Duration, String> {
    let schedule = CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(cron)
        .map_err(|e| e.to_string())?;
    let never = |_| "it never fires (twice) from now on".to_string();
    let first = schedule
        .find_next_occurrence(&Utc::now(), false)
        .map_err(never)?;
    let second = schedule
        .find_next_occurrence(&first, false)
        .map_err(never)?;
    (second - first)
        .to_std()
        .map_err(|_| "its fire times do not follow one another".into())
}

/// When the daemon retries a failed full run: after `initial`, doubling with each failure in a
/// row, at most `cap` (the schedule's interval: by then the next tick comes first anyway).
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

/// The task that runs the retries [`App`] asks for: it sleeps until the retry is due, and starts
/// it unless a run started meanwhile (which then decides whether a retry is due). Ends with
/// `cancel`; a retry in flight is stopped like any run (see [`App::drain`]).
pub fn spawn_retries(app: Arc<App>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut due = app.retry_due();
        loop {
            let at = *due.borrow_and_update();
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = due.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = async {
                    match at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    app.retry(&cancel).await;
                }
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::reconcile::{Mode, Trigger};

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
    fn the_interval_is_the_time_between_the_next_two_fire_times() {
        let s = Duration::from_secs;
        assert_eq!(interval("0 */5 * * * *"), Ok(s(300)));
        assert_eq!(interval("*/1 * * * * *"), Ok(s(1)));
        assert_eq!(interval("0 0 * * * *"), Ok(s(3600)));
        // Once a year: the cap is a year, so the backoff doubles as long as failures go on.
        assert!(interval("0 0 0 1 1 *").unwrap() >= s(365 * 86400));
        assert!(interval("0 0 0 30 2 *").is_err(), "February 30 never comes");
        assert!(interval("not cron").is_err());
    }

    #[test]
    fn retries_double_from_the_initial_delay_up_to_the_interval_and_reset_after_a_success() {
        let s = Duration::from_secs;
        let mut b = RetryBackoff::new(s(10), s(60));
        let failed = || report(Outcome::Failed, Some(Error::Io("down".into())));
        let delays: Vec<_> = (0..5).map(|_| b.after(&failed()).unwrap()).collect();
        assert_eq!(delays, [s(10), s(20), s(40), s(60), s(60)]);
        assert_eq!(b.after(&report(Outcome::Succeeded, None)), None);
        assert_eq!(b.after(&failed()), Some(s(10)), "reset by the success");
        // A lock held by a replica is not a failure; a shutdown retries nothing. Neither resets.
        assert_eq!(b.after(&report(Outcome::Skipped, None)), None);
        assert_eq!(
            b.after(&report(Outcome::Failed, Some(Error::Cancelled))),
            None
        );
        assert_eq!(b.after(&failed()), Some(s(20)));
        // A clash fails the run without an error value: retried like any failure.
        assert_eq!(b.after(&report(Outcome::Failed, None)), Some(s(40)));
        // An initial delay above the interval: the interval caps it too.
        let mut slow = RetryBackoff::new(s(90), s(60));
        assert_eq!(slow.after(&failed()), Some(s(60)));
    }
}
