//! The benchmark (`make bench`): realms of 1,000 / 10,000 / 100,000 users synced by the real
//! binary with both sources, next to the COPY floor of the same rows, plus a fresh bootstrap
//! against `psql -f` of `seedkeeper export-sql`. Prints one table and writes JSON.
//!
//! Sizes come from `SEEDKEEPER_BENCH_SIZES` (default "1000,10000,100000"; "1000000" runs: about
//! nine minutes with both sources and 100,000 on a 2-core machine, three of them the floors),
//! the sources from `SEEDKEEPER_BENCH_SOURCES` (default "realm-file,keycloak"), the server from
//! `SEEDKEEPER_TEST_DATABASE_URL`, the emulator latency from `SEEDKEEPER_BENCH_LATENCY_MS`
//! (default 5). Each phase runs the release binary as a child, whose peak RSS (`VmHWM`) is the
//! sync's own. The COPY floor is also given for its tenants rows alone (tenants, projects, both
//! membership tables), the rows of the `tenants` unit, and loaded as seedkeeper's bulk writes
//! load (the tenants tables' foreign keys set aside, then checked once each); the ratios are
//! against the plain one. Each database is dropped once measured, so a million users never needs
//! more than two at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../tests/it/harness/keycloak.rs"]
mod keycloak;
#[path = "../tests/it/harness/spawn.rs"]
#[allow(dead_code)]
mod spawn;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{admin_url, connect, drop_db, fresh_db, generate_realm};
use serde_json::json;

struct Row {
    size: usize,
    source: &'static str,
    phase: &'static str,
    seconds: f64,
    floor: Option<f64>,
    rss_kib: Option<u64>,
    tuples: Option<i64>,
}

