//! The evidence table `seed_runs`: one row per run, written at start (`running`) and finished
//! with the outcome, counts per unit, findings and an error without secrets. Rows beyond
//! `evidence.retention` are pruned. A `running` row left by a killed process is closed as
//! failed by the next run that holds the lock.
//!
//! Statements are unnamed ([`Client::query_typed`]): nothing prepared outlives them on a backend
//! that a connection pooler hands to someone else.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::Type;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::error::Result;
use crate::store::db_error;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunRecord {
    pub id: Uuid,
    pub trigger: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: String,
    pub seed_digest: Option<String>,
    pub counts: Value,
    pub findings: Value,
    pub error: Option<String>,
}

pub(crate) async fn insert(
    client: &Client,
    id: Uuid,
    trigger: &str,
    started_at: DateTime<Utc>,
    outcome: &str,
    digest: &str,
) -> Result<()> {
    let host = hostname();
    client
        .query_typed(
            "INSERT INTO seed_runs (id, trigger, started_at, outcome, seed_digest, host) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                (&id, Type::UUID),
                (&trigger, Type::TEXT),
                (&started_at, Type::TIMESTAMPTZ),
                (&outcome, Type::TEXT),
                (&digest, Type::TEXT),
                (&host, Type::TEXT),
            ],
        )
        .await
        .map_err(db_error("recording the run in seed_runs"))?;
    Ok(())
}

pub(crate) async fn finish(
    client: &Client,
    id: Uuid,
    outcome: &str,
    counts: &Value,
    findings: &Value,
    error: Option<&str>,
) -> Result<()> {
    client
        .query_typed(
            "UPDATE seed_runs SET finished_at = now(), outcome = $2, counts = $3, findings = $4, error = $5 WHERE id = $1",
            &[
                (&id, Type::UUID),
                (&outcome, Type::TEXT),
                (counts, Type::JSONB),
                (findings, Type::JSONB),
                (&error, Type::TEXT),
            ],
        )
        .await
        .map_err(db_error("finishing the run in seed_runs"))?;
    Ok(())
}

/// Closes runs left `running` by a process that died. Only a run holding the run lock calls it:
/// a `running` row is written only under the lock, and a run that loses its lock stops (see
/// [`crate::store::lock::RunLock::cancel_on_loss`]), so no other row's run is still going.
pub(crate) async fn close_abandoned(client: &Client, current: Uuid) -> Result<u64> {
    let row = client
        .query_typed_one(
            "WITH closed AS ( \
                 UPDATE seed_runs SET outcome = 'failed', finished_at = now(), \
                 error = 'interrupted: the process ended before the run finished (killed or lost its connection); ' || \
                     CASE WHEN counts - 'schema' = '{}'::jsonb THEN 'it committed no unit after the schema' \
                          ELSE 'it committed ' || (SELECT string_agg(k, ', ') FROM jsonb_object_keys(counts) k) || ' (their counts are in this row)' END || \
                     '; this run converges what it left' \
                 WHERE outcome = 'running' AND id <> $1 RETURNING 1) \
             SELECT count(*) FROM closed",
            &[(&current, Type::UUID)],
        )
        .await
        .map_err(db_error("closing abandoned runs"))?;
    Ok(row.get::<_, i64>(0).unsigned_abs())
}

/// The state the latest run recorded for the unit named `unit` in `seed_runs.unit_states`, if
/// this build recorded it ([`state_stamp`] removed).
pub(crate) async fn recorded_state<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    unit: &str,
) -> Result<Option<String>> {
    let row = client
        .query_typed_opt(
            "SELECT unit_states ->> $1 FROM seed_runs WHERE unit_states ? $1
             ORDER BY started_at DESC LIMIT 1",
            &[(&unit, Type::TEXT)],
        )
        .await
        .map_err(db_error("reading the state the last settled run recorded"))?;
    let recorded: Option<String> = row.map(|r| r.get(0));
    let stamp = state_stamp();
    Ok(recorded.and_then(|r| r.strip_prefix(stamp.as_str()).map(str::to_string)))
}

