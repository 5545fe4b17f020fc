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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Problems, Result};

pub const ENV_PREFIX: &str = "SEEDKEEPER_";
pub const DEFAULT_CONFIG_PATH: &str = "config/seedkeeper.toml";

/// Environment variables with the prefix that are not config keys.
const NON_KEY_ENV: &[&str] = &[
    "config",
    "test_database_url",
    "test_keycloak_url",
    "test_keycloak_admin",
    // Tests only: shortens the progress log interval (crate::progress).
    "progress_interval",
];

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
    /// Identities written per statement while streaming.
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
    pub fn events_enabled(&self) -> bool {
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
            database: DatabaseSettings {
                url: None,
                password: None,
                connect_timeout: Duration::from_secs(5),
                batch_size: 5000,
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
        }
    }
}

/// The secrets, their key paths, and the env var / credential names they can come from.
struct SecretKey {
    key: &'static str,
    env: &'static str,
    credential: &'static str,
}

const SECRET_KEYS: &[SecretKey] = &[
    SecretKey {
        key: "database.url",
        env: "SEEDKEEPER_DATABASE__URL",
        credential: "database.url",
    },
    SecretKey {
        key: "database.password",
        env: "SEEDKEEPER_DATABASE__PASSWORD",
        credential: "database.password",
    },
    SecretKey {
        key: "keycloak.client_secret",
        env: "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET",
        credential: "keycloak.client_secret",
    },
];

/// Where configuration comes from. `env` is injectable so tests never touch the process
/// environment (tests run in parallel).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// The process environment and the `--config` path.
    pub fn from_process(config_flag: Option<PathBuf>) -> Self {
        Sources {
            file: config_flag,
            env: std::env::vars().collect(),
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Loads and validates the configuration. Every problem is reported at once.
pub fn load(sources: &Sources) -> Result<Settings> {
    load_with(sources, true)
}

/// Like [`load`], for commands that never touch the database (`export-sql`, `healthcheck`).
pub fn load_offline(sources: &Sources) -> Result<Settings> {
    load_with(sources, false)
}

fn load_with(sources: &Sources, need_database: bool) -> Result<Settings> {
    let mut problems = Vec::new();
    let mut figment = Figment::from(Serialized::defaults(Settings::default()));

    let file = sources.file.clone().or_else(|| {
        sources
            .var("SEEDKEEPER_CONFIG")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    match file {
        Some(path) => {
            if !path.is_file() {
                return Err(Error::config(format!(
                    "config file {} does not exist or is not a file: fix --config or SEEDKEEPER_CONFIG",
                    path.display()
                )));
            }
            if let Err(e) = std::fs::read_to_string(&path) {
                return Err(Error::config(format!(
                    "config file {} cannot be read: {e}",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(&path));
        }
        None => {
            let default = Path::new(DEFAULT_CONFIG_PATH);
            if default.is_file() {
                figment = figment.merge(Toml::file_exact(default));
            }
        }
    }

    // Non-secret keys from the environment. Secrets are read raw below; `_FILE` variables are
    // resolved below too.
    let env_pairs: Vec<(String, String)> = sources
        .env
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix(ENV_PREFIX)?;
            let lower = rest.to_ascii_lowercase();
            if NON_KEY_ENV.contains(&lower.as_str()) {
                return None;
            }
            // Secrets and their `_FILE` variants are resolved separately.
            if SECRET_KEYS
                .iter()
                .any(|s| s.env == k || k.strip_suffix("_FILE") == Some(s.env))
            {
                return None;
            }
            Some((k.clone(), v.clone()))
        })
        .collect();
    figment = figment.merge(EnvPairs(env_pairs));

    let mut settings: Settings = match figment.extract() {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                problems.push(describe_figment_error(&e, sources));
            }
            return Err(Error::Config(Problems(problems)));
        }
    };

    resolve_secrets(&mut settings, sources, &mut problems);
    validate(&settings, need_database, &mut problems);
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(Error::Config(Problems(problems)))
    }
}

/// The `SEEDKEEPER_*` variables as a figment provider. figment's own `Env` reads the process
/// environment; this one reads `Sources`, so tests can inject variables without touching it.
struct EnvPairs(Vec<(String, String)>);

impl figment::Provider for EnvPairs {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable")
    }

    fn data(
        &self,
    ) -> std::result::Result<
        figment::value::Map<figment::Profile, figment::value::Dict>,
        figment::Error,
    > {
        let mut f = Figment::new();
        for (k, v) in &self.0 {
            let key = k[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .replace("__", ".");
            // Same typing as figment's Env: "30" is a number, "[a, b]" an array.
            let value = match v.parse::<figment::value::Value>() {
                Ok(value) => value,
                Err(never) => match never {},
            };
            f = f.merge(Serialized::default(&key, value));
        }
        f.data()
    }
}

fn describe_figment_error(e: &figment::Error, sources: &Sources) -> String {
    let path = e.path.join(".");
    // The key the problem is about: for an unknown field, the path plus the field.
    let key = match &e.kind {
        figment::error::Kind::UnknownField(field, _) => {
            if path.is_empty() {
                field.clone()
            } else if path == *field || path.ends_with(&format!(".{field}")) {
                path.clone()
            } else {
                format!("{path}.{field}")
            }
        }
        _ => path.clone(),
    };
    let env_name = format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase());
    let from_env = match &e.metadata {
        Some(m) => m.name.contains("environment"),
        // figment leaves some errors without metadata: name the variable when one is set.
        None => sources
            .env
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(&env_name)),
    };
    let origin = match &e.metadata {
        _ if from_env => format!(" (environment variable {env_name})"),
        Some(m) => match &m.source {
            Some(src) => format!(" (in {src})"),
            None => format!(" (from {})", m.name),
        },
        None => String::new(),
    };
    match &e.kind {
        figment::error::Kind::UnknownField(_, expected) => format!(
            "unknown key `{key}`{origin}: remove it or fix its spelling (expected one of: {})",
            expected.join(", ")
        ),
        other if key.is_empty() => format!("{other}{origin}"),
        other => format!("key `{key}`{origin}: {other}"),
    }
}

