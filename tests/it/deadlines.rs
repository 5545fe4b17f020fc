//! Bounded runs (`run.timeout`, `database.lock_timeout`, `database.statement_timeout`),
//! a watchdog that proves progress, and liveness apart from readiness. Every wait polls a
//! condition with a deadline; durations are asserted with a margin for a loaded machine.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seedkeeper::app::HEARTBEAT_STALE;
use seedkeeper::config::{self, ConfigLayers};
use seedkeeper::reconcile::Outcome;
use seedkeeper::store::lock::RUN_LOCK_KEY;
use tokio_util::sync::CancellationToken;

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A session of the test holding `LOCK TABLE users IN ACCESS EXCLUSIVE MODE` in an open
/// transaction until `release`.
struct UsersLocked(tokio_postgres::Client);

impl UsersLocked {
    async fn by_another_session(db: &TestDb) -> UsersLocked {
        let c = db.client().await;
        c.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        UsersLocked(c)
    }

    async fn release(self) {
        self.0.batch_execute("COMMIT").await.unwrap();
    }
}

/// Whether the run lock is free: taken and given back at once by a session of the test.
async fn run_lock_free(db: &TestDb) -> bool {
    let c = db.client().await;
    let got: bool = c
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RUN_LOCK_KEY])
        .await
        .unwrap()
        .get(0);
    if got {
        c.execute("SELECT pg_advisory_unlock($1)", &[&RUN_LOCK_KEY])
            .await
            .unwrap();
    }
    got
}

