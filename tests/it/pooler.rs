//! Behind a connection pooler: a real PgBouncer (Debian's package) of the test's own in front of
//! the test PostgreSQL, in transaction and in session mode. Runs at once through it never fail,
//! never overlap and never leave the run lock held; a pooler that refuses the startup parameter
//! `options` is a configuration error at once, not an outage.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::pooler::{PgBouncer, PoolMode};
use crate::harness::*;

/// Rounds of two `--once` processes started at once.
const ROUNDS: usize = 20;

/// Seconds a run of the test may take, waits for the run lock included.
const ONCE_WITHIN: Duration = Duration::from_secs(120);

/// Pairs of succeeded runs whose `seed_runs` intervals overlap.
async fn overlapping_runs(db: &TestDb) -> i64 {
    db.scalar(
        "SELECT count(*) FROM seed_runs a JOIN seed_runs b ON a.id < b.id \
         WHERE a.outcome = 'succeeded' AND b.outcome = 'succeeded' \
           AND tstzrange(a.started_at, a.finished_at) && tstzrange(b.started_at, b.finished_at)",
    )
    .await
}

/// Advisory locks held in the test's database, as the server (not the pooler) sees them.
async fn advisory_locks(db: &TestDb) -> i64 {
    let admin = connect(&admin_url()).await;
    admin
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND d.datname = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0)
}

