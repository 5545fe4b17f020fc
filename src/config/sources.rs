//! Where configuration comes from, and the figment layers built from it: built-in defaults <
//! the TOML file (`--config`, `SEEDKEEPER_CONFIG`, else `config/seedkeeper.toml` when present) <
//! the `SEEDKEEPER_*` environment (nested keys joined with `__`). Secrets are left out of the
//! environment layer: [`super::secrets`] reads them raw. Figment's errors become messages that
//! name the key and where its value came from.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;

use super::{secrets, Settings, DEFAULT_CONFIG_PATH, ENV_PREFIX};
use crate::error::{Error, Result};

/// The name of the environment layer in figment's metadata: how an error tells it apart.
const ENV_METADATA: &str = "environment variable";

/// Environment variables with the prefix that are not config keys: `SEEDKEEPER_CONFIG` names
/// the file layer itself.
const NON_KEY_ENV: &[&str] = &["config"];

/// The inputs of the configuration layers above the built-in defaults: the `--config` file and
/// the environment. Not named `Sources`: the identity source (`IdentitySource`) is another
/// thing. `env` is injectable so tests never touch the process environment (tests run in
/// parallel).
#[derive(Debug, Clone, Default)]
pub struct ConfigLayers {
    pub file: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl ConfigLayers {
    /// The process environment and the `--config` path.
    pub(crate) fn from_process(config_flag: Option<PathBuf>) -> Self {
        ConfigLayers {
            file: config_flag,
            env: std::env::vars().collect(),
        }
    }

    /// The configuration file these sources name, and how: `--config`, else
    /// `SEEDKEEPER_CONFIG`, else `config/seedkeeper.toml` when something is there (`exists`
    /// looks, and opens nothing). The one answer to "which file": the load reads it, and the
    /// log format chosen before the load (`telemetry::early_format`) asks it too. Whether the
    /// file can be read is for the reader to find out.
    pub(crate) fn config_file(&self) -> Option<ConfigFile> {
        match (&self.file, self.var("SEEDKEEPER_CONFIG")) {
            (Some(p), _) => Some(ConfigFile::new(p.clone(), ConfigOrigin::Flag)),
            (None, Some(p)) if !p.is_empty() => {
                Some(ConfigFile::new(PathBuf::from(p), ConfigOrigin::EnvVar))
            }
            _ => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                default
                    .exists()
                    .then(|| ConfigFile::new(default.to_path_buf(), ConfigOrigin::WorkingDirectory))
            }
        }
    }

    /// The value of an environment variable; the last one wins when given twice.
    pub(crate) fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How the configuration file was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOrigin {
    /// `--config FILE`.
    Flag,
    /// `SEEDKEEPER_CONFIG=FILE`.
    EnvVar,
    /// `config/seedkeeper.toml` found in the working directory, named by nobody.
    WorkingDirectory,
}

impl ConfigOrigin {
    /// How it was chosen, as the log line and `seedkeeper config` say it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConfigOrigin::Flag => "--config",
            ConfigOrigin::EnvVar => "SEEDKEEPER_CONFIG",
            ConfigOrigin::WorkingDirectory => "the working directory",
        }
    }
}

/// The configuration file that was loaded, and how it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// As given (or `config/seedkeeper.toml`).
    pub path: PathBuf,
    /// The absolute path, where it can be known: a relative path read from an unexpected
    /// working directory is the mistake this is for.
    pub absolute: PathBuf,
    pub origin: ConfigOrigin,
}

impl ConfigFile {
    fn new(path: PathBuf, origin: ConfigOrigin) -> ConfigFile {
        let absolute = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
        ConfigFile {
            path,
            absolute,
            origin,
        }
    }
}

/// The layers, lowest first, and the configuration file among them. A config file that cannot
/// be read (named, or found in the working directory) is an error here; problems with the
/// values come when the figment is extracted.
pub(super) fn layered(sources: &ConfigLayers) -> Result<(Figment, Option<ConfigFile>)> {
    let mut figment = Figment::from(Serialized::defaults(Settings::default()));
    let file = config_file(sources)?;
    if let Some(f) = &file {
        figment = figment.merge(Toml::file_exact(&f.path));
    }
    Ok((figment.merge(EnvPairs(key_env_pairs(sources))), file))
}

/// The TOML file to read: the one named (`--config`, else `SEEDKEEPER_CONFIG`), else the
/// default path when something is there. Whichever it is, it must be a regular file of at most
/// 1 MiB, looked at before it is opened (a FIFO would block before the first log line).
fn config_file(sources: &ConfigLayers) -> Result<Option<ConfigFile>> {
    let Some(file) = sources.config_file() else {
        return Ok(None);
    };
    let fix = match file.origin {
        ConfigOrigin::Flag => "fix --config".to_string(),
        ConfigOrigin::EnvVar => "fix SEEDKEEPER_CONFIG".to_string(),
        ConfigOrigin::WorkingDirectory => format!(
            "remove or fix it, or name the file to use with --config or SEEDKEEPER_CONFIG (this one was found in the working directory as {DEFAULT_CONFIG_PATH})"
        ),
    };
    if let Err(why) = super::files::read_regular(&file.path, super::files::CONFIG_LIMIT) {
        return Err(Error::config(format!(
            "config file {} (from {}) {why}: {fix}; a config file must be a regular TOML file of at most 1 MiB",
            file.path.display(),
            file.origin.as_str()
        )));
    }
    Ok(Some(file))
}

/// The `SEEDKEEPER_*` variables that are non-secret config keys. Secrets and their `_FILE`
/// variants are resolved separately ([`super::secrets`]).
fn key_env_pairs(sources: &ConfigLayers) -> Vec<(String, String)> {
    sources
        .env
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix(ENV_PREFIX).is_some_and(|rest| {
                !NON_KEY_ENV.contains(&rest.to_ascii_lowercase().as_str())
                    && !secrets::is_secret_var(k)
            })
        })
        .cloned()
        .collect()
}

/// The `SEEDKEEPER_*` variables as a figment provider. figment's own `Env` reads the process
/// environment; this one reads `ConfigLayers`, so tests can inject variables without touching it.
struct EnvPairs(Vec<(String, String)>);

impl figment::Provider for EnvPairs {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(ENV_METADATA)
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

/// One figment error as a problem: the key, where its value came from, what is wrong.
pub(super) fn describe_figment_error(e: &figment::Error, sources: &ConfigLayers) -> String {
    let key = error_key(e);
    let env_name = format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase());
    let from_env = match &e.metadata {
        Some(m) => m.name == ENV_METADATA,
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

/// The key a figment error is about: for an unknown field, the path plus the field.
fn error_key(e: &figment::Error) -> String {
    let path = e.path.join(".");
    match &e.kind {
        figment::error::Kind::UnknownField(field, _) => {
            if path.is_empty() {
                field.clone()
            } else if path == *field || path.ends_with(&format!(".{field}")) {
                path
            } else {
                format!("{path}.{field}")
            }
        }
        _ => path,
    }
}
