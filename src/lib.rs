//! seedkeeper: a Keycloak-aware identity bootstrap daemon. It applies the platform schema and
//! the reference seed to PostgreSQL, and keeps realm users, their admin bindings and personal
//! tenants in sync with Keycloak, once (`--once`) or on a schedule.
//!
//! Layout (each arrow of the data flow crosses one module boundary):
//!
//! ```text
//! cli ──> config::load ──> app::build ──> gate::RunGate ──> reconcile::Engine::run ──> store
//!                                                            │        ▲       (PostgreSQL)
//!                                   seed (what should exist)─┘        └─ identity (who exists
//!                                                                        in Keycloak)
//! app::Daemon::build ──> http (/healthz /readyz /metrics) ──> health ──> gate
//!                        schedule (cron: when) ──> gate; events (the event follower) ──> gate
//! ```
//!
//! - [`config`]: settings, layered load, validation, secrets.
//! - [`seed`]: the reference seed model and its validation.
//! - [`identity`]: identity sources (`keycloak`, `realm-file`).
//! - [`reconcile`]: units (schema, reference_seed, identities, role_bindings, tenants), plan/apply.
//! - [`store`]: connections, migrations, the advisory lock, the evidence table.
//! - [`trust`]: which CAs TLS trusts (the OS trust store, else the built-in Mozilla set).
//! - [`retry`]: the one retry policy (backoff, limits, cancellable waits) of every dependency wait.
//! - [`progress`]: how far a run has got (bars on a terminal, `seeding_progress` log lines).
//! - [`gate`]: the one way a run starts (overlap guard, retries, one entry point per trigger).
//! - [`health`]: liveness and readiness.
//! - [`app`], [`schedule`], [`http`], [`metrics`], [`telemetry`]: the daemon around it.

#![forbid(unsafe_code)]

mod names;
pub mod process;

/// The inner modules: public with the `testing` feature, which only the integration tests and
/// benches turn on (through the dev-dependency of this package on itself, Cargo.toml), and
/// crate-private otherwise, so a build of the binary has no public surface but [`process`].
macro_rules! inner_modules {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "testing")]
        pub mod $name;
        #[cfg(not(feature = "testing"))]
        pub(crate) mod $name;
    )*};
}

inner_modules!(
    app, cli, config, cron, error, events, gate, health, http, identity, metrics, model, progress,
    reconcile, retry, schedule, seed, store, telemetry, trust,
);
