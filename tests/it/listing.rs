//! A listing never ends early in silence. Keycloak returns pages shorter than
//! `max` before the end (permissions filtered after the query, federation providers capping
//! results, a server limit on `max`); every listing goes on to an empty page, advancing by what
//! was returned, and the user listing is checked against `users/count` (short of it, the run is
//! narrowed to the listed users and offboards nobody). Each case runs with one
//! and with eight pages in flight.

use serde_json::{json, Value};

use crate::harness::keycloak::{IgnoreFirst, KeycloakEmulator};
use crate::harness::*;
use crate::identities::{identity_state, kc_env, refs, test_realm, user};
use seedkeeper::reconcile::{FindingKind, Tally, Unit};

const USERS: usize = 300;
/// The realm's human users: the generated ones and the six dev personas.
const HUMANS: usize = USERS + 6;

/// A realm of 300 users holding admin in every way there is: directly, through composite roles
/// (one of them sorted after many plain roles), through a group, through twelve subgroups of it
/// and through a subgroup of a subgroup; so that with small pages every listing spans pages.
fn listing_realm() -> Value {
    let users = (0..USERS)
        .map(|i| {
            let team = format!("/admins/team-{:02}", (i / 10) % 11);
            let (roles, groups): (&[&str], Vec<&str>) = match i % 10 {
                0 => (&["admin"], vec![]),
                1 => (&[], vec!["/admins"]),
                2 => (&[], vec![team.as_str()]),
                3 if i % 20 == 3 => (&[], vec!["/admins/team-00/deep"]),
                3 => (&["zz-lead"], vec![]),
                4 => (&["super"], vec![]),
                5 => (&["ops-lead"], vec![]),
                _ => (&[], vec![]),
            };
            let mut u = user(
                &format!("e0000000-0000-4000-8000-{i:012}"),
                &format!("member{i:04}"),
                roles,
                &groups,
            );
            if i % 50 == 7 {
                u["enabled"] = json!(false);
            }
            u
        })
        .collect();
    let mut realm = test_realm(users);
    let roles = realm["roles"]["realm"].as_array_mut().unwrap();
    for r in 0..10 {
        roles.push(json!({"name": format!("plain-{r:02}")}));
    }
    roles.push(json!({"name": "zz-lead", "composite": true, "composites": {"realm": ["super"]}}));
    let admins = realm["groups"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|g| g["name"] == "admins")
        .unwrap();
    let subs = admins["subGroups"].as_array_mut().unwrap();
    for t in 0..11 {
        let deep = if t == 0 {
            json!([{"name": "deep", "path": "/admins/team-00/deep", "realmRoles": [], "subGroups": []}])
        } else {
            json!([])
        };
        subs.push(
            json!({"name": format!("team-{t:02}"), "path": format!("/admins/team-{t:02}"),
                         "realmRoles": [], "subGroups": deep}),
        );
    }
    realm
}

/// Admins of `listing_realm`: dev-admin and the generated users with i % 10 in 0..=4.
const ADMINS: i64 = 1 + (USERS as i64 / 10) * 5;

fn env_for(kc: &KeycloakEmulator, page: usize, concurrency: usize) -> Vec<(String, String)> {
    let mut env = kc_env(kc);
    env.push(("SEEDKEEPER_KEYCLOAK__PAGE_SIZE".into(), page.to_string()));
    env.push((
        "SEEDKEEPER_KEYCLOAK__CONCURRENCY".into(),
        concurrency.to_string(),
    ));
    env
}

/// A fresh database synced from `kc` with `env`; the run must succeed.
async fn synced(env: &[(String, String)], what: &str) -> (TestDb, i64) {
    let db = TestDb::new().await;
    let r = apply(&db.engine(&refs(env))).await;
    assert!(
        r.outcome == seedkeeper::reconcile::Outcome::Succeeded,
        "{what}: run failed: {:?}",
        r.error
    );
    (db, count(&r, "identities", "listed"))
}

fn users_requests(kc: &KeycloakEmulator) -> Vec<String> {
    let path = format!("/admin/realms/{}/users", kc.realm_name());
    kc.journal()
        .into_iter()
        .filter(|j| j.path == path)
        .map(|j| j.query)
        .collect()
}

fn requests_to(kc: &KeycloakEmulator, suffix: &str) -> usize {
    kc.journal()
        .iter()
        .filter(|j| j.path.ends_with(suffix))
        .count()
}

