//! The schedule: a `tokio-cron-scheduler` job on `schedule.cron` (six fields, seconds first,
//! UTC) that triggers a run. Overlapping ticks are skipped by the app's overlap guard; across
//! replicas the advisory lock decides. A second job, the heartbeat, runs every second and marks
//! the scheduler alive ([`App::heartbeat`]): liveness and the systemd watchdog rest on it.
//! Reads `schedule.cron`.

use std::sync::Arc;

use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::app::App;
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