/// What the units' recorded states are read and written under ([`STATE_FORMAT`], seedkeeper's
/// version and, when the build said, its revision): a state recorded by another build is never
/// taken for settled, as that build's units may do less than this one's. After an upgrade, the
/// first run compares row by row and records again.
fn state_stamp() -> String {
    format!(
        "{STATE_FORMAT}/{}/{} ",
        env!("CARGO_PKG_VERSION"),
        crate::metrics::REVISION
    )
}

/// Raised whenever what a unit's state covers, or what a unit does, changes.
const STATE_FORMAT: &str = "state-1";

pub(crate) async fn prune(client: &Client, retention: u32) -> Result<u64> {
    let row = client
        .query_typed_one(
            "WITH pruned AS ( \
                 DELETE FROM seed_runs WHERE id IN (SELECT id FROM seed_runs ORDER BY started_at DESC OFFSET $1) \
                 RETURNING 1) \
             SELECT count(*) FROM pruned",
            &[(&i64::from(retention), Type::INT8)],
        )
        .await
        .map_err(db_error("pruning seed_runs"))?;
    Ok(row.get::<_, i64>(0).unsigned_abs())
}

pub(crate) async fn list(client: &Client, limit: i64) -> Result<Vec<RunRecord>> {
    let rows = client
        .query_typed(
            "SELECT id, trigger, started_at, finished_at, outcome, seed_digest, counts, findings, error \
             FROM seed_runs ORDER BY started_at DESC LIMIT $1",
            &[(&limit, Type::INT8)],
        )
        .await
        .map_err(db_error("reading seed_runs"))?;
    Ok(rows
        .into_iter()
        .map(|r| RunRecord {
            id: r.get(0),
            trigger: r.get(1),
            started_at: r.get(2),
            finished_at: r.get(3),
            outcome: r.get(4),
            seed_digest: r.get(5),
            counts: r.get(6),
            findings: r.get(7),
            error: r.get(8),
        })
        .collect())
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default()
}

/// Inserts the run row unless the run already has one (it is written once the schema exists).
pub(crate) async fn insert_if_missing(
    client: &Client,
    id: Uuid,
    trigger: &str,
    digest: &str,
) -> Result<()> {
    let host = hostname();
    client
        .query_typed(
            "INSERT INTO seed_runs (id, trigger, started_at, outcome, seed_digest, host) \
             VALUES ($1, $2, now(), 'running', $3, $4) ON CONFLICT (id) DO NOTHING",
            &[
                (&id, Type::UUID),
                (&trigger, Type::TEXT),
                (&digest, Type::TEXT),
                (&host, Type::TEXT),
            ],
        )
        .await
        .map_err(db_error("recording the run in seed_runs"))?;
    Ok(())
}

/// Adds one unit's counts and findings to its run's row, on `client`: the unit's own
/// transaction, so that what the unit commits and the evidence of it commit together (a run that
/// dies after a unit, or whose closing write fails, is still described by what it committed).
pub(crate) async fn record_unit<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    id: Uuid,
    unit: &crate::model::UnitReport,
) -> Result<()> {
    use tokio_postgres::types::Type;
    let counts = serde_json::json!({ unit.unit.as_str(): unit.counts });
    let findings = serde_json::json!(unit.findings);
    let states = match &unit.state {
        Some(s) => {
            let stamped = format!("{}{s}", state_stamp());
            serde_json::json!({ unit.unit.as_str(): stamped })
        }
        None => serde_json::json!({}),
    };
    client
        .execute_typed(
            "UPDATE seed_runs SET counts = counts || $2, findings = findings || $3,
                    unit_states = unit_states || $4 WHERE id = $1",
            &[
                (&id, Type::UUID),
                (&counts, Type::JSONB),
                (&findings, Type::JSONB),
                (&states, Type::JSONB),
            ],
        )
        .await
        .map_err(db_error("recording the unit in seed_runs"))?;
    Ok(())
}