/// The reference database: the realm listed by an unfaulted emulator.
async fn reference(kc: &KeycloakEmulator) -> Vec<String> {
    kc.clear_paging_faults();
    kc.clear_journal();
    let (db, listed) = synced(&env_for(kc, 10, 4), "reference").await;
    assert_eq!(listed, HUMANS as i64);
    assert_eq!(
        db.scalar("SELECT count(*) FROM users WHERE role = 'admin'")
            .await,
        ADMINS,
        "every way of holding admin is resolved"
    );
    // An unfaulted listing of 306 users in pages of 10: 31 windows (the last one, of 6 users,
    // asks once more for the rest and gets []) and one empty window past the count that ends
    // the listing; none more, as windows past the count are asked one at a time. users/count
    // once: the preflight's, answered just before the listing, is the listing's count.
    let pages = users_requests(kc);
    assert_eq!(pages.len(), 33, "users pages: {pages:?}");
    assert_eq!(requests_to(kc, "/users/count"), 1);
    identity_state(&db).await
}

#[tokio::test(flavor = "multi_thread")]
async fn capped_pages_lose_no_user_and_no_admin_through_roles_groups_and_subgroups() {
    let kc = KeycloakEmulator::start(listing_realm()).await;
    let want = reference(&kc).await;
    for (cap, page) in [(7, 10), (50, 500)] {
        for concurrency in [1, 8] {
            let what = format!("max capped at {cap}, pages of {page}, {concurrency} in flight");
            kc.clear_journal();
            kc.cap_page_size(cap);
            let (db, listed) = synced(&env_for(&kc, page, concurrency), &what).await;
            kc.clear_paging_faults();
            assert_eq!(listed, HUMANS as i64, "{what}");
            assert_eq!(identity_state(&db).await, want, "{what}: same database");
            // The cap was met: windows were filled by further requests, and the role, group
            // and children listings went past their first (short) page.
            let refills = users_requests(&kc)
                .iter()
                .filter(|q| !q.contains(&format!("max={page}")))
                .count();
            assert!(refills > 0, "{what}: no refill request");
            if cap == 7 {
                // 19 roles, 31 direct admins, 12 children of /admins: each past its first page.
                // The realm's roles (each client's roles end in `/roles` too).
                let realm_roles = format!("/realms/{}/roles", kc.realm_name());
                assert_eq!(requests_to(&kc, &realm_roles), 4, "{what}: roles paged");
                assert_eq!(requests_to(&kc, "/roles/admin/users"), 6, "{what}");
                let admins = kc
                    .journal()
                    .iter()
                    .filter(|j| j.path.ends_with("/children") && j.query.contains("first=7"))
                    .count();
                assert_eq!(admins, 1, "{what}: the children of /admins paged");
            }
        }
    }
}

/// A slow page does not hold back the pages after it: with the listing's first page held for
/// 1.5 s, the other windows are all fetched meanwhile, `keycloak.concurrency` at a time, where
/// windows taken in order would start none past the first four until it came.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_page_does_not_hold_back_the_pages_after_it() {
    let kc = KeycloakEmulator::start(listing_realm()).await;
    let want = reference(&kc).await;
    kc.clear_journal();
    kc.slow_users_page(0, std::time::Duration::from_millis(1500));
    let (db, listed) = synced(&env_for(&kc, 10, 4), "first page slow").await;
    kc.clear_paging_faults();
    assert_eq!(listed, HUMANS as i64);
    assert_eq!(identity_state(&db).await, want, "same database");
    let pages = users_requests(&kc);
    let before = pages
        .iter()
        .position(|q| q.split('&').any(|p| p == "first=0"))
        .expect("the first page was asked");
    // 31 windows of 10 and the empty one that ends the listing: all but the held one.
    assert!(
        before >= 30,
        "only {before} pages answered while the first was held: {pages:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn short_pages_in_the_middle_of_a_listing_are_not_its_end() {
    let kc = KeycloakEmulator::start(listing_realm()).await;
    let want = reference(&kc).await;
    for concurrency in [1, 8] {
        let what = format!("every 3rd answer halved, {concurrency} in flight");
        kc.clear_journal();
        kc.short_page_every(3);
        let (db, listed) = synced(&env_for(&kc, 10, concurrency), &what).await;
        kc.clear_paging_faults();
        assert_eq!(listed, HUMANS as i64, "{what}");
        assert_eq!(identity_state(&db).await, want, "{what}: same database");
        let short = users_requests(&kc)
            .iter()
            .filter(|q| !q.contains("max=10"))
            .count();
        assert!(short > 0, "{what}: short pages were served and refilled");
    }
}

