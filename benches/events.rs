//! The event follower's figures (`make bench-events`). Prints tables and writes
//! `bench-results/bench-events.json`. Not a test: nothing here fails on a missed target, the
//! figures are printed next to it.
//!
//! 1. Latency from a change in the real Keycloak to the database: the release binary
//!    (`seedkeeper run`, keycloak source on a realm of its own made from the dev realm, the
//!    schedule a year away so only events act, `events.poll_interval = 2s`) while users are
//!    created through the admin API (until their `users` row, personal tenant and project exist)
//!    and `admin` grants are taken away (until the `platform_superadmin` binding is `revoked`).
//!    PostgreSQL is polled every 50 ms; each change waits a random 0..2 s first, so changes fall
//!    anywhere in the poll cycle. The clock starts before the admin request is sent.
//! 2. Keycloak requests in an idle minute of that daemon: the increase of
//!    `seedkeeper_keycloak_requests_total` (all outcomes) and `seedkeeper_event_polls_total` from
//!    its /metrics, and what an HTTP proxy between the daemon and Keycloak saw (admin requests,
//!    user listing pages, token requests).
//! 3. One new user against a full no-op run in a large realm, on the Keycloak emulator (5 ms
//!    added to every request, as in `make bench`): `seedkeeper --once` three times on an
//!    unchanged, analyzed database (wall time, requests in the emulator's journal), then five
//!    REGISTER events, each applied by one `seedkeeper::events::Follower::poll` (wall time, the
//!    batch run's duration, requests in the journal and `KeycloakSource::request_count`), and
//!    the idle poll after them. `SEEDKEEPER_BENCH_EVENTS_NO_ANALYZE=1` skips the `ANALYZE`.
//!
//! Environment: `SEEDKEEPER_TEST_KEYCLOAK_URL` (the real Keycloak; scripts/bench-events.sh sets
//! it from `scripts/keycloak.sh url`), `SEEDKEEPER_TEST_DATABASE_URL` (the PostgreSQL admin URL),
//! `SEEDKEEPER_BENCH_EVENTS_CHANGES` (default 50, half creations, half revocations),
//! `SEEDKEEPER_BENCH_EVENTS_IDLE_SECS` (default 60), `SEEDKEEPER_BENCH_EVENTS_SIZES` (emulator
//! realm sizes, default "1000,10000,100000"), `SEEDKEEPER_BENCH_EVENTS_PARTS` (default "keycloak,emulator").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../tests/it/harness/keycloak.rs"]
mod keycloak;
#[path = "../tests/it/harness/proxy.rs"]
#[allow(dead_code)]
mod proxy;
#[path = "../tests/it/harness/real_keycloak.rs"]
#[allow(dead_code)]
mod real_keycloak;
#[path = "../tests/it/harness/spawn.rs"]
#[allow(dead_code)]
mod spawn;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{admin_url, connect, drop_db, fresh_db, generate_realm};
use serde_json::{json, Value};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use seedkeeper::config::{self, ConfigLayers};
use seedkeeper::events::{now_ms, Follower, FollowerState};
use seedkeeper::identity::keycloak::KeycloakSource;
use seedkeeper::identity::RoleFilter;

/// `real_keycloak::TestRealm::export` names it; unused here.
#[allow(dead_code)]
pub struct TempDir(pub PathBuf);

const YEARLY: &str = "0 0 0 1 1 *";
const POLL: Duration = Duration::from_secs(2);
/// No-op full runs measured per realm size (the machine is shared: the median is reported).
const NOOP_RUNS: usize = 3;
/// REGISTER events applied per realm size, one per poll.
const REGISTERS: u64 = 5;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The daemon, stopped with SIGTERM (then killed) when dropped.
struct DaemonProcess {
    child: Child,
    log: PathBuf,
}

