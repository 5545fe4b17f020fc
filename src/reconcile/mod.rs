//! Reconcile: the difference between what should exist (`seed`, `identity`) and the database,
//! and the writes that close it.
//!
//! Units run in order: `schema`, `reference_seed`, `identities`, `role_bindings`, `tenants`.
//! Each can `plan` (compute the difference, no writes) or `apply` (write only the difference,
//! set-based, in its own transaction, so an interrupted run never leaves half a unit). A run
//! holds the advisory lock; a run that cannot take it is recorded as skipped. Every run leaves
//! one `seed_runs` row. Reads `schema.mode`, `identity.*`, `evidence.retention`.

pub mod bindings;
pub mod identities;
pub mod reference;
pub mod tenants;

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::Utc;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{SchemaMode, Settings};
use crate::error::{Error, Result};
use crate::identity::IdentityProvider;
use crate::seed::ReferenceSeed;
use crate::store::{self, lock, migrate, runs, Db};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plan,
    Apply,
}

/// Findings listed per kind are capped so a 100,000-user re-import does not make a 100,000-entry
/// evidence row; the counts stay exact.
pub const FINDINGS_PER_KIND: usize = 50;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub unit: &'static str,
    pub kind: String,
    pub entity: String,
    pub detail: String,
}

impl Finding {
    pub fn new(
        unit: &'static str,
        kind: &str,
        entity: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Finding {
            unit,
            kind: kind.to_string(),
            entity: entity.into(),
            detail: detail.into(),
        }
    }
}

/// What one unit found (plan) or did (apply).
#[derive(Debug, Clone, Serialize)]
pub struct UnitReport {
    pub unit: &'static str,
    pub counts: BTreeMap<String, i64>,
    pub findings: Vec<Finding>,
    /// Plan only: the changes apply would make, capped like findings.
    pub changes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Findings that make the run's outcome failed (e.g. a username clash).
    #[serde(skip)]
    pub blocking: Vec<String>,
}

impl UnitReport {
    pub fn new(unit: &'static str) -> Self {
        UnitReport {
            unit,
            counts: BTreeMap::new(),
            findings: Vec::new(),
            changes: Vec::new(),
            error: None,
            blocking: Vec::new(),
        }
    }

    pub fn bump(&mut self, key: &str, n: i64) {
        *self.counts.entry(key.to_string()).or_insert(0) += n;
    }

    pub fn get(&self, key: &str) -> i64 {
        self.counts.get(key).copied().unwrap_or(0)
    }

    pub fn add_finding(&mut self, f: Finding) {
        let same = self.findings.iter().filter(|x| x.kind == f.kind).count();
        if same < FINDINGS_PER_KIND {
            self.findings.push(f);
        }
    }

    pub fn add_change(&mut self, c: String) {
        if self.changes.len() < FINDINGS_PER_KIND * 4 {
            self.changes.push(c);
        }
    }

    /// Rows apply would write (plan) or wrote (apply).
    pub fn writes(&self) -> i64 {
        ["inserted", "updated", "revoked", "realigned", "applied"]
            .iter()
            .map(|k| self.get(k))
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Succeeded,
    Failed,
    Skipped,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The result of one run (apply) or plan.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub id: Uuid,
    pub trigger: String,
    pub mode: &'static str,
    pub outcome: Outcome,
    pub seed_digest: String,
    pub duration_ms: u64,
    pub units: Vec<UnitReport>,
    pub error: Option<String>,
    #[serde(skip)]
    pub error_value: Option<Error>,
}

impl RunReport {
    pub fn counts_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for u in &self.units {
            m.insert(u.unit.to_string(), json!(u.counts));
        }
        Value::Object(m)
    }

    pub fn findings_json(&self) -> Value {
        json!(self
            .units
            .iter()
            .flat_map(|u| u.findings.iter())
            .collect::<Vec<_>>())
    }

    pub fn unit(&self, name: &str) -> Option<&UnitReport> {
        self.units.iter().find(|u| u.unit == name)
    }

    /// Plan: whether apply would change anything.
    pub fn changes_pending(&self) -> bool {
        self.units.iter().any(|u| u.writes() > 0)
    }
}

/// Everything a run needs, built once.
pub struct Engine {
    pub settings: Settings,
    pub seed: ReferenceSeed,
    pub identities: std::sync::Arc<dyn IdentityProvider>,
}

