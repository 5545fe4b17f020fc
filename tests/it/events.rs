//! Against the emulator: the event follower's checkpoint and batches under duplicated,
//! out-of-order, same-millisecond and expired events, and Keycloak down between polls.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::*;
use crate::identities::{kc_env, refs, user};
use seedkeeper::events::{load_checkpoint, now_ms, Follower, FollowerState};
use seedkeeper::identity::keycloak::KeycloakSource;
use seedkeeper::identity::RoleFilter;
use seedkeeper::reconcile::RunReport;

const ALICE: &str = "e1000000-0000-4000-8000-000000000001";
const BOB: &str = "e1000000-0000-4000-8000-000000000002";

/// The dev realm with events readable by the seedkeeper service account.
pub(crate) fn realm_with(users: Vec<Value>) -> Value {
    let mut realm = dev_realm();
    for u in realm["users"].as_array_mut().unwrap() {
        if u.get("serviceAccountClientId").is_some() {
            u["clientRoles"] = json!({"realm-management": ["view-users", "view-realm", "view-clients", "view-events"]});
        }
    }
    realm["users"].as_array_mut().unwrap().extend(users);
    realm
}

struct Setup {
    kc: KeycloakEmulator,
    db: TestDb,
    follower: Follower,
}

/// The daemon's scheduled full run, through the follower's gate.
async fn scheduled_run(s: &Setup) -> RunReport {
    s.follower
        .gate
        .scheduled_tick(&CancellationToken::new())
        .await
        .expect("no run in flight")
}

async fn setup(users: Vec<Value>) -> Setup {
    setup_with(users, &[]).await
}

/// [`setup`], with further settings.
async fn setup_with(users: Vec<Value>, extra: &[(&str, &str)]) -> Setup {
    let kc = KeycloakEmulator::start(realm_with(users)).await;
    let db = TestDb::new().await;
    let mut env = kc_env(&kc);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    // The daemon's own gate: the follower's batches run through it, as in the daemon.
    let gate = db.gate(&refs(&env));
    // The startup run: schema, seed and the realm as it is now.
    assert_ok(&gate.startup(&CancellationToken::new()).await);
    let settings = gate.settings().clone();
    let source = KeycloakSource::new(
        &settings.keycloak,
        RoleFilter::new(&settings.identity),
        100,
        Duration::from_secs(2),
    )
    .unwrap();
    let follower = Follower {
        kc: Arc::new(source),
        gate,
        database: settings.database.clone(),
        realm: settings.keycloak.realm.clone(),
        poll_interval: Duration::from_millis(200),
        state: Arc::new(FollowerState::default()),
        metrics: Default::default(),
    };
    Setup { kc, db, follower }
}

impl Setup {
    /// The full runs the follower has asked its gate for.
    fn full_runs_asked(&self) -> u64 {
        self.follower.metrics.full_runs_asked.get()
    }

    async fn poll(&self) -> seedkeeper::events::Poll {
        let c = self.db.client().await;
        self.follower
            .poll(&c, None, &CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("poll: {e}"))
    }

    async fn event_runs(&self) -> i64 {
        self.db
            .scalar("SELECT count(*) FROM seed_runs WHERE trigger = 'event'")
            .await
    }
}

pub(crate) fn user_event(id: &str, time: i64, kind: &str, user_id: &str) -> Value {
    json!({"id": id, "time": time, "type": kind, "realmId": "dev", "clientId": "account", "userId": user_id, "ipAddress": "127.0.0.1"})
}