fn secret_slot<'a>(settings: &'a mut Settings, key: &str) -> &'a mut Option<SecretString> {
    match key {
        "database.url" => &mut settings.database.url,
        "database.password" => &mut settings.database.password,
        _ => &mut settings.keycloak.client_secret,
    }
}

fn resolve_secrets(settings: &mut Settings, sources: &Sources, problems: &mut Vec<String>) {
    let cred_dir = sources.var("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    for s in SECRET_KEYS {
        let mut found: Vec<(String, SecretString)> = Vec::new();
        if let Some(v) = secret_slot(settings, s.key).take() {
            found.push(("the config file".to_string(), v));
        }
        if let Some(v) = sources.var(s.env) {
            found.push((
                format!("environment variable {}", s.env),
                SecretString::from(v.to_string()),
            ));
        }
        let file_var = format!("{}_FILE", s.env);
        if let Some(path) = sources.var(&file_var) {
            match read_secret_file(Path::new(path)) {
                Ok(v) => found.push((file_var.clone(), v)),
                Err(why) => problems.push(format!(
                    "{} from {file_var}={path}: {why}: point {file_var} at a readable, non-empty file",
                    s.key
                )),
            }
        }
        if let Some(dir) = &cred_dir {
            let path = dir.join(s.credential);
            if path.exists() {
                match read_secret_file(&path) {
                    Ok(v) => found.push((format!("systemd credential {}", s.credential), v)),
                    Err(why) => problems.push(format!(
                        "{} from systemd credential {}: {why}: fix LoadCredential={}",
                        s.key,
                        path.display(),
                        s.credential
                    )),
                }
            }
        }
        match found.len() {
            0 => {}
            1 => {
                let (_, v) = found.remove(0);
                if v.expose_secret().is_empty() {
                    problems.push(format!(
                        "{} is set but empty: give it a value ({})",
                        s.key, s.env
                    ));
                } else {
                    *secret_slot(settings, s.key) = Some(v);
                }
            }
            _ => problems.push(format!(
                "{} is given more than once ({}): keep exactly one source",
                s.key,
                found
                    .iter()
                    .map(|(w, _)| w.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// Reads a secret file; one trailing newline (as editors and `echo` leave) is not part of it.
fn read_secret_file(path: &Path) -> std::result::Result<SecretString, String> {
    let raw = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "file does not exist".to_string(),
        std::io::ErrorKind::PermissionDenied => {
            "file is not readable (permission denied)".to_string()
        }
        _ => format!("file cannot be read ({})", e.kind()),
    })?;
    let trimmed = raw
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&raw);
    if trimmed.is_empty() {
        return Err("file is empty".to_string());
    }
    Ok(SecretString::from(trimmed.to_string()))
}

/// Every problem of the settings at once, in the order of the configuration table.
fn validate(s: &Settings, need_database: bool, problems: &mut Vec<String>) {
    validate_database(s, need_database, problems);
    validate_identity(s, problems);
    validate_keycloak(s, problems);
    validate_daemon(s, problems);
    validate_limits(s, problems);
    validate_production(s, problems);
}

/// `database.*`: the URL (its TLS parameters included), the connect timeout and the batch size.
fn validate_database(s: &Settings, need_database: bool, problems: &mut Vec<String>) {
    match &s.database.url {
        None if !need_database => {}
        None => problems.push(
            "database.url is not set: set SEEDKEEPER_DATABASE__URL (postgres://user@host:5432/db), \
             SEEDKEEPER_DATABASE__URL_FILE, or the systemd credential database.url"
                .to_string(),
        ),
        Some(url) => match split_libpq_tls(url.expose_secret()) {
            Err(why) => problems.push(format!("{why} (SEEDKEEPER_DATABASE__URL)")),
            Ok((rest, tls)) => match tokio_postgres::Config::from_str(&rest) {
                Err(e) => problems.push(format!(
                    "database.url is not a valid PostgreSQL URL{} (expected postgres://user@host:5432/db) \
                     (SEEDKEEPER_DATABASE__URL); its value is not shown because it may hold a password",
                    url_refusal_reason(&e).map(|r| format!(" ({r})")).unwrap_or_default()
                )),
                Ok(cfg) => validate_database_tls(s, &cfg, &tls, problems),
            },
        },
    }
    if s.database.connect_timeout.is_zero() {
        problems.push(
            "database.connect_timeout must be above 0 (SEEDKEEPER_DATABASE__CONNECT_TIMEOUT)"
                .into(),
        );
    }
    if !(1..=100_000).contains(&s.database.batch_size) {
        problems.push(
            "database.batch_size must be within 1..=100000 (SEEDKEEPER_DATABASE__BATCH_SIZE)"
                .into(),
        );
    }
}

/// `seed.path` and `identity.*`.
fn validate_identity(s: &Settings, problems: &mut Vec<String>) {
    if let Some(p) = &s.seed.path {
        if !p.is_file() {
            problems.push(format!(
                "seed.path {} is not a readable file: fix SEEDKEEPER_SEED__PATH, or unset it to use the embedded seed",
                p.display()
            ));
        }
    }
    if s.identity.admin_roles.is_empty()
        || s.identity.admin_roles.iter().any(|r| r.trim().is_empty())
    {
        problems.push(
            "identity.admin_roles must list at least one non-empty realm role (SEEDKEEPER_IDENTITY__ADMIN_ROLES)".into(),
        );
    }
    if let Some(p) = &s.identity.realm_file {
        if s.identity.source == IdentitySource::RealmFile && !p.exists() {
            problems.push(format!(
                "identity.realm_file {} does not exist: fix SEEDKEEPER_IDENTITY__REALM_FILE",
                p.display()
            ));
        }
    }
}

/// `keycloak.*`: what the keycloak source needs, and the listing's bounds.
fn validate_keycloak(s: &Settings, problems: &mut Vec<String>) {
    if s.identity.source == IdentitySource::Keycloak {
        match &s.keycloak.base_url {
            None => problems.push(
                "keycloak.base_url is not set but identity.source = \"keycloak\": set SEEDKEEPER_KEYCLOAK__BASE_URL (e.g. http://127.0.0.1:8080)".into(),
            ),
            Some(u) => match reqwest::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => problems.push(format!(
                    "keycloak.base_url {u:?} is not an http(s) URL: fix SEEDKEEPER_KEYCLOAK__BASE_URL (e.g. https://keycloak.example.com)"
                )),
            },
        }
        if let Some(u) = &s.keycloak.issuer {
            match reqwest::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => problems.push(format!(
                    "keycloak.issuer {u:?} is not an http(s) URL: fix SEEDKEEPER_KEYCLOAK__ISSUER (the issuer Keycloak announces, e.g. https://auth.example.com/realms/{})",
                    s.keycloak.realm
                )),
            }
        }
        if s.keycloak.realm.trim().is_empty() {
            problems.push("keycloak.realm is empty: set SEEDKEEPER_KEYCLOAK__REALM".into());
        }
        if s.keycloak.client_id.trim().is_empty() {
            problems.push("keycloak.client_id is empty: set SEEDKEEPER_KEYCLOAK__CLIENT_ID".into());
        }
        if s.keycloak.client_secret.is_none() {
            problems.push(
                "keycloak.client_secret is not set but identity.source = \"keycloak\": set SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE (or SEEDKEEPER_KEYCLOAK__CLIENT_SECRET, or the systemd credential keycloak.client_secret)".into(),
            );
        }
        if let Some(ca) = &s.keycloak.ca_file {
            if !ca.is_file() {
                problems.push(format!(
                    "keycloak.ca_file {} is not a readable file: fix SEEDKEEPER_KEYCLOAK__CA_FILE",
                    ca.display()
                ));
            }
        }
    }
    if !(1..=5000).contains(&s.keycloak.page_size) {
        problems.push(
            "keycloak.page_size must be within 1..=5000 (SEEDKEEPER_KEYCLOAK__PAGE_SIZE)".into(),
        );
    }
    if !(1..=32).contains(&s.keycloak.concurrency) {
        problems.push(
            "keycloak.concurrency must be within 1..=32 (SEEDKEEPER_KEYCLOAK__CONCURRENCY)".into(),
        );
    }
    if s.keycloak.request_timeout.is_zero() {
        problems.push(
            "keycloak.request_timeout must be above 0 (SEEDKEEPER_KEYCLOAK__REQUEST_TIMEOUT)"
                .into(),
        );
    }
}

/// The daemon's `events.poll_interval`, `schedule.cron`, `schedule.retry_initial` and
/// `http.listen`.
fn validate_daemon(s: &Settings, problems: &mut Vec<String>) {
    if s.events.poll_interval < Duration::from_millis(100) {
        problems.push(format!(
            "events.poll_interval {} is below 100ms (SEEDKEEPER_EVENTS__POLL_INTERVAL): Keycloak would be polled without pause",
            duration_str::format(&s.events.poll_interval)
        ));
    }
    if let Err(why) = validate_cron(&s.schedule.cron) {
        problems.push(format!(
            "schedule.cron {:?} is not a valid six-field cron expression (seconds first, e.g. \"0 */5 * * * *\") (SEEDKEEPER_SCHEDULE__CRON): {why}",
            s.schedule.cron
        ));
    }
    if s.schedule.retry_initial < Duration::from_millis(100) {
        problems.push(format!(
            "schedule.retry_initial {} is below 100ms (SEEDKEEPER_SCHEDULE__RETRY_INITIAL): a failed run would be retried without pause",
            duration_str::format(&s.schedule.retry_initial)
        ));
    }
    if SocketAddr::from_str(&s.http.listen).is_err() {
        problems.push(format!(
            "http.listen {:?} is not an address:port (e.g. 127.0.0.1:8787) (SEEDKEEPER_HTTP__LISTEN)",
            s.http.listen
        ));
    }
}

/// The timeouts' bounds, `run.timeout` against `startup.wait_timeout`, `evidence.retention`.
fn validate_limits(s: &Settings, problems: &mut Vec<String>) {
    for (key, d) in [
        ("statement_timeout", s.database.statement_timeout),
        ("lock_timeout", s.database.lock_timeout),
    ] {
        if d.as_millis() > i32::MAX as u128 {
            problems.push(format!(
                "database.{key} must be at most 24 days (PostgreSQL's limit); 0 leaves the server's setting (SEEDKEEPER_DATABASE__{})",
                key.to_uppercase()
            ));
        }
    }
    if s.run.timeout <= s.startup.wait_timeout {
        problems.push(format!(
            "run.timeout ({}) must be above startup.wait_timeout ({}): it bounds the whole run, waiting for PostgreSQL and Keycloak included (SEEDKEEPER_RUN__TIMEOUT)",
            duration_str::format(&s.run.timeout),
            duration_str::format(&s.startup.wait_timeout)
        ));
    }
    if s.evidence.retention == 0 {
        problems
            .push("evidence.retention must be at least 1 (SEEDKEEPER_EVIDENCE__RETENTION)".into());
    }
}

/// What `environment = "production"` refuses.
fn validate_production(s: &Settings, problems: &mut Vec<String>) {
    if s.environment == Environment::Production {
        if s.identity.source == IdentitySource::RealmFile {
            problems.push(
                "environment = \"production\" refuses identity.source = \"realm-file\" (a dev-only source): set SEEDKEEPER_IDENTITY__SOURCE=keycloak".into(),
            );
        }
        if !s.keycloak.tls_verify {
            problems.push(
                "environment = \"production\" refuses keycloak.tls_verify = false: trust the CA with keycloak.ca_file (SEEDKEEPER_KEYCLOAK__CA_FILE) instead".into(),
            );
        }
        // The client secret and every token would cross the network in clear; on loopback
        // (a sidecar, a local proxy that terminates TLS) nothing leaves the machine.
        if let Some(url) = s
            .keycloak
            .base_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
        {
            if url.scheme() == "http" && !url_is_loopback(&url) {
                problems.push(format!(
                    "environment = \"production\" refuses keycloak.base_url {} (http:// to the non-loopback host {}): the client secret and every token would cross the network in clear. Use https:// in SEEDKEEPER_KEYCLOAK__BASE_URL (trusting its CA through the OS trust store or keycloak.ca_file)",
                    url.as_str().trim_end_matches('/'),
                    url.host_str().unwrap_or_default()
                ));
            }
        }
    }
}

/// The TLS files of `database.url` exist, and production refuses a remote database without TLS.
fn validate_database_tls(
    s: &Settings,
    cfg: &tokio_postgres::Config,
    tls: &DbTls,
    problems: &mut Vec<String>,
) {
    let files = [
        (
            "sslrootcert",
            match &tls.root_cert {
                RootCert::File(p) => Some(p),
                RootCert::System => None,
            },
        ),
        ("sslcert", tls.client_cert.as_ref()),
        ("sslkey", tls.client_key.as_ref()),
    ];
    for (key, path) in files {
        if let Some(p) = path.filter(|p| !p.is_file()) {
            problems.push(format!(
                "database.url: {key}={} is not a readable file: fix the path in SEEDKEEPER_DATABASE__URL",
                p.display()
            ));
        }
    }
    let remote = remote_hosts(cfg);
    if s.environment == Environment::Production && tls.mode < SslMode::Require && !remote.is_empty()
    {
        problems.push(format!(
            "environment = \"production\" refuses database.url's sslmode={}{} for the non-loopback host {}: identity data would cross the network unencrypted or unauthenticated. Add sslmode=verify-full&sslrootcert=/path/ca.pem to database.url (SEEDKEEPER_DATABASE__URL), or sslmode=require at least",
            tls.mode.as_str(),
            if tls.mode_given { "" } else { " (libpq's default when none is given)" },
            remote.join(", ")
        ));
    }
}

/// Six fields, seconds first; checked with the scheduler's own parser.
pub fn validate_cron(expr: &str) -> std::result::Result<(), String> {
    if expr.split_whitespace().count() != 6 {
        return Err(format!(
            "{} fields given, 6 expected",
            expr.split_whitespace().count()
        ));
    }
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map_err(|e| e.to_string())?;
    // Its interval caps the retry backoff: an expression that never fires has none.
    crate::schedule::interval(expr).map(|_| ())
}

impl DatabaseSettings {
    /// The one place the database secrets are exposed: the connection config, and the libpq TLS
    /// parameters taken out of the URL (see [`DbTls`]).
    pub fn connection(&self) -> Result<(tokio_postgres::Config, DbTls)> {
        let url = self
            .url
            .as_ref()
            .ok_or_else(|| Error::config("database.url is not set"))?;
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
    pub fn pg_config(&self) -> Result<tokio_postgres::Config> {
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
    pub fn target(&self) -> String {
        match self.pg_config() {
            Ok(cfg) => describe_target(&cfg),
            Err(_) => "(invalid database.url)".to_string(),
        }
    }
}

pub fn describe_target(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_string());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let db = cfg.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

/// libpq's `sslmode`, weakest first: `disable` never uses TLS; `prefer` (the default) tries TLS
/// and falls back to plain, verifying nothing; `require` encrypts without verifying the
/// certificate (unless `sslrootcert` is given: then like `verify-ca`); `verify-ca` checks the
/// chain against the roots; `verify-full` checks the chain and that the certificate names the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the CA certificates that verify the server come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`, or none given: the OS trust store, else the Mozilla root set built
    /// into the binary ([`crate::trust::system_roots`], as for Keycloak).
    System,
}

/// The TLS parameters of `database.url` that libpq knows and tokio-postgres does not (or knows
/// only in part): `sslmode` (all five values), `sslrootcert`, `sslcert`, `sslkey`. They are
/// taken out of the URL before tokio-postgres parses the rest. Paths are not secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbTls {
    pub mode: SslMode,
    /// Whether `sslmode` was given (else it is libpq's default).
    pub mode_given: bool,
    pub root_cert: RootCert,
    /// Whether `sslrootcert` was given (libpq: `require` with a root certificate verifies the chain).
    pub root_cert_given: bool,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

const LIBPQ_TLS_KEYS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits the libpq TLS parameters off a connection string (URL or `key=value` form). Returns
/// the rest for tokio-postgres and the TLS parameters, with libpq's defaults and implications
/// applied. Errors name the parameter, never the string (it may hold a password). A string that
/// does not tokenize is returned as it is: tokio-postgres then reports what is wrong with it.
pub fn split_libpq_tls(conn: &str) -> std::result::Result<(String, DbTls), String> {
    let mut found: Vec<(String, String)> = Vec::new();
    let rest = match ["postgres://", "postgresql://"]
        .iter()
        .find(|p| conn.starts_with(*p))
    {
        Some(prefix) => {
            // As tokio-postgres (and libpq) read it: credentials end at the first '@', the
            // parameters start at the first '?' after them.
            let body = &conn[prefix.len()..];
            let after_creds = body.find('@').map(|i| i + 1).unwrap_or(0);
            match body[after_creds..].find('?') {
                None => conn.to_string(),
                Some(q) => {
                    let q = prefix.len() + after_creds + q;
                    let mut kept = Vec::new();
                    for pair in conn[q + 1..].split('&') {
                        let key = pair.split_once('=').map(|(k, _)| k).unwrap_or(pair);
                        let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
                        match (LIBPQ_TLS_KEYS.contains(&key.as_ref()), pair.split_once('=')) {
                            (true, Some((_, v))) => {
                                let v = percent_encoding::percent_decode_str(v)
                                    .decode_utf8()
                                    .map_err(|_| format!("database.url: {key} is not UTF-8"))?;
                                found.push((key.into_owned(), v.into_owned()));
                            }
                            _ => kept.push(pair),
                        }
                    }
                    if kept.is_empty() {
                        conn[..q].to_string()
                    } else {
                        format!("{}?{}", &conn[..q], kept.join("&"))
                    }
                }
            }
        }
        None => match split_key_value(conn) {
            Some(pairs) => {
                let mut kept = Vec::new();
                for (key, raw, value) in pairs {
                    if LIBPQ_TLS_KEYS.contains(&key) {
                        found.push((key.to_string(), value));
                    } else {
                        kept.push(raw);
                    }
                }
                kept.join(" ")
            }
            None => conn.to_string(),
        },
    };

    let get = |k: &str| found.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v);
    let root_cert = match get("sslrootcert").map(String::as_str) {
        None => None,
        Some("system") => Some(RootCert::System),
        Some("") => return Err(
            "database.url: sslrootcert is empty: give the path of a PEM file of CA certificates"
                .into(),
        ),
        Some(p) => Some(RootCert::File(PathBuf::from(p))),
    };
    let mode = match get("sslmode").map(String::as_str) {
        None => None,
        Some("disable") => Some(SslMode::Disable),
        Some("prefer") => Some(SslMode::Prefer),
        Some("require") => Some(SslMode::Require),
        Some("verify-ca") => Some(SslMode::VerifyCa),
        Some("verify-full") => Some(SslMode::VerifyFull),
        Some(other) => {
            return Err(format!(
                "database.url: sslmode={other} is not supported: use disable, prefer, require, verify-ca or verify-full"
            ))
        }
    };
    let effective = match (mode, &root_cert) {
        // libpq 16: sslrootcert=system makes verify-full the default and refuses weaker modes.
        (None, Some(RootCert::System)) => SslMode::VerifyFull,
        (Some(m), Some(RootCert::System)) if m != SslMode::VerifyFull => {
            return Err(format!(
                "database.url: sslmode={} cannot be combined with sslrootcert=system: use sslmode=verify-full",
                m.as_str()
            ))
        }
        // libpq: require with a root certificate file verifies the chain, like verify-ca.
        (Some(SslMode::Require), Some(RootCert::File(_))) => SslMode::VerifyCa,
        (Some(m), _) => m,
        (None, _) => SslMode::Prefer,
    };
    let client_cert = get("sslcert").filter(|s| !s.is_empty()).map(PathBuf::from);
    let client_key = get("sslkey").filter(|s| !s.is_empty()).map(PathBuf::from);
    match (&client_cert, &client_key) {
        (Some(_), None) => return Err("database.url: sslcert is given without sslkey: give both (the client certificate and its private key, PEM)".into()),
        (None, Some(_)) => return Err("database.url: sslkey is given without sslcert: give both (the client certificate and its private key, PEM)".into()),
        _ => {}
    }
    Ok((
        rest,
        DbTls {
            mode: effective,
            mode_given: mode.is_some(),
            root_cert_given: root_cert.is_some(),
            root_cert: root_cert.unwrap_or(RootCert::System),
            client_cert,
            client_key,
        },
    ))
}

/// Tokenizes a `key=value` connection string as tokio-postgres does (values unquoted up to
/// whitespace, or single-quoted; a backslash escapes the next character). Returns each
/// parameter's key, its raw text and its value; `None` when it does not tokenize.
fn split_key_value(s: &str) -> Option<Vec<(&str, &str, String)>> {
    let mut out = Vec::new();
    let mut it = s.char_indices().peekable();
    loop {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else {
            return Some(out);
        };
        let mut key_end = s.len();
        while let Some(&(i, c)) = it.peek() {
            if c.is_whitespace() || c == '=' {
                key_end = i;
                break;
            }
            it.next();
        }
        let key = &s[start..key_end];
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        it.next_if(|(_, c)| *c == '=')?;
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let quoted = it.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut end = s.len();
        let mut closed = !quoted;
        while let Some((i, c)) = it.next() {
            match c {
                '\'' if quoted => {
                    end = i + 1;
                    closed = true;
                    break;
                }
                c if c.is_whitespace() && !quoted => {
                    end = i;
                    break;
                }
                '\\' => value.push(it.next()?.1),
                c => value.push(c),
            }
        }
        if !closed || key.is_empty() {
            return None;
        }
        out.push((key, &s[start..end], value));
    }
}

/// Whether a URL's host is this machine: `localhost` (and `*.localhost`) or a loopback address.
pub fn url_is_loopback(url: &reqwest::Url) -> bool {
    url.host_str()
        .is_some_and(|h| is_loopback_host(&tokio_postgres::config::Host::Tcp(h.to_string())))
}

/// Whether a host is this machine: a Unix socket directory, `localhost` or a loopback address.
pub fn is_loopback_host(host: &tokio_postgres::config::Host) -> bool {
    match host {
        tokio_postgres::config::Host::Unix(_) => true,
        tokio_postgres::config::Host::Tcp(h) => {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.to_ascii_lowercase().ends_with(".localhost")
                || h.parse::<std::net::IpAddr>()
                    .map(|ip| ip.is_loopback())
                    .unwrap_or(false)
        }
    }
}

/// The hosts of a connection config that are not this machine (`hostaddr`, when given, is
/// where the connection goes).
pub fn remote_hosts(cfg: &tokio_postgres::Config) -> Vec<String> {
    let mut remote: Vec<String> = cfg
        .get_hostaddrs()
        .iter()
        .filter(|ip| !ip.is_loopback())
        .map(|ip| ip.to_string())
        .collect();
    if cfg.get_hostaddrs().is_empty() {
        remote.extend(
            cfg.get_hosts()
                .iter()
                .filter(|h| !is_loopback_host(h))
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                }),
        );
    }
    remote
}

