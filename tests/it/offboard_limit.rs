//! A stop before mass offboarding: `identity.offboard_limit`, the listing that looks empty, and
//! `--allow-offboard N`, through both sources (the realm file, the real Keycloak) and the
//! binary's exit codes and evidence.

use serde_json::{json, Value};

use crate::harness::real_keycloak::{as_new_realm, real_keycloak, realm_name};
use crate::harness::*;
use crate::identities::{realm_file_env, refs, test_realm, user};
use seedkeeper::reconcile::{FindingKind, Outcome, RunReport};

/// Users in the realm (a sub, not offboarded), and users offboarded.
async fn standing(db: &TestDb) -> (i64, i64) {
    (
        db.scalar(
            "SELECT count(*) FROM users WHERE keycloak_sub IS NOT NULL AND offboarded_at IS NULL",
        )
        .await,
        db.scalar("SELECT count(*) FROM users WHERE offboarded_at IS NOT NULL")
            .await,
    )
}

async fn active_superadmins(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM platform_role_bindings WHERE role_name = 'platform_superadmin' AND status = 'active'")
        .await
}

/// The newest seed_runs row: outcome, counts of the identities unit, error.
async fn last_run(db: &TestDb) -> (String, Value, String) {
    let c = db.client().await;
    let r = c
        .query_one(
            "SELECT outcome, counts->'identities', coalesce(error, '') FROM seed_runs ORDER BY started_at DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn with_file(db: &TestDb, path: &std::path::Path) -> Vec<(String, String)> {
    let mut env = db.env();
    env.push((
        "SEEDKEEPER_IDENTITY__REALM_FILE".into(),
        path.display().to_string(),
    ));
    env
}

/// The stop and the way through it, on a database seeded from the dev realm (6 users, 3
/// superadmin or ops bindings) whose listing now has none of them (`empty`: a realm file or
/// folder).
async fn stop_then_allow(db: &TestDb, empty: &std::path::Path) {
    let env = with_file(db, empty);

    // The run: nobody offboarded, everything else applied, the finding, exit 1.
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("offboarding stopped")
            && t.contains("every one of the 6 user(s) in the realm would be offboarded")
            && t.contains("--allow-offboard 6"),
        "{t}"
    );
    assert_eq!(standing(db).await, (6, 0), "nobody offboarded");
    assert_eq!(
        active_superadmins(db).await,
        2,
        "no superadmin lost its binding"
    );
    let (outcome, counts, error) = last_run(db).await;
    assert_eq!(outcome, "failed");
    assert_eq!(counts["offboard_stopped"], json!(6), "{counts}");
    assert_eq!(counts["deactivated"], json!(0), "{counts}");
    assert!(error.contains("offboarding stopped"), "{error}");

    // plan shows it under `!` and plans no offboarding.
    let out = run_bin(&["plan"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("! offboard_stopped realm:"), "{t}");
    assert!(!t.contains("+ offboard"), "{t}");

    // The wrong number: nothing of the identities unit is applied, exit 78.
    let out = run_bin(&["--once", "--allow-offboard", "5"], &env);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains("--allow-offboard 5 was given, but this run would offboard 6 user(s)"),
        "{}",
        text(&out)
    );
    assert_eq!(standing(db).await, (6, 0));
    assert_eq!(active_superadmins(db).await, 2);
    let (outcome, counts, error) = last_run(db).await;
    assert_eq!(outcome, "failed");
    assert_eq!(
        counts,
        json!({}),
        "the identities unit left no counts: it was rolled back"
    );
    assert!(error.contains("--allow-offboard 5"), "{error}");

    // Exactly the number: applied, and recorded.
    let out = run_bin(&["--once", "--allow-offboard", "6"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(standing(db).await, (0, 6));
    assert_eq!(
        active_superadmins(db).await,
        0,
        "an offboarded user holds no binding"
    );
    let (outcome, counts, _) = last_run(db).await;
    assert_eq!(outcome, "succeeded");
    assert_eq!(counts["offboard_allowed"], json!(6), "{counts}");
    assert_eq!(counts["deactivated"], json!(6), "{counts}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_realm_file_without_users_offboards_nobody_until_exactly_that_many_are_allowed() {
    let db = TestDb::new().await;
    let out = run_bin(&["--once"], &db.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(standing(&db).await, (6, 0));
    let mut realm = dev_realm();
    realm.as_object_mut().unwrap().remove("users");
    let dir = TempDir::new();
    let empty = dir.write("dev-realm.json", &realm.to_string());
    stop_then_allow(&db, &empty).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kc_export_folder_whose_users_file_went_missing_offboards_nobody() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let mut realm = dev_realm();
    let users = realm.as_object_mut().unwrap().remove("users").unwrap();
    dir.write("dev-realm.json", &realm.to_string());
    let users_file = dir.write(
        "dev-users-0.json",
        &json!({"realm": "dev", "users": users}).to_string(),
    );
    let out = run_bin(&["--once"], &with_file(&db, &dir.0));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(standing(&db).await, (6, 0));
    std::fs::remove_file(users_file).unwrap();
    stop_then_allow(&db, &dir.0).await;
}

fn pool(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            user(
                &format!("d1000000-0000-4000-8000-{i:012}"),
                &format!("member{i}"),
                &[],
                &[],
            )
        })
        .collect()
}

fn stopped(r: &RunReport) -> i64 {
    count(r, "identities", "offboard_stopped")
}

#[tokio::test(flavor = "multi_thread")]
async fn more_than_the_limit_gone_at_once_is_stopped_and_up_to_it_goes_through() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    // 6 personas and 30 members: 36 in the realm, a 10% limit of 4 raised to its floor of 10.
    let r = apply(&db.engine(&refs(&realm_file_env(&dir, &test_realm(pool(30)))))).await;
    assert_ok(&r);

    // 11 gone at once: over the limit.
    let engine = db.engine(&refs(&realm_file_env(&dir, &test_realm(pool(19)))));
    let r = apply(&engine).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(stopped(&r), 11);
    assert_eq!(count(&r, "identities", "offboard_limit"), 10);
    let finding = r
        .unit(seedkeeper::reconcile::Unit::Identities)
        .unwrap()
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::OffboardStopped)
        .expect("the finding")
        .detail
        .clone();
    assert!(
        finding.contains("11 of the 36 user(s) in the realm would be offboarded, more than identity.offboard_limit (10%: 10 user(s))"),
        "{finding}"
    );
    assert_eq!(standing(&db).await, (36, 0));

    // A limit raised to 11: they go, and the run succeeds.
    let mut env = realm_file_env(&dir, &test_realm(pool(19)));
    env.push(("SEEDKEEPER_IDENTITY__OFFBOARD_LIMIT".into(), "11".into()));
    let r = apply(&db.engine(&refs(&env))).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "deactivated"), 11);
    assert_eq!(standing(&db).await, (25, 11));

    // 10 more (of 25): within the limit of 10, offboarded without a word.
    let r = apply(&db.engine(&refs(&realm_file_env(&dir, &test_realm(pool(9)))))).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "deactivated"), 10);
    assert_eq!(stopped(&r), 0);

    // A count of 0: not even one without --allow-offboard.
    let mut env = realm_file_env(&dir, &test_realm(pool(8)));
    env.push(("SEEDKEEPER_IDENTITY__OFFBOARD_LIMIT".into(), "0".into()));
    let r = apply(&db.engine(&refs(&env))).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(stopped(&r), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_realm_on_the_real_keycloak_offboards_nobody_until_exactly_that_many_are_allowed()
{
    let kc = real_keycloak();
    let name = realm_name("emptied");
    let (rep, _) = as_new_realm(&dev_realm(), &name);
    let realm = kc.create_realm(rep).await;
    let db = TestDb::new().await;
    let mut env = db.env();
    env.extend(realm.env());
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(standing(&db).await, (6, 0));

    // Every user deleted in Keycloak: a complete listing of 0 users (users/count says 0 too).
    let users = realm.get("/users?briefRepresentation=true&max=100").await;
    for u in users.as_array().unwrap() {
        let id = u["id"].as_str().unwrap();
        realm
            .admin(reqwest::Method::DELETE, &format!("/users/{id}"), None)
            .await;
    }
    assert_eq!(realm.get("/users/count").await, json!(0));

    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("offboarding stopped"), "{}", text(&out));
    assert_eq!(standing(&db).await, (6, 0));
    assert_eq!(active_superadmins(&db).await, 2);
    let out = run_bin(&["--once", "--allow-offboard", "7"], &env);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert_eq!(standing(&db).await, (6, 0));
    let out = run_bin(&["--once", "--allow-offboard", "6"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(standing(&db).await, (0, 6));
    assert_eq!(active_superadmins(&db).await, 0);
}

#[test]
fn allow_offboard_is_refused_outside_one_run() {
    for args in [
        vec!["--allow-offboard", "3"],
        vec!["run", "--allow-offboard", "3"],
        vec!["status", "--allow-offboard", "3"],
    ] {
        let out = run_bin(&args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("--allow-offboard applies to one run"),
            "{}",
            text(&out)
        );
    }
}
