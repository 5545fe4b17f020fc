//! Builds the object graph once and runs it. [`build`] validates the inputs and builds the
//! [`Components`] of one process (`--once`, `plan`, the tests); [`Daemon`] is the daemon:
//! `Daemon::build` builds them, wraps the engine in its [`RunGate`] and binds `http.listen`
//! (port 0 picks a free port, [`Daemon::local_addr`] says which); `run_until_stopped` serves
//! HTTP, starts the startup run, the schedule, the retries and the event follower, notifies
//! systemd and shuts down gracefully on one `CancellationToken`. `main` (through
//! `cli::execute`) and the test harness both start the daemon this way.
//! Reads every section of the config, through the units.
//! How runs start is [`crate::gate`]; liveness and readiness [`crate::health`]; the systemd
//! watchdog [`watchdog`].

pub mod watchdog;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub(crate) use crate::gate::RunGate;
pub(crate) use crate::health::Health;
#[cfg(feature = "testing")]
pub use crate::health::{liveness_verdict, Liveness, HEARTBEAT_STALE, PROBE_TIMEOUT, RUN_OVERRUN};
pub use watchdog::watchdog;

use crate::config::{IdentitySource, Settings};
use crate::error::{Error, Result};
use crate::identity::keycloak::{AdminClient, KeycloakSource};
use crate::identity::realm_file::{RealmFileSource, RealmInput};
use crate::identity::{IdentityProvider, RoleFilter};
use crate::metrics::{Metrics, Series};
use crate::reconcile::Engine;
use crate::seed::ReferenceSeed;

/// What one process is built from, in order: the metrics registry first, then each part with
/// its instruments: the Keycloak admin client (shared by the identity source and the event
/// follower), then the engine.
pub struct Components {
    pub engine: Engine,
    pub metrics: Metrics,
    /// The Keycloak source, when the identity source is Keycloak: the event follower reads
    /// through its client too, so the two share one token and one set of instruments.
    pub keycloak: Option<Arc<KeycloakSource>>,
}

impl Components {
    /// The run gate around the engine: how every run of this process starts.
    pub fn into_gate(self) -> Arc<RunGate> {
        RunGate::new(self.engine, self.metrics)
    }
}

/// Validates what the config points at (seed, realm source, role map) and builds the
/// components.
pub fn build(settings: Settings) -> Result<Components> {
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
    Ok(Components {
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

/// The daemon, built and not yet running: its run gate, its health, and its bound HTTP
/// listener.
pub struct Daemon {
    gate: Arc<RunGate>,
    health: Arc<Health>,
    /// The Keycloak source, whose client the event follower shares.
    keycloak: Option<Arc<KeycloakSource>>,
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl Daemon {
    /// Validates what the config points at, builds the engine, its metrics and its gate, and
    /// binds `http.listen`. Nothing is asked of PostgreSQL or Keycloak yet.
    pub async fn build(settings: Settings) -> std::result::Result<Daemon, BuildError> {
        let listen = settings.http.listen.clone();
        let Components {
            engine,
            metrics,
            keycloak,
        } = build(settings)?;
        let bound = TcpListener::bind(&listen)
            .await
            .and_then(|l| Ok((l.local_addr()?, l)));
        let (local_addr, listener) =
            bound.map_err(|reason| BuildError::Listen { listen, reason })?;
        let gate = RunGate::new(engine, metrics);
        Ok(Daemon {
            health: Health::new(gate.clone()),
            gate,
            keycloak,
            listener,
            local_addr,
        })
    }

    /// The address the HTTP listener is bound to (the port picked when `http.listen` says 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The run gate: every run of the daemon starts through it.
    #[cfg(feature = "testing")]
    pub fn gate(&self) -> Arc<RunGate> {
        self.gate.clone()
    }

    /// The daemon: HTTP, a run at start, then the schedule, until `cancel` fires.
    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<()> {
        let Daemon {
            gate,
            health,
            keycloak,
            listener,
            ..
        } = self;
        let http = tokio::spawn(crate::http::serve(health.clone(), listener, cancel.clone()));
        if let Some(interval) = sd_notify::watchdog_enabled() {
            tokio::spawn(watchdog(
                health.clone(),
                interval / 2,
                cancel.clone(),
                || {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                },
            ));
        }
        // The first run waits for the dependencies; it never ends the daemon.
        gate.spawn_startup(&cancel);
        let mut scheduler = crate::schedule::start(&gate, &health, &cancel).await?;
        let retries = gate.spawn_retries(&cancel);
        let events = start_following(&gate, keycloak, &cancel);
        cancel.cancelled().await;
        let stopping = Instant::now();
        tracing::info!("shutting down: no new runs; waiting for the run in flight");
        let _ = scheduler.shutdown().await;
        let grace = gate.settings().shutdown.grace;
        if gate.drain(grace).await {
            tracing::info!("shutdown complete");
        } else {
            tracing::warn!(grace_secs = grace.as_secs(), "the run in flight did not finish within shutdown.grace; its open transaction is rolled back");
        }
        retries.abort();
        stop_following(events, grace.saturating_sub(stopping.elapsed())).await;
        let _ = http.await;
        health.close_probe().await;
        if gate.notifies_systemd() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        }
        Ok(())
    }
}

/// With the keycloak source and `events.enabled`: the event follower, and the task that runs
/// the full runs it asks for (trigger `event-full`), both through the gate. Both end with
/// `cancel`.
fn start_following(
    gate: &Arc<RunGate>,
    keycloak: Option<Arc<KeycloakSource>>,
    cancel: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let settings = gate.settings();
    if !settings.events_enabled() {
        return Vec::new();
    }
    // The identity source's client: one token, one set of seedkeeper_keycloak_* series.
    let Some(kc) = keycloak else {
        return Vec::new();
    };
    let follower = crate::events::Follower {
        kc,
        gate: gate.clone(),
        database: settings.database.clone(),
        realm: settings.keycloak.realm.clone(),
        poll_interval: settings.events.poll_interval,
        state: Arc::new(crate::events::FollowerState::default()),
        metrics: gate.metrics().events().clone(),
    };
    let follow = tokio::spawn(follower.run(cancel.clone()));
    vec![follow, gate.spawn_full_runs(cancel)]
}

/// Ends the event follower's tasks. The follower may be waiting on Keycloak (a poll, a
/// check): its batches ran under the overlap guard the gate has drained, so it gets a moment
/// within what is left of the grace, then is dropped, request and all; its checkpoint makes the
/// next start read again what it had not applied.
async fn stop_following(tasks: Vec<tokio::task::JoinHandle<()>>, left: Duration) {
    let moment = left.min(Duration::from_secs(1));
    for mut task in tasks {
        if tokio::time::timeout(moment, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
}
