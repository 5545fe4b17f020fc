//! The secrets (`database.url`, `database.password`, `keycloak.client_secret`): where each may
//! come from, and how they (de)serialize. Each comes from exactly one of: the TOML file, its
//! environment variable (read raw, so `007` stays `007`), `<VAR>_FILE`, or a systemd credential
//! named after the key in `$CREDENTIALS_DIRECTORY`. Two sources for one secret is an error: there
//! is no precedence to guess. Nothing here exposes a secret's value in a message.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serializer};

use super::{ConfigLayers, Settings};

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

/// Whether an environment variable is a secret or its `_FILE` variant (read here, not by the
/// environment layer).
pub(super) fn is_secret_var(name: &str) -> bool {
    SECRET_KEYS
        .iter()
        .any(|s| s.env == name || name.strip_suffix("_FILE") == Some(s.env))
}

fn secret_slot<'a>(settings: &'a mut Settings, key: &str) -> &'a mut Option<SecretString> {
    match key {
        "database.url" => &mut settings.database.url,
        "database.password" => &mut settings.database.password,
        _ => &mut settings.keycloak.client_secret,
    }
}

/// Sets each secret from its one source; a problem for each secret given twice, empty, or
/// whose file cannot be read.
pub(super) fn resolve(settings: &mut Settings, sources: &ConfigLayers, problems: &mut Vec<String>) {
    let cred_dir = sources.var("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    for s in SECRET_KEYS {
        let mut found = Vec::new();
        if let Some(v) = secret_slot(settings, s.key).take() {
            found.push(("the config file".to_string(), v));
        }
        found.extend(from_env(s, sources, problems));
        if let Some(dir) = &cred_dir {
            found.extend(from_credential(s, dir, problems));
        }
        if let Some(v) = the_one(s, found, problems) {
            *secret_slot(settings, s.key) = Some(v);
        }
    }
}

/// The secret from its environment variable and from `<VAR>_FILE`, each with where it came from.
fn from_env(
    s: &SecretKey,
    sources: &ConfigLayers,
    problems: &mut Vec<String>,
) -> Vec<(String, SecretString)> {
    let mut found = Vec::new();
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
                "{} from {file_var}={path}: {why}: point {file_var} at a readable, non-empty regular file of at most 64 KiB",
                s.key
            )),
        }
    }
    found
}

/// The secret from the systemd credential named after its key, when there is one.
fn from_credential(
    s: &SecretKey,
    dir: &Path,
    problems: &mut Vec<String>,
) -> Option<(String, SecretString)> {
    let path = dir.join(s.credential);
    if !path.exists() {
        return None;
    }
    match read_secret_file(&path) {
        Ok(v) => Some((format!("systemd credential {}", s.credential), v)),
        Err(why) => {
            problems.push(format!(
                "{} from systemd credential {}: {why}: fix LoadCredential={} (a readable, non-empty regular file of at most 64 KiB)",
                s.key,
                path.display(),
                s.credential
            ));
            None
        }
    }
}

/// The secret when exactly one source gave a non-empty value; a problem when it is empty or
/// given more than once.
fn the_one(
    s: &SecretKey,
    mut found: Vec<(String, SecretString)>,
    problems: &mut Vec<String>,
) -> Option<SecretString> {
    match found.len() {
        0 => None,
        1 => {
            let (_, v) = found.remove(0);
            if v.expose_secret().is_empty() {
                problems.push(format!(
                    "{} is set but empty: give it a value ({})",
                    s.key, s.env
                ));
                None
            } else {
                Some(v)
            }
        }
        _ => {
            problems.push(format!(
                "{} is given more than once ({}): keep exactly one source",
                s.key,
                found
                    .iter()
                    .map(|(w, _)| w.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            None
        }
    }
}

/// Reads a secret file; one trailing newline (as editors and `echo` leave) is not part of it.
/// It must be a regular file of at most 64 KiB, checked before it is opened
/// ([`super::files::read_regular`]): a FIFO would block, `/dev/zero` would never end.
fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    let raw = super::files::read_regular(path, super::files::SECRET_LIMIT)
        .map_err(|why| format!("file {why}"))?;
    let trimmed = raw
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&raw);
    if trimmed.is_empty() {
        return Err("file is empty".to_string());
    }
    Ok(SecretString::from(trimmed.to_string()))
}

/// Secrets deserialize from any scalar: figment and TOML may type `12345` as a number.
pub(super) fn de_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
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

/// Every secret that is set serializes as `[REDACTED]`.
pub(super) fn ser_secret<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("[REDACTED]"),
        None => s.serialize_none(),
    }
}
