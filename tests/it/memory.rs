//! Memory that does not grow with the realm. The same `seedkeeper --once` on a realm
//! file of 20,000 and of 200,000 users: its peak RSS (the child's maximum resident set, from
//! `/usr/bin/time`, package `time`) must stay within 10 % between the two. What the run holds
//! per user lives in PostgreSQL (the identity stage) or in one batch; a set of ids, usernames or
//! emails kept in memory shows up here at once (about 150 bytes a user: 27 MiB more at 200,000).
//! The figures are printed (`cargo test --test it -- memory --nocapture`).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use crate::harness::*;

/// A realm file of `n` users, written as it is generated (one admin in 1,000, one user in 50
/// disabled), in the shape of a `kc.sh export`.
pub fn write_realm(path: &Path, n: usize) {
    let f = std::fs::File::create(path).expect("realm file");
    let mut w = std::io::BufWriter::new(f);
    write!(
        w,
        r#"{{"realm": "dev", "roles": {{"realm": [{{"name": "admin"}}, {{"name": "ops"}}]}}, "groups": [], "users": ["#
    )
    .expect("write");
    for i in 0..n {
        let sep = if i == 0 { "" } else { "," };
        let roles = if i % 1000 == 0 { r#"["admin"]"# } else { "[]" };
        write!(
            w,
            r#"{sep}{{"id": "{i:08x}-0000-4000-8000-{i:012x}", "username": "user{i:07}", "email": "user{i:07}@mem.example", "firstName": "Mem", "lastName": "User {i}", "enabled": {}, "realmRoles": {roles}, "groups": []}}"#,
            i % 50 != 7
        )
        .expect("write");
    }
    write!(w, "]}}").expect("write");
    w.flush().expect("flush");
}

/// Peak RSS in KiB of one `seedkeeper --once` syncing `n` users from a realm file into a fresh
/// database, and the users it wrote.
async fn peak_rss_kib(n: usize) -> (u64, i64) {
    let dir = TempDir::new();
    let realm = dir.0.join("realm.json");
    write_realm(&realm, n);
    let db = TestDb::new().await;
    let times = dir.0.join("time.txt");
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-o")
        .arg(&times)
        .args(["-f", "%M", env!("CARGO_BIN_EXE_seedkeeper"), "--once"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in db.env() {
        cmd.env(k, v);
    }
    cmd.env("SEEDKEEPER_IDENTITY__REALM_FILE", &realm);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("/usr/bin/time runs (install the package `time`: scripts/test-deps.sh)");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let kib: u64 = std::fs::read_to_string(&times)
        .expect("time's output")
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("peak RSS in KiB");
    let users = db.scalar("SELECT count(*) FROM users").await;
    (kib, users)
}

#[tokio::test(flavor = "multi_thread")]
async fn peak_memory_of_a_run_does_not_grow_with_the_realm() {
    let (small, small_users) = peak_rss_kib(20_000).await;
    let (large, large_users) = peak_rss_kib(200_000).await;
    println!(
        "peak RSS of seedkeeper --once (realm file): 20,000 users {:.1} MiB, 200,000 users {:.1} MiB ({:+.1} %)",
        small as f64 / 1024.0,
        large as f64 / 1024.0,
        (large as f64 / small as f64 - 1.0) * 100.0
    );
    assert_eq!(
        (small_users, large_users),
        (20_000, 200_000),
        "every user synced"
    );
    assert!(
        (large as f64) <= small as f64 * 1.10,
        "peak RSS grew with the realm: {small} KiB at 20,000 users, {large} KiB at 200,000"
    );
}
