//! The daemon's health, [`Health`]: liveness (`/healthz`, the systemd watchdog) and the
//! database check of readiness (`/readyz`), around the [`RunGate`] whose runs they judge.
//!
//! Liveness ([`Health::liveness`]) is: the scheduler's heartbeat job ran within
//! [`HEARTBEAT_STALE`], and no run has outlived `run.timeout` (plus [`RUN_OVERRUN`] to end it).
//! Neither depends on PostgreSQL or Keycloak, so an outage of either never makes the daemon look
//! dead; that is readiness. It starts no run and knows nothing of HTTP: `http` and `schedule`
//! read it. Reads `run.timeout` and `database.*` (the probe's connection).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::gate::RunGate;
use crate::store::Db;

/// The scheduler's heartbeat job runs every second; older than this, the scheduler counts as
/// stopped and the daemon as wedged.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(10);

/// How far past `run.timeout` a run may still be in flight (being stopped and recorded, see
/// `reconcile::STOP_BUDGET`) before the daemon counts as wedged.
pub const RUN_OVERRUN: Duration = Duration::from_secs(15);

/// How long `/readyz` waits for the database.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether the daemon is alive, and the figures behind the verdict.
#[derive(Debug, Clone)]
pub struct Liveness {
    pub heartbeat_age: Duration,
    pub run_age: Option<Duration>,
    /// Why the daemon is not alive; `None` when it is.
    pub problem: Option<String>,
}

/// The liveness verdict from the heartbeat's age and the age of the run in flight: why the
/// daemon counts as wedged, or `None` when it is alive.
pub fn liveness_verdict(
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

/// Liveness and readiness of one daemon: see the module's documentation.
pub struct Health {
    gate: Arc<RunGate>,
    /// When the scheduler's heartbeat job last ran (the creation of this before it first does).
    heartbeat: Mutex<Instant>,
    /// The connection `/readyz` keeps and reuses; replaced when broken.
    probe: tokio::sync::Mutex<Option<Db>>,
}

impl Health {
    pub fn new(gate: Arc<RunGate>) -> Arc<Self> {
        Arc::new(Health {
            gate,
            heartbeat: Mutex::new(Instant::now()),
            probe: tokio::sync::Mutex::new(None),
        })
    }

    /// The gate whose runs this judges (readiness reads its last outcome).
    pub(crate) fn gate(&self) -> &Arc<RunGate> {
        &self.gate
    }

    /// Called by the scheduler's heartbeat job: the scheduler is alive.
    pub(crate) fn heartbeat(&self) {
        if let Ok(mut h) = self.heartbeat.lock() {
            *h = Instant::now();
        }
    }

    /// Liveness: the scheduler ticks and no run has outlived its deadline. PostgreSQL and
    /// Keycloak play no part in it.
    pub(crate) fn liveness(&self) -> Liveness {
        let heartbeat_age = self
            .heartbeat
            .lock()
            .map(|h| h.elapsed())
            .unwrap_or(Duration::MAX);
        let run_age = self.gate.run_age();
        Liveness {
            heartbeat_age,
            run_age,
            problem: liveness_verdict(heartbeat_age, run_age, self.gate.settings().run.timeout),
        }
    }

    /// Readiness' database check on one kept connection: whether the server answers and takes
    /// writes ([`crate::store::server::read_only`]), reconnecting once when the kept connection
    /// is broken; within `within` (a connection that does not answer is dropped).
    pub(crate) async fn probe_database(&self, within: Duration) -> std::result::Result<(), String> {
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
                        let db = crate::store::connect(&self.gate.settings().database)
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
    pub(crate) async fn close_probe(&self) {
        *self.probe.lock().await = None;
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
        assert_eq!(liveness_verdict(s(1), None, timeout), None);
        assert_eq!(
            liveness_verdict(HEARTBEAT_STALE, Some(s(70)), timeout),
            None
        );
        let stale = liveness_verdict(HEARTBEAT_STALE + s(1), None, timeout).unwrap_or_default();
        assert!(
            stale.contains("scheduler has not ticked for 11s"),
            "{stale}"
        );
        assert_eq!(
            liveness_verdict(s(1), Some(timeout + RUN_OVERRUN), timeout),
            None
        );
        let overrun =
            liveness_verdict(s(1), Some(timeout + RUN_OVERRUN + s(1)), timeout).unwrap_or_default();
        assert!(overrun.contains("past run.timeout (60s)"), "{overrun}");
    }
}