/// Sessions named `application_name` on the test database.
async fn sessions(db: &TestDb, application_name: &str) -> Vec<i32> {
    let admin = connect(&admin_url()).await;
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 ORDER BY pid",
            &[&db.name, &application_name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// (outcome, error, finished) of a run's `seed_runs` row.
async fn run_row(db: &TestDb, id: uuid::Uuid) -> (String, String, bool) {
    let r = db
        .client()
        .await
        .query_one(
            "SELECT outcome, coalesce(error, ''), finished_at IS NOT NULL FROM seed_runs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn env_of(db: &TestDb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = db.env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// A `NOTIFY_SOCKET` listener: every datagram, with the time it arrived.
struct Notifications {
    path: PathBuf,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    _dir: TempDir,
}

impl Notifications {
    fn listen() -> Notifications {
        let dir = TempDir::new();
        let path = dir.0.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let keep = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            // Ends once the listener is dropped (this thread holds the last reference).
            while Arc::strong_count(&keep) > 1 {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    keep.lock().unwrap().push((Instant::now(), msg));
                }
            }
        });
        Notifications {
            path,
            seen,
            _dir: dir,
        }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self, what: &str) -> usize {
        self.all().iter().filter(|(_, m)| m.contains(what)).count()
    }

    fn first(&self, what: &str) -> Option<(Instant, String)> {
        self.all().into_iter().find(|(_, m)| m.contains(what))
    }
}

async fn json_of(url: &str) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_held_up_by_a_lock_past_run_timeout_is_stopped_recorded_failed_and_frees_the_run_lock(
) {
    let db = TestDb::new().await;
    assert_ok(&apply(&db.engine(&[])).await);
    let bounded = [
        ("SEEDKEEPER_RUN__TIMEOUT", "2s"),
        ("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "1s"),
        // Longer than the run: the run deadline is what stops it.
        ("SEEDKEEPER_DATABASE__LOCK_TIMEOUT", "1m"),
    ];
    let engine = db.engine(&bounded);
    let held = UsersLocked::by_another_session(&db).await;

    let t = Instant::now();
    let r = apply(&engine).await;
    let took = t.elapsed();
    assert_eq!(r.outcome, Outcome::Failed);
    let err = error_of(&r);
    assert!(err.contains("run.timeout (2s) exceeded in unit"), "{err}");
    assert!(err.contains("cancelled and rolled back"), "{err}");
    assert!(took >= SECS(2) && took < SECS(4), "stopped after {took:?}");
    assert_eq!(r.error.as_ref().map(|e| e.exit_code()), Some(1));
    let (outcome, error, finished) = run_row(&db, r.id).await;
    assert_eq!(outcome, "failed");
    assert!(error.contains("run.timeout (2s) exceeded"), "{error}");
    assert!(finished);
    // Its session ended with it, while the table lock is still held: no seedkeeper session is
    // left waiting, and the run lock is free.
    assert!(sessions(&db, "seedkeeper").await.is_empty());
    assert!(run_lock_free(&db).await);

    // `--once`: exit 1, naming the timeout, as soon.
    let t = Instant::now();
    let out = run_bin(&["--once"], &env_of(&db, &bounded));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("run.timeout (2s) exceeded"),
        "{}",
        text(&out)
    );
    assert!(t.elapsed() < SECS(6), "--once took {:?}", t.elapsed());

    // Released: the next run goes through at once, nothing half-written before it.
    held.release().await;
    let t = Instant::now();
    let r = apply(&engine).await;
    assert_ok(&r);
    assert!(t.elapsed() < SECS(2), "{:?}", t.elapsed());
    assert_eq!(count(&r, "identities", "inserted"), 0);
    let stopped = db
        .scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'failed' AND error LIKE 'run.timeout (2s) exceeded%'")
        .await;
    assert_eq!(stopped, 2);
    assert_eq!(
        db.scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'running'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lock_and_statement_timeouts_shorter_than_the_run_deadline_fail_the_run_naming_their_key() {
    let db = TestDb::new().await;
    assert_ok(&apply(&db.engine(&[])).await);
    let held = UsersLocked::by_another_session(&db).await;
    for (key, env, named) in [
        (
            "lock_timeout",
            "SEEDKEEPER_DATABASE__LOCK_TIMEOUT",
            "database.lock_timeout (1s)",
        ),
        (
            "statement_timeout",
            "SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT",
            "database.statement_timeout (1s)",
        ),
    ] {
        // The other one set to 0: left to the server (where it is off).
        let other = if key == "lock_timeout" {
            "SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT"
        } else {
            "SEEDKEEPER_DATABASE__LOCK_TIMEOUT"
        };
        let engine = db.engine(&[("SEEDKEEPER_RUN__TIMEOUT", "1m"), (env, "1s"), (other, "0")]);
        let t = Instant::now();
        let r = apply(&engine).await;
        // Every unit that reads users waits its second, then the run ends.
        assert!(t.elapsed() < SECS(15), "{key}: {:?}", t.elapsed());
        assert_eq!(r.outcome, Outcome::Failed, "{key}");
        let err = error_of(&r);
        assert!(err.contains(named), "{key}: {err}");
        assert!(!err.contains("run.timeout"), "{key}: {err}");
        let (outcome, error, _) = run_row(&db, r.id).await;
        assert_eq!(outcome, "failed");
        assert!(error.contains(named), "{key}: {error}");
        assert!(run_lock_free(&db).await);
    }
    held.release().await;
    assert_ok(&apply(&db.engine(&[("SEEDKEEPER_DATABASE__LOCK_TIMEOUT", "1s")])).await);
}

fn keycloak_env(kc: &KeycloakEmulator) -> Vec<(&'static str, String)> {
    vec![
        ("SEEDKEEPER_IDENTITY__SOURCE", "keycloak".into()),
        ("SEEDKEEPER_KEYCLOAK__BASE_URL", kc.base_url()),
        (
            "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET",
            "seedkeeper-dev-secret".into(),
        ),
        // One user per page, one page at a time: a listing of many slow requests.
        ("SEEDKEEPER_KEYCLOAK__PAGE_SIZE", "1".into()),
        ("SEEDKEEPER_KEYCLOAK__CONCURRENCY", "1".into()),
        ("SEEDKEEPER_KEYCLOAK__REQUEST_TIMEOUT", "1m".into()),
    ]
}

fn pairs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keycloak_slower_than_run_timeout_is_given_up_at_the_deadline_and_asked_nothing_more() {
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let mut env = keycloak_env(&kc);
    assert_ok(&apply(&db.engine(&pairs(&env))).await);
    env.extend([
        ("SEEDKEEPER_RUN__TIMEOUT", "4s".to_string()),
        ("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "1s".to_string()),
        // Retries that outlast the deadline whatever their jitter draws (5 jittered waits can
        // add up to under 4 s), so the last phase ends at the deadline, not out of retries.
        ("SEEDKEEPER_KEYCLOAK__MAX_RETRIES", "20".to_string()),
    ]);
    let engine = db.engine(&pairs(&env));

    // Slow in the listing: the deadline lands in the identities unit, with a request in flight.
    kc.set_latency(Duration::from_millis(300));
    kc.clear_journal();
    let t = Instant::now();
    let r = apply(&engine).await;
    let took = t.elapsed();
    let err = error_of(&r);
    assert!(
        err.contains("run.timeout (4s) exceeded in unit identities"),
        "{err}"
    );
    assert!(took >= SECS(4) && took < SECS(6), "stopped after {took:?}");
    let (outcome, error, _) = run_row(&db, r.id).await;
    assert_eq!(outcome, "failed");
    assert!(error.contains("run.timeout (4s)"), "{error}");
    assert!(run_lock_free(&db).await);
    // The listing stopped with the run: nothing more is asked of Keycloak (a listing left running
    // would make about 3 requests a second). The request in flight at the deadline is answered
    // or dropped first; from then on, none arrives.
    until(
        "no request of the stopped run left in flight",
        5,
        || async { kc.in_flight() == 0 },
    )
    .await;
    let asked = kc.received();
    let journaled = kc.journal().len();
    // A fixed wait, on purpose: it asserts that nothing arrives within it (longer than six
    // requests of a listing left running).
    tokio::time::sleep(SECS(2)).await;
    assert_eq!(
        kc.received(),
        asked,
        "requests after the run ended: {:?}",
        &kc.journal()[journaled..]
    );

    // Slower than the whole deadline in the preflight: given up there, nothing written.
    kc.set_latency(SECS(30));
    let t = Instant::now();
    let r = apply(&engine).await;
    let err = error_of(&r);
    assert!(
        err.contains("run.timeout (4s) exceeded before its database session was open"),
        "{err}"
    );
    assert!(t.elapsed() < SECS(6), "{:?}", t.elapsed());

    // Failing with 503 and retried with backoff: the retry sleeps end at the deadline too.
    kc.set_latency(Duration::ZERO);
    kc.fail_next_admin(1000, 503);
    let t = Instant::now();
    let r = apply(&engine).await;
    let err = error_of(&r);
    assert!(err.contains("run.timeout (4s) exceeded"), "{err}");
    assert!(t.elapsed() < SECS(6), "{:?}", t.elapsed());
    kc.fail_next_admin(0, 503);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_keycloak_is_slow_exits_within_the_grace() {
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let mut env = env_of(&db, &pairs(&keycloak_env(&kc)));
    env.extend(
        [
            ("SEEDKEEPER_HTTP__LISTEN", "127.0.0.1:0"),
            ("SEEDKEEPER_SHUTDOWN__GRACE", "3s"),
            ("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "2s"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let stop = |mut child: std::process::Child| async move {
        let t = Instant::now();
        sigterm(child.id());
        let code = tokio::task::spawn_blocking(move || child.wait().unwrap().code())
            .await
            .unwrap();
        (code, t.elapsed())
    };

    // In the listing (the identities unit has begun resolving roles), then Keycloak stalls.
    kc.set_latency(Duration::from_millis(200));
    let child = spawn_bin(&["run"], &env);
    until("the listing has begun", 30, || async {
        kc.journal()
            .iter()
            .any(|j| j.path == "/admin/realms/dev/roles")
    })
    .await;
    kc.set_latency(SECS(60));
    let (code, took) = stop(child).await;
    assert_eq!(code, Some(0));
    assert!(took < SECS(4), "exited {took:?} after SIGTERM (grace 3s)");
    let errors = db
        .strings("SELECT coalesce(error, '') FROM seed_runs WHERE outcome = 'failed'")
        .await;
    assert!(
        errors.len() == 1
            && errors[0].contains("shutdown")
            && errors[0].contains("shutdown.grace (3s)"),
        "{errors:?}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0);
    assert!(run_lock_free(&db).await);

    // In the preflight (nothing written yet): at once. The startup run has begun (its
    // `seeding_started` line) and Keycloak holds a request of it: nothing answers for 60 s, so the
    // run cannot have got past the preflight to the database.
    let asked = kc.received();
    let watched = spawn_bin_watched(&["run"], &env);
    until(
        "the startup run is in its preflight, waiting on Keycloak",
        30,
        || async { watched.logged(&["seeding_started", "startup"]) && kc.received() > asked },
    )
    .await;
    let (code, took) = stop(watched.child).await;
    assert_eq!(code, Some(0));
    assert!(took < SECS(2), "exited {took:?} after SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_pings_while_a_run_waits_on_a_lock_and_the_daemon_carries_on_after_its_deadline(
) {
    let db = TestDb::new().await;
    assert_ok(&apply(&db.engine(&[])).await);
    let held = UsersLocked::by_another_session(&db).await;
    let notes = Notifications::listen();
    let listen = format!("127.0.0.1:{}", spawn::free_port());
    let mut env = env_of(
        &db,
        &[
            ("SEEDKEEPER_RUN__TIMEOUT", "3s"),
            ("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "1s"),
            ("SEEDKEEPER_DATABASE__LOCK_TIMEOUT", "1m"),
            ("SEEDKEEPER_SCHEDULE__CRON", "*/1 * * * * *"),
            ("SEEDKEEPER_HTTP__LISTEN", &listen),
            // Pings every 0.5 s.
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    env.push(("NOTIFY_SOCKET".into(), notes.path.display().to_string()));
    let mut child = spawn_bin(&["run"], &env);
    let base = format!("http://{listen}");

    until("READY=1 after the first run", 20, || async {
        notes.first("READY=1").is_some()
    })
    .await;
    let (ready_at, ready) = notes.first("READY=1").unwrap();
    assert!(ready.contains("STATUS=last run failed"), "{ready}");
    // The first run waited on the lock for its 3 s, and the watchdog was pinged meanwhile: a run
    // within its deadline is progress.
    let before_ready = notes
        .all()
        .iter()
        .filter(|(t, m)| *t < ready_at && m.contains("WATCHDOG=1"))
        .count();
    assert!(before_ready >= 3, "{:?}", notes.all());
    let first = db
        .strings("SELECT coalesce(error, '') FROM seed_runs WHERE trigger = 'startup'")
        .await;
    assert!(first[0].contains("run.timeout (3s) exceeded"), "{first:?}");

    // Not ready (its runs fail), yet alive: liveness does not depend on the database.
    assert_eq!(status_of(&format!("{base}/readyz")).await, 503);
    assert_eq!(status_of(&format!("{base}/healthz")).await, 200);
    let out = run_bin(
        &["healthcheck"],
        &[("SEEDKEEPER_HTTP__LISTEN".to_string(), listen.clone())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // The daemon carries on: once the lock is gone a tick succeeds, with the same process.
    held.release().await;
    until("ready after the lock is released", 30, || async {
        status_of(&format!("{base}/readyz")).await == 200
    })
    .await;
    let pings = notes.count("WATCHDOG=1");
    until("the watchdog keeps pinging", 5, || async {
        notes.count("WATCHDOG=1") > pings + 2
    })
    .await;
    sigterm(child.id());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(run_lock_free(&db).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_scheduler_silences_the_watchdog_and_fails_healthz_and_the_healthcheck() {
    // No database and no run: liveness is the scheduler's, nothing else.
    let settings = config::load(&ConfigLayers {
        file: None,
        env: vec![
            (
                "SEEDKEEPER_DATABASE__URL".into(),
                "postgres://nobody@127.0.0.1:1/none".into(),
            ),
            // Once a year: no run during the test.
            ("SEEDKEEPER_SCHEDULE__CRON".into(), "0 0 0 1 1 *".into()),
        ],
    })
    .unwrap();
    let gate = seedkeeper::app::build(settings).unwrap().into_gate();
    let app = seedkeeper::health::Health::new(gate.clone());
    let cancel = CancellationToken::new();
    let mut scheduler = seedkeeper::schedule::start(&gate, &app, &cancel)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap().to_string();
    let healthz = format!("http://{listen}/healthz");
    tokio::spawn(seedkeeper::http::serve(
        app.clone(),
        listener,
        cancel.clone(),
    ));
    let notes = Notifications::listen();
    let socket = notes.path.clone();
    tokio::spawn(seedkeeper::app::watchdog(
        app.clone(),
        Duration::from_millis(200),
        cancel.clone(),
        move || {
            let _ = UnixDatagram::unbound().and_then(|s| s.send_to(b"WATCHDOG=1", &socket));
        },
    ));

    until("watchdog pings", 5, || async {
        notes.count("WATCHDOG=1") >= 3
    })
    .await;
    // The heartbeat job of the scheduler keeps the age low: seen going back down, it ticked.
    let age = |body: &serde_json::Value| {
        body["scheduler"]["heartbeat_age_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("no scheduler.heartbeat_age_ms: {body}"))
    };
    let last = std::cell::Cell::new(age(&json_of(&healthz).await));
    until(
        "the scheduler's heartbeat ticks (its age goes back down)",
        5,
        || async {
            let now = age(&json_of(&healthz).await);
            let ticked = now < last.get();
            last.set(now);
            ticked
        },
    )
    .await;
    let body = json_of(&healthz).await;
    assert_eq!(body["status"], "ok", "{body}");
    assert!(age(&body) < 2000, "{body}");
    let probe = [("SEEDKEEPER_HTTP__LISTEN".to_string(), listen.clone())];
    let out = run_bin(&["healthcheck"], &probe);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // The scheduler stops ticking: as wedged as a daemon gets.
    scheduler.shutdown().await.unwrap();
    let stopped = Instant::now();
    until("healthz 503", HEARTBEAT_STALE.as_secs() + 5, || async {
        status_of(&healthz).await == 503
    })
    .await;
    assert!(stopped.elapsed() >= HEARTBEAT_STALE - SECS(1));
    let body = json_of(&healthz).await;
    assert_eq!(body["status"], "wedged", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("scheduler has not ticked"),
        "{body}"
    );
    let out = run_bin(&["healthcheck"], &probe);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("unhealthy"), "{}", text(&out));
    // No ping since the heartbeat went stale. A fixed wait, on purpose: it asserts that no ping
    // comes within it (ten ping periods of 200 ms).
    let pings = notes.count("WATCHDOG=1");
    tokio::time::sleep(SECS(2)).await;
    assert_eq!(notes.count("WATCHDOG=1"), pings, "pinged while wedged");
    let last = notes.all().last().map(|(t, _)| *t).unwrap();
    assert!(last < stopped + HEARTBEAT_STALE + SECS(1));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_keeps_one_connection_for_every_probe_and_replaces_it_when_broken() {
    let db = TestDb::new().await;
    // Only the startup run.
    let d = start_daemon(db.settings(&[("SEEDKEEPER_SCHEDULE__CRON", "0 0 0 1 1 *")])).await;
    let ready = format!("{}/readyz", d.base);
    until("ready", 30, || async { status_of(&ready).await == 200 }).await;
    let kept = sessions(&db, "seedkeeper-readyz").await;
    assert_eq!(kept.len(), 1, "{kept:?}");

    // 40 probes at once, then 40 one after the other: the same one session answers them all.
    let burst = futures_util::future::join_all((0..40).map(|_| status_of(&ready))).await;
    assert!(burst.iter().all(|s| *s == 200), "{burst:?}");
    for _ in 0..40 {
        assert_eq!(status_of(&ready).await, 200);
        assert!(sessions(&db, "seedkeeper-readyz").await.len() <= 1);
    }
    assert_eq!(sessions(&db, "seedkeeper-readyz").await, kept);
    // No other seedkeeper session either (the run's ended with it).
    assert!(sessions(&db, "seedkeeper").await.is_empty());

    // Broken (the server ended it): the next probe reconnects and answers ready.
    let admin = connect(&admin_url()).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&kept[0]])
        .await
        .unwrap();
    assert_eq!(status_of(&ready).await, 200);
    let replaced = sessions(&db, "seedkeeper-readyz").await;
    assert!(
        replaced.len() == 1 && replaced != kept,
        "{kept:?} -> {replaced:?}"
    );

    // Shutdown closes it.
    d.cancel.cancel();
    d.task.await.unwrap().unwrap();
    until("the kept connection is closed", 10, || async {
        sessions(&db, "seedkeeper-readyz").await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keycloak_listing_longer_than_statement_timeout_is_not_cut_by_it() {
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let mut env = keycloak_env(&kc);
    // Six users one page at a time, each request 400 ms: the identities COPY stays open about
    // 3 s, three times the statement timeout. Only run.timeout bounds the listing.
    env.extend([
        ("SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT", "1s".to_string()),
        ("SEEDKEEPER_RUN__TIMEOUT", "1m".to_string()),
    ]);
    kc.set_latency(Duration::from_millis(400));
    let t = Instant::now();
    let r = apply(&db.engine(&pairs(&env))).await;
    assert_ok(&r);
    assert!(
        t.elapsed() > SECS(2),
        "the listing was slow: {:?}",
        t.elapsed()
    );
    assert_eq!(count(&r, "identities", "inserted"), 6);
}

/// A Keycloak listing starts as soon as the run holds its lock, beside the schema and reference
/// seed units, not when the identities unit begins: here the schema unit waits for a table
/// another session holds, and the listing's pages are asked meanwhile (one user a page, the
/// queue to the stage holding the first few). Once the table is free the run completes as ever.
#[tokio::test(flavor = "multi_thread")]
async fn the_keycloak_listing_runs_beside_the_schema_unit_not_after_it() {
    let db = TestDb::new().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let env = keycloak_env(&kc);
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; LOCK TABLE seedkeeper_migrations IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    kc.clear_journal();
    let engine = db.engine(&pairs(&env));
    let run = tokio::spawn(async move { apply(&engine).await });
    until(
        "pages of the user listing asked while the schema unit waits",
        20,
        || async {
            kc.journal()
                .iter()
                .any(|j| j.path.ends_with("/users") && j.query.contains("first="))
        },
    )
    .await;
    let waiting = db
        .scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
             WHERE c.relname = 'seedkeeper_migrations' AND NOT l.granted",
        )
        .await;
    assert_eq!(
        waiting, 1,
        "the schema unit waits for seedkeeper_migrations"
    );
    assert!(!run.is_finished());
    holder.batch_execute("COMMIT").await.unwrap();
    let r = run.await.unwrap();
    assert_ok(&r);
    assert_eq!(
        count(&r, "identities", "listed"),
        dev_realm()["users"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u.get("serviceAccountClientId").is_none())
            .count() as i64
    );
}

/// A run that fails before its identities unit (the schema unit, `schema.mode = verify` on a
/// database without seedkeeper's tables) ends the listing it started beside it: the requests in
/// flight are dropped and nothing more is asked of Keycloak.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_fails_before_its_identities_unit_stops_the_listing_it_started() {
    let db = TestDb::empty().await;
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let mut env = keycloak_env(&kc);
    env.push(("SEEDKEEPER_SCHEMA__MODE", "verify".into()));
    kc.set_latency(Duration::from_millis(200));
    let r = apply(&db.engine(&pairs(&env))).await;
    assert_eq!(r.outcome, Outcome::Failed);
    let err = error_of(&r);
    assert!(err.contains("schema"), "{err}");
    until("no request of the failed run left in flight", 5, || async {
        kc.in_flight() == 0
    })
    .await;
    let asked = kc.received();
    // A fixed wait, on purpose: nothing may arrive within it (a listing left running, one user
    // a page at 200 ms each, would ask several).
    tokio::time::sleep(SECS(1)).await;
    assert_eq!(kc.received(), asked, "requests after the run ended");
    assert_eq!(no_user_rows(&db).await, 0);
}
