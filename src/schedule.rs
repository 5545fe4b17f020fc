//! The schedule: when a run happens, and nothing else. A `tokio-cron-scheduler` job on
//! `schedule.cron` (six fields, seconds first, UTC) starts a tick through the run gate
//! ([`RunGate::spawn_tick`]), which skips it when a run is still going; across replicas the
//! advisory lock decides. A second job, the heartbeat, runs every second and marks the
//! scheduler alive ([`Health::heartbeat`]): liveness and the systemd watchdog rest on it.
//! The retries of failed full runs are the gate's own ([`RunGate::spawn_retries`]).
//! Reads `schedule.cron`.

use std::sync::Arc;

use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::gate::RunGate;
use crate::health::Health;

/// Every second.
const HEARTBEAT_CRON: &str = "* * * * * *";

/// Starts the scheduler: the tick job and the heartbeat job. Stopped by the caller
/// (`JobScheduler::shutdown`); a tick that fires after `cancel` starts nothing.
pub async fn start(
    gate: &Arc<RunGate>,
    health: &Arc<Health>,
    cancel: &CancellationToken,
) -> Result<JobScheduler> {
    let cron = gate.settings().schedule.cron.clone();
    let (gate, beat, cancel) = (gate.clone(), health.clone(), cancel.clone());
    let sched = JobScheduler::new()
        .await
        .map_err(|e| Error::Io(format!("cannot start the scheduler: {e}")))?;
    let job = Job::new_async(cron.as_str(), move |_id, _lock| {
        if !cancel.is_cancelled() {
            // The run goes on a task of the gate's own, so the scheduler's tick never waits
            // for it, and shutdown does.
            gate.spawn_tick(&cancel);
        }
        Box::pin(async {})
    })
    .map_err(|e| Error::config(format!("schedule.cron {cron:?} is invalid: {e}")))?;
    sched
        .add(job)
        .await
        .map_err(|e| Error::Io(format!("cannot schedule the job: {e}")))?;
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
