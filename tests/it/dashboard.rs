//! The Grafana dashboard (deploy/grafana/seedkeeper.json) and the alerts
//! (deploy/kubernetes/alerts.yaml) are proven against live metrics. A real Prometheus (Debian's
//! `prometheus` package) scrapes a real daemon every second while the daemon runs on a short
//! schedule against the Keycloak emulator, fails a run, and applies an event batch. Then every
//! panel's query, with Grafana's variables substituted, must return at least one series with a
//! number, and every metric name the dashboard or an alert uses must be in the daemon's
//! `/metrics`: a renamed metric fails here instead of leaving a panel empty or an alert silent.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::events::{realm_with, user_event};
use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::*;
use crate::identities::{kc_env, refs, user};
use seedkeeper::reconcile::Outcome;

const DASHBOARD: &str = include_str!("../../deploy/grafana/seedkeeper.json");
const ALERTS: &str = include_str!("../../deploy/kubernetes/alerts.yaml");

/// What Grafana puts in place of the dashboard's variables. `$job` and `$instance` are "All"
/// (the variables' `allValue`); every rate window is one minute, longer than the whole drive,
/// so a panel's value does not depend on how fast a loaded machine ran it.
const VARIABLES: &[(&str, &str)] = &[
    ("${__rate_interval}", "1m"),
    ("$__rate_interval", "1m"),
    ("${__interval}", "1m"),
    ("$__interval", "1m"),
    ("${__range}", "1h"),
    ("$__range", "1h"),
    ("${job}", ".*"),
    ("$job", ".*"),
    ("${instance}", ".*"),
    ("$instance", ".*"),
];

/// The matchers every selector of a panel carries, so the variables filter every panel.
const FILTER: &str = r#"{job=~"$job", instance=~"$instance""#;

const NEWCOMER: &str = "e1900000-0000-4000-8000-000000000001";

/// A Prometheus server of its own: a temp config and data directory, a free port on loopback.
/// Killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SEEDKEEPER_PROMETHEUS` when set, else `prometheus` on the PATH, else Debian's
/// `/usr/bin/prometheus`. None is a failure, not a skip: a skipped check proves nothing.
fn prometheus_binary() -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("SEEDKEEPER_PROMETHEUS") {
        Some(p) => vec![p.into()],
        None => {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .map(|dir| dir.join("prometheus"))
                .chain([PathBuf::from("/usr/bin/prometheus")])
                .collect()
        }
    };
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test needs a Prometheus server and found none (SEEDKEEPER_PROMETHEUS, \
                 prometheus on the PATH, /usr/bin/prometheus): install Debian's prometheus \
                 package (`DEBIAN_FRONTEND=noninteractive apt-get install -y \
                 --no-install-recommends prometheus`, as .ci/run does; the test runs the binary \
                 itself, no service needed) or set SEEDKEEPER_PROMETHEUS to a prometheus binary"
            )
        })
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`) every second, and waits until it is
    /// ready.
    async fn start(bin: &std::path::Path, target: &str) -> Prometheus {
        let dir = TempDir::new();
        let config = dir.write(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: seedkeeper\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        );
        // A port that was free a moment ago; Prometheus exiting on a bind race shows in its log.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut p = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "prometheus exited ({status}) before it was ready:\n{}",
                    p.log()
                );
            }
            if status_of(&format!("{}/-/ready", p.base)).await == 200 {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 30 s:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/query`: each series' labels and value (a scalar result is one series).
    async fn query(&self, expr: &str) -> Vec<(Value, f64)> {
        let r = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await
            .unwrap_or_else(|e| panic!("query {expr}: {e}"));
        let status = r.status();
        let body: Value = r.json().await.expect("a JSON answer");
        assert!(
            status.is_success() && body["status"] == "success",
            "Prometheus refused {expr}: {status} {body}"
        );
        let value = |v: &Value| -> f64 {
            v[1].as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let data = &body["data"];
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| (s["metric"].clone(), value(&s["value"])))
                .collect(),
            Some("scalar") => vec![(Value::Null, value(&data["result"]))],
            other => panic!("{expr}: result type {other:?} in {body}"),
        }
    }

    /// The values of a label on the series that `selector` matches (what Grafana's
    /// `label_values(selector, label)` lists).
    async fn label_values(&self, label: &str, selector: &str) -> Vec<String> {
        let body: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/label/{label}/values", self.base))
            .query(&[("match[]", selector)])
            .send()
            .await
            .expect("label values")
            .json()
            .await
            .expect("a JSON answer");
        body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    }
}

