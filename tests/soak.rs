//! 1,000 consecutive no-op runs in one process: no growth in memory, open connections, file
//! descriptors or tasks. A test binary of its own (no libtest harness) so nothing else runs in the
//! process while it measures. `make test` runs it; it prints its figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/harness/mod.rs"]
mod harness;

use std::time::Instant;

use harness::TestDb;
use tokio_util::sync::CancellationToken;

const RUNS: usize = 1000;
const WARMUP: usize = 100;

#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    fds: usize,
    tasks: usize,
    connections: i64,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn sample(db: &TestDb, admin: &tokio_postgres::Client) -> Sample {
    // Connections seedkeeper holds between runs (the sampling connection is not seedkeeper's).
    let connections: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'seedkeeper'",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    Sample {
        rss_kib: rss_kib(),
        fds: fds(),
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        connections,
    }
}

/// Waits until seedkeeper holds no session on the database: the connection of the run that just
/// ended is closed and its backend gone, so a sample sees the state between runs.
async fn between_runs(db: &TestDb, admin: &tokio_postgres::Client) {
    harness::until("seedkeeper holds no session between runs (the last run's has ended)", 10, || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'seedkeeper'",
                &[&db.name],
            )
            .await
            .expect("pg_stat_activity")
            .get::<_, i64>(0)
            == 0
    })
    .await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(soak());
}

async fn soak() {
    let db = TestDb::new().await;
    let app = db.gate(&[]);
    let cancel = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let http = tokio::spawn(seedkeeper::http::serve(
        seedkeeper::health::Health::new(app.clone()),
        listener,
        cancel.clone(),
    ));
    let scraper = reqwest::Client::new();
    let admin = harness::connect(&harness::admin_url()).await;

    let first = app.scheduled_tick(&cancel).await.expect("not skipped");
    assert_eq!(first.outcome.as_str(), "succeeded", "{:?}", first.error);
    let mut warm = None;
    let start = Instant::now();
    for i in 1..=RUNS {
        let r = app.scheduled_tick(&cancel).await.expect("not skipped");
        assert_eq!(r.outcome.as_str(), "succeeded", "run {i}: {:?}", r.error);
        assert!(!r.changes_pending(), "run {i} changed something");
        if i % 10 == 0 {
            let body = scraper
                .get(&metrics_url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(body.contains("seedkeeper_runs_total"));
        }
        if i == WARMUP {
            between_runs(&db, &admin).await;
            warm = Some(sample(&db, &admin).await);
        }
    }
    let elapsed = start.elapsed();
    between_runs(&db, &admin).await;
    let end = sample(&db, &admin).await;
    let warm = warm.unwrap();
    let kept = db.scalar("SELECT count(*) FROM seed_runs").await;
    println!(
        "soak: {RUNS} no-op runs in {:.1} s ({:.1} ms/run); after run {WARMUP} -> after run {RUNS}: \
         RSS {} -> {} KiB, fds {} -> {}, tasks {} -> {}, seedkeeper connections {} -> {}; seed_runs kept {kept}",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / RUNS as f64,
        warm.rss_kib,
        end.rss_kib,
        warm.fds,
        end.fds,
        warm.tasks,
        end.tasks,
        warm.connections,
        end.connections
    );
    assert_eq!(end.connections, 0, "no connection kept between runs");
    assert_eq!(end.connections, warm.connections);
    assert!(
        end.fds <= warm.fds + 2,
        "file descriptors grew: {warm:?} -> {end:?}"
    );
    assert!(
        end.tasks <= warm.tasks + 1,
        "tasks grew: {warm:?} -> {end:?}"
    );
    assert!(
        end.rss_kib <= warm.rss_kib + 2048,
        "memory grew by more than 2 MiB over {} runs: {warm:?} -> {end:?}",
        RUNS - WARMUP
    );
    assert_eq!(kept, 500, "evidence pruned to evidence.retention");
    cancel.cancel();
    http.await.unwrap();
}
