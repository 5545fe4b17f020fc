//! Runs that mean what they say. The daemon retries a failed full run with
//! backoff instead of waiting a whole schedule interval (readiness comes back within seconds),
//! and `--once` exits 0 only after a run of its own: it waits for a run lock another session
//! holds, up to `startup.wait_timeout`, and exits 69 naming the holder when the wait runs out.
//! Every wait polls a condition with a deadline.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use seedkeeper::reconcile::{Outcome, Trigger};
use tokio_util::sync::CancellationToken;

use crate::harness::cluster::OwnCluster;
use crate::harness::*;

/// Once a year, on January 1st: no scheduled tick during a test.
const NO_TICK: &str = "0 0 0 1 1 *";

/// A session of the test holding `LOCK TABLE users IN ACCESS EXCLUSIVE MODE` in an open
/// transaction: a run fails on `database.lock_timeout` while it is held.
async fn lock_users(db: &TestDb) -> tokio_postgres::Client {
    let c = db.client().await;
    c.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    c
}

/// A session of the test ([`TestDb::hold_run_lock`]), named `test-holder`, holding the run
/// lock; and its backend's pid.
async fn named_run_lock_holder(db: &TestDb) -> (tokio_postgres::Client, i32) {
    let c = db.hold_run_lock().await;
    c.batch_execute("SET application_name = 'test-holder'")
        .await
        .unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    (c, pid)
}

/// (trigger, outcome, error) of every `seed_runs` row, oldest first.
async fn runs(db: &TestDb) -> Vec<(String, String, String)> {
    db.triples("SELECT trigger, outcome, coalesce(error, '') FROM seed_runs ORDER BY started_at")
        .await
}