impl DaemonProcess {
    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn count(
    c: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    match c.query_one(sql, params).await {
        Ok(r) => r.get(0),
        Err(_) => 0, // tables not there yet: the startup run migrates
    }
}

/// Polls `sql` (a count) every 50 ms until it gives `want`; the time since `start`, or `None`
/// after `limit`.
async fn until_count(
    c: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    want: i64,
    start: Instant,
    limit: Duration,
) -> Option<Duration> {
    loop {
        if count(c, sql, params).await == want {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A random delay in 0..POLL, so that changes fall anywhere in the poll cycle.
/// The subs of the users rows matching `condition`, by username.
async fn subs_of(c: &Client, condition: &str) -> Vec<String> {
    c.query(
        &format!("SELECT keycloak_sub FROM users WHERE {condition} ORDER BY username"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn jitter() -> Duration {
    Duration::from_millis((uuid::Uuid::new_v4().as_u128() % POLL.as_millis()) as u64)
}

#[derive(Debug, Clone)]
struct Stats {
    n: usize,
    missed: usize,
    p50: f64,
    p95: f64,
    max: f64,
    min: f64,
}

/// Nearest-rank percentiles of the latencies that arrived (seconds); `missed` did not.
fn stats(samples: &[Option<Duration>]) -> Stats {
    let mut s: Vec<f64> = samples.iter().flatten().map(|d| d.as_secs_f64()).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = |p: f64| -> f64 {
        if s.is_empty() {
            return f64::NAN;
        }
        let k = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
        s[k - 1]
    };
    Stats {
        n: samples.len(),
        missed: samples.iter().filter(|d| d.is_none()).count(),
        p50: rank(0.50),
        p95: rank(0.95),
        max: s.last().copied().unwrap_or(f64::NAN),
        min: s.first().copied().unwrap_or(f64::NAN),
    }
}

/// The sum of every sample of `metric` (all label sets) in a Prometheus text answer.
fn metric_sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

struct KeycloakFigures {
    version: String,
    create: Vec<Option<Duration>>,
    revoke: Vec<Option<Duration>>,
    /// Deletion in Keycloak to the user offboarded (row inactive, `offboarded_at` set).
    offboard: Vec<Option<Duration>>,
    idle_secs: u64,
    idle: BTreeMap<&'static str, f64>,
    runs: BTreeMap<String, i64>,
    /// Durations of the daemon's event batch runs (ms).
    batch_ms: Vec<f64>,
}

/// Parts 1 and 2: the release daemon against the real Keycloak.
async fn against_real_keycloak(admin: &Client, changes: usize, idle_secs: u64) -> KeycloakFigures {
    let kc = real_keycloak::real_keycloak();
    let name = real_keycloak::realm_name("bench-events");
    let dev: Value =
        serde_json::from_str(seedkeeper::identity::realm_file::EMBEDDED_REALM).unwrap();
    let (rep, _) = real_keycloak::as_new_realm(&dev, &name);
    assert_eq!(
        rep["eventsEnabled"],
        json!(true),
        "the dev realm saves events"
    );
    let realm = kc.create_realm(rep).await; // deleted when dropped
    let info = kc
        .send(reqwest::Method::GET, "/admin/serverinfo", None, None)
        .await;
    let version = info.body["systemInfo"]["version"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    eprintln!(
        "bench-events: Keycloak {version} at {}, realm {name}",
        kc.base_url()
    );

    // Between the daemon and Keycloak: a proxy that counts what the daemon asks for.
    let proxy = proxy::KeycloakProxy::start(&kc.base_url()).await;
    let db_name = format!("sk_bench_events_{}", std::process::id());
    let url = fresh_db(admin, &db_name).await;
    let port = spawn::free_port();
    let mut env = realm.env();
    for (k, v) in env.iter_mut() {
        if k == "SEEDKEEPER_KEYCLOAK__BASE_URL" {
            *v = proxy.base_url();
        }
    }
    env.extend(pairs(&[
        ("SEEDKEEPER_DATABASE__URL", &url),
        ("SEEDKEEPER_SCHEDULE__CRON", YEARLY),
        ("SEEDKEEPER_EVENTS__POLL_INTERVAL", "2s"),
        ("SEEDKEEPER_HTTP__LISTEN", &format!("127.0.0.1:{port}")),
    ]));
    let log = std::env::temp_dir().join(format!("{db_name}.log"));
    let child = spawn::command(&["run"], &env)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let daemon = DaemonProcess { child, log };
    let base = format!("http://127.0.0.1:{port}");
    let c = connect(&url).await;

    let started = Instant::now();
    let ready = until_count(
        &c,
        "SELECT count(*) FROM seed_runs WHERE trigger = 'startup' AND outcome = 'succeeded'",
        &[],
        1,
        started,
        Duration::from_secs(120),
    )
    .await;
    assert!(ready.is_some(), "no startup run:\n{}", daemon.log_tail());
    let following = until_count(
        &c,
        "SELECT count(*) FROM event_follower WHERE following",
        &[],
        1,
        Instant::now(),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        following.is_some(),
        "not following events:\n{}",
        daemon.log_tail()
    );
    eprintln!(
        "bench-events: daemon up (startup run and checkpoint in {:.1} s)",
        started.elapsed().as_secs_f64()
    );

    let n_create = changes.div_ceil(2);
    let n_revoke = changes - n_create;
    let limit = Duration::from_secs(30);
    let provisioned = "SELECT count(*) FROM users u JOIN tenants t ON t.owner_user_id = u.id \
         JOIN projects p ON p.tenant_id = t.id WHERE u.username = $1";
    // A user created through the admin API, timed until its row, tenant and project exist.
    let create_user = |username: String| {
        let (realm, c) = (&realm, &c);
        async move {
            let start = Instant::now();
            realm
                .admin(
                    reqwest::Method::POST,
                    "/users",
                    Some(json!({"username": username, "enabled": true, "email": format!("{username}@bench.example"),
                                "firstName": "Bench", "lastName": "Events"})),
                )
                .await;
            until_count(c, provisioned, &[&username], 1, start, limit).await
        }
    };
    let mut create = Vec::new();
    for i in 0..n_create {
        tokio::time::sleep(jitter()).await;
        let username = format!("bench-ev-{i:03}");
        let d = create_user(username.clone()).await;
        eprintln!("bench-events: created {username}: {d:?}");
        create.push(d);
    }

    // Grants first (through events too, not measured), then each one taken away.
    let admin_role = realm.role("admin").await;
    let subs: Vec<String> = subs_of(&c, "username LIKE 'bench-ev-%'")
        .await
        .into_iter()
        .take(n_revoke)
        .collect();
    assert_eq!(subs.len(), n_revoke, "users to revoke");
    for sub in &subs {
        realm
            .admin(
                reqwest::Method::POST,
                &format!("/users/{sub}/role-mappings/realm"),
                Some(json!([admin_role])),
            )
            .await;
    }
    let binding = "SELECT count(*) FROM platform_role_bindings b JOIN users u ON u.id = b.user_id \
         WHERE u.keycloak_sub = $1 AND b.role_name = 'platform_superadmin' AND b.status = $2";
    for sub in &subs {
        let d = until_count(&c, binding, &[sub, &"active"], 1, Instant::now(), limit).await;
        assert!(
            d.is_some(),
            "grant of {sub} never applied:\n{}",
            daemon.log_tail()
        );
    }
    let mut revoke = Vec::new();
    for (i, sub) in subs.iter().enumerate() {
        tokio::time::sleep(jitter()).await;
        let start = Instant::now();
        realm
            .admin(
                reqwest::Method::DELETE,
                &format!("/users/{sub}/role-mappings/realm"),
                Some(json!([admin_role])),
            )
            .await;
        let d = until_count(&c, binding, &[sub, &"revoked"], 1, start, limit).await;
        eprintln!("bench-events: revoked #{i}: {d:?}");
        revoke.push(d);
    }

    // The idle minute: nothing changes in the realm.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let m0 = scrape(&base).await;
    let (a0, u0, t0) = (
        proxy.admin_requests(),
        proxy.users_pages(),
        proxy.token_requests(),
    );
    let runs0 = count(&c, "SELECT count(*) FROM seed_runs", &[]).await;
    eprintln!("bench-events: idle for {idle_secs} s");
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let m1 = scrape(&base).await;
    let (a1, u1, t1) = (
        proxy.admin_requests(),
        proxy.users_pages(),
        proxy.token_requests(),
    );
    let runs1 = count(&c, "SELECT count(*) FROM seed_runs", &[]).await;
    let delta = |m: &str| metric_sum(&m1, m) - metric_sum(&m0, m);
    let mut idle = BTreeMap::new();
    idle.insert(
        "keycloak_requests",
        delta("seedkeeper_keycloak_requests_total"),
    );
    idle.insert("event_polls", delta("seedkeeper_event_polls_total"));
    idle.insert(
        "keycloak_retries",
        delta("seedkeeper_keycloak_retries_total"),
    );
    idle.insert("event_batches", delta("seedkeeper_event_batches_total"));
    idle.insert("proxy_admin_requests", (a1 - a0) as f64);
    idle.insert("proxy_user_listing_pages", (u1 - u0) as f64);
    idle.insert("proxy_token_requests", (t1 - t0) as f64);
    idle.insert("seed_runs_written", (runs1 - runs0) as f64);
    idle.insert("following", metric_sum(&m1, "seedkeeper_events_following"));

    // Offboarding: `changes` users deleted one by one (the created ones, and as many more made
    // first, not measured), each timed until its row is offboarded.
    for i in 0..changes.saturating_sub(n_create) {
        let username = format!("bench-off-{i:03}");
        let d = create_user(username.clone()).await;
        assert!(
            d.is_some(),
            "{username} never provisioned:\n{}",
            daemon.log_tail()
        );
    }
    let doomed = subs_of(
        &c,
        "username LIKE 'bench-ev-%' OR username LIKE 'bench-off-%'",
    )
    .await;
    assert_eq!(doomed.len(), changes.max(n_create), "users to delete");
    let offboarded = "SELECT count(*) FROM users WHERE keycloak_sub = $1 AND NOT is_active AND offboarded_at IS NOT NULL";
    let mut offboard = Vec::new();
    for (i, sub) in doomed.iter().enumerate() {
        tokio::time::sleep(jitter()).await;
        let start = Instant::now();
        realm
            .admin(reqwest::Method::DELETE, &format!("/users/{sub}"), None)
            .await;
        let d = until_count(&c, offboarded, &[sub], 1, start, limit).await;
        eprintln!("bench-events: offboarded #{i}: {d:?}");
        offboard.push(d);
    }

    let batch_ms: Vec<f64> = c
        .query(
            "SELECT (extract(epoch FROM finished_at - started_at) * 1000)::float8 FROM seed_runs \
             WHERE trigger = 'event' AND outcome = 'succeeded'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut runs = BTreeMap::new();
    for r in c
        .query(
            "SELECT trigger || ' ' || outcome, count(*) FROM seed_runs GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
    {
        runs.insert(r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    drop(c);
    drop(daemon);
    drop_db(admin, &db_name).await;
    let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{db_name}.log")));
    drop(realm);
    KeycloakFigures {
        version,
        create,
        revoke,
        offboard,
        idle_secs,
        idle,
        runs,
        batch_ms,
    }
}

struct EmulatorFigures {
    size: usize,
    /// Wall seconds of each no-op `--once`.
    noop_seconds: Vec<f64>,
    noop_requests: usize,
    noop_user_pages: usize,
    idle_poll_requests: usize,
    /// Per REGISTER poll: wall seconds, the batch run's own duration (ms), requests in the
    /// emulator's journal and by `KeycloakSource::request_count`.
    event_seconds: Vec<f64>,
    event_run_ms: Vec<u64>,
    event_requests: Vec<usize>,
    event_request_count: Vec<u64>,
    /// The requests of the last REGISTER poll.
    event_paths: Vec<String>,
    event_users: usize,
    /// The next idle poll, the checkpoint on the event's millisecond.
    idle_after_paths: Vec<String>,
    provisioned: i64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        f64::NAN
    } else {
        s[(s.len() - 1) / 2]
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// The journal as "METHOD path" lines, user ids replaced by `{id}`.
fn paths(kc: &keycloak::KeycloakEmulator, id: &str) -> Vec<String> {
    kc.journal()
        .iter()
        .map(|e| format!("{} {}", e.method, e.path.replace(id, "{id}")))
        .collect()
}

/// Part 3: a full no-op run against one event, on the emulator.
async fn against_emulator(admin: &Client, n: usize, latency: Duration) -> EmulatorFigures {
    eprintln!("bench-events: emulator realm of {n} users");
    let mut realm = generate_realm(
        n,
        &["view-users", "view-realm", "view-clients", "view-events"],
    );
    let kc = keycloak::KeycloakEmulator::start(realm.clone()).await;
    kc.set_latency(latency);
    let db_name = format!("sk_bench_events_emu_{}", std::process::id());
    let url = fresh_db(admin, &db_name).await;
    let env = pairs(&[
        ("SEEDKEEPER_DATABASE__URL", &url),
        ("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
        ("SEEDKEEPER_KEYCLOAK__BASE_URL", &kc.base_url()),
        ("SEEDKEEPER_KEYCLOAK__REALM", "bench"),
        ("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "bench-secret"),
    ]);
    let run_once = |env: Vec<(String, String)>| async move {
        tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let out = spawn::command(&["--once"], &env)
                .env("RUST_LOG", "warn")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "seedkeeper --once: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            start.elapsed().as_secs_f64()
        })
        .await
        .unwrap()
    };
    run_once(env.clone()).await; // cold: the database filled
    if std::env::var("SEEDKEEPER_BENCH_EVENTS_NO_ANALYZE").is_err() {
        // Statistics of the fresh tables, as autovacuum gathers them within a minute or so of a
        // bulk load; without them the planner guesses on empty tables.
        connect(&url).await.batch_execute("ANALYZE").await.unwrap();
    }
    let mut noop_seconds = Vec::new();
    let mut noop = Vec::new();
    for _ in 0..NOOP_RUNS {
        kc.clear_journal();
        noop_seconds.push(run_once(env.clone()).await);
        noop = kc.journal();
    }
    let noop_user_pages = noop
        .iter()
        .filter(|e| e.path == "/admin/realms/bench/users")
        .count();

    // The follower in this process, on the same database, as the daemon builds it.
    let settings = config::load(&ConfigLayers {
        file: None,
        env: env.clone(),
    })
    .unwrap();
    // The daemon's own gate: the batches run through it, as in the daemon.
    let gate = seedkeeper::app::build(settings.clone())
        .unwrap()
        .into_gate();
    let source = Arc::new(
        KeycloakSource::new(
            &settings.keycloak,
            RoleFilter::new(&settings.identity),
            settings.database.batch_size,
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    let follower = Follower {
        kc: source.clone(),
        gate,
        database: settings.database.clone(),
        realm: "bench".into(),
        poll_interval: POLL,
        state: Arc::new(FollowerState::default()),
        metrics: Default::default(),
    };
    let c = connect(&url).await;
    let cancel = CancellationToken::new();
    follower.poll(&c, None, &cancel).await.unwrap(); // sets the checkpoint
    follower.poll(&c, None, &cancel).await.unwrap(); // discovery and token, as the daemon's first poll
    kc.clear_journal();
    let idle = follower.poll(&c, None, &cancel).await.unwrap();
    assert_eq!(idle.events, 0);
    let idle_poll_requests = kc.journal().len();

    // People register one after the other: Keycloak has one more user, and a REGISTER event;
    // one poll applies it.
    let mut f = EmulatorFigures {
        size: n,
        noop_requests: noop.len(),
        noop_seconds,
        noop_user_pages,
        idle_poll_requests,
        event_seconds: Vec::new(),
        event_run_ms: Vec::new(),
        event_requests: Vec::new(),
        event_request_count: Vec::new(),
        event_paths: Vec::new(),
        event_users: 0,
        idle_after_paths: Vec::new(),
        provisioned: 0,
    };
    let mut last_id = String::new();
    for k in 1..=REGISTERS {
        let id = format!("eeeeeeee-0000-4000-8000-{k:012x}");
        realm["users"].as_array_mut().unwrap().push(json!({
            "id": id, "username": format!("newcomer{k}"), "email": format!("newcomer{k}@bench.example"),
            "firstName": "New", "lastName": "Comer", "enabled": true, "realmRoles": [], "groups": []
        }));
        kc.set_realm(realm.clone());
        kc.push_user_event(
            json!({"id": format!("bench-register-{k}"), "time": now_ms(), "type": "REGISTER",
            "realmId": "bench", "clientId": "account", "userId": id, "ipAddress": "127.0.0.1"}),
        );
        kc.clear_journal();
        let before = source.request_count();
        let start = Instant::now();
        let p = follower.poll(&c, None, &cancel).await.unwrap();
        f.event_seconds.push(start.elapsed().as_secs_f64());
        f.event_request_count.push(source.request_count() - before);
        f.event_paths = paths(&kc, &id);
        f.event_requests.push(f.event_paths.len());
        let report = p.report.as_ref().expect("a batch run");
        assert_eq!(
            report.outcome,
            seedkeeper::reconcile::Outcome::Succeeded,
            "{:?}",
            report.error
        );
        f.event_run_ms.push(report.duration_ms);
        f.event_users += p.users;
        last_id = id;
    }
    assert_eq!(
        follower.metrics.full_runs_asked.get(),
        0,
        "no full run asked for"
    );
    // Idle again: the checkpoint now sits on the last REGISTER's millisecond.
    kc.clear_journal();
    let again = follower.poll(&c, None, &cancel).await.unwrap();
    assert_eq!(again.users, 0);
    f.idle_after_paths = paths(&kc, &last_id);
    f.provisioned = count(
        &c,
        "SELECT count(*) FROM users u JOIN tenants t ON t.owner_user_id = u.id WHERE u.username LIKE 'newcomer%'",
        &[],
    )
    .await;
    drop(c);
    drop(follower);
    drop_db(admin, &db_name).await;
    f
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}

async fn bench() {
    seedkeeper::telemetry::install_crypto();
    let parts = env_or("SEEDKEEPER_BENCH_EVENTS_PARTS", "keycloak,emulator");
    let changes: usize = env_or("SEEDKEEPER_BENCH_EVENTS_CHANGES", "50")
        .parse()
        .unwrap();
    let idle_secs: u64 = env_or("SEEDKEEPER_BENCH_EVENTS_IDLE_SECS", "60")
        .parse()
        .unwrap();
    let sizes: Vec<usize> = env_or("SEEDKEEPER_BENCH_EVENTS_SIZES", "1000,10000,100000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let latency = Duration::from_millis(5);
    let admin = connect(&admin_url()).await;
    let load_before = loadavg();

    let real = if parts.contains("keycloak") {
        Some(against_real_keycloak(&admin, changes, idle_secs).await)
    } else {
        None
    };
    let mut emu = Vec::new();
    if parts.contains("emulator") {
        for &n in &sizes {
            emu.push(against_emulator(&admin, n, latency).await);
        }
    }
    report(real.as_ref(), &emu, latency, &load_before);
}

/// /proc/loadavg's 1, 5 and 15 minute averages: the machine is shared.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("?").trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|k| k / (1 << 20))
        .unwrap_or(0);
    format!(
        "{} cores, {cpu}, {mem} GiB",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

fn report(
    real: Option<&KeycloakFigures>,
    emu: &[EmulatorFigures],
    latency: Duration,
    load_before: &str,
) {
    let load_after = loadavg();
    let mut out = json!({"date": chrono::Utc::now().format("%Y-%m-%d").to_string(), "machine": machine(),
        "loadavg_before": load_before, "loadavg_after": load_after});
    println!(
        "machine: {}; load average (1, 5, 15 min) {load_before} before, {load_after} after",
        machine()
    );
    if let Some(r) = real {
        let c = stats(&r.create);
        let v = stats(&r.revoke);
        let o = stats(&r.offboard);
        let all: Vec<Option<Duration>> = r.create.iter().chain(r.revoke.iter()).copied().collect();
        let a = stats(&all);
        println!();
        println!(
            "Change to database, real Keycloak {} (events.poll_interval = 2s, PostgreSQL polled every 50 ms):",
            r.version
        );
        println!("| change | n | p50 s | p95 s | max s | min s | not arrived in 30 s |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (what, s) in [
            ("user created (row, tenant, project)", &c),
            ("admin role revoked (binding revoked)", &v),
            ("all", &a),
            ("user deleted (offboarded, bindings revoked)", &o),
        ] {
            println!(
                "| {what} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                s.n, s.p50, s.p95, s.max, s.min, s.missed
            );
        }
        println!(
            "target p95 <= 5 s: {}",
            if a.missed == 0 && a.p95 <= 5.0 {
                "met"
            } else {
                "NOT met"
            }
        );
        println!(
            "offboarding target p95 <= 5 s: {}",
            if o.missed == 0 && o.p95 <= 5.0 {
                "met"
            } else {
                "NOT met"
            }
        );
        println!("seed_runs of the daemon: {:?}", r.runs);
        let (_, bmax) = min_max(&r.batch_ms);
        println!(
            "its event batch runs (seed_runs finished_at - started_at): median {:.0} ms, max {:.0} ms",
            median(&r.batch_ms),
            bmax
        );
        let i = &r.idle;
        let per_poll = i["keycloak_requests"] / i["event_polls"].max(1.0);
        println!();
        println!("Idle {} s of the daemon:", r.idle_secs);
        println!("| seedkeeper_keycloak_requests_total | seedkeeper_event_polls_total | requests per poll | token requests | user listing pages | admin requests (proxy) | seed_runs written |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        println!(
            "| +{} | +{} | {:.2} | {} | {} | {} | {} |",
            i["keycloak_requests"],
            i["event_polls"],
            per_poll,
            i["proxy_token_requests"],
            i["proxy_user_listing_pages"],
            i["proxy_admin_requests"],
            i["seed_runs_written"]
        );
        println!(
            "target <= 2 requests per poll, no user listing: {}",
            if per_poll <= 2.0 && i["proxy_user_listing_pages"] == 0.0 {
                "met"
            } else {
                "NOT met"
            }
        );
        let ms = |s: &Stats| json!({"n": s.n, "missed": s.missed, "p50_s": s.p50, "p95_s": s.p95, "max_s": s.max, "min_s": s.min});
        out["real_keycloak"] = json!({
            "version": r.version,
            "created": ms(&c), "revoked": ms(&v), "all": ms(&a), "offboarded": ms(&o),
            "offboarded_s": r.offboard.iter().map(|d| d.map(|d| d.as_secs_f64())).collect::<Vec<_>>(),
            "created_s": r.create.iter().map(|d| d.map(|d| d.as_secs_f64())).collect::<Vec<_>>(),
            "revoked_s": r.revoke.iter().map(|d| d.map(|d| d.as_secs_f64())).collect::<Vec<_>>(),
            "idle_secs": r.idle_secs, "idle": r.idle, "seed_runs": r.runs, "event_batch_ms": r.batch_ms,
        });
    }
    if !emu.is_empty() {
        println!();
        println!(
            "One new user against a full no-op run, Keycloak emulator with {} ms per request:",
            latency.as_millis()
        );
        println!("| users | full no-op `--once` s (median of {NOOP_RUNS}; min) | its requests | of which user listing pages | one REGISTER poll s (median of {REGISTERS}; max) | its batch run ms (median) | its requests | time vs no-op | idle poll requests (before; after an event) |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut rows = Vec::new();
        for e in emu {
            let (noop_min, _) = min_max(&e.noop_seconds);
            let (_, ev_max) = min_max(&e.event_seconds);
            let run_ms: Vec<f64> = e.event_run_ms.iter().map(|m| *m as f64).collect();
            let req_max = e.event_requests.iter().max().copied().unwrap_or(0);
            let req_min = e.event_requests.iter().min().copied().unwrap_or(0);
            println!(
                "| {} | {:.3} ({:.3}) | {} | {} | {:.3} ({:.3}) | {:.0} | {} | {:.3}x | {}; {} |",
                e.size,
                median(&e.noop_seconds),
                noop_min,
                e.noop_requests,
                e.noop_user_pages,
                median(&e.event_seconds),
                ev_max,
                median(&run_ms),
                if req_min == req_max {
                    req_max.to_string()
                } else {
                    format!("{req_min}-{req_max}")
                },
                median(&e.event_seconds) / median(&e.noop_seconds),
                e.idle_poll_requests,
                e.idle_after_paths.len()
            );
            rows.push(json!({"users": e.size, "noop_seconds": e.noop_seconds, "noop_requests": e.noop_requests,
                "noop_user_pages": e.noop_user_pages, "idle_poll_requests": e.idle_poll_requests,
                "event_seconds": e.event_seconds, "event_run_ms": e.event_run_ms,
                "event_requests": e.event_requests, "event_request_count": e.event_request_count,
                "event_paths": e.event_paths, "event_users": e.event_users, "provisioned": e.provisioned,
                "next_idle_poll_paths": e.idle_after_paths}));
        }
        if let Some(e) = emu.last() {
            println!(
                "a REGISTER poll at {} users: {} (KeycloakSource::request_count {:?}; users applied: {} of {REGISTERS}, with row and tenant: {})",
                e.size,
                e.event_paths.join(", "),
                e.event_request_count,
                e.event_users,
                e.provisioned
            );
            println!(
                "the next idle poll: {} (Keycloak's dateFrom is inclusive: the applied event comes back on a page shorter than max, which ends the stream)",
                e.idle_after_paths.join(", ")
            );
        }
        let worst = emu
            .iter()
            .flat_map(|e| e.event_requests.iter().copied())
            .max()
            .unwrap_or(0);
        println!(
            "target < 10 requests for one changed user whatever the realm size: {}",
            if worst < 10 { "met" } else { "NOT met" }
        );
        out["emulator"] = json!({"latency_ms": latency.as_millis() as u64, "rows": rows});
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results");
    std::fs::create_dir_all(&dir).ok();
    let path = dir.join("bench-events.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("JSON: {}", path.display());
}