fn admin_event(id: &str, time: i64, op: &str, kind: &str, path: &str) -> Value {
    json!({"id": id, "time": time, "realmId": "dev", "authDetails": {"realmId": "master", "clientId": "admin-cli", "userId": "x", "ipAddress": "127.0.0.1"},
           "operationType": op, "resourceType": kind, "resourcePath": path})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_event_provisions_the_user_once_even_when_the_event_is_seen_twice() {
    let s = setup(vec![]).await;
    assert_eq!(
        s.poll().await.events,
        0,
        "the first poll sets the checkpoint"
    );
    // Alice registers: Keycloak has her, and the REGISTER event.
    let mut realm = realm_with(vec![user(ALICE, "alice", &[], &[])]);
    s.kc.set_realm(realm.clone());
    let t = now_ms();
    s.kc.push_user_event(user_event("ev-1", t, "REGISTER", ALICE));
    let p = s.poll().await;
    assert_eq!((p.events, p.users), (1, 1));
    let r = p.report.expect("a batch run");
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "inserted"), 1);
    assert_eq!(
        count(&r, "identities", "missing"),
        0,
        "a batch never reports the rest missing"
    );
    let n = s
        .db
        .scalar("SELECT count(*) FROM users u JOIN tenants t ON t.owner_user_id = u.id WHERE u.username = 'alice'")
        .await;
    assert_eq!(n, 1, "a row and a personal tenant");
    assert_eq!(s.event_runs().await, 1);

    // The same event again (Keycloak answers it again at the checkpoint's millisecond), and an
    // unrelated LOGIN: nothing is applied, no evidence row.
    s.kc.push_user_event(user_event("ev-1", t, "REGISTER", ALICE));
    s.kc.push_user_event(user_event("ev-2", t, "LOGIN", ALICE));
    let p = s.poll().await;
    assert_eq!(p.users, 0);
    assert!(p.report.is_none());
    assert_eq!(
        s.event_runs().await,
        1,
        "idle and duplicate polls leave no row"
    );

    // A role taken away is revoked by the next batch.
    realm["users"].as_array_mut().unwrap().last_mut().unwrap()["realmRoles"] = json!(["admin"]);
    s.kc.set_realm(realm.clone());
    s.kc.push_admin_event(admin_event(
        "ad-1",
        t + 5,
        "CREATE",
        "REALM_ROLE_MAPPING",
        &format!("users/{ALICE}/role-mappings/realm"),
    ));
    assert_ok(s.poll().await.report.as_ref().unwrap());
    assert_eq!(
        s.db.strings("SELECT role FROM users WHERE username = 'alice'")
            .await,
        ["admin"]
    );
    realm["users"].as_array_mut().unwrap().last_mut().unwrap()["realmRoles"] = json!([]);
    s.kc.set_realm(realm);
    s.kc.push_admin_event(admin_event(
        "ad-2",
        t + 6,
        "DELETE",
        "REALM_ROLE_MAPPING",
        &format!("users/{ALICE}/role-mappings/realm"),
    ));
    let r = s.poll().await.report.unwrap();
    assert_eq!(count(&r, "role_bindings", "revoked"), 1);
    assert!(s.full_runs_asked() == 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_out_of_order_and_in_the_same_millisecond_are_each_applied_once() {
    let s = setup(vec![
        user(ALICE, "alice", &[], &[]),
        user(BOB, "bob", &[], &[]),
    ])
    .await;
    s.poll().await;
    let t = now_ms() + 1000;
    // Two events at the same millisecond, pushed after a later one: Keycloak sorts by time.
    s.kc.push_admin_event(admin_event(
        "a-3",
        t + 2,
        "UPDATE",
        "USER",
        &format!("users/{BOB}"),
    ));
    s.kc.push_admin_event(admin_event(
        "a-1",
        t,
        "UPDATE",
        "USER",
        &format!("users/{ALICE}"),
    ));
    let p = s.poll().await;
    assert_eq!(p.events, 2);
    let cp = load_checkpoint(&s.db.client().await, "dev")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (cp.admin.time, cp.admin.ids.clone()),
        (t + 2, vec!["a-3".to_string()])
    );
    // Another event at the checkpoint's very millisecond arrives late: applied, not skipped;
    // the one already applied there is not applied again.
    s.kc.push_admin_event(admin_event(
        "a-4",
        t + 2,
        "UPDATE",
        "USER",
        &format!("users/{ALICE}"),
    ));
    let p = s.poll().await;
    assert_eq!((p.events, p.users), (1, 1));
    let cp = load_checkpoint(&s.db.client().await, "dev")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cp.admin.ids, ["a-3", "a-4"]);
    assert_eq!(s.poll().await.events, 0);
    // An idle poll costs one request a stream, though Keycloak answers the checkpoint's own
    // millisecond again.
    let before = s.follower.kc.request_count();
    assert_eq!(s.poll().await.events, 0);
    assert_eq!(
        s.follower.kc.request_count() - before,
        2,
        "requests of an idle poll"
    );
    // And an event older than the checkpoint (clock skew) is never applied twice.
    s.kc.push_admin_event(admin_event(
        "a-0",
        t - 10,
        "UPDATE",
        "USER",
        &format!("users/{BOB}"),
    ));
    assert_eq!(s.poll().await.events, 0);
}

