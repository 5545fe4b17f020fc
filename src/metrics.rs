//! Prometheus metrics, rendered by hand in the text exposition format.
//!
//! One `Metrics` value per app (no global recorder), so tests can run many apps in one process.
//! Labels are bounded: outcomes, unit names, actions, sources and error kinds, never user data.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::reconcile::RunReport;

const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Default)]
struct State {
    runs: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    duration_buckets: Vec<u64>,
    duration_sum: f64,
    duration_count: u64,
    rows: BTreeMap<(String, String), u64>,
    drift: BTreeMap<String, u64>,
    identities: BTreeMap<String, u64>,
    last_success: Option<f64>,
    skipped_ticks: u64,
    last_outcome_ok: Option<bool>,
}

#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record_run(&self, report: &RunReport, source: &str) {
        let Ok(mut s) = self.state.lock() else { return };
        *s.runs
            .entry(report.outcome.as_str().to_string())
            .or_insert(0) += 1;
        if let Some(e) = &report.error_value {
            *s.errors.entry(e.metric_label().to_string()).or_insert(0) += 1;
        }
        let secs = report.duration_ms as f64 / 1000.0;
        if s.duration_buckets.is_empty() {
            s.duration_buckets = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                s.duration_buckets[i] += 1;
            }
        }
        s.duration_sum += secs;
        s.duration_count += 1;
        for u in &report.units {
            for (action, n) in &u.counts {
                if matches!(
                    action.as_str(),
                    "inserted" | "updated" | "revoked" | "realigned" | "applied"
                ) && *n > 0
                {
                    *s.rows
                        .entry((u.unit.to_string(), action.clone()))
                        .or_insert(0) += *n as u64;
                }
            }
            if u.error.is_none() {
                s.drift.insert(
                    u.unit.to_string(),
                    u.counts.get("drift").copied().unwrap_or(0).max(0) as u64,
                );
            }
        }
        if let Some(id) = report.unit("identities") {
            if id.error.is_none() {
                s.identities.insert(
                    source.to_string(),
                    id.counts.get("listed").copied().unwrap_or(0).max(0) as u64,
                );
            }
        }
        match report.outcome {
            crate::reconcile::Outcome::Succeeded => {
                s.last_success = Some(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
                s.last_outcome_ok = Some(true);
            }
            crate::reconcile::Outcome::Failed => s.last_outcome_ok = Some(false),
            crate::reconcile::Outcome::Skipped => {}
        }
    }

    pub fn record_skipped_tick(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.skipped_ticks += 1;
        }
    }

    pub fn render(&self) -> String {
        let Ok(s) = self.state.lock() else {
            return String::new();
        };
        let mut o = String::new();
        let _ = writeln!(o, "# HELP seedkeeper_runs_total Reconcile runs by outcome.\n# TYPE seedkeeper_runs_total counter");
        for outcome in ["succeeded", "failed", "skipped"] {
            let _ = writeln!(
                o,
                "seedkeeper_runs_total{{outcome=\"{outcome}\"}} {}",
                s.runs.get(outcome).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(o, "# HELP seedkeeper_run_errors_total Failed runs by error kind.\n# TYPE seedkeeper_run_errors_total counter");
        for (k, v) in &s.errors {
            let _ = writeln!(o, "seedkeeper_run_errors_total{{kind=\"{k}\"}} {v}");
        }
        let _ = writeln!(o, "# HELP seedkeeper_run_duration_seconds Duration of reconcile runs.\n# TYPE seedkeeper_run_duration_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "seedkeeper_run_duration_seconds_bucket{{le=\"{b}\"}} {}",
                s.duration_buckets.get(i).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            o,
            "seedkeeper_run_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            s.duration_count
        );
        let _ = writeln!(o, "seedkeeper_run_duration_seconds_sum {}", s.duration_sum);
        let _ = writeln!(
            o,
            "seedkeeper_run_duration_seconds_count {}",
            s.duration_count
        );
        let _ = writeln!(o, "# HELP seedkeeper_rows_changed_total Rows written, by unit and action.\n# TYPE seedkeeper_rows_changed_total counter");
        for ((unit, action), v) in &s.rows {
            let _ = writeln!(
                o,
                "seedkeeper_rows_changed_total{{unit=\"{unit}\",action=\"{action}\"}} {v}"
            );
        }
        let _ = writeln!(o, "# HELP seedkeeper_drift_items Items found differing from the seed in the last run, by unit.\n# TYPE seedkeeper_drift_items gauge");
        for (unit, v) in &s.drift {
            let _ = writeln!(o, "seedkeeper_drift_items{{unit=\"{unit}\"}} {v}");
        }
        let _ = writeln!(o, "# HELP seedkeeper_identities_seen Identities listed by the source in the last run.\n# TYPE seedkeeper_identities_seen gauge");
        for (src, v) in &s.identities {
            let _ = writeln!(o, "seedkeeper_identities_seen{{source=\"{src}\"}} {v}");
        }
        let _ = writeln!(o, "# HELP seedkeeper_last_success_timestamp_seconds Unix time of the last successful run (0: none yet).\n# TYPE seedkeeper_last_success_timestamp_seconds gauge");
        let _ = writeln!(
            o,
            "seedkeeper_last_success_timestamp_seconds {}",
            s.last_success.unwrap_or(0.0)
        );
        let _ = writeln!(o, "# HELP seedkeeper_skipped_ticks_total Scheduled ticks skipped because a run was still going.\n# TYPE seedkeeper_skipped_ticks_total counter");
        let _ = writeln!(o, "seedkeeper_skipped_ticks_total {}", s.skipped_ticks);
        let _ = writeln!(o, "# HELP seedkeeper_last_run_ok 1 when the last finished run succeeded.\n# TYPE seedkeeper_last_run_ok gauge");
        let _ = writeln!(
            o,
            "seedkeeper_last_run_ok {}",
            u8::from(s.last_outcome_ok.unwrap_or(false))
        );
        o
    }
}
