//! The reference seed: what should exist, as typed values.
//!
//! Owns the TOML model of `config/reference-seed.toml` (embedded in the binary, overridable by
//! `seed.path`), its validation (every problem reported at once, as `file: path: message`), the
//! ownership of each section, and the seed digest recorded in the evidence. It does not touch the
//! database: `reconcile::reference` compares and writes.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Problems, Result};

pub const EMBEDDED_SEED: &str = include_str!("../../config/reference-seed.toml");
pub(crate) const EMBEDDED_NAME: &str = "embedded config/reference-seed.toml";

/// Who owns a section's rows after bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ownership {
    /// The seed is the authority: a differing row is updated and reported as drift corrected.
    Converge,
    /// The admin API owns the row: a missing row is inserted, a differing one is left alone.
    InsertMissing,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section<T> {
    pub ownership: Ownership,
    pub items: Vec<T>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sku {
    pub sku: String,
    pub vendor: String,
    pub display_name: String,
    pub gpus: i32,
    pub gpu_hourly_price_minor: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_profile: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    Integer,
    Boolean,
    String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDefinition {
    pub key: String,
    pub value_type: ValueType,
    pub default_value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_value: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_value: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_values: Option<Vec<String>>,
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyValue {
    pub policy_key: String,
    pub scope_type: String,
    pub value: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingPlan {
    pub id: uuid::Uuid,
    pub name: String,
    pub display_name: String,
    pub is_default: bool,
    pub currency: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformRole {
    pub name: String,
    pub description: String,
    pub version: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub slug: String,
    pub display_name: String,
    pub runtime_backend: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedFile {
    pub format: u32,
    pub sku_catalog: Section<Sku>,
    pub policy_definitions: Section<PolicyDefinition>,
    pub policy_values: Section<PolicyValue>,
    pub pricing_plans: Section<PricingPlan>,
    pub platform_roles: Section<PlatformRole>,
    pub app_catalog: Section<App>,
}

/// A loaded, validated reference seed.
#[derive(Debug, Clone)]
pub struct ReferenceSeed {
    pub source_name: String,
    pub digest: String,
    pub data: SeedFile,
}

pub(crate) const RUNTIME_BACKENDS: &[&str] = &["bare_metal", "slurm", "rke2"];

impl ReferenceSeed {
    /// The seed at `path`, or the embedded one.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            None => Self::parse(EMBEDDED_NAME, EMBEDDED_SEED),
            Some(p) => {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| Error::Seed {
                    source_name: name.clone(),
                    problems: Problems(vec![format!(
                        "{name}: cannot read: {e}; fix seed.path (SEEDKEEPER_SEED__PATH)"
                    )]),
                })?;
                Self::parse(&name, &text)
            }
        }
    }

    pub fn parse(source_name: &str, text: &str) -> Result<Self> {
        let data: SeedFile = toml::from_str(text).map_err(|e| Error::Seed {
            source_name: source_name.to_string(),
            problems: Problems(vec![format!("{source_name}: {}", e.to_string().trim_end())]),
        })?;
        let problems = validate(source_name, &data);
        if !problems.is_empty() {
            return Err(Error::Seed {
                source_name: source_name.to_string(),
                problems: Problems(problems),
            });
        }
        // The digest is over the parsed data, so comments and formatting do not change it.
        let canonical = serde_json::to_vec(&data).unwrap_or_default();
        let digest = hex(&Sha256::digest(&canonical));
        Ok(ReferenceSeed {
            source_name: source_name.to_string(),
            digest,
            data,
        })
    }

    pub(crate) fn role_names(&self) -> BTreeSet<&str> {
        self.data
            .platform_roles
            .items
            .iter()
            .map(|r| r.name.as_str())
            .collect()
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dupes<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    let mut d: Vec<&str> = keys.filter(|k| !seen.insert(*k)).collect();
    d.dedup();
    d
}

/// Problems found in a seed file, each prefixed with the file and the path of the entry.
struct Found<'a> {
    file: &'a str,
    found: Vec<String>,
}

impl Found<'_> {
    fn err(&mut self, path: impl std::fmt::Display, msg: impl std::fmt::Display) {
        self.found.push(format!("{}: {path}: {msg}", self.file));
    }

    /// One problem per key listed twice in `section`'s items, named by `field`.
    fn dupes<'k>(&mut self, section: &str, field: &str, keys: impl Iterator<Item = &'k str>) {
        for d in dupes(keys) {
            self.err(
                format!("{section}.items[{field}={d}]"),
                format!("duplicate {field}"),
            );
        }
    }
}

/// Every problem of the seed at once, section by section.
fn validate(file: &str, s: &SeedFile) -> Vec<String> {
    let mut p = Found {
        file,
        found: Vec::new(),
    };
    if s.format != 1 {
        let msg = format!(
            "unsupported format {} (this seedkeeper reads format 1)",
            s.format
        );
        p.err("format", msg);
    }
    validate_skus(&mut p, &s.sku_catalog.items);
    validate_policy_definitions(&mut p, &s.policy_definitions.items);
    validate_policy_values(&mut p, &s.policy_values.items, &s.policy_definitions.items);
    validate_pricing_plans(&mut p, &s.pricing_plans.items);
    validate_platform_roles(&mut p, &s.platform_roles.items);
    validate_apps(&mut p, &s.app_catalog.items);
    p.found
}

fn validate_skus(p: &mut Found, skus: &[Sku]) {
    p.dupes("sku_catalog", "sku", skus.iter().map(|i| i.sku.as_str()));
    for (i, sku) in skus.iter().enumerate() {
        let at = format!("sku_catalog.items[{i}] ({})", sku.sku);
        if sku.sku.trim().is_empty() {
            p.err(&at, "sku is empty");
        }
        if sku.gpus <= 0 {
            p.err(&at, format!("gpus must be above 0, got {}", sku.gpus));
        }
        if sku.gpu_hourly_price_minor < 0 {
            p.err(
                &at,
                "gpu_hourly_price_minor must not be negative (minor units, cents)",
            );
        }
        if let Some(profile) = &sku.resource_profile {
            validate_profile(&at, profile, &mut |path, msg| p.err(path, msg));
        }
    }
}

fn validate_policy_definitions(p: &mut Found, defs: &[PolicyDefinition]) {
    p.dupes(
        "policy_definitions",
        "key",
        defs.iter().map(|i| i.key.as_str()),
    );
    for (i, d) in defs.iter().enumerate() {
        let at = format!("policy_definitions.items[{i}] ({})", d.key);
        if d.key.trim().is_empty() {
            p.err(&at, "key is empty");
        }
        if d.description.trim().is_empty() {
            p.err(&at, "description is empty");
        }
        let bounded = d.min_value.is_some() || d.max_value.is_some();
        match d.value_type {
            ValueType::Integer => {
                if let (Some(lo), Some(hi)) = (d.min_value, d.max_value) {
                    if lo > hi {
                        p.err(&at, format!("min_value {lo} is above max_value {hi}"));
                    }
                }
            }
            ValueType::Boolean | ValueType::String if bounded => {
                p.err(&at, "min_value/max_value are only for integer policies");
            }
            ValueType::Boolean | ValueType::String => {}
        }
        match (d.value_type, &d.allowed_values) {
            (ValueType::String, Some(a)) if !a.is_empty() => {
                for dup in dupes(a.iter().map(String::as_str)) {
                    p.err(&at, format!("allowed_values lists {dup:?} twice"));
                }
            }
            (ValueType::String, _) => p.err(&at, "string policies need a non-empty allowed_values"),
            (ValueType::Integer | ValueType::Boolean, Some(_)) => {
                p.err(&at, "allowed_values is only for string policies")
            }
            (ValueType::Integer | ValueType::Boolean, None) => {}
        }
        if let Err(m) = check_value(d, &d.default_value) {
            p.err(&at, format!("default_value {m}"));
        }
    }
}

fn validate_policy_values(p: &mut Found, vals: &[PolicyValue], defs: &[PolicyDefinition]) {
    let globals = vals.iter().filter(|v| v.scope_type == "global");
    for d in dupes(globals.map(|v| v.policy_key.as_str())) {
        p.err(
            format!("policy_values.items[policy_key={d}]"),
            "more than one global value for this key",
        );
    }
    for (i, v) in vals.iter().enumerate() {
        let at = format!("policy_values.items[{i}] ({})", v.policy_key);
        if v.scope_type != "global" {
            let msg = format!(
                "scope_type {:?}: the seed holds global values only",
                v.scope_type
            );
            p.err(&at, msg);
        }
        match defs.iter().find(|d| d.key == v.policy_key) {
            None => p.err(&at, "policy_key is not defined in policy_definitions"),
            Some(d) => {
                if let Err(m) = check_value(d, &v.value) {
                    p.err(&at, format!("value {m}"));
                }
            }
        }
    }
}

fn validate_pricing_plans(p: &mut Found, plans: &[PricingPlan]) {
    p.dupes(
        "pricing_plans",
        "name",
        plans.iter().map(|p| p.name.as_str()),
    );
    let ids: Vec<String> = plans.iter().map(|p| p.id.to_string()).collect();
    p.dupes("pricing_plans", "id", ids.iter().map(String::as_str));
    if plans.iter().filter(|p| p.is_default).count() > 1 {
        p.err(
            "pricing_plans.items",
            "more than one plan has is_default = true",
        );
    }
    for (i, plan) in plans.iter().enumerate() {
        if plan.currency.len() != 3 || !plan.currency.chars().all(|c| c.is_ascii_uppercase()) {
            p.err(
                format!("pricing_plans.items[{i}] ({})", plan.name),
                format!(
                    "currency {:?} is not an ISO 4217 code like USD",
                    plan.currency
                ),
            );
        }
    }
}

fn validate_platform_roles(p: &mut Found, roles: &[PlatformRole]) {
    p.dupes(
        "platform_roles",
        "name",
        roles.iter().map(|r| r.name.as_str()),
    );
    for (i, r) in roles.iter().enumerate() {
        if r.version < 1 {
            p.err(
                format!("platform_roles.items[{i}] ({})", r.name),
                "version must be 1 or more",
            );
        }
    }
}

fn validate_apps(p: &mut Found, apps: &[App]) {
    p.dupes("app_catalog", "slug", apps.iter().map(|a| a.slug.as_str()));
    for (i, a) in apps.iter().enumerate() {
        let at = format!("app_catalog.items[{i}] ({})", a.slug);
        if !RUNTIME_BACKENDS.contains(&a.runtime_backend.as_str()) {
            let msg = format!(
                "runtime_backend {:?} is not one of {RUNTIME_BACKENDS:?}",
                a.runtime_backend
            );
            p.err(&at, msg);
        }
        if a.version.trim().is_empty() {
            p.err(&at, "version is empty");
        }
    }
}

fn validate_profile(at: &str, profile: &Value, err: &mut impl FnMut(String, String)) {
    let Some(obj) = profile.as_object() else {
        err(at.to_string(), "resource_profile must be a table".into());
        return;
    };
    let names: Vec<&str> = obj
        .get("slice_vm_profiles")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    for d in dupes(names.iter().copied()) {
        err(
            at.to_string(),
            format!("slice_vm_profiles lists {d:?} twice"),
        );
    }
    if let Some(default) = obj.get("default_slice_vm_profile") {
        match default.as_str() {
            Some(d) if names.contains(&d) => {}
            _ => err(
                at.to_string(),
                format!("default_slice_vm_profile {default} is not one of the slice_vm_profiles"),
            ),
        }
    }
}

/// Checks a value against a definition's type, bounds and allowed values.
pub(crate) fn check_value(d: &PolicyDefinition, v: &Value) -> std::result::Result<(), String> {
    match d.value_type {
        ValueType::Integer => {
            let n = v.as_i64().ok_or_else(|| format!("{v} is not an integer"))?;
            if let Some(lo) = d.min_value {
                if n < lo {
                    return Err(format!("{n} is below min_value {lo}"));
                }
            }
            if let Some(hi) = d.max_value {
                if n > hi {
                    return Err(format!("{n} is above max_value {hi}"));
                }
            }
            Ok(())
        }
        ValueType::Boolean => v
            .as_bool()
            .map(|_| ())
            .ok_or_else(|| format!("{v} is not a boolean")),
        ValueType::String => {
            let s = v.as_str().ok_or_else(|| format!("{v} is not a string"))?;
            match &d.allowed_values {
                Some(a) if !a.iter().any(|x| x == s) => {
                    Err(format!("{s:?} is not one of allowed_values {a:?}"))
                }
                _ => Ok(()),
            }
        }
    }
}