fn base_users(bulk: usize) -> Vec<Value> {
    let mut users: Vec<Value> = (0..bulk)
        .map(|i| {
            user(
                &format!("f0000000-0000-4000-8000-{i:012}"),
                &format!("bulk{i:03}"),
                &[],
                &[],
            )
        })
        .collect();
    users.push(user(
        "f1000000-0000-4000-8000-000000000001",
        "boss",
        &["admin"],
        &[],
    ));
    users.push(user(
        "f1000000-0000-4000-8000-000000000002",
        "mover",
        &[],
        &[],
    ));
    users
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listing_short_of_users_count_narrows_the_run_to_the_listed_users_and_offboards_nobody() {
    for concurrency in [1, 8] {
        let kc = KeycloakEmulator::start(test_realm(base_users(50))).await;
        let env = env_for(&kc, 10, concurrency);
        let db = TestDb::new().await;
        let engine = db.engine(&refs(&env));
        assert_ok(&apply(&engine).await);
        let state = identity_state(&db).await;
        assert!(state.contains(&"binding boss platform_superadmin active seedkeeper".to_string()));

        // The realm changes: boss loses admin, mover is re-imported with a new id, 20 users
        // join. The listing is filtered after the query (every 5th user hidden), while
        // users/count still counts everyone.
        let mut next = base_users(70);
        next[70] = user("f1000000-0000-4000-8000-000000000001", "boss", &[], &[]);
        next[71] = user("f2000000-0000-4000-8000-000000000002", "mover", &[], &[]);
        kc.set_realm(test_realm(next));
        kc.hide_from_listing_every(5);
        let hidden = kc.hidden_users(5);
        assert!(!hidden.iter().any(|u| u == "boss" || u == "mover"));
        let counted = 70 + 2 + 6;
        let listed = counted - hidden.len();
        assert_eq!(listed, 63);
        let hidden_new = hidden
            .iter()
            .filter(|u| u.strip_prefix("bulk").and_then(|n| n.parse::<usize>().ok()) >= Some(50))
            .count();

        let r = apply(&engine).await;
        assert_ok(&r);
        let ids = r.unit(Unit::Identities).expect("identities ran");
        assert_eq!(ids.get(Tally::Unlisted), (counted - listed) as i64);
        let finding = ids
            .findings
            .iter()
            .find(|f| f.kind == FindingKind::Unlisted)
            .expect("a finding names the shortfall");
        for part in [
            format!("{listed} distinct users"),
            format!("users/count reported {counted}"),
            "user storage provider".to_string(),
            "fine-grained admin permissions".to_string(),
        ] {
            assert!(
                finding.detail.contains(&part),
                "{part:?} not in: {}",
                finding.detail
            );
        }
        assert!(FindingKind::Unlisted.needs_attention());
        // What the listed users say is applied: the new listed users inserted, boss's binding
        // revoked from its own roles.
        assert_eq!(
            count(&r, "identities", "inserted"),
            (20 - hidden_new) as i64,
            "{concurrency} in flight"
        );
        assert_eq!(count(&r, "role_bindings", "revoked"), 1);
        // Nothing rests on absence: nobody offboarded (the hidden users are still in the realm),
        // mover's row is not re-aligned away from its unlisted old sub.
        assert_eq!(count(&r, "identities", "deactivated"), 0);
        assert_eq!(count(&r, "identities", "realigned"), 0);
        assert_eq!(
            count(&r, "identities", "deferred"),
            1,
            "mover waits for a complete listing"
        );
        assert_eq!(
            db.scalar(
                "SELECT count(*) FROM users WHERE NOT is_active OR offboarded_at IS NOT NULL"
            )
            .await,
            0
        );
        assert_eq!(
            db.strings("SELECT keycloak_sub FROM users WHERE username = 'mover'")
                .await,
            ["f1000000-0000-4000-8000-000000000002"]
        );

        // The filter is gone: the complete listing converges.
        kc.clear_paging_faults();
        let r = apply(&engine).await;
        assert_ok(&r);
        assert_eq!(count(&r, "identities", "inserted"), hidden_new as i64);
        assert_eq!(count(&r, "identities", "realigned"), 1);
        assert_eq!(count(&r, "identities", "unlisted"), 0);
        assert_eq!(count(&r, "identities", "deactivated"), 0);
        assert_eq!(db.scalar("SELECT count(*) FROM users").await, 78);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_ignores_first_fails_the_run_instead_of_listing_forever() {
    let kc = KeycloakEmulator::start(test_realm(base_users(30))).await;
    for (place, fault, says) in [
        (
            "users",
            IgnoreFirst::Users,
            "GET users: paging does not advance",
        ),
        (
            // The roles are resolved beside the user listing: either listing can be the first
            // to find that paging does not advance.
            "everywhere",
            IgnoreFirst::Everywhere,
            ": paging does not advance",
        ),
    ] {
        let db = TestDb::new().await;
        kc.clear_journal();
        kc.ignore_first(fault);
        let r = apply(&db.engine(&refs(&env_for(&kc, 10, 4)))).await;
        kc.clear_paging_faults();
        assert_eq!(r.outcome.as_str(), "failed", "{place}");
        let err = error_of(&r);
        assert!(
            err.contains(says) && err.contains("ignores the first parameter"),
            "{place}: {err}"
        );
        assert_eq!(db.scalar("SELECT count(*) FROM users").await, 0, "{place}");
        // Bounded: 2 x 10 distinct users + 16 windows of 10, a few more in flight; or roles
        // returned until `first` passes 500 times the distinct roles.
        let requests = kc.journal().len();
        assert!(requests < 5_000, "{place}: {requests} requests");
    }
}

/// Users created after the count are listed too, past it a window at a time: the realm holds
/// 331 users and `users/count` says 306, as a count taken just before 25 users were created.
/// The windows past the count, asked one after the other, list the 25, and no window is asked
/// after the one that found nothing, where four in flight would have asked three windows past
/// the end at once.
#[tokio::test(flavor = "multi_thread")]
async fn users_created_after_the_count_are_listed_past_it_a_window_at_a_time() {
    let mut realm = listing_realm();
    realm["users"]
        .as_array_mut()
        .unwrap()
        .extend((0..25).map(|i| {
            user(
                &format!("e1000000-0000-4000-8000-{i:012}"),
                &format!("late{i:02}"),
                &[],
                &[],
            )
        }));
    let kc = KeycloakEmulator::start(realm).await;
    kc.count_short_by(25);
    let (db, listed) = synced(&env_for(&kc, 10, 4), "count 25 short").await;
    kc.clear_paging_faults();
    assert_eq!(requests_to(&kc, "/users/count"), 1, "counted once: 306");
    assert_eq!(listed, HUMANS as i64 + 25);
    assert_eq!(
        db.scalar("SELECT count(*) FROM users WHERE username LIKE 'late%'")
            .await,
        25,
        "every user created after the count"
    );
    let mut past: Vec<u64> = users_requests(&kc)
        .iter()
        .filter_map(|q| {
            q.split('&')
                .find_map(|p| p.strip_prefix("first="))
                .and_then(|f| f.parse().ok())
        })
        .filter(|f| *f >= 306)
        .collect();
    past.sort_unstable();
    // [310, 320), [320, 330), [330, 340) (one user, then its rest from 331: nothing) and
    // [340, 350), empty: the end. [300, 310), below the count, is full.
    assert_eq!(
        past,
        vec![310, 320, 330, 331, 340],
        "users pages past the count"
    );
}

/// The preflight's count stands in for the listing's only when the listing starts right after
/// it: a `--once` held at the run lock for 1.5 s after its preflight's count asks `users/count`
/// again before listing.
#[tokio::test(flavor = "multi_thread")]
async fn a_listing_long_after_the_preflight_counts_the_users_again() {
    let kc = KeycloakEmulator::start(listing_realm()).await;
    let db = TestDb::new().await;
    let holder = db.hold_run_lock().await;
    kc.clear_journal();
    let env = [db.env(), env_for(&kc, 10, 4)].concat();
    let once = tokio::task::spawn_blocking(move || run_bin(&["--once"], &env));
    until("the preflight's users/count answered", 20, || async {
        requests_to(&kc, "/users/count") > 0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        requests_to(&kc, "/users/count"),
        1,
        "the preflight counted, then the run waited for the lock"
    );
    release_run_lock(&holder).await;
    let out = once.await.expect("the run's thread");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(requests_to(&kc, "/users/count"), 2, "counted again");
    assert_eq!(db.scalar("SELECT count(*) FROM users").await, HUMANS as i64);
}