/// One sample of the text exposition, by its exact series text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The sample names the exposition has (`seedkeeper_runs_total`, `…_bucket`, `…_count`): the
/// names PromQL can select. A histogram's family name itself selects nothing.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

/// Every `seedkeeper_…` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("seedkeeper_") {
        let starts_a_name = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
        let len = rest[i..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(rest.len() - i);
        if starts_a_name {
            names.insert(rest[i..i + len].to_string());
        }
        rest = &rest[i + len..];
    }
    names
}

/// Every panel of the dashboard, those inside rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            if p["type"] == "row" {
                walk(&p["panels"], out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The expression with Grafana's variables replaced; one left over is a failure.
fn substitute(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in VARIABLES {
        e = e.replace(var, value);
    }
    assert!(
        !e.contains('$'),
        "a variable this test does not know in {expr}"
    );
    e
}

/// The `expr` of every rule in alerts.yaml, one-line or a block scalar (`expr: |`). Read by
/// indentation: the test binary has no YAML parser, and the file's rules are plain.
fn alert_exprs(yaml: &str) -> Vec<String> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if !(rest.starts_with('|') || rest.starts_with('>')) {
            out.push(rest.to_string());
            continue;
        }
        let mut block = String::new();
        while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > indent(line)) {
            block.push_str(lines[i].trim());
            block.push('\n');
            i += 1;
        }
        out.push(block);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_panel_and_alert_queries_series_a_real_prometheus_scraped_from_the_daemon()
{
    let started = Instant::now();
    // First: without Prometheus nothing below can be checked.
    let bin = prometheus_binary();
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");

    // The daemon: full runs every two seconds, events polled every 300 ms, one retry per
    // Keycloak request (so a few queued 500s fail a run).
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(realm_with(vec![])).await;
    let mut env = kc_env(&kc);
    env.extend([
        ("SEEDKEEPER_SCHEDULE__CRON".into(), "*/2 * * * * *".into()),
        ("SEEDKEEPER_EVENTS__POLL_INTERVAL".into(), "300ms".into()),
        ("SEEDKEEPER_KEYCLOAK__MAX_RETRIES".into(), "1".into()),
    ]);
    let d = start_daemon(db.settings(&refs(&env))).await;
    let prom = Prometheus::start(&bin, d.base.trim_start_matches("http://")).await;
    until("Prometheus scrapes the daemon", 20, || async {
        prom.query(r#"up{job="seedkeeper"} == 1"#).await.len() == 1
    })
    .await;

    // A few successful full runs, and the follower following.
    until("two full runs and the follower following", 30, || async {
        let m = d.metrics().await;
        sample(&m, "seedkeeper_run_duration_seconds_count").is_some_and(|n| n >= 2.0)
            && sample(&m, "seedkeeper_events_following") == Some(1.0)
    })
    .await;
    until("the event checkpoint exists", 20, || async {
        db.scalar_or_zero("SELECT count(*) FROM event_follower WHERE following")
            .await
            == 1
    })
    .await;

    // A failure: Keycloak answers 500 to the next admin calls, and a full run meets them (the
    // follower's polls take some too, and a scheduled run may hold the lock: try again).
    let mut faults = 0.0;
    for attempt in 1.. {
        assert!(
            attempt <= 5,
            "no full run failed after {faults} queued 500s"
        );
        kc.fail_next_admin(6, 500);
        faults += 6.0;
        let r = tick(&d.gate).await;
        if r.outcome == Outcome::Failed {
            break;
        }
    }
    // Every queued 500 answered, and a full run succeeded after them.
    until(
        "the faults are used up and a full run succeeds again",
        30,
        || async {
            let m = d.metrics().await;
            sample(
                &m,
                r#"seedkeeper_keycloak_requests_total{outcome="server_error"}"#,
            )
            .is_some_and(|n| n >= faults)
                && sample(&m, "seedkeeper_last_run_ok") == Some(1.0)
        },
    )
    .await;

    // Some events: a user registers, and the follower's batch provisions her.
    kc.set_realm(realm_with(vec![user(NEWCOMER, "newcomer", &[], &[])]));
    kc.push_user_event(user_event(
        "ev-19",
        seedkeeper::events::now_ms(),
        "REGISTER",
        NEWCOMER,
    ));
    until("the event batch", 20, || async {
        sample(
            &d.metrics().await,
            r#"seedkeeper_event_batches_total{outcome="succeeded"}"#,
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;

    // Prometheus has scraped all of it: what the drive did, as Prometheus sees it.
    let proofs = [
        r#"sum(seedkeeper_runs_total{outcome="failed", trigger!="event"}) >= 1"#,
        "seedkeeper_run_duration_seconds_count >= 3",
        "seedkeeper_last_run_ok == 1",
        r#"seedkeeper_event_batches_total{outcome="succeeded"} >= 1"#,
        "seedkeeper_event_users_total >= 1",
        r#"seedkeeper_keycloak_requests_total{outcome="server_error"} >= 1"#,
        "seedkeeper_keycloak_retries_total >= 1",
        r#"seedkeeper_identities_seen{source="keycloak"} >= 1"#,
        "seedkeeper_events_following == 1",
    ];
    until(
        "Prometheus has the failure, the runs and the batch",
        20,
        || async {
            for p in proofs {
                if prom.query(p).await.is_empty() {
                    return false;
                }
            }
            true
        },
    )
    .await;

    // The template variables list this daemon.
    let templating = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let names: Vec<&str> = templating
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["DS_PROMETHEUS", "job", "instance"]);
    let mut used = BTreeSet::new();
    for v in templating.iter().filter(|v| v["type"] == "query") {
        let q = v["query"].as_str().expect("a label_values query");
        let (selector, label) = q
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("not label_values(selector, label): {q}"));
        used.extend(metric_names(selector));
        let values = prom.label_values(label, &substitute(selector)).await;
        eprintln!("variable {}: {q} -> {values:?}", v["name"]);
        assert!(!values.is_empty(), "{q} lists nothing");
    }

    // Every panel's every query returns a series with a number.
    let mut failures = Vec::new();
    let mut count = 0;
    for p in panels(&dashboard) {
        let title = p["title"].as_str().expect("a title");
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{title}: the datasource variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            let raw = t["expr"].as_str().expect("expr");
            let names = metric_names(raw);
            assert!(!names.is_empty(), "{title}: no seedkeeper metric in {raw}");
            for n in &names {
                assert!(
                    raw.matches(n.as_str()).count() == raw.matches(&format!("{n}{FILTER}")).count(),
                    "{title}: every {n} selector must start with {FILTER}: {raw}"
                );
            }
            used.extend(names);
            let expr = substitute(raw);
            let series = prom.query(&expr).await;
            let value = series.iter().map(|(_, v)| *v).find(|v| v.is_finite());
            // Each series as its labels (job and instance left out) and value, for the record.
            let shown: Vec<String> = series
                .iter()
                .map(|(labels, v)| {
                    let labels: Vec<String> = labels
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| !["job", "instance"].contains(&k.as_str()))
                        .map(|(k, l)| format!("{k}={}", l.as_str().unwrap_or("?")))
                        .collect();
                    format!("{{{}}} {v:.3}", labels.join(","))
                })
                .collect();
            eprintln!(
                "{:>2} series  {title} [{}]: {}\n      {expr}",
                series.len(),
                t["refId"].as_str().unwrap_or("?"),
                shown.join("  "),
            );
            count += 1;
            if value.is_none() {
                failures.push(format!("{title} [{}]: {expr} -> {series:?}", t["refId"]));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "panel queries without a series (or only NaN):\n{}",
        failures.join("\n")
    );

    // Every metric name of the dashboard and the alerts is in /metrics.
    let exposition = d.metrics().await;
    let exposed = sample_names(&exposition);
    let exprs = alert_exprs(ALERTS);
    assert_eq!(
        exprs.len(),
        ALERTS.matches("- alert:").count(),
        "one expr per alert: {exprs:#?}"
    );
    let in_alerts: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(
        in_alerts.contains("seedkeeper_last_run_ok") && in_alerts.len() >= 5,
        "the alerts' metric names were not found: {in_alerts:?}"
    );
    for (source, names) in [("the dashboard", &used), ("alerts.yaml", &in_alerts)] {
        let missing: Vec<_> = names.difference(&exposed).collect();
        assert!(
            missing.is_empty(),
            "{source} uses metrics the daemon does not expose: {missing:?}\nexposed: {exposed:?}"
        );
    }
    // For the record: exposed families no panel draws.
    let families: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let undrawn: Vec<_> = families
        .iter()
        .filter(|f| {
            !used.iter().any(|u| {
                u.strip_prefix(**f)
                    .is_some_and(|s| ["", "_bucket", "_sum", "_count"].contains(&s))
            })
        })
        .collect();
    eprintln!(
        "{count} panel queries, each with a series; {} metric names on the dashboard and {} in the alerts, all in /metrics; families no panel draws: {undrawn:?}; {:.1} s",
        used.len(),
        in_alerts.len(),
        started.elapsed().as_secs_f64()
    );

    d.cancel.cancel();
    d.task.await.expect("the daemon task").expect("the daemon");
}