/// Two `--once` at once, `ROUNDS` times; the failures (exit code and log) of all of them.
async fn two_at_once(env: &[(String, String)]) -> Vec<String> {
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let children: Vec<_> = (0..2)
            .map(|_| {
                spawn::command(&["--once"], env)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn seedkeeper --once")
            })
            .collect();
        for child in children {
            let started = Instant::now();
            let out = tokio::task::spawn_blocking(move || child.wait_with_output())
                .await
                .unwrap()
                .unwrap();
            assert!(started.elapsed() < ONCE_WITHIN, "round {round}: too slow");
            if out.status.code() != Some(0) {
                failures.push(format!(
                    "round {round}: exit {:?}: {}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    failures
}

/// The whole scenario in one pool mode: two `--once` at once for [`ROUNDS`] rounds, then a
/// daemon and a second replica for several ticks, then one more `--once`; nothing fails,
/// overlaps or leaves the lock held.
async fn behind_pgbouncer(mode: PoolMode, pool_size: u32) {
    let db = TestDb::new().await;
    // The default timeouts are asked for and dropped by the pooler (seedkeeper warns).
    let pgb = PgBouncer::start(mode, pool_size, &["ignore_startup_parameters = options"]);
    let url = pgb.url(&db.name);
    let env = vec![("SEEDKEEPER_DATABASE__URL".to_string(), url.clone())];

    let t = Instant::now();
    let failures = two_at_once(&env).await;
    let once_secs = t.elapsed().as_secs_f64();
    assert!(
        failures.is_empty(),
        "{} of {} runs failed behind pgbouncer in {} mode:\n{}\npgbouncer log:\n{}",
        failures.len(),
        2 * ROUNDS,
        mode.as_str(),
        failures.join("\n"),
        pgb.log()
    );
    let succeeded = db
        .scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'succeeded'")
        .await;
    assert_eq!(succeeded, 2 * ROUNDS as i64, "every --once succeeded");
    let overlaps_once = overlapping_runs(&db).await;
    assert_eq!(overlaps_once, 0, "succeeded runs overlap");
    let locks_once = advisory_locks(&db).await;
    assert_eq!(locks_once, 0, "an advisory lock outlived the processes");

    // A daemon and a second replica, ticking every second.
    let daemon_env = [
        ("SEEDKEEPER_DATABASE__URL", url.as_str()),
        ("SEEDKEEPER_SCHEDULE__CRON", "*/1 * * * * *"),
        ("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "10s"),
    ];
    let replicas = [
        start_daemon(settings_from(&daemon_env)).await,
        start_daemon(settings_from(&daemon_env)).await,
    ];
    let c = db.client().await;
    let before = succeeded;
    until("both replicas ticked, some ticks skipped by the lock", 90, || async {
        let row = c
            .query_one(
                "SELECT count(*) FILTER (WHERE outcome = 'succeeded'), count(*) FILTER (WHERE outcome = 'skipped') FROM seed_runs",
                &[],
            )
            .await;
        match row {
            Ok(r) => r.get::<_, i64>(0) >= before + 8 && r.get::<_, i64>(1) >= 3,
            Err(_) => false,
        }
    })
    .await;
    for d in &replicas {
        assert_eq!(status_of(&d.url("/readyz")).await, 200, "{}", mode.as_str());
    }
    for d in replicas {
        d.cancel.cancel();
        d.task.await.unwrap().unwrap();
    }
    // One more run after them: the lock is free, nothing was left running.
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("not in effect") && text(&out).contains("database.statement_timeout"),
        "the dropped timeouts are named: {}",
        text(&out)
    );

    let failed: Vec<String> = db
        .strings("SELECT coalesce(error, '') FROM seed_runs WHERE outcome NOT IN ('succeeded', 'skipped')")
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    let overlaps = overlapping_runs(&db).await;
    assert_eq!(overlaps, 0, "succeeded runs overlap");
    let locks = advisory_locks(&db).await;
    assert_eq!(locks, 0, "an advisory lock outlived the processes");
    let (runs, skipped) = (
        db.scalar("SELECT count(*) FROM seed_runs").await,
        db.scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'skipped'")
            .await,
    );
    println!(
        "pgbouncer {} mode (default_pool_size {pool_size}): {ROUNDS} rounds of two --once in {once_secs:.1} s, then two daemons: {runs} runs ({skipped} skipped), 0 failed, {overlaps} overlapping, {locks} advisory locks left",
        mode.as_str()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_behind_pgbouncer_in_transaction_mode_never_fail_overlap_or_leak_the_run_lock() {
    // As small as the pool that showed the failures: three server connections.
    behind_pgbouncer(PoolMode::Transaction, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_behind_pgbouncer_in_session_mode_never_fail_overlap_or_leak_the_run_lock() {
    // Session mode gives each client connection a server connection of its own: a replica
    // needs three (its run, the run lock, the /readyz probe), and two replicas run here.
    behind_pgbouncer(PoolMode::Session, 6).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pgbouncer_refusing_the_options_startup_parameter_is_a_config_error_at_once() {
    let db = TestDb::new().await;
    // PgBouncer's defaults: `options` is not in ignore_startup_parameters.
    let pgb = PgBouncer::start(PoolMode::Transaction, 3, &[]);
    let url = pgb.url(&db.name);
    let mut env = vec![
        ("SEEDKEEPER_DATABASE__URL".to_string(), url.clone()),
        // Long: a refusal taken for an outage would wait all of it.
        (
            "SEEDKEEPER_STARTUP__WAIT_TIMEOUT".to_string(),
            "60s".to_string(),
        ),
    ];
    let t = Instant::now();
    let out = run_bin(&["--once"], &env);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for named in [
        "unsupported startup parameter",
        "ignore_startup_parameters = options",
        "SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT=0",
        "SEEDKEEPER_DATABASE__LOCK_TIMEOUT=0",
    ] {
        assert!(text(&out).contains(named), "{named}: {}", text(&out));
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM seed_runs").await,
        0,
        "nothing written"
    );

    // The daemon: its startup run fails as a configuration error at once, not after the wait.
    let daemon = start_daemon(settings_from(&[
        ("SEEDKEEPER_DATABASE__URL", url.as_str()),
        ("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "60s"),
    ]))
    .await;
    let t = Instant::now();
    until("the startup run failed as a config error", 10, || async {
        daemon
            .metrics()
            .await
            .contains("seedkeeper_run_errors_total{kind=\"config\"} 1")
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(status_of(&daemon.url("/readyz")).await, 503);
    daemon.cancel.cancel();
    daemon.task.await.unwrap().unwrap();

    // The keys that send no `options`: the same PgBouncer lets the run through.
    env.push(("SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT".into(), "0".into()));
    env.push(("SEEDKEEPER_DATABASE__LOCK_TIMEOUT".into(), "0".into()));
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !text(&out).contains("not in effect"),
        "no timeout asked, none missed: {}",
        text(&out)
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'succeeded'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_run_lock_session_ends_stops_at_once_rolled_back_and_recorded_failed() {
    let db = TestDb::new().await;
    assert_ok(&apply(&db.engine(&[])).await);
    // Held up mid-run by a table lock of the test's, with every deadline far away.
    let held = db.client().await;
    held.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let engine = db.engine(&[
        ("SEEDKEEPER_RUN__TIMEOUT", "5m"),
        ("SEEDKEEPER_DATABASE__LOCK_TIMEOUT", "5m"),
    ]);
    let run = tokio::spawn(async move { apply(&engine).await });
    let admin = connect(&admin_url()).await;
    let lock_holder = "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                       WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1";
    until(
        "the run holds the run lock and waits on the table lock",
        30,
        || async {
            let waiting: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND application_name = 'seedkeeper' AND wait_event_type = 'Lock'",
                    &[&db.name],
                )
                .await
                .unwrap()
                .get(0);
            let holding = admin.query(lock_holder, &[&db.name]).await.unwrap();
            waiting == 1 && holding.len() == 1
        },
    )
    .await;
    let pid: i32 = admin
        .query_one(lock_holder, &[&db.name])
        .await
        .unwrap()
        .get(0);
    // What a server restart, an operator or a transaction_timeout does to the lock's session.
    let t = Instant::now();
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the run went on without its run lock")
        .unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
    assert_eq!(r.outcome, seedkeeper::reconcile::Outcome::Failed);
    let err = error_of(&r);
    assert!(err.contains("lost the run lock"), "{err}");
    // Stopped while the table lock is still held: no seedkeeper session is left, and its row is
    // closed by itself, not left for the next run to close as abandoned.
    until("the stopped run's sessions are gone", 5, || async {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'seedkeeper'",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    let rows = db
        .strings(&format!(
            "SELECT outcome || ': ' || coalesce(error, '') FROM seed_runs WHERE id = '{}'",
            r.id
        ))
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].starts_with("failed: the run lost the run lock"),
        "{rows:?}"
    );
    held.batch_execute("COMMIT").await.unwrap();
    assert_ok(&apply(&db.engine(&[])).await);
    assert_eq!(
        db.scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'running'")
            .await,
        0
    );
    assert_eq!(advisory_locks(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_stopped_at_its_deadline_behind_pgbouncer_is_cancelled_through_its_connection_and_other_sessions_live_on(
) {
    let db = TestDb::new().await;
    let pgb = PgBouncer::start(
        PoolMode::Transaction,
        3,
        &["ignore_startup_parameters = options"],
    );
    let url = pgb.url(&db.name);
    let through_pgbouncer = [("SEEDKEEPER_DATABASE__URL", url.as_str())];
    assert_ok(&apply(&db.engine(&through_pgbouncer)).await);
    // Another application's session through the same pooler, in a transaction holding a lock
    // the run needs: its server connection must outlive the stop.
    let other = connect(&url).await;
    other
        .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let engine = db.engine(&[
        ("SEEDKEEPER_DATABASE__URL", url.as_str()),
        ("SEEDKEEPER_RUN__TIMEOUT", "2s"),
        ("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "1s"),
    ]);
    let t = Instant::now();
    let r = apply(&engine).await;
    let took = t.elapsed();
    assert_eq!(r.outcome, seedkeeper::reconcile::Outcome::Failed);
    let err = error_of(&r);
    assert!(err.contains("run.timeout (2s) exceeded in unit"), "{err}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "stopped after {took:?}"
    );
    assert_eq!(advisory_locks(&db).await, 0, "the run lock is free");
    // The other session is still in its transaction, its lock held, and commits.
    let held: i64 = other
        .simple_query(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND mode = 'AccessExclusiveLock' AND pid = pg_backend_pid()",
        )
        .await
        .unwrap_or_else(|e| panic!("the other session: {e}; pgbouncer log:\n{}", pgb.log()))
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
            _ => None,
        })
        .unwrap();
    assert_eq!(held, 1, "the other session lost its lock");
    other.batch_execute("COMMIT").await.unwrap();
    let rows = db
        .strings(&format!(
            "SELECT outcome || ': ' || coalesce(error, '') FROM seed_runs WHERE id = '{}'",
            r.id
        ))
        .await;
    assert!(
        rows[0].starts_with("failed: run.timeout (2s) exceeded"),
        "{rows:?}"
    );
    assert_ok(&apply(&db.engine(&through_pgbouncer)).await);
    assert_eq!(
        db.scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'running'")
            .await,
        0
    );
}