impl Engine {
    /// One run: connect (waiting up to `wait`), lock, units in order, evidence.
    pub async fn run(
        &self,
        mode: Mode,
        trigger: &str,
        wait: std::time::Duration,
        cancel: &CancellationToken,
    ) -> RunReport {
        let started = Instant::now();
        let mut report = RunReport {
            id: Uuid::new_v4(),
            trigger: trigger.to_string(),
            mode: if mode == Mode::Plan { "plan" } else { "apply" },
            outcome: Outcome::Failed,
            seed_digest: self.seed.digest.clone(),
            duration_ms: 0,
            units: Vec::new(),
            error: None,
            error_value: None,
        };
        tracing::info!(run.id = %report.id, trigger, mode = report.mode, "seeding_started");
        let result = self.run_inner(mode, &mut report, wait, cancel).await;
        if let Err(e) = result {
            report.outcome = Outcome::Failed;
            report.error = Some(e.to_string());
            report.error_value = Some(e);
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        let counts = report.counts_json();
        match report.outcome {
            Outcome::Failed => tracing::error!(
                run.id = %report.id, trigger, outcome = report.outcome.as_str(), duration_ms = report.duration_ms,
                counts = %counts, error = report.error.as_deref().unwrap_or(""), "seeding_completed"
            ),
            _ => tracing::info!(
                run.id = %report.id, trigger, outcome = report.outcome.as_str(), duration_ms = report.duration_ms,
                counts = %counts, "seeding_completed"
            ),
        }
        report
    }

    async fn run_inner(
        &self,
        mode: Mode,
        report: &mut RunReport,
        wait: std::time::Duration,
        cancel: &CancellationToken,
    ) -> Result<()> {
        // Validate the identity input before anything is written: a bad realm file must leave the
        // database untouched (C1).
        self.identities.clone().preflight().await?;

        let mut db = store::connect_with_wait(&self.settings.database, wait, cancel).await?;
        if !lock::try_acquire(&db.client).await? {
            report.outcome = Outcome::Skipped;
            report.error = Some(
                "another run holds the run lock (a second replica or an overlapping tick)".into(),
            );
            if mode == Mode::Apply && store::table_exists(&db.client, "seed_runs").await? {
                runs::insert(
                    &db.client,
                    report.id,
                    &report.trigger,
                    Utc::now(),
                    "skipped",
                    &report.seed_digest,
                )
                .await?;
                runs::finish(
                    &db.client,
                    report.id,
                    "skipped",
                    &json!({}),
                    &json!([]),
                    report.error.as_deref(),
                )
                .await?;
            }
            return Ok(());
        }
        let result = self.units(mode, report, &mut db, cancel).await;
        let outcome_error = match &result {
            Ok(()) => {
                let blocking: Vec<String> = report
                    .units
                    .iter()
                    .flat_map(|u| u.blocking.iter().cloned())
                    .collect();
                if blocking.is_empty() {
                    report.outcome = Outcome::Succeeded;
                    None
                } else {
                    report.outcome = Outcome::Failed;
                    let msg = blocking.join("; ");
                    report.error = Some(msg.clone());
                    Some(msg)
                }
            }
            Err(e) => Some(e.to_string()),
        };
        if mode == Mode::Apply
            && store::table_exists(&db.client, "seed_runs")
                .await
                .unwrap_or(false)
        {
            let outcome = if result.is_err() {
                "failed"
            } else {
                report.outcome.as_str()
            };
            let finished = async {
                // The row may be missing when the schema unit itself failed.
                runs::insert_if_missing(
                    &db.client,
                    report.id,
                    &report.trigger,
                    &report.seed_digest,
                )
                .await?;
                runs::finish(
                    &db.client,
                    report.id,
                    outcome,
                    &report.counts_json(),
                    &report.findings_json(),
                    outcome_error.as_deref(),
                )
                .await?;
                runs::prune(&db.client, self.settings.evidence.retention).await
            }
            .await;
            if let Err(e) = finished {
                tracing::error!(run.id = %report.id, error = %e, "could not record the run in seed_runs");
            }
        }
        let _ = lock::release(&db.client).await;
        result
    }

    async fn units(
        &self,
        mode: Mode,
        report: &mut RunReport,
        db: &mut Db,
        cancel: &CancellationToken,
    ) -> Result<()> {
        // schema
        let mut schema = UnitReport::new("schema");
        let pending = migrate::pending(&db.client, migrate::MIGRATIONS).await?;
        match mode {
            Mode::Plan => {
                for m in &pending {
                    schema.add_change(format!("apply migration {}", m.label()));
                }
                schema.bump("applied", pending.len() as i64);
                schema.bump(
                    "unchanged",
                    (migrate::MIGRATIONS.len() - pending.len()) as i64,
                );
                let blocked = !pending.is_empty();
                report.units.push(schema);
                if blocked {
                    // The other units compare against tables that do not exist yet.
                    for unit in ["reference_seed", "identities", "role_bindings", "tenants"] {
                        let mut u = UnitReport::new(unit);
                        u.add_change("everything (the schema is not applied yet)".into());
                        u.bump("inserted", 1);
                        report.units.push(u);
                    }
                    return Ok(());
                }
            }
            Mode::Apply => {
                let applied = migrate::run(
                    &mut db.client,
                    self.settings.schema.mode,
                    migrate::MIGRATIONS,
                )
                .await;
                match applied {
                    Ok(r) => {
                        schema.bump("applied", r.applied.len() as i64);
                        schema.bump(
                            "unchanged",
                            (migrate::MIGRATIONS.len() - r.applied.len()) as i64,
                        );
                        report.units.push(schema);
                    }
                    Err(e) => {
                        schema.error = Some(e.to_string());
                        report.units.push(schema);
                        return Err(e);
                    }
                }
                runs::insert(
                    &db.client,
                    report.id,
                    &report.trigger,
                    Utc::now(),
                    "running",
                    &report.seed_digest,
                )
                .await?;
                let closed = runs::close_abandoned(&db.client, report.id).await?;
                if closed > 0 {
                    tracing::warn!(run.id = %report.id, closed, "closed runs left running by a process that died");
                }
            }
        }
        let _ = self.settings.schema.mode == SchemaMode::Apply;

        // Each unit in its own transaction; a failing unit does not stop the ones after it, whose
        // inputs are the database's committed state.
        let mut first_error: Option<Error> = None;
        for unit in ["reference_seed", "identities", "role_bindings", "tenants"] {
            // A shutdown does not cut the run short: the run in flight finishes within
            // shutdown.grace, or its open transaction is rolled back when the process ends.
            let r = match unit {
                "reference_seed" => self.unit_reference(db, mode).await,
                "identities" => {
                    identities::reconcile(
                        &mut db.client,
                        self.identities.clone(),
                        &self.settings,
                        mode,
                        cancel,
                    )
                    .await
                }
                "role_bindings" => self.unit_bindings(db, mode).await,
                _ => self.unit_tenants(db, mode).await,
            };
            match r {
                Ok(u) => report.units.push(u),
                Err(e) => {
                    let mut u = UnitReport::new(unit);
                    u.error = Some(e.to_string());
                    report.units.push(u);
                    let wrapped = match e {
                        Error::Database { context, message } => Error::Unit {
                            unit,
                            message: format!("{context}: {message}"),
                        },
                        other => other,
                    };
                    tracing::error!(unit, error = %wrapped, "unit failed");
                    first_error.get_or_insert(wrapped);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn unit_reference(&self, db: &mut Db, mode: Mode) -> Result<UnitReport> {
        let tx = begin(&mut db.client, mode).await?;
        let r = reference::reconcile(&tx, &self.seed, mode).await?;
        finish(tx, mode).await?;
        Ok(r)
    }

    async fn unit_bindings(&self, db: &mut Db, mode: Mode) -> Result<UnitReport> {
        let tx = begin(&mut db.client, mode).await?;
        let r = bindings::reconcile(&tx, &self.settings.identity, mode).await?;
        finish(tx, mode).await?;
        Ok(r)
    }

    async fn unit_tenants(&self, db: &mut Db, mode: Mode) -> Result<UnitReport> {
        let tx = begin(&mut db.client, mode).await?;
        let r = tenants::reconcile(&tx, mode).await?;
        finish(tx, mode).await?;
        Ok(r)
    }
}

/// Apply: a read-write transaction. Plan: read only, so a plan cannot write by construction.
pub async fn begin(
    client: &mut tokio_postgres::Client,
    mode: Mode,
) -> Result<tokio_postgres::Transaction<'_>> {
    let mut b = client.build_transaction();
    if mode == Mode::Plan {
        b = b.read_only(true);
    }
    b.start()
        .await
        .map_err(store::ctx("starting a transaction"))
}

pub async fn finish(tx: tokio_postgres::Transaction<'_>, mode: Mode) -> Result<()> {
    match mode {
        Mode::Apply => tx.commit().await.map_err(store::ctx("committing")),
        Mode::Plan => tx.rollback().await.map_err(store::ctx("ending a plan")),
    }
}
