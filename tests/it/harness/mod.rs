//! Test harness: a real PostgreSQL database per test (cloned from a template migrated once per
//! set of migrations, or empty where a test watches the schema being made; dropped on `Drop`,
//! leftovers of dead test processes swept), settings built from injected environment pairs, the
//! binary, and the Keycloak emulator.

#![allow(dead_code)]

pub mod cluster;
pub mod keycloak;
pub mod pooler;
pub mod proxy;
pub mod real_keycloak;
pub mod spawn;

// The soak test includes the harness and starts no binary.
#[allow(unused_imports)]
pub use spawn::{run_bin, spawn_bin, spawn_bin_watched};

use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use seedkeeper::config::{self, ConfigLayers, SchemaMode, Settings};
use seedkeeper::reconcile::{Count, Unit};
use seedkeeper::reconcile::{Engine, Mode, RunReport, Trigger};
use seedkeeper::store::migrate::MIGRATIONS;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// Leftovers of dead test processes are dropped once per process, before its first database.
static SWEPT: OnceCell<()> = OnceCell::const_new();
/// The name of the migrated template, made or found once per process.
static TEMPLATE: OnceCell<String> = OnceCell::const_new();
/// The advisory lock (in the admin database) under which one test process at a time looks for
/// the template and makes it; other worktrees' test runs share the server.
const TEMPLATE_LOCK: i64 = 0x736b_7470_6c00; // "sktpl"

