//! The whole life of an identity, through the realm-file source and the Keycloak
//! source against the emulator (the real Keycloak cases are in `conformance*.rs`, the event
//! follower's in `events.rs`, short listings in `listing.rs`): provisioned, disabled, deleted
//! (offboarded), back again, and a new person reusing an offboarded name. A privilege never
//! outlives the identity's standing.

use serde_json::Value;

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::*;
use crate::identities::{kc_env, realm_file_env, refs, test_realm, user};
use seedkeeper::reconcile::{FindingKind, RunReport, Unit};

const BOSS: &str = "b7000000-0000-4000-8000-000000000001";
const NEWCOMER: &str = "b7000000-0000-4000-8000-000000000002";

/// boss holds admin (platform_superadmin) and ops (platform_ops through the role map).
fn boss(enabled: bool) -> Value {
    let mut u = user(BOSS, "boss", &["admin", "ops"], &[]);
    u["enabled"] = Value::Bool(enabled);
    u
}

/// Where the realm comes from: a realm file, or the emulator serving it.
enum Source {
    File(TempDir),
    Emulator(KeycloakEmulator),
}

impl Source {
    async fn both() -> [Source; 2] {
        let kc = KeycloakEmulator::start(test_realm(vec![])).await;
        [Source::File(TempDir::new()), Source::Emulator(kc)]
    }

    fn name(&self) -> &'static str {
        match self {
            Source::File(_) => "realm-file",
            Source::Emulator(_) => "keycloak",
        }
    }

    /// The realm as it is now, and the settings that read it.
    fn env(&self, realm: &Value) -> Vec<(String, String)> {
        match self {
            Source::File(dir) => realm_file_env(dir, realm),
            Source::Emulator(kc) => {
                kc.set_realm(realm.clone());
                kc_env(kc)
            }
        }
    }
}

async fn run_with(db: &TestDb, source: &Source, realm: &Value) -> RunReport {
    apply(&db.engine(&refs(&source.env(realm)))).await
}

/// boss's bindings: `role status granted_by reason`, sorted.
async fn bindings_of(db: &TestDb, username: &str) -> Vec<String> {
    db.strings(&format!(
        "SELECT b.role_name || ' ' || b.status || ' ' || b.granted_by || ' ' || coalesce(b.revoked_reason, '-')
         FROM platform_role_bindings b JOIN users u ON u.id = b.user_id WHERE u.username = '{username}' ORDER BY 1"
    ))
    .await
}

