//! The daemon: schedule, self-healing, health, metrics, systemd and graceful shutdown.
//! No fixed sleeps wait for a tick: every wait polls a condition with a deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::harness::*;

async fn spawn_daemon(db: &TestDb, extra: &[(&str, &str)]) -> Daemon {
    let mut all = vec![("SEEDKEEPER_SCHEDULE__CRON", "*/1 * * * * *")];
    all.extend_from_slice(extra);
    start_daemon(db.settings(&all)).await
}

/// `seedkeeper_runs_total{outcome=...}` as /metrics shows it, summed over the triggers (0 when
/// absent; the scrape must succeed).
async fn runs_counted(d: &Daemon, outcome: &str) -> f64 {
    runs_in(&d.metrics().await, outcome)
}

/// The sum of `seedkeeper_runs_total{outcome=...,trigger=...}` over the triggers in `text`.
fn runs_in(text: &str, outcome: &str) -> f64 {
    let series = format!("seedkeeper_runs_total{{outcome=\"{outcome}\",trigger=");
    text.lines()
        .filter(|l| l.starts_with(&series))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_turns_ready_after_the_first_run_and_a_dropped_database_heals_on_the_next_tick() {
    let db = TestDb::new().await;
    let d = spawn_daemon(&db, &[]).await;
    assert_eq!(status_of(&format!("{}/healthz", d.base)).await, 200);
    let ready = format!("{}/readyz", d.base);
    until("readyz 200", 30, || async {
        status_of(&ready).await == 200
    })
    .await;
    assert_eq!(db.scalar_or_zero("SELECT count(*) FROM users").await, 6);

    // The database goes away: not ready.
    let admin = connect(&admin_url()).await;
    admin
        .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", db.name))
        .await
        .unwrap();
    until("readyz 503 without a database", 30, || async {
        status_of(&ready).await == 503
    })
    .await;
    // It comes back empty: the next tick restores schema, seed and identities without a restart.
    admin
        .batch_execute(&format!("CREATE DATABASE {}", db.name))
        .await
        .unwrap();
    until("users restored", 30, || async {
        db.scalar_or_zero("SELECT count(*) FROM users").await == 6
    })
    .await;
    until("readyz 200 again", 30, || async {
        status_of(&ready).await == 200
    })
    .await;
    // Neither the restored users nor readyz (which can still show the first run's success) say
    // the healing run is over: it may still be writing bindings and tenants, and it is counted
    // in /metrics only when it ends. Wait for the run itself: its seed_runs row final, and the
    // second success counted.
    until("the healing run has ended and is counted", 30, || async {
        let recorded = db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM seed_runs WHERE outcome = 'succeeded' AND finished_at IS NOT NULL",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) >= 1)
            .unwrap_or(false);
        recorded && runs_counted(&d, "succeeded").await >= 2.0
    })
    .await;
    let bindings: i64 = db
        .scalar("SELECT count(*) FROM platform_role_bindings WHERE status = 'active'")
        .await;
    assert_eq!(bindings, 3);

    // Metrics parse as exposition text and the counters moved.
    let text = d.metrics().await;
    let mut succeeded = 0.0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad metrics line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(name.starts_with("seedkeeper_"), "{line}");
        if name.starts_with("seedkeeper_runs_total{outcome=\"succeeded\",") {
            succeeded += v;
        }
    }
    assert!(succeeded >= 2.0, "{text}");
    assert!(
        text.contains("seedkeeper_rows_changed_total{unit=\"identities\",action=\"inserted\"} 12"),
        "{text}"
    );
    assert!(text.contains("# TYPE seedkeeper_run_duration_seconds histogram"));
    // The realm-file source follows no events: no event series, so no alert on them can fire.
    assert!(!text.contains("# TYPE seedkeeper_event"), "{text}");
    d.cancel.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_dropped_under_a_running_daemon_is_recreated() {
    let db = TestDb::new().await;
    let d = spawn_daemon(&db, &[]).await;
    until("first run", 30, || async {
        db.scalar_or_zero("SELECT count(*) FROM users").await == 6
    })
    .await;
    let c = db.client().await;
    c.batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        .await
        .unwrap();
    until("schema restored", 30, || async {
        db.scalar_or_zero("SELECT count(*) FROM users").await == 6
    })
    .await;
    let skus: i64 = db.scalar("SELECT count(*) FROM sku_catalog").await;
    assert_eq!(skus, 7);
    d.cancel.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_comes_up_after_the_daemon_started_is_picked_up() {
    let db = TestDb::new().await;
    let admin = connect(&admin_url()).await;
    admin
        .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", db.name))
        .await
        .unwrap();
    let d = spawn_daemon(&db, &[("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "2s")]).await;
    let ready = format!("{}/readyz", d.base);
    assert_eq!(
        status_of(&format!("{}/healthz", d.base)).await,
        200,
        "alive while the database is missing"
    );
    assert_eq!(status_of(&ready).await, 503);
    admin
        .batch_execute(&format!("CREATE DATABASE {}", db.name))
        .await
        .unwrap();
    until("ready once the database exists", 30, || async {
        status_of(&ready).await == 200
    })
    .await;
    assert_eq!(db.scalar_or_zero("SELECT count(*) FROM users").await, 6);
    d.cancel.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_on_one_database_for_many_ticks_never_duplicate_or_fail() {
    let db = TestDb::new().await;
    let daemons = [
        spawn_daemon(&db, &[]).await,
        spawn_daemon(&db, &[]).await,
        spawn_daemon(&db, &[]).await,
    ];
    let c = db.client().await;
    until("many ticks ran, several of them skipped by the lock", 60, || async {
        let row = c
            .query_one(
                "SELECT count(*) FILTER (WHERE outcome = 'succeeded'), count(*) FILTER (WHERE outcome = 'skipped') FROM seed_runs",
                &[],
            )
            .await;
        match row {
            Ok(r) => r.get::<_, i64>(0) >= 8 && r.get::<_, i64>(1) >= 3,
            Err(_) => false,
        }
    })
    .await;
    for d in daemons {
        d.cancel.cancel();
        d.task.await.unwrap().unwrap();
    }
    let failed: Vec<String> = db
        .strings("SELECT coalesce(error, '') FROM seed_runs WHERE outcome = 'failed'")
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    for (table, n) in [
        ("users", 6i64),
        ("tenants", 6),
        ("projects", 6),
        ("tenant_memberships", 6),
        ("platform_role_bindings", 3),
        ("sku_catalog", 7),
    ] {
        let got: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, n, "{table}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overlapping_tick_is_skipped_and_counted() {
    let db = TestDb::new().await;
    // The first run is kept going: another session holds the users table, which the run waits
    // for (up to its lock_timeout) until the test lets go.
    let held = db.client().await;
    held.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let app = db.gate(&[("SEEDKEEPER_DATABASE__LOCK_TIMEOUT", "30s")]);
    let cancel = CancellationToken::new();
    let app2 = app.clone();
    let c2 = cancel.clone();
    let slow = tokio::spawn(async move { app2.startup(&c2).await });
    until("the first run is in flight", 10, || async {
        app.run_age().is_some()
    })
    .await;
    // It holds the overlap guard: a tick skips, and is counted.
    assert!(
        app.scheduled_tick(&cancel).await.is_none(),
        "a tick during a run is skipped"
    );
    assert!(
        app.metrics()
            .render()
            .contains("seedkeeper_skipped_ticks_total 1"),
        "{}",
        app.metrics().render()
    );
    held.batch_execute("COMMIT").await.unwrap();
    assert_ok(&slow.await.unwrap());
    assert!(
        app.scheduled_tick(&cancel).await.is_some(),
        "a tick after the run is not skipped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_run_exits_0_and_ready_reaches_the_notify_socket() {
    use crate::harness::keycloak::KeycloakEmulator;
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    kc.set_latency(Duration::from_millis(150));
    let dir = TempDir::new();
    let sock_path = dir.0.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut env = db.env();
    env.extend([
        (
            "SEEDKEEPER_HTTP__LISTEN".to_string(),
            "127.0.0.1:0".to_string(),
        ),
        (
            "SEEDKEEPER_IDENTITY__SOURCE".to_string(),
            "keycloak".to_string(),
        ),
        ("SEEDKEEPER_KEYCLOAK__BASE_URL".to_string(), kc.base_url()),
        (
            "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET".to_string(),
            "seedkeeper-dev-secret".to_string(),
        ),
        (
            "SEEDKEEPER_KEYCLOAK__PAGE_SIZE".to_string(),
            "1".to_string(),
        ),
        (
            "SEEDKEEPER_KEYCLOAK__CONCURRENCY".to_string(),
            "1".to_string(),
        ),
        ("NOTIFY_SOCKET".to_string(), sock_path.display().to_string()),
    ]);
    // First daemon: let it finish its first run and say READY=1.
    let mut child = spawn_bin(&["run"], &env);
    let mut buf = [0u8; 512];
    let n = tokio::task::spawn_blocking(move || {
        let n = sock
            .recv(&mut buf)
            .expect("a notification before the timeout");
        (String::from_utf8_lossy(&buf[..n]).to_string(), sock)
    })
    .await
    .unwrap();
    let (msg, sock) = n;
    assert!(
        msg.contains("READY=1") && msg.contains("STATUS=last run succeeded"),
        "{msg}"
    );
    drop(sock);
    sigterm(child.id());
    assert_eq!(child.wait().unwrap().code(), Some(0));

    // Second daemon on a fresh database: SIGTERM while the first run is listing (slow Keycloak).
    let db2 = TestDb::new().await;
    let mut env2 = env.clone();
    env2[0].1 = db2.url.clone();
    env2.retain(|(k, _)| k != "NOTIFY_SOCKET");
    kc.clear_journal();
    let mut child = spawn_bin(&["run"], &env2);
    until("the run is listing users", 30, || async {
        kc.journal()
            .iter()
            .filter(|j| j.path == "/admin/realms/dev/users")
            .count()
            >= 2
    })
    .await;
    sigterm(child.id());
    let code = tokio::task::spawn_blocking(move || child.wait().unwrap().code())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    // Consistent: the identities unit is all or nothing; tenants cover every user row.
    let users: i64 = db2.scalar("SELECT count(*) FROM users").await;
    assert!(users == 0 || users == 6, "half a unit: {users} users");
    let uncovered: i64 = db2.scalar("SELECT count(*) FROM users u WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.owner_user_id = u.id)").await;
    assert_eq!(uncovered, 0);
}
