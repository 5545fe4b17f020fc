//! The systemd watchdog: pings while the daemon is alive ([`Health::liveness`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// The systemd watchdog: every `every`, `ping` (WATCHDOG=1) while the daemon is alive
/// ([`Health::liveness`]), nothing while it is not, so that systemd's `WatchdogSec=` restarts a
/// daemon whose scheduler stopped or whose run outlived its deadline. Ends with `cancel`.
pub async fn watchdog(
    health: Arc<Health>,
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
        match health.liveness().problem {
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
