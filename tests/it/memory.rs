//! Memory that does not grow with the realm. The same `seedkeeper --once` on a realm of 20,000
//! and of 200,000 users, from a realm file and from Keycloak (the emulator): its peak RSS (the
//! child's maximum resident set, from `/usr/bin/time`, package `time`) must stay within 10 %
//! between the two. What the run holds per user lives in PostgreSQL (the identity stage) or in
//! one batch or page; a set of ids, usernames or emails kept in memory shows up here at once
//! (about 150 bytes a user: 27 MiB more at 200,000), and so does a set of the users holding a
//! mapped role (one user in five holds `admin` in the Keycloak realm here). The figures are
//! printed (`cargo test --test it -- memory --nocapture`).
//!
//! Each size is run twice and the lower peak kept: the same run of the Keycloak source peaks
//! up to 2.5 MiB apart from one time to the next (38.1 to 40.6 MiB at 200,000 users in six
//! runs, debug build), because glibc's malloc raises its mmap threshold after the first page
//! body (about 0.8 MB: the emulator answers as Keycloak 26.4, each user with its
//! `userProfileMetadata`) is freed, and later bodies fragment its arenas by chance. Pinning the threshold
//! (`MALLOC_MMAP_THRESHOLD_=131072`) made the two sizes peak within 0.5 % of each other, so the
//! spread is the allocator's, not the realm's; retention per user is not a matter of chance and
//! shows up in both runs.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use crate::harness::keycloak::KeycloakEmulator;
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

/// Peak RSS in KiB of one `seedkeeper --once` with `env` into a fresh database, the users it
/// wrote, and those of them that are admins
/// With the generated Keycloak users holding `admin` (the `mem*` users of [`from_keycloak`]).
async fn peak_rss_kib(env: Vec<(String, String)>) -> (u64, i64, i64) {
    let dir = TempDir::new();
    let db = TestDb::new().await;
    let times = dir.0.join("time.txt");
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-o")
        .arg(&times)
        .args(["-f", "%M", env!("CARGO_BIN_EXE_seedkeeper"), "--once"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in db.env().into_iter().chain(env) {
        cmd.env(k, v);
    }
    // On a blocking thread: the emulator is served by this test's runtime meanwhile.
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
    let admins = db
        .scalar("SELECT count(*) FROM users WHERE role = 'admin' AND username LIKE 'mem%'")
        .await;
    (kib, users, admins)
}

/// The peak RSS of a sync of `n` users from a realm file.
async fn from_realm_file(n: usize) -> (u64, i64) {
    let dir = TempDir::new();
    let realm = dir.0.join("realm.json");
    write_realm(&realm, n);
    let env = vec![(
        "SEEDKEEPER_IDENTITY__REALM_FILE".to_string(),
        realm.display().to_string(),
    )];
    let (kib, users, _) = peak_rss_kib(env).await;
    (kib, users)
}

/// The peak RSS of a sync of the dev realm plus `n` users from Keycloak (the emulator); one user
/// in five holds the realm role `admin`, one in fifty is disabled. Returns the generated users
/// synced.
async fn from_keycloak(n: usize) -> (u64, i64) {
    let users: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let roles: &[&str] = if i % 5 == 0 { &["admin"] } else { &[] };
            serde_json::json!({
                "id": format!("{i:08x}-0000-4000-9000-{i:012x}"), "username": format!("mem{i:07}"),
                "email": format!("mem{i:07}@mem.example"), "firstName": "Mem", "lastName": format!("User {i}"),
                "enabled": i % 50 != 7, "realmRoles": roles
            })
        })
        .collect();
    let kc = KeycloakEmulator::start(crate::events::realm_with(users)).await;
    let mut env = crate::identities::kc_env(&kc);
    env.push(("SEEDKEEPER_KEYCLOAK__REQUEST_TIMEOUT".into(), "30s".into()));
    let (kib, synced, admins) = peak_rss_kib(env).await;
    // Their holders come in pages of 500 members, beside the listing: every one got the role.
    assert_eq!(admins, n as i64 / 5, "keycloak, {n} users: admins synced");
    let dev_users = (dev_realm()["users"].as_array().expect("users").len() - 1) as i64;
    (kib, synced - dev_users)
}

/// The lower peak of two runs of `run` (see the module's comment), with the users it synced
/// (the same in both, or the test fails), and both peaks for the output.
async fn lower_of_two<F, Fut>(run: F) -> ((u64, i64), [u64; 2])
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (u64, i64)>,
{
    let (a, a_users) = run().await;
    let (b, b_users) = run().await;
    assert_eq!(
        a_users, b_users,
        "the same run synced different users twice"
    );
    ((a.min(b), a_users), [a, b])
}

/// MiB, for the output.
fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The figures, and the check: the same users synced, and within 10 %.
fn within_ten_percent(
    source: &str,
    ((small, small_users), small_runs): ((u64, i64), [u64; 2]),
    ((large, large_users), large_runs): ((u64, i64), [u64; 2]),
) {
    println!(
        "peak RSS of seedkeeper --once ({source}): 20,000 users {} MiB, 200,000 users {} MiB ({:+.1} %); the lower of two runs each: {} and {}, {} and {} MiB",
        mib(small),
        mib(large),
        (large as f64 / small as f64 - 1.0) * 100.0,
        mib(small_runs[0]),
        mib(small_runs[1]),
        mib(large_runs[0]),
        mib(large_runs[1]),
    );
    assert_eq!(
        (small_users, large_users),
        (20_000, 200_000),
        "{source}: every user synced"
    );
    assert!(
        (large as f64) <= small as f64 * 1.10,
        "{source}: peak RSS grew with the realm: {small} KiB at 20,000 users, {large} KiB at 200,000 (the lower of two runs each)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn peak_memory_of_a_run_does_not_grow_with_the_realm() {
    let small = lower_of_two(|| from_realm_file(20_000)).await;
    let large = lower_of_two(|| from_realm_file(200_000)).await;
    within_ten_percent("realm file", small, large);
}

#[tokio::test(flavor = "multi_thread")]
async fn peak_memory_of_a_keycloak_run_does_not_grow_with_the_realm_or_its_admins() {
    let small = lower_of_two(|| from_keycloak(20_000)).await;
    let large = lower_of_two(|| from_keycloak(200_000)).await;
    within_ten_percent("keycloak", small, large);
}