/// tokio-postgres' reason for refusing a connection string, when it names only an option (its
/// other messages can quote a character of the string).
fn url_refusal_reason(e: &tokio_postgres::Error) -> Option<String> {
    let inner = std::error::Error::source(e)?.to_string();
    (inner.starts_with("unknown option") || inner.starts_with("invalid value for option"))
        .then_some(inner)
}

impl Settings {
    /// The effective configuration as TOML, every secret replaced by `[REDACTED]`.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Secrets deserialize from any scalar: figment and TOML may type `12345` as a number.
fn de_secret<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    let v: Option<Scalar> = Option::deserialize(d)?;
    Ok(v.map(|v| {
        SecretString::from(match v {
            Scalar::S(s) => s,
            Scalar::I(i) => i.to_string(),
            Scalar::U(u) => u.to_string(),
            Scalar::F(f) => f.to_string(),
            Scalar::B(b) => b.to_string(),
        })
    }))
}

fn ser_secret<S: Serializer>(
    v: &Option<SecretString>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("[REDACTED]"),
        None => s.serialize_none(),
    }
}

/// Durations as `"250ms"`, `"30s"`, `"5m"`, `"1h"`, or a bare number of seconds.
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 250ms"))?;
        let d = match unit.trim() {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(format!("{s:?} has an unknown unit (use ms, s, m or h)")),
        };
        Ok(d)
    }

    pub fn format(d: &Duration) -> String {
        if d.subsec_millis() != 0 {
            format!("{}ms", d.as_millis())
        } else {
            format!("{}s", d.as_secs())
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Duration::from_secs(n)),
            Raw::S(s) => parse(&s).map_err(serde::de::Error::custom),
        }
    }
}
