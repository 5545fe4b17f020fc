//! Builds the object graph once and runs it: `run_once` for `--once`, `plan` and the tests, and
//! `run_until_stopped` for the daemon (HTTP, schedule, systemd notifications, graceful
//! shutdown on one `CancellationToken`). Reads every section of the config, through the units.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{IdentitySource, Settings};
use crate::error::{Error, Result};
use crate::identity::keycloak::KeycloakSource;
use crate::identity::realm_file::{RealmFileSource, RealmInput};
use crate::identity::{IdentityProvider, RoleFilter};
use crate::metrics::Metrics;
use crate::reconcile::{Engine, Mode, Outcome, RunReport};
use crate::seed::ReferenceSeed;

/// Validates what the config points at (seed, realm source, role map) and builds the engine.
pub fn build_engine(settings: Settings) -> Result<Engine> {
    let seed = ReferenceSeed::load(settings.seed.path.as_deref())?;
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
    let filter = RoleFilter::new(&settings.identity);
    let identities: Arc<dyn IdentityProvider> = match settings.identity.source {
        IdentitySource::RealmFile => {
            let input = RealmInput::from_setting(settings.identity.realm_file.as_deref())?;
            Arc::new(
                RealmFileSource::new(input, filter, settings.database.batch_size)
                    .with_realm(&settings.keycloak.realm),
            )
        }
        IdentitySource::Keycloak => Arc::new(KeycloakSource::new(
            &settings.keycloak,
            filter,
            settings.database.batch_size,
            settings.startup.wait_timeout,
        )?),
    };
    Ok(Engine {
        settings,
        seed,
        identities,
    })
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
}

impl App {
    pub fn new(engine: Engine) -> Arc<Self> {
        Arc::new(App {
            engine,
            metrics: Metrics::new(),
            inflight: tokio::sync::Mutex::new(()),
            last: Mutex::new(None),
            first_done: AtomicBool::new(false),
            notify_systemd: std::env::var_os("NOTIFY_SOCKET").is_some(),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.engine.settings
    }

    /// One run, waiting for the previous one to finish if needed.
    pub async fn run_once(
        &self,
        trigger: &str,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> RunReport {
        let _guard = self.inflight.lock().await;
        self.run_locked(trigger, wait, cancel).await
    }

    async fn run_locked(
        &self,
        trigger: &str,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> RunReport {
        let report = self.engine.run(Mode::Apply, trigger, wait, cancel).await;
        self.metrics
            .record_run(&report, self.engine.identities.name());
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

    /// A scheduled tick: skipped (and counted) when a run is still going.
    pub async fn tick(&self, cancel: &CancellationToken) -> Option<RunReport> {
        match self.inflight.try_lock() {
            Ok(_guard) => Some(self.run_locked("schedule", Duration::ZERO, cancel).await),
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

/// The daemon: HTTP, a run at start, then the schedule, until `cancel` fires.
pub async fn run_until_stopped(
    app: Arc<App>,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<()> {
    let http = tokio::spawn(crate::http::serve(app.clone(), listener, cancel.clone()));

    if let Some(interval) = sd_notify::watchdog_enabled() {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(interval / 2);
            loop {
                tokio::select! {
                    _ = t.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
                    _ = cancel.cancelled() => break,
                }
            }
        });
    }

    // The first run waits for the dependencies; it never ends the daemon.
    let first = {
        let app = app.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let wait = app.settings().startup.wait_timeout;
            app.run_once("startup", wait, &cancel).await
        })
    };

    let mut scheduler = crate::schedule::start(app.clone(), cancel.clone()).await?;
    cancel.cancelled().await;
    tracing::info!("shutting down: no new runs; waiting for the run in flight");
    let _ = scheduler.shutdown().await;
    let grace = app.settings().shutdown.grace;
    if app.drain(grace).await {
        tracing::info!("shutdown complete");
    } else {
        tracing::warn!(grace_secs = grace.as_secs(), "the run in flight did not finish within shutdown.grace; its open transaction is rolled back");
    }
    first.abort();
    let _ = http.await;
    if app.notify_systemd {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
    Ok(())
}
