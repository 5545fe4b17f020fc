//! The schedule: a `tokio-cron-scheduler` job on `schedule.cron` (six fields, seconds first,
//! UTC) that triggers a run. Overlapping ticks are skipped by the app's overlap guard; across
//! replicas the advisory lock decides. A second job, the heartbeat, runs every second and marks
//! the scheduler alive ([`App::heartbeat`]): liveness and the systemd watchdog rest on it.
//!
//! A failed full run is retried without waiting for the next tick ([`spawn_retries`]): after
//! `schedule.retry_initial`, doubling after each failure in a row (each wait jittered down to
//! half of that, so replicas that failed together retry apart), capped at the schedule's
//! interval ([`crate::cron::interval`]), so a database restarted for two seconds costs seconds of staleness rather than
//! an interval. A retry is a run like any other (overlap guard, run lock, `run.timeout`, stopped
//! by a shutdown) with trigger `retry`; any run that starts first (a tick) takes its place, and a
//! success resets the backoff ([`crate::app::state::RetryBackoff`]).
//! Reads `schedule.cron` and `schedule.retry_initial`.

use std::sync::Arc;

use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::app::state::App;
use crate::error::{Error, Result};

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
            // The run goes on its own task so the scheduler's tick never waits for it; tracked,
            // so that shutdown waits for it.
            let run = app.clone();
            app.spawn_run(async move {
                run.tick(&cancel).await;
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