/// `seedkeeper_runs_total{outcome, trigger}` in a /metrics text (0 when absent).
fn runs_total(text: &str, outcome: Outcome, trigger: Trigger) -> f64 {
    let series = crate::signals::runs_series(outcome, trigger);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_run_is_retried_with_backoff_and_readiness_returns_without_waiting_for_the_schedule(
) {
    let db = TestDb::new().await;
    let locked = lock_users(&db).await;
    let started = Instant::now();
    let d = start_daemon(db.settings(&[
        ("SEEDKEEPER_SCHEDULE__CRON", NO_TICK),
        ("SEEDKEEPER_SCHEDULE__RETRY_INITIAL", "1s"),
        ("SEEDKEEPER_DATABASE__LOCK_TIMEOUT", "300ms"),
        ("SEEDKEEPER_EVENTS__ENABLED", "false"),
    ]))
    .await;
    until("the startup run failed on the users lock", 30, || async {
        db.scalar_or_zero(
            "SELECT count(*) FROM seed_runs WHERE trigger = 'startup' AND outcome = 'failed'",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        status_of(&d.url("/readyz")).await,
        503,
        "not ready after a failed run"
    );
    // The blip ends: the retry converges without a tick (the next one is up to a year away).
    locked.batch_execute("COMMIT").await.unwrap();
    d.until_ready("ready again through a retry", 30).await;
    let healed = started.elapsed();
    until("the retry's success is counted", 10, || async {
        runs_total(&d.metrics().await, Outcome::Succeeded, Trigger::Retry) == 1.0
    })
    .await;
    let rows = runs(&db).await;
    let (first, rest) = rows.split_first().unwrap();
    assert_eq!((first.0.as_str(), first.1.as_str()), ("startup", "failed"));
    assert!(first.2.contains("database.lock_timeout"), "{}", first.2);
    // Retries while the lock was still held failed; the last one succeeded, and nothing else ran.
    let (last, between) = rest.split_last().unwrap();
    assert_eq!((last.0.as_str(), last.1.as_str()), ("retry", "succeeded"));
    assert!(
        between
            .iter()
            .all(|r| (r.0.as_str(), r.1.as_str()) == ("retry", "failed")),
        "{rows:?}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 6);
    // Metrics count each retry as a run, under its own trigger.
    let text = d.metrics().await;
    assert_eq!(runs_total(&text, Outcome::Failed, Trigger::Startup), 1.0);
    assert_eq!(
        runs_total(&text, Outcome::Failed, Trigger::Retry),
        between.len() as f64
    );
    assert_eq!(
        runs_total(&text, Outcome::Succeeded, Trigger::Schedule),
        0.0
    );
    println!(
        "healed through {} retr{} in {:.1}s after the start",
        between.len() + 1,
        if between.is_empty() { "y" } else { "ies" },
        healed.as_secs_f64()
    );
    d.cancel.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_failed_by_a_postgresql_restart_is_retried_and_the_daemon_is_ready_again_within_seconds(
) {
    let cluster = Arc::new(tokio::task::spawn_blocking(OwnCluster::new).await.unwrap());
    let url = cluster.url();
    let d = start_ready_daemon(
        &[
            ("SEEDKEEPER_DATABASE__URL", &url),
            ("SEEDKEEPER_SCHEDULE__CRON", NO_TICK),
            ("SEEDKEEPER_SCHEDULE__RETRY_INITIAL", "1s"),
            ("SEEDKEEPER_DATABASE__CONNECT_TIMEOUT", "1s"),
            ("SEEDKEEPER_EVENTS__ENABLED", "false"),
        ],
        60,
    )
    .await;

    // PostgreSQL restarts, and the run that comes meanwhile (a tick) fails.
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.stop())
        .await
        .unwrap();
    let failed = d
        .gate
        .scheduled_tick(&d.cancel)
        .await
        .expect("no run in flight");
    assert_eq!(failed.outcome, Outcome::Failed);
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.start())
        .await
        .unwrap();
    let back = Instant::now();
    // Ready again through a retry, a year before the next tick.
    d.until_ready("ready again after the restart", 30).await;
    let took = back.elapsed();
    let c = connect(&cluster.url()).await;
    let retried: i64 = c
        .query_one(
            "SELECT count(*) FROM seed_runs WHERE trigger = 'retry' AND outcome = 'succeeded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(retried, 1);
    println!(
        "ready again {:.1}s after PostgreSQL was back",
        took.as_secs_f64()
    );
    d.cancel.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_starts_takes_the_place_of_a_due_retry_and_a_success_clears_it() {
    let db = TestDb::new().await;
    let app = db.gate(&[
        ("SEEDKEEPER_SCHEDULE__CRON", NO_TICK),
        ("SEEDKEEPER_SCHEDULE__RETRY_INITIAL", "100ms"),
        ("SEEDKEEPER_DATABASE__LOCK_TIMEOUT", "300ms"),
    ]);
    let cancel = CancellationToken::new();
    let due = app.retry_due();
    assert!(due.borrow().is_none(), "no retry before any run");
    let locked = lock_users(&db).await;
    let failed = app.scheduled_tick(&cancel).await.unwrap();
    assert_eq!(failed.outcome, Outcome::Failed, "{:?}", failed.error);
    let first_due = due.borrow().expect("a failed tick makes a retry due");
    // A second failure in a row waits longer.
    let failed = app.scheduled_tick(&cancel).await.unwrap();
    assert_eq!(failed.outcome, Outcome::Failed);
    let second_due = due.borrow().expect("due again");
    assert!(
        second_due - first_due >= Duration::from_millis(100),
        "{first_due:?} then {second_due:?}"
    );
    locked.batch_execute("COMMIT").await.unwrap();
    // A run that starts before the retry is due (a tick) takes its place; its success clears it.
    let ok = app.scheduled_tick(&cancel).await.unwrap();
    assert_ok(&ok);
    assert!(due.borrow().is_none(), "a success leaves no retry due");
    assert!(
        app.retry_when_due(&cancel).await.is_none(),
        "nothing to retry"
    );
    let triggers = db
        .strings("SELECT trigger || ' ' || outcome FROM seed_runs ORDER BY started_at")
        .await;
    assert_eq!(
        triggers,
        ["schedule failed", "schedule failed", "schedule succeeded"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn once_waits_for_a_run_lock_another_session_holds_then_runs_and_exits_0() {
    let db = TestDb::new().await;
    let (holder, _) = named_run_lock_holder(&db).await;
    let env = db.env();
    let started = Instant::now();
    let child = spawn::command(&["--once"], &env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND application_name = 'seedkeeper' AND query LIKE '%pg_try_advisory_xact_lock%'";
    until("--once is waiting for the run lock", 30, || async {
        db.scalar(waiting).await >= 1
    })
    .await;
    // Hold it a moment longer, as a killed process's backend would while it finishes.
    until("--once has asked again", 10, || async {
        started.elapsed() > Duration::from_millis(1500)
    })
    .await;
    assert!(
        runs(&db).await.is_empty(),
        "nothing recorded while it waits"
    );
    release_run_lock(&holder).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the run lock is held by another session")
            && stderr.contains("test-holder"),
        "{stderr}"
    );
    let rows = runs(&db).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        ("once", "succeeded")
    );
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 6);
    println!(
        "--once waited for the lock and converged in {:.1}s",
        took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn once_exits_69_naming_the_holder_when_the_run_lock_is_held_past_startup_wait_timeout() {
    let db = TestDb::new().await;
    let (_holder, pid) = named_run_lock_holder(&db).await;
    let mut env = db.env();
    env.push(("SEEDKEEPER_STARTUP__WAIT_TIMEOUT".into(), "2s".into()));
    let started = Instant::now();
    let out = run_bin(&["--once"], &env);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in [
        format!("pid {pid} "),
        "application_name \"test-holder\"".to_string(),
        "startup.wait_timeout (2s)".to_string(),
        "SEEDKEEPER_STARTUP__WAIT_TIMEOUT".to_string(),
    ] {
        assert!(stderr.contains(&part), "{part:?} not in {stderr}");
    }
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "{took:?}"
    );
    // What is documented: the run's own seed_runs row, failed and naming the holder; nothing else.
    let rows = runs(&db).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("once", "failed"));
    assert!(rows[0].2.contains(&format!("pid {pid} ")), "{}", rows[0].2);
    db.settle_stats(1).await;
    assert_eq!(db.tuples_written().await, 0);

    // plan waits for the lock like a run (it runs the apply's statements), says so, and gives
    // up the same way: exit 69 naming the holder, nothing recorded.
    let started = Instant::now();
    let out = run_bin(&["plan"], &env);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("waiting for it") && t.contains(&format!("pid {pid} ")),
        "{t}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "plan did not wait"
    );
    assert_eq!(runs(&db).await.len(), 1);

    // migrate waits for it the same way (never migrating under a run), and gives up with the
    // same exit code and message: 69, naming the holder and the key to raise.
    let started = Instant::now();
    let out = run_bin(&["migrate"], &env);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    let t = text(&out);
    for part in [
        "waiting for it".to_string(),
        format!("pid {pid} "),
        "SEEDKEEPER_STARTUP__WAIT_TIMEOUT".to_string(),
    ] {
        assert!(t.contains(&part), "{part:?} not in {t}");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "migrate did not wait"
    );
    assert_eq!(runs(&db).await.len(), 1);
    println!("--once gave up after {:.1}s", took.as_secs_f64());
}

#[test]
fn a_retry_delay_below_100ms_and_a_schedule_that_never_fires_are_refused_naming_their_keys() {
    let env = [
        ("SEEDKEEPER_DATABASE__URL", "postgres://u@127.0.0.1/db"),
        ("SEEDKEEPER_SCHEDULE__RETRY_INITIAL", "50ms"),
        // February 30th: no interval to cap the backoff with, and no run ever.
        ("SEEDKEEPER_SCHEDULE__CRON", "0 0 0 30 2 *"),
    ];
    let e = seedkeeper::config::load(&seedkeeper::config::ConfigLayers {
        file: None,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
    .unwrap_err()
    .to_string();
    for needle in [
        "schedule.retry_initial 50ms is below 100ms (SEEDKEEPER_SCHEDULE__RETRY_INITIAL)",
        "schedule.cron \"0 0 0 30 2 *\"",
        "never fires",
    ] {
        assert!(e.contains(needle), "missing {needle:?}: {e}");
    }
}