/// Runs seedkeeper; returns (seconds, peak RSS KiB) from polling /proc/<pid>/status VmHWM.
fn run_seedkeeper(args: &[&str], env: &[(&str, String)]) -> (f64, u64) {
    let start = Instant::now();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let mut child = spawn::command(args, &env)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let stat_path = format!("/proc/{}/stat", child.id());
    let own_before = cpu_seconds("/proc/self/stat");
    let mut peak = 0u64;
    let mut child_cpu = 0.0f64;
    loop {
        if let Some(c) = cpu_seconds(&stat_path) {
            child_cpu = c;
        }
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(l) = s.lines().find(|l| l.starts_with("VmHWM:")) {
                peak = peak.max(
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                );
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            let secs = start.elapsed().as_secs_f64();
            if !st.success() {
                let mut err = String::new();
                use std::io::Read;
                child.stderr.take().unwrap().read_to_string(&mut err).ok();
                panic!("seedkeeper {args:?} failed: {err}");
            }
            let own = cpu_seconds("/proc/self/stat")
                .zip(own_before)
                .map(|(a, b)| a - b);
            eprintln!(
                "cpu of seedkeeper {args:?}: {child_cpu:.2} s in {secs:.2} s; this process (the emulator, when it serves): {:.2} s",
                own.unwrap_or(0.0)
            );
            return (secs, peak);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// utime + stime of a process from its `/proc/<pid>/stat`, in seconds (100 ticks a second).
fn cpu_seconds(path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

async fn tuples_written(url: &str) -> i64 {
    // The run's backend has exited: its counters are flushed. Poll briefly until they settle.
    let c = connect(url).await;
    let mut last = -1;
    for _ in 0..40 {
        c.batch_execute("SELECT pg_stat_clear_snapshot()")
            .await
            .ok();
        let v: i64 = c
            .query_one("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint FROM pg_stat_user_tables WHERE schemaname = 'public' AND relname <> 'seed_runs'", &[])
            .await
            .unwrap()
            .get(0);
        if v == last {
            return v;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    last
}

/// How the floor's rows get their ids.
#[derive(Clone, Copy, PartialEq)]
enum Ids {
    /// Time-ordered, in write order, as seedkeeper gives the rows it creates
    /// (`reconcile::tenants::ordered_id`): every index is appended to at its right edge.
    Ordered,
    /// Random (UUID v4), as the floor had them until seedkeeper's own ids became ordered.
    Random,
}

/// The `i`-th id of a table in write order: a UUID version 7 layout (48 bits of `ms`, the
/// version, the variant, then `i` as a counter), or a random one.
fn floor_id(ids: Ids, ms: u64, i: usize) -> uuid::Uuid {
    match ids {
        Ids::Random => uuid::Uuid::new_v4(),
        Ids::Ordered => uuid::Uuid::from_u128(
            (u128::from(ms) << 80) | (0x7u128 << 76) | (0b10u128 << 62) | i as u128,
        ),
    }
}

/// The foreign keys of the four tenants tables: dropped before their COPY and added back (every
/// row checked by one join each) after it, as seedkeeper's bulk writes do
/// (`store::foreign_keys`), or checked row by row as each row is copied.
#[derive(Clone, Copy, PartialEq)]
enum Keys {
    Checked,
    SetAside,
}

/// The same rows seedkeeper writes, loaded with COPY into the same (migrated) schema, in one
/// transaction: the seconds of the whole load, and of its tenants part alone (tenants, projects
/// and both membership tables, the rows of seedkeeper's `tenants` unit).
async fn copy_floor(url: &str, n: usize, ids: Ids, keys: Keys) -> (f64, f64) {
    let c = connect(url).await;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut users = String::new();
    let mut tenants = String::new();
    let mut projects = String::new();
    let mut tm = String::new();
    let mut pm = String::new();
    let mut bindings = String::new();
    for i in 0..n {
        let uid = floor_id(ids, ms, i);
        let tid = floor_id(ids, ms + 1, i);
        let pid = floor_id(ids, ms + 2, i);
        let admin = matches!(i % 100, 0..=2);
        users.push_str(&format!(
            "{uid}\t{:08x}-0000-4000-8000-{:012x}\tuser{i:07}\tuser{i:07}@bench.example\tBench\tUser {i}\t{}\t{}\t{}\n",
            i,
            i,
            if admin { "admin" } else { "user" },
            if i % 50 != 7 { "t" } else { "f" },
            if admin { "{admin}" } else if i % 100 == 3 { "{ops}" } else { "{}" }
        ));
        tenants.push_str(&format!(
            "{tid}\tpersonal\t{uid}\tpersonal-{uid}\tuser{i:07}\n"
        ));
        projects.push_str(&format!("{pid}\t{tid}\tt\tdefault\tDefault project\n"));
        tm.push_str(&format!("{tid}\t{uid}\towner\tactive\n"));
        pm.push_str(&format!("{pid}\t{uid}\towner\tactive\n"));
        if admin {
            bindings.push_str(&format!(
                "{uid}\tplatform_superadmin\tactive\tseedkeeper\tusers.role=admin\n"
            ));
        } else if i % 100 == 3 {
            bindings.push_str(&format!(
                "{uid}\tplatform_ops\tactive\tseedkeeper\trealm-role:ops\n"
            ));
        }
    }
    let start = Instant::now();
    let mut tenants_part = 0.0;
    let tx_start = c.batch_execute("BEGIN").await;
    tx_start.unwrap();
    let mut add_back = String::new();
    if keys == Keys::SetAside {
        let part = Instant::now();
        let rows = c
            .query(
                "SELECT format('ALTER TABLE %s DROP CONSTRAINT %I', conrelid::regclass, conname),
                        format('ALTER TABLE %s ADD CONSTRAINT %I %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
                 FROM pg_constraint WHERE contype = 'f'
                   AND conrelid::regclass::text IN ('tenants', 'projects', 'tenant_memberships', 'project_memberships')",
                &[],
            )
            .await
            .unwrap();
        for r in &rows {
            c.batch_execute(r.get::<_, &str>(0)).await.unwrap();
        }
        add_back = rows
            .iter()
            .map(|r| r.get::<_, String>(1))
            .collect::<Vec<_>>()
            .join("; ");
        tenants_part += part.elapsed().as_secs_f64();
    }
    for (stmt, data) in [
        ("COPY users (id, keycloak_sub, username, email, first_name, last_name, role, is_active, realm_roles) FROM STDIN", &users),
        ("COPY tenants (id, kind, owner_user_id, slug, name) FROM STDIN", &tenants),
        ("COPY projects (id, tenant_id, is_default, slug, name) FROM STDIN", &projects),
        ("COPY tenant_memberships (tenant_id, user_id, role, status) FROM STDIN", &tm),
        ("COPY project_memberships (project_id, user_id, role, status) FROM STDIN", &pm),
        ("COPY platform_role_bindings (user_id, role_name, status, granted_by, basis) FROM STDIN", &bindings),
    ] {
        use futures_util::SinkExt;
        let part = Instant::now();
        let sink = c.copy_in(stmt).await.unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes_of(data)).await.unwrap();
        sink.finish().await.unwrap();
        if !stmt.starts_with("COPY users") && !stmt.starts_with("COPY platform_role_bindings") {
            tenants_part += part.elapsed().as_secs_f64();
        }
    }
    if !add_back.is_empty() {
        let part = Instant::now();
        c.batch_execute(&add_back).await.unwrap();
        tenants_part += part.elapsed().as_secs_f64();
    }
    c.batch_execute("COMMIT").await.unwrap();
    (start.elapsed().as_secs_f64(), tenants_part)
}

fn bytes_of(s: &str) -> std::io::Cursor<Vec<u8>> {
    std::io::Cursor::new(s.as_bytes().to_vec())
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sizes: Vec<usize> = std::env::var("SEEDKEEPER_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let latency_ms: u64 = std::env::var("SEEDKEEPER_BENCH_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let admin = connect(&admin_url()).await;
    let dir = std::env::temp_dir().join(format!("seedkeeper-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows: Vec<Row> = Vec::new();

    // Fresh bootstrap: schema + seed by seedkeeper vs psql -f of export-sql, both on a migrated db.
    {
        let empty = dir.join("empty-realm.json");
        std::fs::write(&empty, json!({"realm": "bench", "users": []}).to_string()).unwrap();
        let url = fresh_db(&admin, "sk_bench_boot").await;
        run_seedkeeper(&["migrate"], &[("SEEDKEEPER_DATABASE__URL", url.clone())]);
        let (secs, rss) = run_seedkeeper(
            &["--once"],
            &[
                ("SEEDKEEPER_DATABASE__URL", url.clone()),
                (
                    "SEEDKEEPER_IDENTITY__REALM_FILE",
                    empty.display().to_string(),
                ),
            ],
        );
        let url2 = fresh_db(&admin, "sk_bench_boot_psql").await;
        run_seedkeeper(&["migrate"], &[("SEEDKEEPER_DATABASE__URL", url2.clone())]);
        let sql = spawn::run_bin(&["export-sql"], &[]).stdout;
        let sql_path = dir.join("seed.sql");
        std::fs::write(&sql_path, sql).unwrap();
        let start = Instant::now();
        let st = Command::new("psql")
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-f"])
            .arg(&sql_path)
            .arg(&url2)
            .status()
            .unwrap();
        assert!(st.success());
        let psql = start.elapsed().as_secs_f64();
        rows.push(Row {
            size: 0,
            source: "psql -f export-sql",
            phase: "bootstrap",
            seconds: psql,
            floor: None,
            rss_kib: None,
            tuples: None,
        });
        rows.push(Row {
            size: 0,
            source: "seedkeeper --once",
            phase: "bootstrap",
            seconds: secs,
            floor: Some(psql),
            rss_kib: Some(rss),
            tuples: None,
        });
    }

    let empty = dir.join("empty-realm.json");
    std::fs::write(&empty, json!({"realm": "bench", "users": []}).to_string()).unwrap();
    let sources: Vec<String> = std::env::var("SEEDKEEPER_BENCH_SOURCES")
        .unwrap_or_else(|_| "realm-file,keycloak".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    // Schema and reference seed in place, no users: every timed phase below is identity work.
    let prepare = |url: &str| {
        run_seedkeeper(
            &["--once"],
            &[
                ("SEEDKEEPER_DATABASE__URL", url.to_string()),
                (
                    "SEEDKEEPER_IDENTITY__REALM_FILE",
                    empty.display().to_string(),
                ),
            ],
        );
    };
    for &n in &sizes {
        let realm = generate_realm(n, &["view-users", "view-realm", "view-clients"]);
        let realm_path = dir.join(format!("realm-{n}.json"));
        std::fs::write(&realm_path, realm.to_string()).unwrap();
        let file_size_kib = std::fs::metadata(&realm_path).unwrap().len() / 1024;

        // The floor: the same rows with the same kind of ids as seedkeeper's, time-ordered.
        // The floor with random ids, which it had until seedkeeper's ids became ordered, is
        // given beside it, to compare with older figures.
        let floor_url = fresh_db(&admin, "sk_bench_floor").await;
        prepare(&floor_url);
        let (floor, tenants_floor) = copy_floor(&floor_url, n, Ids::Ordered, Keys::Checked).await;
        drop_db(&admin, "sk_bench_floor").await;
        let floor_url = fresh_db(&admin, "sk_bench_floor").await;
        prepare(&floor_url);
        let (random_floor, _) = copy_floor(&floor_url, n, Ids::Random, Keys::Checked).await;
        drop_db(&admin, "sk_bench_floor").await;
        // The floor loaded as seedkeeper's bulk writes load: the tenants tables' foreign keys
        // set aside, then checked once each.
        let floor_url = fresh_db(&admin, "sk_bench_floor").await;
        prepare(&floor_url);
        let (aside_floor, aside_tenants) =
            copy_floor(&floor_url, n, Ids::Ordered, Keys::SetAside).await;
        drop_db(&admin, "sk_bench_floor").await;
        for (phase, seconds) in [
            ("floor", floor),
            ("floor, random ids", random_floor),
            ("floor, tenants rows", tenants_floor),
            ("floor, foreign keys set aside", aside_floor),
            ("floor, foreign keys set aside, tenants rows", aside_tenants),
        ] {
            rows.push(Row {
                size: n,
                source: "COPY",
                phase,
                seconds,
                floor: Some(floor),
                rss_kib: None,
                tuples: None,
            });
        }
        if sources.contains(&"realm-file") {
            let url = fresh_db(&admin, "sk_bench_file").await;
            prepare(&url);
            let file = realm_path.display().to_string();
            let env = vec![
                ("SEEDKEEPER_DATABASE__URL", url.clone()),
                ("SEEDKEEPER_IDENTITY__REALM_FILE", file),
            ];
            cold_and_noop(&url, env, ("realm-file", n, floor), &mut rows).await;
            drop_db(&admin, "sk_bench_file").await;
        }
        eprintln!("realm file {n}: {file_size_kib} KiB");
        if sources.contains(&"keycloak") {
            // The emulator serves the realm with a fixed latency on every request.
            let kc = keycloak::KeycloakEmulator::start(realm).await;
            kc.set_latency(Duration::from_millis(latency_ms));
            let url = fresh_db(&admin, "sk_bench_kc").await;
            prepare(&url);
            let env = vec![
                ("SEEDKEEPER_DATABASE__URL", url.clone()),
                ("SEEDKEEPER_IDENTITY__SOURCE", "keycloak".to_string()),
                ("SEEDKEEPER_KEYCLOAK__BASE_URL", kc.base_url()),
                ("SEEDKEEPER_KEYCLOAK__REALM", "bench".to_string()),
                ("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "bench-secret".into()),
            ];
            cold_and_noop(&url, env, ("keycloak", n, floor), &mut rows).await;
            drop_db(&admin, "sk_bench_kc").await;
        }
    }

    for name in [
        "sk_bench_boot",
        "sk_bench_boot_psql",
        "sk_bench_floor",
        "sk_bench_file",
        "sk_bench_kc",
    ] {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    report(&rows, latency_ms);
}

/// A cold `--once` on the prepared database at `url`, then a no-op `--once` on the same one, with
/// the tuples it wrote. The binary runs on a blocking thread so the emulator, served by this
/// process's runtime, keeps answering.
async fn cold_and_noop(
    url: &str,
    env: Vec<(&'static str, String)>,
    (source, size, floor): (&'static str, usize, f64),
    rows: &mut Vec<Row>,
) {
    for phase in ["cold", "no-op"] {
        let before = tuples_written(url).await;
        let env2 = env.clone();
        let (seconds, rss) =
            tokio::task::spawn_blocking(move || run_seedkeeper(&["--once"], &env2))
                .await
                .unwrap();
        let after = tuples_written(url).await;
        rows.push(Row {
            size,
            source,
            phase,
            seconds,
            floor: Some(floor),
            rss_kib: Some(rss),
            tuples: (phase == "no-op").then_some(after - before),
        });
    }
}

fn report(rows: &[Row], latency_ms: u64) {
    println!(
        "keycloak emulator latency: {latency_ms} ms per request; machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("| users | source | phase | seconds | users/s | x COPY floor | peak RSS MiB | tuples written |");
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    let mut json_rows = Vec::new();
    for r in rows {
        let ups = if r.size > 0 {
            format!("{:.0}", r.size as f64 / r.seconds)
        } else {
            "-".into()
        };
        let ratio = r
            .floor
            .map(|f| format!("{:.2}", r.seconds / f))
            .unwrap_or_else(|| "-".into());
        let rss = r
            .rss_kib
            .map(|k| format!("{:.1}", k as f64 / 1024.0))
            .unwrap_or_else(|| "-".into());
        let tuples = r
            .tuples
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {} | {:.3} | {} | {} | {} | {} |",
            r.size, r.source, r.phase, r.seconds, ups, ratio, rss, tuples
        );
        json_rows.push(json!({"users": r.size, "source": r.source, "phase": r.phase, "seconds": r.seconds, "ratio_to_floor": r.floor.map(|f| r.seconds / f), "peak_rss_kib": r.rss_kib, "tuples_written": r.tuples}));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results");
    std::fs::create_dir_all(&out).ok();
    let path = out.join("bench.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"latency_ms": latency_ms, "rows": json_rows}))
            .unwrap(),
    )
    .unwrap();
    println!("JSON: {}", path.display());
}