fn findings(r: &RunReport, kind: FindingKind) -> Vec<String> {
    r.units
        .iter()
        .flat_map(|u| &u.findings)
        .filter(|f| f.kind == kind)
        .map(|f| format!("{} {}", f.entity, f.detail))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_admin_is_offboarded_keeps_its_row_and_tenant_and_comes_back_with_its_bindings() {
    for source in Source::both().await {
        offboarded_and_back(&source).await;
    }
}

async fn offboarded_and_back(source: &Source) {
    let db = TestDb::new().await;
    eprintln!("source: {}", source.name());
    assert_ok(&run_with(&db, source, &test_realm(vec![boss(true)])).await);
    assert_eq!(
        bindings_of(&db, "boss").await,
        [
            "platform_ops active seedkeeper -",
            "platform_superadmin active seedkeeper -"
        ]
    );
    // A binding granted by someone else is never touched, whatever happens to the identity.
    db.client()
        .await
        .execute(
            "INSERT INTO platform_role_bindings (user_id, role_name, status, granted_by)
             SELECT id, 'platform_user', 'active', 'console' FROM users WHERE username = 'boss'",
            &[],
        )
        .await
        .unwrap();
    let tenant_before = db
        .strings("SELECT t.id::text || ' ' || t.slug FROM tenants t JOIN users u ON u.id = t.owner_user_id WHERE u.username = 'boss'")
        .await;
    assert_eq!(tenant_before.len(), 1);

    // boss is deleted from the realm: offboarded by the next complete listing.
    let r = run_with(&db, source, &test_realm(vec![])).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "deactivated"), 1);
    assert_eq!(count(&r, "role_bindings", "revoked"), 2);
    let off = findings(&r, FindingKind::Offboarded);
    assert_eq!(off.len(), 1, "{off:?}");
    assert!(
        off[0].starts_with("user:boss ") && off[0].contains(BOSS),
        "{off:?}"
    );
    assert_eq!(
        db.strings("SELECT username || ' ' || is_active || ' ' || (offboarded_at IS NOT NULL) FROM users WHERE keycloak_sub = 'b7000000-0000-4000-8000-000000000001'")
            .await,
        ["boss false true"],
        "the row is kept, deactivated and marked offboarded"
    );
    assert_eq!(
        bindings_of(&db, "boss").await,
        [
            "platform_ops revoked seedkeeper identity-offboarded",
            "platform_superadmin revoked seedkeeper identity-offboarded",
            "platform_user active console -",
        ],
        "every seedkeeper binding revoked, with why; the console's kept"
    );
    let tenant_after = db
        .strings("SELECT t.id::text || ' ' || t.slug FROM tenants t JOIN users u ON u.id = t.owner_user_id WHERE u.username = 'boss'")
        .await;
    assert_eq!(
        tenant_after, tenant_before,
        "the tenant is the platform's data: kept"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM tenant_memberships m JOIN users u ON u.id = m.user_id WHERE u.username = 'boss' AND m.status = 'active'").await,
        1
    );

    // The next run writes nothing: boss stays offboarded, counted missing, not offboarded again.
    db.settle_stats(2).await;
    let written = db.tuples_written().await;
    let r = run_with(&db, source, &test_realm(vec![])).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "deactivated"), 0);
    assert_eq!(count(&r, "identities", "missing"), 1);
    assert_eq!(r.unit(Unit::Identities).unwrap().findings.len(), 0);
    db.settle_stats(3).await;
    assert_eq!(
        db.tuples_written().await,
        written,
        "a second run writes nothing"
    );

    // boss is back under the same sub: reactivated, its bindings granted again as new rows; the
    // revoked ones stay as history.
    let r = run_with(&db, source, &test_realm(vec![boss(true)])).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "reactivated"), 1);
    assert_eq!(count(&r, "identities", "updated"), 0);
    assert_eq!(count(&r, "role_bindings", "inserted"), 2);
    assert_eq!(findings(&r, FindingKind::Reactivated).len(), 1);
    assert_eq!(
        db.strings(
            "SELECT is_active || ' ' || (offboarded_at IS NULL) FROM users WHERE username = 'boss'"
        )
        .await,
        ["true true"]
    );
    assert_eq!(
        bindings_of(&db, "boss").await,
        [
            "platform_ops active seedkeeper -",
            "platform_ops revoked seedkeeper identity-offboarded",
            "platform_superadmin active seedkeeper -",
            "platform_superadmin revoked seedkeeper identity-offboarded",
            "platform_user active console -",
        ]
    );
    assert_eq!(tenant_after, tenant_before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_admin_holds_no_binding_and_gets_it_back_when_enabled() {
    for source in Source::both().await {
        disabled_and_enabled(&source).await;
    }
}

async fn disabled_and_enabled(source: &Source) {
    let db = TestDb::new().await;
    eprintln!("source: {}", source.name());
    assert_ok(&run_with(&db, source, &test_realm(vec![boss(true)])).await);

    // Disabled in Keycloak: deactivated, not offboarded. The plan shows the user's update and
    // the revocations that follow from it, exactly as the apply then lists them.
    let disabled = test_realm(vec![boss(false)]);
    let mut engine = db.engine(&refs(&source.env(&disabled)));
    let p = plan(&engine).await;
    let changes: Vec<String> = p
        .changes_sorted()
        .iter()
        .map(|(u, c)| format!("{u} {c}"))
        .collect();
    let boss_sub = db
        .strings("SELECT keycloak_sub FROM users WHERE username = 'boss'")
        .await;
    assert_eq!(
        changes,
        [
            format!("identities update users:boss (sub {})", boss_sub[0]),
            "role_bindings revoke platform_role_bindings:boss/platform_ops".to_string(),
            "role_bindings revoke platform_role_bindings:boss/platform_superadmin".to_string(),
        ]
    );
    engine.list_changes = true;
    let r = apply(&engine).await;
    assert_eq!(
        r.changes_sorted(),
        p.changes_sorted(),
        "the apply wrote what the plan showed"
    );
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "updated"), 1);
    assert_eq!(count(&r, "identities", "deactivated"), 0);
    assert_eq!(count(&r, "role_bindings", "revoked"), 2);
    let revoked = findings(&r, FindingKind::Revoked);
    assert!(
        revoked.iter().all(|f| f.contains("disabled in Keycloak")),
        "{revoked:?}"
    );
    assert_eq!(
        db.strings("SELECT role || ' ' || is_active || ' ' || (offboarded_at IS NULL) FROM users WHERE username = 'boss'")
            .await,
        ["admin false true"],
        "still an admin in the realm, but inactive"
    );
    assert_eq!(
        bindings_of(&db, "boss").await,
        [
            "platform_ops revoked seedkeeper identity-disabled",
            "platform_superadmin revoked seedkeeper identity-disabled"
        ]
    );
    // No active seedkeeper binding of an inactive user anywhere.
    assert_eq!(
        db.scalar("SELECT count(*) FROM platform_role_bindings b JOIN users u ON u.id = b.user_id WHERE b.status = 'active' AND b.granted_by = 'seedkeeper' AND NOT u.is_active").await,
        0
    );
    let again = run_with(&db, source, &disabled).await;
    assert_ok(&again);
    assert_eq!(
        again.units.iter().map(|u| u.counts.writes()).sum::<i64>(),
        0
    );

    // Enabled again: the bindings come back.
    let r = run_with(&db, source, &test_realm(vec![boss(true)])).await;
    assert_ok(&r);
    assert_eq!(count(&r, "role_bindings", "inserted"), 2);
    assert_eq!(
        db.scalar("SELECT count(*) FROM platform_role_bindings b JOIN users u ON u.id = b.user_id WHERE u.username = 'boss' AND b.status = 'active'").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_sub_reusing_an_offboarded_users_name_is_a_clash_and_inherits_nothing() {
    for source in Source::both().await {
        reused_name(&source).await;
    }
}

async fn reused_name(source: &Source) {
    let db = TestDb::new().await;
    eprintln!("source: {}", source.name());
    assert_ok(&run_with(&db, source, &test_realm(vec![boss(true)])).await);
    assert_ok(&run_with(&db, source, &test_realm(vec![])).await);

    // Another person joins under the name "boss", with a sub of their own.
    let newcomer = user(NEWCOMER, "boss", &["admin"], &[]);
    let realm = test_realm(vec![newcomer]);
    for attempt in 1..=2 {
        let r = run_with(&db, source, &realm).await;
        assert_eq!(
            r.outcome.as_str(),
            "failed",
            "attempt {attempt}: needs an operator"
        );
        assert_eq!(count(&r, "identities", "clashes"), 1);
        assert_eq!(count(&r, "identities", "realigned"), 0);
        let clash = findings(&r, FindingKind::Clash);
        assert_eq!(clash.len(), 1, "{clash:?}");
        for part in [BOSS, NEWCOMER, "offboarded on", "reusing the name"] {
            assert!(clash[0].contains(part), "{part:?} not in {clash:?}");
        }
        assert!(FindingKind::Clash.needs_attention());
        assert_eq!(
            db.strings("SELECT keycloak_sub || ' ' || is_active || ' ' || (offboarded_at IS NOT NULL) FROM users WHERE username = 'boss'")
                .await,
            [format!("{BOSS} false true")],
            "attempt {attempt}: the old row stays the old person's, offboarded"
        );
        assert_eq!(
            db.scalar(&format!(
                "SELECT count(*) FROM users WHERE keycloak_sub = '{NEWCOMER}'"
            ))
            .await,
            0,
            "the newcomer is not provisioned"
        );
        assert_eq!(
            db.scalar("SELECT count(*) FROM platform_role_bindings b JOIN users u ON u.id = b.user_id WHERE u.username = 'boss' AND b.status = 'active'").await,
            0,
            "no privilege reaches the old row through the new person's roles"
        );
    }
}