/// The server admin URL: SEEDKEEPER_TEST_DATABASE_URL, else the local trust-auth default.
pub fn admin_url() -> String {
    std::env::var("SEEDKEEPER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

fn with_db(admin: &str, db: &str) -> String {
    match admin.rfind('/') {
        Some(i)
            if admin[..i].contains('@')
                || admin[..i].ends_with(char::is_numeric)
                || admin[..i].contains(':') =>
        {
            let (base, rest) = admin.split_at(i);
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{base}/{db}{query}")
        }
        _ => format!("{admin}/{db}"),
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is required for these tests and is not reachable at {url}: {e}. Start it (make test does) or set SEEDKEEPER_TEST_DATABASE_URL"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A database with seedkeeper's schema and nothing else: a clone of the template migrated
    /// once by seedkeeper's own migration runner, so a first run applies no migration.
    pub async fn new() -> TestDb {
        let template = template().await;
        TestDb::create(Some(template)).await
    }

    /// A database without any table, for tests that watch the schema unit apply the migrations
    /// or assert that a refused run wrote nothing at all.
    pub async fn empty() -> TestDb {
        TestDb::create(None).await
    }

    async fn create(template: Option<&str>) -> TestDb {
        seedkeeper::telemetry::install_crypto();
        let admin = connect(&admin_url()).await;
        SWEPT.get_or_init(|| sweep(&admin)).await;
        let name = format!(
            "sk_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .get(..8)
                .unwrap_or("x")
        );
        let sql = match template {
            Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
            None => format!("CREATE DATABASE {name}"),
        };
        admin
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        TestDb {
            url: with_db(&admin_url(), &name),
            name,
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// A session of its own holding seedkeeper's run lock, as a run of another process would,
    /// until [`release_run_lock`] (or its end).
    pub async fn hold_run_lock(&self) -> Client {
        let c = self.client().await;
        c.query_one(
            "SELECT pg_advisory_lock($1)",
            &[&seedkeeper::store::lock::RUN_LOCK_KEY],
        )
        .await
        .expect("taking the run lock");
        c
    }

    /// Environment pairs pointing seedkeeper at this database.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SEEDKEEPER_DATABASE__URL".into(), self.url.clone())]
    }

    pub fn settings(&self, extra: &[(&str, &str)]) -> Settings {
        let mut env = self.env();
        env.push(("SEEDKEEPER_STARTUP__WAIT_TIMEOUT".into(), "5s".into()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        config::load(&ConfigLayers { file: None, env })
            .unwrap_or_else(|e| panic!("test settings: {e}"))
    }

    /// The components of a daemon (engine, metrics, the shared Keycloak source).
    pub fn components(&self, extra: &[(&str, &str)]) -> seedkeeper::app::Components {
        seedkeeper::app::build(self.settings(extra)).unwrap_or_else(|e| panic!("components: {e}"))
    }

    /// The run gate of a daemon on this database: how the daemon starts its runs.
    pub fn gate(&self, extra: &[(&str, &str)]) -> std::sync::Arc<seedkeeper::gate::RunGate> {
        self.components(extra).into_gate()
    }

    pub fn engine(&self, extra: &[(&str, &str)]) -> Engine {
        seedkeeper::app::build_engine(self.settings(extra))
            .unwrap_or_else(|e| panic!("engine: {e}"))
    }

    /// Sum of inserted, updated and deleted tuples in public tables other than seed_runs,
    /// after the stats of every finished session have been flushed.
    pub async fn tuples_written(&self) -> i64 {
        let c = self.client().await;
        c.batch_execute("SELECT pg_stat_clear_snapshot()")
            .await
            .expect("pg_stat_clear_snapshot()");
        let row = c
            .query_one(
                "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint FROM pg_stat_user_tables
                 WHERE schemaname = 'public' AND relname <> 'seed_runs'",
                &[],
            )
            .await
            .expect("pg_stat_user_tables");
        row.get(0)
    }

    /// Waits until the stats show `runs` rows inserted into seed_runs: the run's session has
    /// ended and flushed its counters.
    pub async fn settle_stats(&self, runs: i64) {
        let c = self.client().await;
        for _ in 0..100 {
            c.batch_execute("SELECT pg_stat_clear_snapshot()")
                .await
                .expect("pg_stat_clear_snapshot()");
            let n: i64 = c
                .query_one("SELECT coalesce((SELECT n_tup_ins FROM pg_stat_user_tables WHERE schemaname = 'public' AND relname = 'seed_runs'), 0)::bigint", &[])
                .await
                .expect("seed_runs in pg_stat_user_tables")
                .get(0);
            if n >= runs {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("statistics of {runs} run(s) never showed up in pg_stat_user_tables");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = admin_url();
        // Drop cannot be async; a short-lived thread with its own runtime does the DROP.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async move {
                    if let Ok((c, conn)) = tokio_postgres::connect(&admin, NoTls).await {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        let _ = c
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

/// Drops test databases left by test processes that no longer run.
async fn sweep(admin: &Client) {
    let Ok(rows) = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'sk\\_test\\_%'",
            &[],
        )
        .await
    else {
        return;
    };
    for r in rows {
        let name: String = r.get(0);
        let pid: Option<u32> = name.split('_').nth(2).and_then(|p| p.parse().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        }
    }
}

/// `sk_tpl_` and a digest of the embedded migrations: a changed or added migration makes a
/// template of its own, so worktrees with other migrations never share one.
fn template_name() -> String {
    let mut h = Sha256::new();
    for m in MIGRATIONS {
        h.update(m.label().as_bytes());
        h.update(m.checksum().as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sk_tpl_{hex}")
}

/// The migrated template database, made by the first test process that needs it. Its readiness
/// marker is `datistemplate`, set last: a template left half-made by a process that died is
/// dropped and made again. It accepts no connections, so cloning it never fails on a session
/// still connected to it.
async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let name = template_name();
            let admin = connect(&admin_url()).await;
            admin
                .query_one("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK])
                .await
                .expect("template lock");
            let ready: Option<bool> = admin
                .query_opt(
                    "SELECT datistemplate FROM pg_database WHERE datname = $1",
                    &[&name],
                )
                .await
                .expect("pg_database")
                .map(|r| r.get(0));
            if ready != Some(true) {
                // Two statements: neither may run in the implicit transaction of one batch.
                for sql in [
                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                    format!("CREATE DATABASE {name}"),
                ] {
                    admin
                        .batch_execute(&sql)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
                }
                let (mut client, conn) =
                    tokio_postgres::connect(&with_db(&admin_url(), &name), NoTls)
                        .await
                        .unwrap_or_else(|e| panic!("connect to the template {name}: {e}"));
                let conn = tokio::spawn(conn);
                seedkeeper::store::migrate::run(&mut client, SchemaMode::Apply, MIGRATIONS)
                    .await
                    .unwrap_or_else(|e| panic!("migrate the template {name}: {e}"));
                // The session must be gone before the database can be a template.
                drop(client);
                let _ = conn.await;
                admin
                    .batch_execute(&format!(
                        "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false IS_TEMPLATE true"
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("mark {name} a template: {e}"));
            }
            admin
                .query_one("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
                .await
                .expect("template unlock");
            name
        })
        .await
}

pub async fn apply(engine: &Engine) -> RunReport {
    engine
        .run(
            Mode::Apply,
            Trigger::Schedule,
            Duration::from_secs(5),
            &CancellationToken::new(),
            engine.identities.clone(),
        )
        .await
}

pub async fn plan(engine: &Engine) -> RunReport {
    engine
        .run(
            Mode::Plan,
            Trigger::Plan,
            Duration::from_secs(5),
            &CancellationToken::new(),
            engine.identities.clone(),
        )
        .await
}

/// The error of a run that failed; a run without one fails the test, naming its outcome.
pub fn error_of(r: &RunReport) -> String {
    r.error
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| panic!("the run has no error: it {:?}\n{:#?}", r.outcome, r.units))
}

pub fn assert_ok(r: &RunReport) {
    assert_eq!(
        r.outcome,
        seedkeeper::reconcile::Outcome::Succeeded,
        "run failed: {:?}\n{:#?}",
        r.error,
        r.units
    );
}

/// A unit's count, both named by their text as in the evidence JSON (an unknown name panics).
pub fn count(r: &RunReport, unit: &str, key: &str) -> i64 {
    let u = Unit::from_name(unit).unwrap_or_else(|| panic!("no unit named {unit}"));
    let k = Count::from_name(key).unwrap_or_else(|| panic!("no count named {key}"));
    r.unit(u)
        .map(|u| u.get(k))
        .unwrap_or_else(|| panic!("no unit {unit} in the run"))
}

/// Rows of `users`, 0 when the table does not exist: what a refused realm must leave.
pub async fn no_user_rows(db: &TestDb) -> i64 {
    let exists: i64 = db
        .scalar(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'users'",
        )
        .await;
    if exists == 0 {
        return 0;
    }
    db.scalar("SELECT count(*) FROM users").await
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p =
            std::env::temp_dir().join(format!("seedkeeper-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn dev_realm() -> serde_json::Value {
    serde_json::from_str(seedkeeper::identity::realm_file::EMBEDDED_REALM).expect("dev realm JSON")
}

/// Polls `f` until it holds, failing the test after `secs` seconds.
pub async fn until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

impl TestDb {
    /// A login role `{prefix}_{this database}` that may connect (and make temporary tables) and
    /// use the schema, given `grant` on every table of it (`SELECT`, say): the role and the URL
    /// that logs in as it. [`TestDb::drop_role`] removes it.
    pub async fn login_role(&self, prefix: &str, grant: &str) -> (String, String) {
        let role = format!("{prefix}_{}", &self.name[8..]);
        self.execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role};
             GRANT USAGE ON SCHEMA public TO {role};
             GRANT {grant} ON ALL TABLES IN SCHEMA public TO {role};",
            db = self.name
        ))
        .await;
        let url = self.url.replacen("postgres@", &format!("{role}@"), 1);
        assert_ne!(
            url, self.url,
            "the test URL names the postgres user: {}",
            self.url
        );
        (role, url)
    }

    /// Removes a role made by [`TestDb::login_role`] (roles outlive the test's database).
    pub async fn drop_role(&self, role: &str) {
        self.execute(&format!(
            "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}; REVOKE ALL ON SCHEMA public FROM {role};
             REVOKE ALL ON DATABASE {db} FROM {role}; DROP ROLE {role}",
            db = self.name
        ))
        .await;
    }

    /// Runs `sql` (one or more statements) on a connection of its own; panics naming it.
    pub async fn execute(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The single bigint `sql` returns (a count, say), on a fresh connection.
    pub async fn scalar(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// As [`TestDb::scalar`], for polling: 0 while the database or the statement's tables are
    /// not there (dropped by the test, or not made yet by the daemon's first run).
    pub async fn scalar_or_zero(&self, sql: &str) -> i64 {
        let Ok((c, conn)) = tokio_postgres::connect(&self.url, NoTls).await else {
            return 0;
        };
        tokio::spawn(conn);
        c.query_one(sql, &[]).await.map(|r| r.get(0)).unwrap_or(0)
    }

    /// The first column of every row `sql` returns, as text.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        self.client()
            .await
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// The first three columns of every row `sql` returns, as text.
    pub async fn triples(&self, sql: &str) -> Vec<(String, String, String)> {
        self.client()
            .await
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }
}

/// Sends SIGTERM to a child process (the graceful stop systemd and Kubernetes send).
pub fn sigterm(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// The daemon in this process, started as `main` starts it ([`seedkeeper::app::Daemon`]),
/// its HTTP on 127.0.0.1 and a port of its own whatever `http.listen` says: tests run side by
/// side.
pub struct Daemon {
    /// Its run gate: a test starts a run as the daemon does.
    pub gate: std::sync::Arc<seedkeeper::gate::RunGate>,
    pub base: String,
    pub cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<seedkeeper::error::Result<()>>,
}

impl Daemon {
    /// The URL of `path` (`/readyz`, say) on the daemon's HTTP.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Waits until `/readyz` answers 200 (a full run succeeded and the database answers); fails
    /// the test after `secs` seconds, naming `what` it waited for.
    pub async fn until_ready(&self, what: &str, secs: u64) {
        let ready = self.url("/readyz");
        until(what, secs, || async { status_of(&ready).await == 200 }).await;
    }

    /// The daemon's `/metrics` text (the scrape must succeed).
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the /metrics body")
    }
}

/// A scheduled tick of `gate`, as the daemon's schedule starts it: tried again until no other
/// run (a tick of the daemon's own, an event batch) is in flight, so that the test's tick runs.
pub async fn tick(gate: &seedkeeper::gate::RunGate) -> RunReport {
    let cancel = CancellationToken::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(report) = gate.scheduled_tick(&cancel).await {
            return report;
        }
        assert!(Instant::now() < deadline, "a run stayed in flight for 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn start_daemon(mut settings: Settings) -> Daemon {
    settings.http.listen = "127.0.0.1:0".into();
    let application = seedkeeper::app::Daemon::build(settings)
        .await
        .unwrap_or_else(|e| panic!("daemon: {e}"));
    let base = format!("http://{}", application.local_addr());
    let gate = application.gate();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(application.run_until_stopped(cancel.clone()));
    Daemon {
        gate,
        base,
        cancel,
        task,
    }
}

/// Settings from environment pairs alone, no file (the test's whole configuration).
pub fn settings_from(env: &[(&str, &str)]) -> Settings {
    config::load(&ConfigLayers {
        file: None,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
    .unwrap_or_else(|e| panic!("test settings: {e}"))
}

/// The daemon with the settings `env` gives ([`settings_from`]), once ready: `/readyz` answers
/// 200 after its startup run, within `secs` seconds.
pub async fn start_ready_daemon(env: &[(&str, &str)], secs: u64) -> Daemon {
    let d = start_daemon(settings_from(env)).await;
    d.until_ready("ready after the startup run", secs).await;
    d
}

/// The HTTP status of a GET, 0 when nothing answers.
pub async fn status_of(url: &str) -> u16 {
    match reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Gives back the run lock `holder` took with [`TestDb::hold_run_lock`].
pub async fn release_run_lock(holder: &Client) {
    holder
        .query_one(
            "SELECT pg_advisory_unlock($1)",
            &[&seedkeeper::store::lock::RUN_LOCK_KEY],
        )
        .await
        .expect("giving the run lock back");
}
