//! Signals an SRE can trust: `/metrics` from the registry (every error-kind series at
//! 0 before any run, build info, no `last_run_ok` before a run finishes), Keycloak requests and
//! retries counted exactly as the emulator saw them, and JSON logs: with
//! `SEEDKEEPER_LOG__FORMAT=json` everything `--once` prints is a JSON line (summary with `counts`
//! as an object, errors included, configuration and usage errors too), and every line of a run
//! carries its `run.id`.
//!
//! Event batches have their own series, and never move the ones that describe full
//! runs (`seedkeeper_last_success_timestamp_seconds`, `seedkeeper_last_run_ok`, the run
//! duration), so they cannot mask full runs that fail; `seedkeeper_identities_unlisted` shows a
//! listing short of `users/count` for as long as it lasts.

use std::collections::BTreeMap;

use seedkeeper::metrics::{ErrorKind, KeycloakOutcome};
use seedkeeper::reconcile::{Outcome, Trigger};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::events::{realm_with, user_event};
use crate::harness::keycloak::{KeycloakEmulator, Release};
use crate::harness::*;
use crate::identities::{kc_env, refs, user};

/// Every sample of a Prometheus text exposition, `name{labels}` -> value. Fails on a line that
/// is not a comment, a blank or `series value`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad metrics line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(series.starts_with("seedkeeper_"), "{line}");
        assert!(
            out.insert(series.to_string(), v).is_none(),
            "duplicate {line}"
        );
    }
    out
}

/// The `seedkeeper_runs_total` series of an outcome and a trigger.
pub(crate) fn runs_series(outcome: Outcome, trigger: Trigger) -> String {
    format!("seedkeeper_runs_total{{outcome=\"{outcome}\",trigger=\"{trigger}\"}}")
}

fn get(s: &BTreeMap<String, f64>, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no series {series} in {s:#?}"))
}

fn kc_requests(s: &BTreeMap<String, f64>, outcome: KeycloakOutcome) -> f64 {
    get(
        s,
        &format!(
            "seedkeeper_keycloak_requests_total{{outcome=\"{}\"}}",
            outcome.as_str()
        ),
    )
}

fn run_errors(s: &BTreeMap<String, f64>, kind: ErrorKind) -> f64 {
    get(
        s,
        &format!("seedkeeper_run_errors_total{{kind=\"{}\"}}", kind.as_str()),
    )
}

async fn scrape(base: &str) -> (String, String) {
    let r = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().expect("a text content-type").to_string())
        .expect("/metrics names its content-type");
    (ctype, r.text().await.unwrap())
}

/// `promtool`: on the PATH, else Debian's `/usr/bin/promtool`, else the copy
/// `scripts/check-deploy.sh` takes out of the package into `.ci/promtool`. None is a failure,
/// not a skip: a lint that did not run proves nothing.
fn promtool_binary() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("promtool"))
        .chain([
            "/usr/bin/promtool".into(),
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/promtool/usr/bin/promtool"),
        ])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test lints /metrics with promtool and found none (on the PATH, \
                 /usr/bin/promtool, .ci/promtool/usr/bin/promtool): install Debian's prometheus \
                 package, which ships it (`DEBIAN_FRONTEND=noninteractive apt-get install -y \
                 --no-install-recommends prometheus`, as .ci/run does)"
            )
        })
}