/// A batch's role_bindings and tenants units look at the batch's users only (so one changed user
/// costs the same whatever the realm's size); what they leave out, the next full run heals.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_touches_its_own_users_rows_only_and_the_full_run_heals_the_rest() {
    let s = setup(vec![]).await;
    s.poll().await;
    // Damage outside the coming batch: a seedkeeper binding whose basis is gone, and an owner
    // membership demoted.
    let c = s.db.client().await;
    c.batch_execute(
        "INSERT INTO platform_role_bindings (user_id, role_name, status, granted_by, basis)
           SELECT id, 'platform_superadmin', 'active', 'seedkeeper', 'users.role=admin' FROM users WHERE username = 'dev-user';
         UPDATE tenant_memberships m SET role = 'member' FROM tenants t, users u
           WHERE m.tenant_id = t.id AND t.owner_user_id = u.id AND m.user_id = u.id AND u.username = 'dev-ops'",
    )
    .await
    .unwrap();
    let users_before = s.db.scalar("SELECT count(*) FROM users").await;

    s.kc.set_realm(realm_with(vec![user(ALICE, "alice", &["admin"], &[])]));
    s.kc.push_user_event(user_event("sc-1", now_ms(), "REGISTER", ALICE));
    let r = s.poll().await.report.expect("a batch run");
    assert_ok(&r);
    assert_eq!(
        count(&r, "tenants", "users_covered"),
        1,
        "alice only, not {users_before} rows"
    );
    assert_eq!(count(&r, "tenants", "tenants_inserted"), 1);
    assert_eq!(count(&r, "tenants", "tenant_memberships_updated"), 0);
    assert_eq!(
        count(&r, "role_bindings", "inserted"),
        1,
        "alice's superadmin"
    );
    assert_eq!(count(&r, "role_bindings", "revoked"), 0);
    assert_eq!(count(&r, "role_bindings", "unchanged"), 0);
    let alice = "SELECT count(*) FROM users u JOIN tenants t ON t.owner_user_id = u.id
                 JOIN projects p ON p.tenant_id = t.id AND p.is_default
                 JOIN tenant_memberships tm ON tm.tenant_id = t.id AND tm.user_id = u.id AND tm.role = 'owner'
                 JOIN project_memberships pm ON pm.project_id = p.id AND pm.user_id = u.id AND pm.role = 'owner'
                 JOIN platform_role_bindings b ON b.user_id = u.id AND b.status = 'active'
                 WHERE u.username = 'alice'";
    assert_eq!(
        s.db.scalar(alice).await,
        1,
        "alice's whole chain and binding"
    );
    let stale = "SELECT count(*) FROM platform_role_bindings b JOIN users u ON u.id = b.user_id
                 WHERE u.username = 'dev-user' AND b.status = 'active'";
    assert_eq!(s.db.scalar(stale).await, 1, "left to the full run");

    // The scheduled full run covers every row again.
    let full = scheduled_run(&s).await;
    assert_ok(&full);
    assert_eq!(count(&full, "tenants", "users_covered"), users_before + 1);
    assert_eq!(count(&full, "tenants", "tenant_memberships_updated"), 1);
    assert_eq!(count(&full, "role_bindings", "revoked"), 1);
    assert_eq!(s.db.scalar(stale).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_structural_change_or_an_expired_checkpoint_asks_for_a_full_run() {
    let s = setup(vec![]).await;
    s.poll().await;
    let t = now_ms();
    s.kc.push_admin_event(admin_event(
        "g-1",
        t,
        "CREATE",
        "REALM_ROLE_MAPPING",
        "groups/g1/role-mappings/realm",
    ));
    let p = s.poll().await;
    assert!(p.full_run.unwrap().contains("groups/g1"));
    assert_eq!(s.full_runs_asked(), 1);
    assert!(p.report.is_none(), "the full run covers the batch");

    // A checkpoint older than the realm's event expiration: events may be gone.
    let c = s.db.client().await;
    c.execute("UPDATE event_follower SET user_time = user_time - 7200000, admin_time = admin_time - 7200000", &[])
        .await
        .unwrap();
    let p = s
        .follower
        .poll(&c, Some(3600), &CancellationToken::new())
        .await
        .unwrap();
    assert!(p
        .full_run
        .unwrap()
        .contains("beyond the realm's event expiration of 3600 s"));
    let cp = load_checkpoint(&c, "dev").await.unwrap().unwrap();
    assert!(
        now_ms() - cp.user.time < 60_000,
        "the checkpoint moved to now"
    );
    assert_eq!(s.full_runs_asked(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn keycloak_down_between_polls_loses_nothing_and_a_restart_resumes_from_the_checkpoint() {
    let s = setup(vec![]).await;
    s.poll().await;
    let realm = realm_with(vec![
        user(ALICE, "alice", &[], &[]),
        user(BOB, "bob", &[], &[]),
    ]);
    s.kc.set_realm(realm);
    let t = now_ms();
    s.kc.push_user_event(user_event("r-1", t, "REGISTER", ALICE));
    s.kc.fail_next_admin(4, 503); // the first request and its 3 retries
    let c = s.db.client().await;
    let err = s.follower.poll(&c, None, &CancellationToken::new()).await;
    assert!(err.is_err(), "an outage fails the poll");
    let users =
        s.db.scalar("SELECT count(*) FROM users WHERE username = 'alice'")
            .await;
    assert_eq!(users, 0);
    // Keycloak is back; a second follower (a restarted daemon, or another replica) reads the
    // same checkpoint and applies what the outage held back, and Bob who came meanwhile.
    s.kc.push_user_event(user_event("r-2", t + 1, "REGISTER", BOB));
    let again = Follower {
        kc: s.follower.kc.clone(),
        gate: s.follower.gate.clone(),
        database: s.follower.database.clone(),
        realm: s.follower.realm.clone(),
        poll_interval: s.follower.poll_interval,
        state: Arc::new(FollowerState::default()),
        metrics: Default::default(),
    };
    let p = again
        .poll(&c, None, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((p.events, p.users), (2, 2));
    let n =
        s.db.scalar("SELECT count(*) FROM users WHERE username IN ('alice', 'bob')")
            .await;
    assert_eq!(n, 2);
}

/// `revoked_reason` of each of a user's bindings, sorted.
async fn revocations_of(db: &TestDb, username: &str) -> Vec<String> {
    db.strings(&format!(
        "SELECT b.role_name || ' ' || b.status || ' ' || coalesce(b.revoked_reason, '-')
         FROM platform_role_bindings b JOIN users u ON u.id = b.user_id WHERE u.username = '{username}' ORDER BY 1"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_admin_is_offboarded_by_the_next_event_batch_by_admin_or_user_event() {
    let s = setup(vec![
        user(ALICE, "alice", &["admin"], &[]),
        user(BOB, "bob", &["admin"], &[]),
    ])
    .await;
    assert_eq!(
        s.poll().await.events,
        0,
        "the first poll sets the checkpoint"
    );
    // Alice is deleted by an administrator (admin event DELETE USER), Bob deletes his own
    // account (user event DELETE_ACCOUNT): Keycloak answers 404 for both.
    s.kc.set_realm(realm_with(vec![]));
    let t = now_ms();
    s.kc.push_admin_event(admin_event(
        "ad-del",
        t,
        "DELETE",
        "USER",
        &format!("users/{ALICE}"),
    ));
    s.kc.push_user_event(user_event("ev-del", t, "DELETE_ACCOUNT", BOB));
    let p = s.poll().await;
    assert_eq!((p.events, p.users), (2, 2));
    let r = p.report.expect("a batch run");
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "deactivated"), 2);
    assert_eq!(count(&r, "role_bindings", "revoked"), 2);
    assert_eq!(
        s.db.strings("SELECT username || ' ' || is_active || ' ' || (offboarded_at IS NOT NULL) FROM users WHERE username IN ('alice', 'bob') ORDER BY 1")
            .await,
        ["alice false true", "bob false true"]
    );
    for who in ["alice", "bob"] {
        assert_eq!(
            revocations_of(&s.db, who).await,
            ["platform_superadmin revoked identity-offboarded"]
        );
    }
    assert!(s.full_runs_asked() == 0, "a deletion needs no full run");
    // The other admins are untouched: the batch looked at its own users only.
    assert_eq!(
        s.db.scalar("SELECT count(*) FROM users WHERE offboarded_at IS NOT NULL")
            .await,
        2
    );

    // The full run agrees: nothing more to offboard, nothing written twice.
    let r = scheduled_run(&s).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "deactivated"), 0);
    assert_eq!(count(&r, "identities", "missing"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_batch_that_would_offboard_more_than_the_limit_offboards_nobody() {
    let s = setup_with(
        vec![
            user(ALICE, "alice", &["admin"], &[]),
            user(BOB, "bob", &["admin"], &[]),
        ],
        &[("SEEDKEEPER_IDENTITY__OFFBOARD_LIMIT", "1")],
    )
    .await;
    assert_eq!(
        s.poll().await.events,
        0,
        "the first poll sets the checkpoint"
    );
    s.kc.set_realm(realm_with(vec![]));
    let t = now_ms();
    for (id, who) in [("ad-a", ALICE), ("ad-b", BOB)] {
        s.kc.push_admin_event(admin_event(
            id,
            t,
            "DELETE",
            "USER",
            &format!("users/{who}"),
        ));
    }
    // The batch fails (its checkpoint stays, so it is read again until someone decides).
    let c = s.db.client().await;
    let e = s
        .follower
        .poll(&c, None, &CancellationToken::new())
        .await
        .expect_err("a batch over the limit fails");
    assert_eq!(e.kind().as_str(), "offboard_limit");
    assert!(
        e.to_string().contains("2 of the 8 user(s) in the realm would be offboarded, more than identity.offboard_limit (1: 1 user(s))"),
        "{e}"
    );
    assert_eq!(
        s.db.strings("SELECT outcome || ' ' || (counts->'identities'->>'offboard_stopped') || ' ' || (counts->'identities'->>'deactivated') FROM seed_runs WHERE trigger = 'event'").await,
        ["failed 2 0"]
    );
    assert_eq!(
        s.db.scalar("SELECT count(*) FROM users WHERE offboarded_at IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        s.db.scalar("SELECT count(*) FROM platform_role_bindings WHERE status = 'active' AND user_id IN (SELECT id FROM users WHERE username IN ('alice', 'bob'))").await,
        2,
        "their bindings stay until someone decides"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deletion_whose_event_is_lost_is_offboarded_by_the_next_full_run() {
    let s = setup(vec![user(ALICE, "alice", &["admin"], &[])]).await;
    assert_eq!(s.poll().await.events, 0);
    // Alice is deleted, and the event never arrives (expired, or events were off).
    s.kc.set_realm(realm_with(vec![]));
    let p = s.poll().await;
    assert!(p.report.is_none());
    assert_eq!(
        revocations_of(&s.db, "alice").await,
        ["platform_superadmin active -"],
        "no event, no batch"
    );
    let r = scheduled_run(&s).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "deactivated"), 1);
    assert_eq!(
        revocations_of(&s.db, "alice").await,
        ["platform_superadmin revoked identity-offboarded"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_waits_for_the_next_poll_while_the_daemons_gate_has_a_full_run_in_flight() {
    let s = setup_with(vec![], &[("SEEDKEEPER_DATABASE__LOCK_TIMEOUT", "30s")]).await;
    assert_eq!(
        s.poll().await.events,
        0,
        "the first poll sets the checkpoint"
    );
    s.kc.set_realm(realm_with(vec![user(ALICE, "alice", &[], &[])]));
    s.kc.push_user_event(user_event("ev-1", now_ms(), "REGISTER", ALICE));
    // A full run of the same gate is kept going: another session holds the users table.
    let held = s.db.client().await;
    held.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let gate = s.follower.gate.clone();
    let full = tokio::spawn(async move { gate.event_full_run(&CancellationToken::new()).await });
    until("the full run is in flight", 10, || async {
        s.follower.gate.run_age().is_some()
    })
    .await;
    // The batch does not run beside it: no report, no row, the checkpoint stays.
    let p = s.poll().await;
    assert_eq!((p.events, p.users), (1, 1));
    assert!(p.report.is_none(), "a batch ran beside a full run");
    held.batch_execute("COMMIT").await.unwrap();
    assert_ok(&full.await.unwrap());
    assert_eq!(s.event_runs().await, 0);
    // The next poll reads the event again and applies it.
    let p = s.poll().await;
    assert_eq!((p.events, p.users), (1, 1));
    assert_ok(&p.report.expect("the batch runs once the full run is done"));
    assert_eq!(s.event_runs().await, 1);
}
