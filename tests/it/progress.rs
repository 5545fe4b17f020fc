//! Long work shows its progress. Without a terminal a run logs
//! `seeding_progress` every interval (shortened here with `SEEDKEEPER_PROGRESS_INTERVAL`) with
//! its unit and the users listed so far, and nothing when it is shorter; on a terminal (a
//! pseudo-terminal here) `--once` and `plan` draw the listing's bar and the unit's spinner once
//! they have gone on for a second, and nothing for a shorter run.

use std::time::Duration;

use serde_json::Value;

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::spawn::run_bin_in_terminal;
use crate::harness::*;
use crate::identities::{kc_env, test_realm, user};

/// Generated users; the realm's human users are these and the six dev personas.
const USERS: usize = 100;
const HUMANS: u64 = USERS as u64 + 6;

/// A realm whose listing, at 5 users a page, one page at a time and 100 ms a request, takes
/// over two seconds.
async fn slow_keycloak() -> KeycloakEmulator {
    let users = (0..USERS)
        .map(|i| {
            user(
                &format!("f0000000-0000-4000-8000-{i:012}"),
                &format!("slow{i:04}"),
                &[],
                &[],
            )
        })
        .collect();
    KeycloakEmulator::start(test_realm(users)).await
}

fn env_for(db: &TestDb, kc: &KeycloakEmulator, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = db.env();
    env.extend(kc_env(kc));
    env.push(("SEEDKEEPER_KEYCLOAK__PAGE_SIZE".into(), "5".into()));
    env.push(("SEEDKEEPER_KEYCLOAK__CONCURRENCY".into(), "1".into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_run_without_a_terminal_logs_its_progress_with_the_unit_and_growing_counts() {
    let db = TestDb::new().await;
    let kc = slow_keycloak().await;
    kc.set_latency(Duration::from_millis(100));
    let env = env_for(
        &db,
        &kc,
        &[
            ("SEEDKEEPER_LOG__FORMAT", "json"),
            ("SEEDKEEPER_PROGRESS_INTERVAL", "300ms"),
        ],
    );
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary = json_lines(&out.stdout);
    let run_id = summary[0]["run.id"].as_str().expect("run.id").to_string();
    let logs = json_lines(&out.stderr);
    let progress: Vec<&Value> = logs
        .iter()
        .filter(|l| l["message"] == "seeding_progress")
        .collect();
    assert!(
        progress.len() >= 3,
        "a line every 300 ms of a run over 2 s: {logs:#?}"
    );
    for l in &progress {
        assert_eq!(l["level"], "INFO", "{l}");
        assert_eq!(l["run.id"], run_id.as_str(), "{l}");
        assert!(l["elapsed_ms"].as_u64().is_some_and(|ms| ms >= 300), "{l}");
    }
    let listing: Vec<&&Value> = progress
        .iter()
        .filter(|l| l["unit"] == "identities" && l["users.listed"].is_u64())
        .collect();
    assert!(
        listing.len() >= 2,
        "lines while the users were listed: {progress:#?}"
    );
    for l in &listing {
        assert_eq!(l["users.count"], HUMANS, "users/count as the total: {l}");
    }
    let counts: Vec<u64> = listing
        .iter()
        .filter_map(|l| l["users.listed"].as_u64())
        .collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "never going back: {counts:?}"
    );
    assert!(
        counts.first() < counts.last() && counts.first().is_some_and(|c| *c < HUMANS),
        "counts that grow while the listing goes on: {counts:?}"
    );
    let elapsed: Vec<u64> = progress
        .iter()
        .filter_map(|l| l["elapsed_ms"].as_u64())
        .collect();
    assert!(elapsed.windows(2).all(|w| w[0] < w[1]), "{elapsed:?}");
    // The run's last line comes after the last progress line: the reporter ends with the run.
    let last = logs
        .iter()
        .rposition(|l| l["message"] == "seeding_progress");
    let done = logs
        .iter()
        .position(|l| l["message"] == "seeding_completed");
    assert!(last < done, "{logs:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_run_without_a_terminal_logs_no_progress() {
    let db = TestDb::new().await;
    let kc = slow_keycloak().await;
    // The interval as shipped (10 s): a line at the start of the run would show here.
    let out = run_bin(&["--once"], &env_for(&db, &kc, &[]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("seeding_completed"), "{stderr}");
    assert!(!stderr.contains("seeding_progress"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_run_on_a_terminal_draws_the_listing_bar_and_the_unit_spinner() {
    let db = TestDb::new().await;
    let kc = slow_keycloak().await;
    kc.set_latency(Duration::from_millis(100));
    let env = env_for(&db, &kc, &[]);
    for args in [&["--once"][..], &["plan"][..]] {
        let out = run_bin_in_terminal(args, &env);
        let screen = String::from_utf8_lossy(&out.stdout);
        assert!(
            matches!(out.status.code(), Some(0) | Some(2)),
            "{args:?}: {screen}"
        );
        assert!(
            screen.contains(&format!("/{HUMANS} users listed")),
            "{args:?}: the listing's bar, out of users/count: {screen}"
        );
        assert!(
            screen.contains("identities: running for"),
            "{args:?}: the unit's spinner: {screen}"
        );
        assert!(
            !screen.contains("seeding_progress"),
            "{args:?}: bars instead of progress lines: {screen}"
        );
        // Log lines still reach the terminal, above the bars.
        assert!(screen.contains("seeding_completed"), "{args:?}: {screen}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_run_on_a_terminal_draws_nothing() {
    let db = TestDb::new().await;
    let kc = slow_keycloak().await;
    let out = run_bin_in_terminal(&["--once"], &env_for(&db, &kc, &[]));
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{screen}");
    // "run <id> succeeded in <ms> ms": only a run under a second has nothing to draw (on a
    // machine so busy that a stage took longer, the spinner is right to show).
    let ms: u64 = screen
        .split("succeeded in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the summary: {screen}"));
    if ms < 1000 {
        assert!(!screen.contains("users listed"), "{screen}");
        assert!(!screen.contains("running for"), "{screen}");
    } else {
        eprintln!("the run took {ms} ms: too slow to tell whether a short run draws");
    }
}

/// The listing's total is the realm file's own count of its users, known from the
/// check that precedes the listing, and never a number below what has been listed.
#[tokio::test(flavor = "multi_thread")]
async fn a_realm_file_listing_logs_the_files_user_count_as_its_total() {
    const FILE_USERS: u64 = 30_000;
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let realm = dir.0.join("realm.json");
    crate::memory::write_realm(&realm, FILE_USERS as usize);
    let mut env = db.env();
    env.extend([
        (
            "SEEDKEEPER_IDENTITY__REALM_FILE".to_string(),
            realm.display().to_string(),
        ),
        ("SEEDKEEPER_LOG__FORMAT".to_string(), "json".to_string()),
        (
            "SEEDKEEPER_PROGRESS_INTERVAL".to_string(),
            "100ms".to_string(),
        ),
    ]);
    let out = tokio::task::spawn_blocking(move || run_bin(&["--once"], &env))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let logs = json_lines(&out.stderr);
    let listing: Vec<&Value> = logs
        .iter()
        .filter(|l| l["message"] == "seeding_progress" && l["users.listed"].is_u64())
        .collect();
    assert!(
        !listing.is_empty(),
        "progress lines while listing: {logs:#?}"
    );
    for l in &listing {
        let listed = l["users.listed"].as_u64().expect("listed");
        assert_eq!(
            l["users.count"], FILE_USERS,
            "the file's count as the total: {l}"
        );
        assert!(listed <= FILE_USERS, "never a total below the listed: {l}");
    }
}