/// `promtool check metrics` (the linter Prometheus ships) on a /metrics text.
fn promtool_lint(text: &str) {
    use std::io::Write;
    let bin = promtool_binary();
    let mut child = std::process::Command::new(&bin)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn before_any_run_every_error_kind_is_0_build_info_is_1_and_last_run_ok_is_absent() {
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let env = kc_env(&kc);
    let components = db.components(&refs(&env));
    let digest = components.engine.seed.digest.clone();
    let app = components.into_gate();
    let health = seedkeeper::health::Health::new(app.clone());
    // HTTP only: no scheduler, no startup run.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    let http = tokio::spawn(seedkeeper::http::serve(health, listener, cancel.clone()));

    let (ctype, text) = scrape(&base).await;
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let s = samples(&text);
    assert_eq!(
        get(
            &s,
            &format!(
                "seedkeeper_build_info{{version=\"{}\",revision=\"{}\",seed_digest=\"{digest}\"}}",
                env!("CARGO_PKG_VERSION"),
                seedkeeper::metrics::REVISION
            )
        ),
        1.0
    );
    for kind in ErrorKind::ALL {
        assert_eq!(run_errors(&s, *kind), 0.0, "{kind:?}");
    }
    for outcome in Outcome::ALL {
        for trigger in Trigger::ALL.iter().filter(|t| t.in_daemon()) {
            let series = runs_series(*outcome, *trigger);
            assert_eq!(get(&s, &series), 0.0);
        }
    }
    for outcome in KeycloakOutcome::ALL {
        assert_eq!(kc_requests(&s, *outcome), 0.0, "{outcome:?}");
    }
    assert_eq!(get(&s, "seedkeeper_keycloak_retries_total"), 0.0);
    assert_eq!(
        get(&s, "seedkeeper_keycloak_request_duration_seconds_count"),
        0.0
    );
    assert_eq!(get(&s, "seedkeeper_run_duration_seconds_count"), 0.0);
    assert_eq!(get(&s, "seedkeeper_last_success_timestamp_seconds"), 0.0);
    assert!(
        !s.contains_key("seedkeeper_last_run_ok"),
        "last_run_ok before any run: {text}"
    );
    assert!(kc.journal().is_empty(), "nothing asked Keycloak yet");
    promtool_lint(&text);

    // The first run sets it.
    let r = app
        .scheduled_tick(&CancellationToken::new())
        .await
        .expect("no run in flight");
    assert_ok(&r);
    let s = samples(&scrape(&base).await.1);
    assert_eq!(get(&s, "seedkeeper_last_run_ok"), 1.0);
    let succeeded = runs_series(Outcome::Succeeded, Trigger::Schedule);
    assert_eq!(get(&s, &succeeded), 1.0);
    assert!(get(&s, "seedkeeper_last_success_timestamp_seconds") > 1.7e9);
    assert_eq!(
        get(&s, "seedkeeper_identities_seen{source=\"keycloak\"}"),
        6.0
    );
    cancel.cancel();
    http.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn keycloak_requests_and_retries_are_counted_as_the_emulator_saw_them() {
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    // One 503, one 429 (Retry-After: 1) and one truncated body before the first admin answer;
    // three retries are allowed (kc_env).
    kc.fail_next_admin(1, 503);
    kc.fail_next_admin(1, 429);
    kc.malformed_next_admin(1);
    let env = kc_env(&kc);
    let d = start_daemon(db.settings(&refs(&startup_only(env)))).await;
    startup_run_counted(&d, 60).await;
    let s = samples(&scrape(&d.base).await.1);
    assert_eq!(
        get(&s, &runs_series(Outcome::Succeeded, Trigger::Startup)),
        1.0,
        "{s:#?}"
    );
    let journal = kc.journal();
    let ok_answers = journal
        .iter()
        .filter(|j| (200..300).contains(&j.status))
        .count() as f64;
    assert_eq!(kc_requests(&s, KeycloakOutcome::ServerError), 1.0);
    assert_eq!(kc_requests(&s, KeycloakOutcome::RateLimited), 1.0);
    assert_eq!(kc_requests(&s, KeycloakOutcome::Malformed), 1.0);
    // The truncated body was a 200 to the emulator.
    assert_eq!(kc_requests(&s, KeycloakOutcome::Ok), ok_answers - 1.0);
    let total: f64 = KeycloakOutcome::ALL
        .iter()
        .map(|o| kc_requests(&s, *o))
        .sum();
    assert_eq!(
        total,
        journal.len() as f64,
        "every request the emulator answered (discovery, token, admin) is counted once"
    );
    assert_eq!(
        get(&s, "seedkeeper_keycloak_request_duration_seconds_count"),
        total
    );
    assert!(get(&s, "seedkeeper_keycloak_request_duration_seconds_sum") > 0.0);
    assert_eq!(get(&s, "seedkeeper_keycloak_retries_total"), 3.0);
    for kind in ErrorKind::ALL {
        assert_eq!(run_errors(&s, *kind), 0.0, "{kind:?}");
    }
    assert_eq!(get(&s, "seedkeeper_last_run_ok"), 1.0);

    // Beyond the retries: four 503s fail the run after three retries.
    kc.clear_journal();
    kc.fail_next_admin(4, 503);
    let r = tick(&d.gate).await;
    assert_eq!(r.outcome.as_str(), "failed", "{:?}", r.error);
    let s2 = samples(&scrape(&d.base).await.1);
    assert_eq!(kc_requests(&s2, KeycloakOutcome::ServerError), 5.0);
    assert_eq!(get(&s2, "seedkeeper_keycloak_retries_total"), 6.0);
    let asked = kc.journal().len() as f64;
    let total2: f64 = KeycloakOutcome::ALL
        .iter()
        .map(|o| kc_requests(&s2, *o))
        .sum();
    assert_eq!(total2 - total, asked);
    assert_eq!(run_errors(&s2, ErrorKind::KeycloakUnavailable), 1.0);
    for kind in ErrorKind::ALL
        .iter()
        .filter(|k| **k != ErrorKind::KeycloakUnavailable)
    {
        assert_eq!(run_errors(&s2, *kind), 0.0, "{kind:?}");
    }
    assert_eq!(
        get(&s2, &runs_series(Outcome::Failed, Trigger::Schedule)),
        1.0
    );
    assert_eq!(get(&s2, "seedkeeper_last_run_ok"), 0.0);
    d.cancel.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_followers_keycloak_requests_count_in_the_same_series() {
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let mut env = kc_env(&kc);
    env.push(("SEEDKEEPER_SCHEDULE__CRON".into(), "0 0 0 1 1 *".into()));
    env.push(("SEEDKEEPER_EVENTS__POLL_INTERVAL".into(), "1s".into()));
    let d = start_daemon(db.settings(&refs(&env))).await;
    // Once the follower has polled the events, every request the emulator answered, the
    // follower's and the runs', is in seedkeeper_keycloak_requests_total.
    until("the follower counted", 60, || async {
        let journal = kc.journal();
        let polled = journal.iter().any(|j| j.path.ends_with("/events"));
        let s = samples(&d.metrics().await);
        let total: f64 = KeycloakOutcome::ALL
            .iter()
            .map(|o| kc_requests(&s, *o))
            .sum();
        polled && total == journal.len() as f64
    })
    .await;
    d.cancel.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn event_batches_succeeding_while_full_runs_fail_leave_the_full_run_series_failed() {
    const MALLORY: &str = "e1700000-0000-4000-8000-000000000001";
    const ALICE: &str = "e1700000-0000-4000-8000-000000000002";
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(realm_with(vec![])).await;
    let mut env = kc_env(&kc);
    // No scheduled tick: the test runs the full run that fails itself.
    env.push(("SEEDKEEPER_SCHEDULE__CRON".into(), "0 0 0 1 1 *".into()));
    env.push(("SEEDKEEPER_EVENTS__POLL_INTERVAL".into(), "1s".into()));
    let d = start_daemon(db.settings(&refs(&env))).await;
    until(
        "the startup run succeeded and events are followed",
        60,
        || async {
            let s = samples(&d.metrics().await);
            s.get("seedkeeper_last_run_ok") == Some(&1.0)
                && s.get("seedkeeper_events_following") == Some(&1.0)
        },
    )
    .await;
    // The follower's first poll after the startup run sets its checkpoint: an event from now on
    // is read.
    until("the event checkpoint exists", 30, || async {
        db.scalar_or_zero("SELECT count(*) FROM event_follower WHERE following")
            .await
            == 1
    })
    .await;
    let s0 = samples(&d.metrics().await);
    let full_success = get(&s0, "seedkeeper_last_success_timestamp_seconds");
    assert!(full_success > 1.7e9, "{s0:#?}");
    let batch = |o: &str| format!("seedkeeper_event_batches_total{{outcome=\"{o}\"}}");
    for o in Outcome::ALL {
        assert_eq!(get(&s0, &batch(o.as_str())), 0.0);
    }
    assert_eq!(
        get(&s0, "seedkeeper_event_batch_last_success_timestamp_seconds"),
        0.0
    );

    // A row someone else made holds "mallory", whom Keycloak now lists under a sub of its own:
    // every full run fails on the clash from here on.
    db.client()
        .await
        .execute(
            "INSERT INTO users (username, email, role) VALUES ('mallory', 'other-mallory@example.test', 'user')",
            &[],
        )
        .await
        .unwrap();
    let mallory = user(MALLORY, "mallory", &[], &[]);
    kc.set_realm(realm_with(vec![mallory.clone()]));
    let r = tick(&d.gate).await;
    assert_eq!(r.outcome, Outcome::Failed, "{:?}", r.error);
    let s1 = samples(&d.metrics().await);
    assert_eq!(get(&s1, "seedkeeper_last_run_ok"), 0.0);
    let full_runs = get(&s1, "seedkeeper_run_duration_seconds_count");

    // Alice registers: the event batch that provisions her succeeds.
    kc.set_realm(realm_with(vec![mallory, user(ALICE, "alice", &[], &[])]));
    kc.push_user_event(user_event(
        "ev-17",
        seedkeeper::events::now_ms(),
        "REGISTER",
        ALICE,
    ));
    until("the event batch is counted", 30, || async {
        samples(&d.metrics().await)
            .get(&batch("succeeded"))
            .is_some_and(|n| *n >= 1.0)
    })
    .await;
    let s2 = samples(&d.metrics().await);
    assert_eq!(
        db.scalar("SELECT count(*) FROM users WHERE username = 'alice' AND is_active")
            .await,
        1,
        "the batch provisioned alice"
    );
    // The full-run series still say the full runs fail, as they do.
    assert_eq!(get(&s2, "seedkeeper_last_run_ok"), 0.0, "{s2:#?}");
    assert_eq!(
        get(&s2, "seedkeeper_last_success_timestamp_seconds"),
        full_success
    );
    assert_eq!(
        get(&s2, "seedkeeper_run_duration_seconds_count"),
        full_runs,
        "a batch is not a full run's duration"
    );
    // The batch's own series moved.
    assert_eq!(get(&s2, &batch("succeeded")), 1.0);
    assert_eq!(get(&s2, &batch("failed")), 0.0);
    assert_eq!(
        get(&s2, "seedkeeper_event_batch_duration_seconds_count"),
        1.0
    );
    assert!(
        get(&s2, "seedkeeper_event_batch_last_success_timestamp_seconds") > full_success,
        "{s2:#?}"
    );
    // Every run is a seed_runs row and counted as one: the startup run and the batch succeeded,
    // the scheduled run failed on the clash.
    assert_eq!(
        get(&s2, &runs_series(Outcome::Succeeded, Trigger::Startup)),
        1.0
    );
    assert_eq!(
        get(&s2, &runs_series(Outcome::Succeeded, Trigger::Event)),
        1.0
    );
    assert_eq!(
        get(&s2, &runs_series(Outcome::Failed, Trigger::Schedule)),
        1.0
    );
    assert_eq!(run_errors(&s2, ErrorKind::IdentityClash), 1.0);
    // Readiness follows the full runs too.
    assert_eq!(status_of(&format!("{}/readyz", d.base)).await, 503);
    promtool_lint(&d.metrics().await);
    d.cancel.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listing_short_of_users_count_shows_in_identities_unlisted_until_a_complete_one() {
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let env = kc_env(&kc);
    let app = db.gate(&refs(&env));
    let cancel = CancellationToken::new();
    assert!(!app
        .metrics()
        .render()
        .contains("seedkeeper_identities_unlisted"));
    assert_ok(&app.startup(&cancel).await);
    assert_eq!(
        get(
            &samples(&app.metrics().render()),
            "seedkeeper_identities_unlisted"
        ),
        0.0
    );

    // users/count counts users the listing leaves out: the run succeeds, narrowed, and the
    // gauge says by how many.
    kc.hide_from_listing_every(2);
    let hidden = kc.hidden_users(2).len();
    assert!(hidden > 0);
    assert_ok(&app.scheduled_tick(&cancel).await.expect("no run in flight"));
    let s = samples(&app.metrics().render());
    assert_eq!(get(&s, "seedkeeper_identities_unlisted"), hidden as f64);
    assert_eq!(get(&s, "seedkeeper_last_run_ok"), 1.0);

    kc.clear_paging_faults();
    assert_ok(&app.scheduled_tick(&cancel).await.expect("no run in flight"));
    assert_eq!(
        get(
            &samples(&app.metrics().render()),
            "seedkeeper_identities_unlisted"
        ),
        0.0
    );
}

/// Every line of `out` parsed as a JSON object; fails naming the first line that is not one.
fn json_lines(what: &str, out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v @ Value::Object(_)) => v,
            _ => panic!("{what}: a line that is not a JSON object: {l:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn once_with_json_logs_prints_only_json_and_every_line_of_the_run_carries_its_id() {
    // Empty: the run applies the migrations, which logs lines inside the schema unit.
    let db = TestDb::empty().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let mut env = db.env();
    env.extend(kc_env(&kc));
    env.push(("SEEDKEEPER_LOG__FORMAT".into(), "json".into()));

    // A run with two retried 503s: their warnings are logged inside the source.
    kc.fail_next_admin(2, 503);
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary = json_lines("stdout", &out.stdout);
    assert_eq!(summary.len(), 1, "one summary line: {summary:?}");
    let summary = &summary[0];
    assert_eq!(summary["message"], "run summary");
    assert_eq!(summary["outcome"], "succeeded");
    assert_eq!(summary["trigger"], "once");
    assert!(summary["counts"].is_object(), "{summary}");
    assert_eq!(summary["counts"]["identities"]["inserted"], 6, "{summary}");
    assert!(summary["findings"].is_array());
    let run_id = summary["run.id"].as_str().expect("run.id").to_string();
    let mut logs = json_lines("stderr", &out.stderr);
    assert!(!logs.is_empty());
    // The one line before the run: where the configuration came from.
    let provenance = logs.remove(0);
    assert_eq!(
        provenance["message"],
        "no configuration file loaded: defaults and the SEEDKEEPER_* environment",
        "{provenance}"
    );
    for l in &logs {
        assert_eq!(
            l["run.id"],
            run_id.as_str(),
            "a line without the run's id: {l}"
        );
        assert_eq!(l["trigger"], "once", "{l}");
        for k in ["timestamp", "level", "target", "message"] {
            assert!(l[k].is_string(), "{k} in {l}");
        }
    }
    let retries: Vec<&Value> = logs
        .iter()
        .filter(|l| {
            l["level"] == "WARN"
                && l["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("seedkeeper::identity::keycloak"))
        })
        .collect();
    assert_eq!(retries.len(), 2, "the two retry warnings: {logs:?}");
    let completed = logs
        .iter()
        .find(|l| l["message"] == "seeding_completed")
        .expect("seeding_completed");
    assert!(
        completed["counts"].is_object(),
        "counts is an object, not a string: {completed}"
    );
    // Lines inside a unit name it.
    assert!(
        logs.iter().any(|l| l["unit"] == "schema"),
        "a schema line: {logs:?}"
    );

    // A failing run: the summary and the error, each one JSON line.
    kc.fail_next_admin(10, 503);
    let out = run_bin(&["--once"], &env);
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("ended by a signal: {}", text(&out)));
    assert_ne!(code, 0, "{}", text(&out));
    let summary = json_lines("stdout", &out.stdout);
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0]["outcome"], "failed");
    assert_eq!(summary[0]["level"], "ERROR");
    assert!(
        summary[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{}",
        summary[0]
    );
    let logs = json_lines("stderr", &out.stderr);
    let last = logs.last().expect("an error line");
    assert_eq!(last["level"], "ERROR");
    assert_eq!(last["error.kind"], "keycloak_unavailable", "{last}");
    assert_eq!(last["exit_code"], code, "{last}");
    assert!(
        last["message"].as_str().is_some_and(|m| m.contains("503")),
        "{last}"
    );

    // Errors before the configuration is loaded follow SEEDKEEPER_LOG__FORMAT (or
    // --log-format, or the file's log.format): a bad key, then a usage error.
    let mut bad = env.clone();
    bad.push(("SEEDKEEPER_NOT_A_KEY".into(), "1".into()));
    let out = run_bin(&["--once"], &bad);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(out.stdout.is_empty());
    let lines = json_lines("config error", &out.stderr);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["error.kind"], "config");
    assert!(
        lines[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not_a_key")),
        "{}",
        lines[0]
    );

    let dir = TempDir::new();
    let file = dir.write(
        "seedkeeper.toml",
        "[log]\nformat = \"json\"\n[nope]\nx = 1\n",
    );
    let mut by_file: Vec<(String, String)> = db.env();
    by_file.push(("SEEDKEEPER_CONFIG".into(), file.display().to_string()));
    let out = run_bin(&["--once"], &by_file);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let lines = json_lines("config error (format from the file)", &out.stderr);
    assert_eq!(lines[0]["exit_code"], 78);

    let out = run_bin(&["--log-format", "json", "--no-such-flag"], &db.env());
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let lines = json_lines("usage error", &out.stderr);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["error.kind"], "usage");
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_of_a_run_carry_its_id_on_every_line_too() {
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let mut env = db.env();
    env.extend(kc_env(&kc));
    kc.fail_next_admin(1, 503);
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout
        .split_whitespace()
        .nth(1)
        .expect("run <id> succeeded ...")
        .to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains('\u{1b}'), "no colours without a terminal");
    // The one line before the run: where the configuration came from.
    for line in stderr
        .lines()
        .filter(|l| !l.contains("no configuration file loaded"))
    {
        assert!(
            line.contains(&format!("run{{run.id={id} trigger=\"once\"")),
            "{line}"
        );
    }
    assert!(
        stderr.contains("Keycloak server error; retrying"),
        "{stderr}"
    );
}

/// The dev realm with the seedkeeper service account also holding realm-management
/// `manage-realm`, the role Keycloak shows its version to.
fn realm_showing_the_version() -> Value {
    let mut realm = dev_realm();
    grant_manage_realm(&mut realm);
    realm
}

/// Gives the realm's seedkeeper service account realm-management `manage-realm` too.
pub(crate) fn grant_manage_realm(realm: &mut Value) {
    let sa = realm["users"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|u| u["serviceAccountClientId"] == "seedkeeper")
        .unwrap();
    sa["clientRoles"]["realm-management"]
        .as_array_mut()
        .unwrap()
        .push("manage-realm".into());
}

/// `env` for a daemon that runs its startup run and the test's own only: no scheduled tick and
/// no event follower (either could take an injected fault or add a run).
pub(crate) fn startup_only(mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    env.push(("SEEDKEEPER_SCHEDULE__CRON".into(), "0 0 0 1 1 *".into()));
    env.push(("SEEDKEEPER_EVENTS__ENABLED".into(), "false".into()));
    env
}

/// Waits up to `secs` for the daemon's startup run to be counted, succeeded or failed.
pub(crate) async fn startup_run_counted(d: &Daemon, secs: u64) {
    until("the startup run is counted", secs, || async {
        let s = samples(&d.metrics().await);
        s.get(&runs_series(Outcome::Succeeded, Trigger::Startup)) == Some(&1.0)
            || s.get(&runs_series(Outcome::Failed, Trigger::Startup)) == Some(&1.0)
    })
    .await;
}

fn serverinfo_requests(kc: &KeycloakEmulator) -> usize {
    kc.journal()
        .iter()
        .filter(|j| j.path == "/admin/serverinfo")
        .count()
}

/// At start seedkeeper reads the Keycloak version from `GET /admin/serverinfo` once,
/// exports it as `seedkeeper_keycloak_info{version, tested}`, and does not ask again on later
/// runs; with the profile of each release that shows it (26.5 and 26.7; 26.4 shows no realm
/// service account its version, as the next test covers).
#[tokio::test(flavor = "multi_thread")]
async fn the_keycloak_version_is_read_once_and_exported() {
    for release in [Release::V26_5, Release::V26_7] {
        let db = TestDb::new().await;
        let kc = KeycloakEmulator::start(realm_showing_the_version()).await;
        kc.set_release(release);
        let env = kc_env(&kc);
        let d = start_daemon(db.settings(&refs(&startup_only(env)))).await;
        let series = format!(
            "seedkeeper_keycloak_info{{version=\"{}\",tested=\"true\"}}",
            release.version()
        );
        until("the version is exported", 60, || async {
            samples(&d.metrics().await).contains_key(&series)
        })
        .await;
        let s = samples(&d.metrics().await);
        assert_eq!(get(&s, &series), 1.0);
        let r = d.gate.once(&CancellationToken::new()).await;
        assert_ok(&r);
        assert_eq!(serverinfo_requests(&kc), 1, "asked once, not per run");
        // Every request is counted, serverinfo included.
        let s = samples(&d.metrics().await);
        let total: f64 = KeycloakOutcome::ALL
            .iter()
            .map(|o| kc_requests(&s, *o))
            .sum();
        assert_eq!(total, kc.journal().len() as f64);
        d.cancel.cancel();
        let _ = d.task.await;
    }
}

/// Without `manage-realm` (the dev realm's service account), on 26.4 (which shows no realm
/// service account the version), or with serverinfo refused or failing, the version is skipped: the run succeeds and no `seedkeeper_keycloak_info` exists.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_keycloak_version_is_skipped_without_failing() {
    for (realm, release, status) in [
        (dev_realm(), Release::V26_7, None),
        (realm_showing_the_version(), Release::V26_4, None),
        (realm_showing_the_version(), Release::V26_7, Some(403)),
        (realm_showing_the_version(), Release::V26_7, Some(500)),
    ] {
        let db = TestDb::new().await;
        let kc = KeycloakEmulator::start(realm).await;
        kc.set_release(release);
        kc.serverinfo_status(status);
        let env = kc_env(&kc);
        let d = start_daemon(db.settings(&refs(&startup_only(env)))).await;
        startup_run_counted(&d, 60).await;
        let text = d.metrics().await;
        let s = samples(&text);
        assert_eq!(
            get(&s, &runs_series(Outcome::Succeeded, Trigger::Startup)),
            1.0,
            "{status:?}"
        );
        assert!(
            !text.contains("seedkeeper_keycloak_info"),
            "{status:?}: {text}"
        );
        assert_eq!(serverinfo_requests(&kc), 1, "{status:?}");
        // A 5xx is no answer: asked again at the next run; a refusal or a 200 is final.
        let r = d.gate.once(&CancellationToken::new()).await;
        assert_ok(&r);
        let again = if status == Some(500) { 2 } else { 1 };
        assert_eq!(serverinfo_requests(&kc), again, "{status:?}");
        d.cancel.cancel();
        let _ = d.task.await;
    }
}

/// The version is logged once at start (info), and a version outside the tested range is
/// warned about, naming the tested versions; the run still succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_keycloak_version_outside_the_tested_range_is_warned_about() {
    for (version, tested) in [("26.7.3", true), ("26.3.5", false), ("27.0.0", false)] {
        let db = TestDb::new().await;
        let kc = KeycloakEmulator::start(realm_showing_the_version()).await;
        kc.set_release(Release::V26_7);
        kc.set_server_version(Some(version));
        let env = [db.env(), kc_env(&kc)].concat();
        let out = run_bin(&["--once"], &env);
        let log = text(&out);
        assert!(out.status.success(), "{version}: {log}");
        assert_eq!(
            log.matches("Keycloak server version").count(),
            1,
            "{version}: {log}"
        );
        assert!(log.contains(version), "{version}: {log}");
        let warned = log.contains("outside the tested range");
        assert_eq!(warned, !tested, "{version}: {log}");
        if warned {
            for v in seedkeeper::identity::keycloak::TESTED_VERSIONS {
                assert!(log.contains(v), "{version}: names {v}: {log}");
            }
        }
    }
}
