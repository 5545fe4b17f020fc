//! Builds the object graph once and runs it: `run_once` for `--once`, `plan` and the tests, and
//! [`Application`] for the daemon: `Application::build` validates the inputs, builds the engine
//! and binds `http.listen` (port 0 picks a free port, [`Application::local_addr`] says which);
//! `run_until_stopped` serves HTTP, runs the schedule and the retries of failed full runs
//! (`schedule::spawn_retries`), notifies systemd and shuts down gracefully on one
//! `CancellationToken`. `main` and the test harness both start the daemon this way.
//! Reads every section of the config, through the units.
//! The state the running parts share is [`state::App`]; the systemd watchdog is in [`watchdog`].

pub mod state;
pub mod watchdog;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use state::{judge, App, Liveness, Parts, HEARTBEAT_STALE, PROBE_TIMEOUT, RUN_OVERRUN};
pub use watchdog::watchdog;

use crate::config::{IdentitySource, Settings};
use crate::error::{Error, Result};
use crate::identity::keycloak::{AdminClient, KeycloakSource};
use crate::identity::realm_file::{RealmFileSource, RealmInput};
use crate::identity::{IdentityProvider, RoleFilter};
use crate::metrics::{Metrics, Series};
use crate::reconcile::{Engine, Trigger};
use crate::seed::ReferenceSeed;

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
        list_changes: false,
        allow_offboard: None,
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
        {
            let run = app.clone();
            let cancel = cancel.clone();
            app.spawn_run(async move {
                let wait = run.settings().startup.wait_timeout;
                run.run_once(Trigger::Startup, wait, &cancel).await;
            });
        }

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
