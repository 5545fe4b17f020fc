//! Configuration: `Settings` and its sections, loaded in layers and validated as a whole.
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config`, `SEEDKEEPER_CONFIG`, else
//! `config/seedkeeper.toml` when present) < environment `SEEDKEEPER_*` (nested keys joined with
//! `__`). Unknown keys are errors in every layer, so a typo never passes silently.
//!
//! Secrets (`database.url`, `database.password`, `keycloak.client_secret`) are `SecretString`.
//! Each comes from exactly one of: the TOML file, its environment variable (read raw, so `007`
//! stays `007`), `<VAR>_FILE`, or a systemd credential named after the key in
//! `$CREDENTIALS_DIRECTORY`. Two sources for one secret is an error: there is no precedence to
//! guess. Secrets are exposed in one place each: [`DatabaseSettings::pg_config`] and the token
//! request of the Keycloak client.
//!
//! `validate()` collects every problem before failing, each naming the key, its environment
//! variable and the fix.
//!
//! Layout: this file holds the settings types and the public API ([`load`], [`load_offline`],
//! [`DatabaseSettings::connection`]); `sources` the layers, `secrets` the secret sources,
//! `validate` the checks, [`duration_str`] the duration format, [`database_url`] the database
//! URL's libpq TLS parameters (re-exported here). The URL is parsed here, where it is validated,
//! and `crate::store` connects with what this module made of it: config never needs the store.

pub(crate) mod database_url;
pub(crate) mod files;
mod secrets;
mod sources;
mod validate;

#[cfg(test)]
mod redaction_props;

pub(crate) mod duration_str;
pub(crate) mod offboard_limit;
pub(crate) use offboard_limit::OffboardLimit;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Problems, Result};
use secrets::{de_secret, ser_secret};

pub use database_url::{describe_target, split_libpq_tls, DbTls, RootCert, SslMode};
#[cfg(feature = "testing")]
pub use database_url::{is_loopback_host, remote_hosts};
pub(crate) use files::{read_regular, CONFIG_LIMIT};
#[cfg(feature = "testing")]
pub use files::SECRET_LIMIT;
pub use sources::{ConfigFile, ConfigLayers, ConfigOrigin};

pub(crate) const ENV_PREFIX: &str = "SEEDKEEPER_";
pub(crate) const DEFAULT_CONFIG_PATH: &str = "config/seedkeeper.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemaMode {
    /// Apply pending migrations at the start of every run.
    Apply,
    /// Refuse to run while migrations are pending (a migration job owns DDL).
    Verify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    Keycloak,
    RealmFile,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub environment: Environment,
    /// How often work without progress bars logs `seeding_progress` (tests shorten it). A
    /// top-level key, so that its variable is `SEEDKEEPER_PROGRESS_INTERVAL`, the name
    /// docs/logging.md gave it before it was a key.
    #[serde(with = "duration_str")]
    pub progress_interval: Duration,
    pub database: DatabaseSettings,
    pub schema: SchemaSettings,
    pub seed: SeedSettings,
    pub identity: IdentitySettings,
    pub keycloak: KeycloakSettings,
    pub schedule: ScheduleSettings,
    pub run: RunSettings,
    pub events: EventsSettings,
    pub http: HttpSettings,
    pub startup: StartupSettings,
    pub shutdown: ShutdownSettings,
    pub evidence: EvidenceSettings,
    pub log: LogSettings,
    /// The configuration file that was loaded, and how it was chosen; not a key.
    #[serde(skip)]
    pub config_file: Option<ConfigFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user@host:port/db`; a password in it is allowed but `password` is preferred.
    #[serde(default, deserialize_with = "de_secret", serialize_with = "ser_secret")]
    pub url: Option<SecretString>,
    #[serde(default, deserialize_with = "de_secret", serialize_with = "ser_secret")]
    pub password: Option<SecretString>,
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// Identities a source sends to the identity stage's COPY at a time: up to four such batches
    /// are held at once (the run's largest holding).
    pub batch_size: usize,
    /// PostgreSQL `statement_timeout` of every seedkeeper session; 0 leaves the server's or
    /// role's setting in place.
    #[serde(with = "duration_str")]
    pub statement_timeout: Duration,
    /// PostgreSQL `lock_timeout` of every seedkeeper session; 0 leaves the server's or role's
    /// setting in place.
    #[serde(with = "duration_str")]
    pub lock_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaSettings {
    pub mode: SchemaMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedSettings {
    /// Path of a reference seed TOML; empty = the seed embedded in the binary.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    pub source: IdentitySource,
    /// Realm export file or `kc.sh export --dir` folder; empty = the embedded dev realm.
    pub realm_file: Option<PathBuf>,
    /// Realm roles that make `users.role = 'admin'` (and so `platform_superadmin`).
    pub admin_roles: Vec<String>,
    /// Further realm role -> platform role mappings.
    pub role_map: BTreeMap<String, String>,
    /// The most users one run may offboard: a count or a percentage of the users in the realm
    /// (see [`offboard_limit`]).
    #[serde(default)]
    pub offboard_limit: OffboardLimit,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeycloakSettings {
    pub base_url: Option<String>,
    /// The issuer Keycloak must announce, exactly; unset: any issuer whose path ends in
    /// `/realms/{realm}` (a realm behind a frontend URL announces its public host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    pub realm: String,
    pub client_id: String,
    #[serde(default, deserialize_with = "de_secret", serialize_with = "ser_secret")]
    pub client_secret: Option<SecretString>,
    /// Users per page (`max`).
    pub page_size: u32,
    /// Pages requested at once; keeps Keycloak's load bounded.
    pub concurrency: usize,
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
    /// Retries of one request on 429, 5xx and timeouts.
    pub max_retries: u32,
    /// Extra PEM CA bundle trusted in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    pub tls_verify: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    /// Six fields, seconds first, UTC.
    pub cron: String,
    /// The wait before the daemon retries a failed full run; it doubles with each failure in a
    /// row, up to the schedule's interval.
    #[serde(with = "duration_str")]
    pub retry_initial: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    /// Follow Keycloak's user and admin events between full runs (daemon, keycloak source).
    /// Unset: on with the keycloak source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// How often the event follower polls.
    #[serde(with = "duration_str")]
    pub poll_interval: Duration,
}

impl Settings {
    /// Whether the daemon follows Keycloak's events: `events.enabled`, by default on with the
    /// keycloak source (the realm-file source has no events).
    pub(crate) fn events_enabled(&self) -> bool {
        self.identity.source == IdentitySource::Keycloak && self.events.enabled.unwrap_or(true)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    /// Bounds a whole run (waiting for dependencies included): past it the run is cancelled,
    /// rolled back and recorded `failed`.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
    /// Connections served at once; at the cap, the connection that has waited longest without
    /// a request in progress is closed to make room (see `crate::http`).
    pub max_connections: usize,
    /// How long a client has to send a request's headers, and how long a kept-alive connection
    /// may sit idle before its next request.
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartupSettings {
    #[serde(with = "duration_str")]
    pub wait_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    #[serde(with = "duration_str")]
    pub grace: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceSettings {
    /// `seed_runs` rows kept; older ones are pruned after each run.
    pub retention: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` env-filter directives; `RUST_LOG` overrides.
    pub filter: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            environment: Environment::Development,
            progress_interval: Duration::from_secs(10),
            database: DatabaseSettings {
                url: None,
                password: None,
                connect_timeout: Duration::from_secs(5),
                batch_size: 1000,
                statement_timeout: Duration::from_secs(300),
                lock_timeout: Duration::from_secs(30),
            },
            schema: SchemaSettings {
                mode: SchemaMode::Apply,
            },
            seed: SeedSettings { path: None },
            identity: IdentitySettings {
                source: IdentitySource::RealmFile,
                realm_file: None,
                admin_roles: vec!["admin".to_string()],
                role_map: BTreeMap::from([
                    (
                        "platform-admin".to_string(),
                        "platform_superadmin".to_string(),
                    ),
                    ("ops".to_string(), "platform_ops".to_string()),
                ]),
                offboard_limit: OffboardLimit::default(),
            },
            keycloak: KeycloakSettings {
                base_url: None,
                issuer: None,
                realm: "dev".to_string(),
                client_id: "seedkeeper".to_string(),
                client_secret: None,
                page_size: 500,
                concurrency: 4,
                request_timeout: Duration::from_secs(10),
                max_retries: 5,
                ca_file: None,
                tls_verify: true,
            },
            schedule: ScheduleSettings {
                cron: "0 */5 * * * *".to_string(),
                retry_initial: Duration::from_secs(10),
            },
            run: RunSettings {
                timeout: Duration::from_secs(600),
            },
            events: EventsSettings {
                enabled: None,
                poll_interval: Duration::from_secs(2),
            },
            http: HttpSettings {
                listen: "127.0.0.1:8787".to_string(),
                max_connections: 1024,
                header_read_timeout: Duration::from_secs(5),
            },
            startup: StartupSettings {
                wait_timeout: Duration::from_secs(60),
            },
            shutdown: ShutdownSettings {
                grace: Duration::from_secs(30),
            },
            evidence: EvidenceSettings { retention: 500 },
            log: LogSettings {
                format: LogFormat::Text,
                filter: "info".to_string(),
            },
            config_file: None,
        }
    }
}

/// Loads and validates the configuration. Every problem is reported at once.
pub fn load(sources: &ConfigLayers) -> Result<Settings> {
    load_with(sources, true)
}

/// Like [`load`], for commands that never touch the database (`export-sql`, `healthcheck`).
pub(crate) fn load_offline(sources: &ConfigLayers) -> Result<Settings> {
    load_with(sources, false)
}

fn load_with(sources: &ConfigLayers, need_database: bool) -> Result<Settings> {
    let (figment, file) = sources::layered(sources)?;
    let mut settings: Settings = figment.extract().map_err(|errors| {
        Error::Config(Problems(
            errors
                .into_iter()
                .map(|e| sources::describe_figment_error(&e, sources))
                .collect(),
        ))
    })?;
    settings.config_file = file;
    let mut problems = Vec::new();
    secrets::resolve(&mut settings, sources, &mut problems);
    validate::validate(&settings, need_database, &mut problems);
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(Error::Config(Problems(problems)))
    }
}

impl DatabaseSettings {
    /// The one place the database secrets are exposed: the connection config, and the libpq TLS
    /// parameters taken out of the URL (see [`DbTls`]).
    pub(crate) fn connection(&self) -> Result<(tokio_postgres::Config, DbTls)> {
        let url = self
            .url
            .as_ref()
            .ok_or_else(|| Error::config("database.url is not set"))?;
        // Validation refuses it too; this holds for settings built without it (tests, tools).
        if let Some(problem) =
            crate::config::database_url::database_userinfo_problem(url.expose_secret())
        {
            return Err(Error::config(problem));
        }
        let (rest, tls) = split_libpq_tls(url.expose_secret()).map_err(Error::config)?;
        let mut cfg = tokio_postgres::Config::from_str(&rest)
            .map_err(|_| Error::config("database.url is not a valid PostgreSQL URL"))?;
        if let Some(p) = &self.password {
            cfg.password(p.expose_secret().as_bytes());
        }
        cfg.connect_timeout(self.connect_timeout);
        cfg.application_name("seedkeeper");
        self.session_timeouts(&mut cfg);
        // libpq never uses TLS over a Unix socket; tokio-postgres would ask and be refused.
        let unix_only = !cfg.get_hosts().is_empty()
            && cfg.get_hostaddrs().is_empty()
            && cfg
                .get_hosts()
                .iter()
                .all(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)));
        cfg.ssl_mode(match tls.mode {
            _ if unix_only => tokio_postgres::config::SslMode::Disable,
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok((cfg, tls))
    }

    /// The connection config alone (see [`DatabaseSettings::connection`]).
    pub(crate) fn pg_config(&self) -> Result<tokio_postgres::Config> {
        self.connection().map(|(cfg, _)| cfg)
    }

    /// `statement_timeout` and `lock_timeout` as startup options of the session (after any
    /// `options` of the URL, so the keys win); a zero leaves the server's or role's setting.
    fn session_timeouts(&self, cfg: &mut tokio_postgres::Config) {
        let mut options = cfg.get_options().unwrap_or_default().to_string();
        for (name, d) in [
            ("statement_timeout", self.statement_timeout),
            ("lock_timeout", self.lock_timeout),
        ] {
            if !d.is_zero() {
                if !options.is_empty() {
                    options.push(' ');
                }
                options.push_str(&format!("-c {name}={}", d.as_millis()));
            }
        }
        if !options.is_empty() {
            cfg.options(&options);
        }
    }

    /// `host:port/db` for messages: never the user or the password.
    pub(crate) fn target(&self) -> String {
        match self.pg_config() {
            Ok(cfg) => describe_target(&cfg),
            Err(_) => "(invalid database.url)".to_string(),
        }
    }
}

impl Settings {
    /// Where the configuration came from, in one line: the file and how it was chosen, or none.
    pub(crate) fn provenance(&self) -> String {
        match &self.config_file {
            Some(f) => format!(
                "configuration file {} (chosen by {})",
                f.absolute.display(),
                f.origin.as_str()
            ),
            None => "no configuration file (defaults and the SEEDKEEPER_* environment)".to_string(),
        }
    }

    /// Logs where the configuration came from, once at start: a file picked up from the
    /// working directory is otherwise invisible.
    pub(crate) fn log_provenance(&self) {
        match &self.config_file {
            Some(f) => tracing::info!(
                config.file = %f.absolute.display(),
                config.chosen_by = f.origin.as_str(),
                "configuration file loaded"
            ),
            None => tracing::info!(
                "no configuration file loaded: defaults and the SEEDKEEPER_* environment"
            ),
        }
    }

    /// The effective configuration as TOML, every secret replaced by `[REDACTED]`.
    pub(crate) fn redacted_toml(&self) -> String {
        // The Keycloak URLs are no secrets, but a user or password written into one is.
        let mut shown = self.clone();
        for u in [&mut shown.keycloak.base_url, &mut shown.keycloak.issuer]
            .into_iter()
            .flatten()
        {
            *u = crate::config::database_url::redact_url(u);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn load_env(vars: &[(&str, &str)]) -> Result<Settings> {
        load_offline(&ConfigLayers {
            file: None,
            env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn an_overflowing_duration_is_refused_naming_the_key() {
        let e = load_env(&[("SEEDKEEPER_SHUTDOWN__GRACE", "99999999999999999h")])
            .expect_err("99999999999999999h hours overflow a Duration")
            .to_string();
        assert!(e.contains("key `shutdown.grace`"), "{e}");
        assert!(e.contains("SEEDKEEPER_SHUTDOWN__GRACE"), "{e}");
        assert!(e.contains("\"99999999999999999h\" is out of range"), "{e}");
    }

    #[test]
    fn durations_take_combined_spans_from_the_environment() {
        let s = load_env(&[
            ("SEEDKEEPER_RUN__TIMEOUT", "1h 30m"),
            ("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "90"),
            ("SEEDKEEPER_EVENTS__POLL_INTERVAL", "250ms"),
        ])
        .expect("valid durations");
        assert_eq!(s.run.timeout, Duration::from_secs(5400));
        assert_eq!(s.startup.wait_timeout, Duration::from_secs(90));
        assert_eq!(s.events.poll_interval, Duration::from_millis(250));
    }

    #[test]
    fn the_progress_interval_is_a_key_read_from_its_variable_and_bounded() {
        assert_eq!(
            load_env(&[]).expect("defaults").progress_interval,
            Duration::from_secs(10)
        );
        let s = load_env(&[("SEEDKEEPER_PROGRESS_INTERVAL", "300ms")]).expect("300ms");
        assert_eq!(s.progress_interval, Duration::from_millis(300));
        let e = load_env(&[("SEEDKEEPER_PROGRESS_INTERVAL", "50ms")])
            .expect_err("below 100ms")
            .to_string();
        assert!(e.contains("progress_interval 50ms is below 100ms"), "{e}");
        assert!(e.contains("SEEDKEEPER_PROGRESS_INTERVAL"), "{e}");
    }

    /// The test harness's variables share the prefix but are not keys: the layers know nothing
    /// of them, so one reaching seedkeeper is refused like any unknown key, naming it.
    #[test]
    fn a_test_harness_variable_is_an_unknown_key() {
        let e = load_env(&[("SEEDKEEPER_TEST_DATABASE_URL", "postgres://x@127.0.0.1/db")])
            .expect_err("not a key")
            .to_string();
        assert!(e.contains("SEEDKEEPER_TEST_DATABASE_URL"), "{e}");
    }
}
