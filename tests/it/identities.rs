//! Identities from the realm file and from Keycloak (through the emulator), subject
//! mapping, superadmin bindings, personal tenants.

use serde_json::{json, Value};

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::*;

const DEV_ADMIN: &str = "a1000000-0000-4000-8000-000000000006";

/// Snapshot of the identity tables, independent of generated ids.
pub(crate) async fn identity_state(db: &TestDb) -> Vec<String> {
    let c = db.client().await;
    let mut out = Vec::new();
    for r in c
        .query("SELECT keycloak_sub, username, coalesce(email, ''), role, is_active, realm_roles::text FROM users ORDER BY username", &[])
        .await
        .unwrap()
    {
        out.push(format!("user {} {} {} {} {} {}", r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, String>(3), r.get::<_, bool>(4), r.get::<_, String>(5)));
    }
    for r in c
        .query("SELECT u.username, b.role_name, b.status, b.granted_by FROM platform_role_bindings b JOIN users u ON u.id = b.user_id ORDER BY 1, 2, 3", &[])
        .await
        .unwrap()
    {
        out.push(format!("binding {} {} {} {}", r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, String>(3)));
    }
    for r in c
        .query(
            "SELECT u.username, t.kind, p.slug, tm.role, tm.status, pm.role, pm.status FROM users u
             JOIN tenants t ON t.owner_user_id = u.id JOIN projects p ON p.tenant_id = t.id AND p.is_default
             JOIN tenant_memberships tm ON tm.tenant_id = t.id AND tm.user_id = u.id
             JOIN project_memberships pm ON pm.project_id = p.id AND pm.user_id = u.id ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
    {
        out.push(format!(
            "tenant {} {} {} {} {} {} {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4),
            r.get::<_, String>(5),
            r.get::<_, String>(6)
        ));
    }
    out
}

/// The six personas of `realms/dev-realm.json` as they must be stored: username, email, first
/// and last name, role, mapped realm roles. Written out rather than derived from either source, so
/// two sources that are wrong the same way (every email NULL) still fail a comparison test.
pub(crate) const DEV_PERSONAS: [&str; 6] = [
    "dev-admin dev-admin@dev.local Dev Admin admin {admin}",
    "dev-ops dev-ops@dev.local Dev Ops user {ops}",
    "dev-platform-admin dev-platform-admin@dev.local Dev Platform Admin user {platform-admin}",
    "dev-project-admin dev-project-admin@dev.local Dev Project Admin user {}",
    "dev-tenant-admin dev-tenant-admin@dev.local Dev Tenant Admin user {}",
    "dev-user dev-user@dev.local Dev User user {}",
];

/// The dev personas' rows in the shape of [`DEV_PERSONAS`] (a NULL shows as `NULL`).
pub(crate) async fn dev_personas(db: &TestDb) -> Vec<String> {
    db.strings(
        "SELECT concat_ws(' ', username, coalesce(email, 'NULL'), coalesce(first_name, 'NULL'), \
         coalesce(last_name, 'NULL'), role, realm_roles::text) FROM users \
         WHERE username LIKE 'dev-%' ORDER BY username",
    )
    .await
}

pub(crate) fn kc_env(kc: &KeycloakEmulator) -> Vec<(String, String)> {
    vec![
        ("SEEDKEEPER_IDENTITY__SOURCE".into(), "keycloak".into()),
        ("SEEDKEEPER_KEYCLOAK__BASE_URL".into(), kc.base_url()),
        ("SEEDKEEPER_KEYCLOAK__REALM".into(), kc.realm_name()),
        (
            "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET".into(),
            "seedkeeper-dev-secret".into(),
        ),
        ("SEEDKEEPER_KEYCLOAK__MAX_RETRIES".into(), "3".into()),
        ("SEEDKEEPER_KEYCLOAK__REQUEST_TIMEOUT".into(), "2s".into()),
    ]
}

pub(crate) fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub(crate) fn realm_file_env(dir: &TempDir, realm: &Value) -> Vec<(String, String)> {
    let p = dir.write("realm.json", &realm.to_string());
    vec![(
        "SEEDKEEPER_IDENTITY__REALM_FILE".into(),
        p.display().to_string(),
    )]
}

pub(crate) fn user(id: &str, username: &str, roles: &[&str], groups: &[&str]) -> Value {
    json!({"id": id, "username": username, "email": format!("{username}@example.test"), "enabled": true,
           "firstName": "F", "lastName": "L", "realmRoles": roles, "groups": groups})
}

/// A realm with composites and nested groups, plus the seedkeeper client.
pub(crate) fn test_realm(users: Vec<Value>) -> Value {
    let mut realm = dev_realm();
    realm["roles"]["realm"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "super", "composite": true, "composites": {"realm": ["admin"]}}));
    realm["roles"]["realm"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "ops-lead", "composite": true, "composites": {"realm": ["ops"]}}));
    realm["groups"].as_array_mut().unwrap().push(json!({"name": "admins", "path": "/admins", "realmRoles": ["admin"],
        "subGroups": [{"name": "emea", "path": "/admins/emea", "realmRoles": [], "subGroups": []}]}));
    let list = realm["users"].as_array_mut().unwrap();
    list.extend(users);
    realm
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dev_realm_file_yields_the_six_personas_with_bindings_and_tenants() {
    let db = TestDb::new().await;
    let r = apply(&db.engine(&[])).await;
    assert_ok(&r);
    let c = db.client().await;
    let users: Vec<(String, String, String)> = c
        .query(
            "SELECT keycloak_sub, username, role FROM users ORDER BY username",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let realm = dev_realm();
    let mut want: Vec<(String, String, String)> = realm["users"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u.get("serviceAccountClientId").is_none())
        .map(|u| {
            let admin = u["realmRoles"]
                .as_array()
                .map(|a| a.iter().any(|r| r == "admin"))
                .unwrap_or(false);
            (
                u["id"].as_str().unwrap().to_string(),
                u["username"].as_str().unwrap().to_string(),
                if admin { "admin" } else { "user" }.to_string(),
            )
        })
        .collect();
    want.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(users, want);
    let names: Vec<&str> = users.iter().map(|u| u.1.as_str()).collect();
    assert_eq!(
        names,
        [
            "dev-admin",
            "dev-ops",
            "dev-platform-admin",
            "dev-project-admin",
            "dev-tenant-admin",
            "dev-user"
        ]
    );
    assert!(users.iter().any(|u| u.0 == DEV_ADMIN && u.2 == "admin"));
    assert_eq!(dev_personas(&db).await, DEV_PERSONAS);
    let state = identity_state(&db).await;
    for b in [
        "binding dev-admin platform_superadmin active seedkeeper",
        "binding dev-platform-admin platform_superadmin active seedkeeper",
        "binding dev-ops platform_ops active seedkeeper",
    ] {
        assert!(state.contains(&b.to_string()), "missing {b}: {state:#?}");
    }
    assert_eq!(
        state.iter().filter(|s| s.starts_with("binding")).count(),
        3,
        "{state:#?}"
    );
    assert_eq!(
        state
            .iter()
            .filter(|s| s.starts_with("tenant")
                && s.ends_with("personal default owner active owner active"))
            .count(),
        6,
        "{state:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_realm_served_by_the_emulator_yields_the_same_database() {
    let file_db = TestDb::new().await;
    assert_ok(&apply(&file_db.engine(&[])).await);
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let kc_db = TestDb::new().await;
    let env = kc_env(&kc);
    let r = apply(&kc_db.engine(&refs(&env))).await;
    assert_ok(&r);
    assert_eq!(identity_state(&file_db).await, identity_state(&kc_db).await);
    // Equal, and right: each source on its own holds the personas as the realm describes them.
    assert_eq!(dev_personas(&kc_db).await, DEV_PERSONAS);
    assert_eq!(dev_personas(&file_db).await, DEV_PERSONAS);
    // and the second run over the unchanged realm writes nothing
    kc_db.settle_stats(1).await;
    let before = kc_db.tuples_written().await;
    assert_ok(&apply(&kc_db.engine(&refs(&env))).await);
    kc_db.settle_stats(2).await;
    assert_eq!(kc_db.tuples_written().await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn composites_groups_and_parent_groups_make_admins_in_both_sources() {
    let users = vec![
        user(
            "b0000000-0000-4000-8000-000000000001",
            "via-composite",
            &["super"],
            &[],
        ),
        user(
            "b0000000-0000-4000-8000-000000000002",
            "via-group",
            &[],
            &["/admins"],
        ),
        user(
            "b0000000-0000-4000-8000-000000000003",
            "via-parent-group",
            &[],
            &["/admins/emea"],
        ),
        user(
            "b0000000-0000-4000-8000-000000000004",
            "ops-by-composite",
            &["ops-lead"],
            &[],
        ),
        user("b0000000-0000-4000-8000-000000000005", "plain", &[], &[]),
    ];
    let realm = test_realm(users);
    let dir = TempDir::new();
    let file_db = TestDb::new().await;
    let env = realm_file_env(&dir, &realm);
    assert_ok(&apply(&file_db.engine(&refs(&env))).await);
    let kc = KeycloakEmulator::start(realm).await;
    let kc_db = TestDb::new().await;
    let mut env = kc_env(&kc);
    env.push(("SEEDKEEPER_KEYCLOAK__PAGE_SIZE".into(), "2".into()));
    assert_ok(&apply(&kc_db.engine(&refs(&env))).await);
    let state = identity_state(&kc_db).await;
    assert_eq!(identity_state(&file_db).await, state);
    for u in ["via-composite", "via-group", "via-parent-group"] {
        assert!(
            state.iter().any(|s| s.starts_with("user b")
                && s.contains(&format!(" {u} "))
                && s.contains(" admin ")),
            "{u}: {state:#?}"
        );
        assert!(
            state.contains(&format!(
                "binding {u} platform_superadmin active seedkeeper"
            )),
            "{u}: {state:#?}"
        );
    }
    assert!(state.contains(&"binding ops-by-composite platform_ops active seedkeeper".to_string()));
    assert!(!state.iter().any(|s| s.starts_with("binding plain")));
    // The users' own values, not only the two sources' agreement.
    assert!(
        state.contains(
            &"user b0000000-0000-4000-8000-000000000005 plain plain@example.test user true {}"
                .to_string()
        ),
        "{state:#?}"
    );
    // page size 2: many pages were requested
    let pages = kc
        .journal()
        .iter()
        .filter(|j| j.path.ends_with("/users") && j.method == "GET")
        .count();
    assert!(pages >= 6, "listed in pages of 2: {pages} requests");
}

/// `n` users `user00`, `user01`, … without roles, their ids starting with `prefix`.
fn numbered_users(prefix: char, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}0000000-0000-4000-8000-{i:012}");
            user(&id, &format!("user{i:02}"), &[], &[])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_expiring_mid_listing_and_a_503_burst_are_survived() {
    let kc = KeycloakEmulator::start(test_realm(numbered_users('c', 30))).await;
    let db = TestDb::new().await;
    let mut env = kc_env(&kc);
    env.push(("SEEDKEEPER_KEYCLOAK__PAGE_SIZE".into(), "5".into()));
    env.push(("SEEDKEEPER_KEYCLOAK__CONCURRENCY".into(), "1".into()));
    let engine = db.engine(&refs(&env));
    kc.invalidate_tokens_after(8);
    kc.fail_next_admin(2, 503);
    let r = apply(&engine).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "inserted"), 36);
    let tokens = kc
        .journal()
        .iter()
        .filter(|j| j.path.ends_with("/token") && j.status == 200)
        .count();
    assert!(tokens >= 2, "the token was renewed: {tokens}");
    let statuses: Vec<u16> = kc.journal().iter().map(|j| j.status).collect();
    assert!(
        statuses.contains(&503) && statuses.contains(&401),
        "{statuses:?}"
    );
}

/// The admin client renews a refused token once, however many requests in flight are refused:
/// with 8 windows of the listing in flight when every token is revoked, the run asks the token
/// endpoint twice (its preflight, one renewal), not once per refused window.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_revoked_under_eight_windows_in_flight_is_renewed_once() {
    let kc = KeycloakEmulator::start(test_realm(numbered_users('d', 80))).await;
    let db = TestDb::new().await;
    let mut env = kc_env(&kc);
    env.push(("SEEDKEEPER_KEYCLOAK__PAGE_SIZE".into(), "5".into()));
    env.push(("SEEDKEEPER_KEYCLOAK__CONCURRENCY".into(), "8".into()));
    let engine = db.engine(&refs(&env));
    // A first run, without latency: the listing takes many windows.
    assert_ok(&apply(&engine).await);
    let tokens = |kc: &KeycloakEmulator| {
        kc.journal()
            .iter()
            .filter(|j| j.path.ends_with("/token") && j.status == 200)
            .count()
    };
    let listing = |j: &&crate::harness::keycloak::JournalEntry| {
        j.path.ends_with("/users") && j.query.contains("first=")
    };
    let windows = kc.journal().iter().filter(listing).count();
    assert!(windows > 16, "{windows} listing requests in a run");
    // The second run: every token is revoked while 8 or more requests of the listing are in
    // flight (each held 40 ms before it is answered): the first of them to be answered revokes
    // the token, and the others, sent with it, are refused.
    kc.clear_journal();
    kc.set_latency(std::time::Duration::from_millis(40));
    let revoke = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while kc.in_flight() < 8 {
            assert!(
                std::time::Instant::now() < deadline,
                "never 8 requests in flight"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        kc.invalidate_tokens_after(0);
    };
    let (r, ()) = tokio::join!(apply(&engine), revoke);
    assert_ok(&r);
    let refused = kc.journal().iter().filter(|j| j.status == 401).count();
    assert!(
        refused >= 2,
        "several windows were refused at once: {refused} 401s"
    );
    assert_eq!(
        tokens(&kc),
        2,
        "the preflight's token and one renewal, for {refused} refused requests"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_and_a_missing_realm_management_role_fail_clearly_and_write_nothing() {
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let db = TestDb::empty().await;
    let mut env = kc_env(&kc);
    env[3].1 = "wrong-secret".into();
    let mut full: Vec<(String, String)> = db.env();
    full.extend(env.clone());
    let out = run_bin(&["--once"], &full);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("unauthorized_client") && t.contains("keycloak.client_secret"),
        "{t}"
    );
    assert!(!t.contains("wrong-secret"));
    let tables: i64 = db
        .scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .await;
    assert_eq!(tables, 0, "nothing written");

    let mut realm = dev_realm();
    for u in realm["users"].as_array_mut().unwrap() {
        if u.get("serviceAccountClientId").is_some() {
            u["clientRoles"] = json!({"realm-management": ["query-users"]});
        }
    }
    kc.set_realm(realm);
    let r = apply(&db.engine(&refs(&kc_env(&kc)))).await;
    assert_eq!(r.outcome, seedkeeper::reconcile::Outcome::Failed);
    let error = r.error.as_ref().unwrap();
    let e = error.to_string();
    assert!(
        e.contains("lacks realm-management role") && e.contains("view-users"),
        "{e}"
    );
    assert_eq!(error.exit_code(), 78);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_realm_reimported_with_new_ids_realigns_rows_without_duplicates() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let realm = test_realm(vec![user(
        "d0000000-0000-4000-8000-000000000001",
        "alice",
        &["admin"],
        &[],
    )]);
    let env = realm_file_env(&dir, &realm);
    assert_ok(&apply(&db.engine(&refs(&env))).await);
    let c = db.client().await;
    let id_before: uuid::Uuid = c
        .query_one("SELECT id FROM users WHERE username = 'alice'", &[])
        .await
        .unwrap()
        .get(0);
    let text_realm = realm
        .to_string()
        .replace(
            "d0000000-0000-4000-8000-000000000001",
            "e0000000-0000-4000-8000-000000000001",
        )
        .replace("a1000000-", "a2000000-");
    let env = realm_file_env(&dir, &serde_json::from_str(&text_realm).unwrap());
    let r = apply(&db.engine(&refs(&env))).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "realigned"), 7);
    assert_eq!(count(&r, "identities", "inserted"), 0);
    let (id_after, sub): (uuid::Uuid, String) = c
        .query_one(
            "SELECT id, keycloak_sub FROM users WHERE username = 'alice'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (id_after, sub.as_str()),
        (id_before, "e0000000-0000-4000-8000-000000000001")
    );
    let n: i64 = db.scalar("SELECT count(*) FROM users").await;
    assert_eq!(n, 7);
    let active: i64 = db
        .scalar("SELECT count(*) FROM platform_role_bindings WHERE status = 'active'")
        .await;
    assert_eq!(active, 4, "bindings follow the re-aligned rows");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_username_clash_never_takes_over_the_row() {
    let db = TestDb::new().await;
    let engine = db.engine(&[]);
    assert_ok(&apply(&engine).await);
    let c = db.client().await;
    // A row created by someone else, no sub, same username as a new realm user.
    c.execute("INSERT INTO users (username, email, role) VALUES ('mallory', 'real-mallory@example.test', 'user')", &[]).await.unwrap();
    let dir = TempDir::new();
    let env = realm_file_env(
        &dir,
        &test_realm(vec![user(
            "f0000000-0000-4000-8000-000000000001",
            "mallory",
            &["admin"],
            &[],
        )]),
    );
    let r = apply(&db.engine(&refs(&env))).await;
    assert_eq!(
        r.outcome,
        seedkeeper::reconcile::Outcome::Failed,
        "the clash makes the run fail"
    );
    assert_eq!(
        r.error.as_ref().map(|e| e.kind()),
        Some(seedkeeper::error::ErrorKind::IdentityClash),
        "{:?}",
        r.error
    );
    assert_eq!(count(&r, "identities", "clashes"), 1);
    let (sub, email, role): (Option<String>, String, String) = c
        .query_one(
            "SELECT keycloak_sub, email, role FROM users WHERE username = 'mallory'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!(
        (sub, email.as_str(), role.as_str()),
        (None, "real-mallory@example.test", "user")
    );
    // the other personas are still in sync, and the findings say why
    let findings: Value = c
        .query_one("SELECT findings FROM seed_runs WHERE id = $1", &[&r.id])
        .await
        .unwrap()
        .get(0);
    assert!(findings.to_string().contains("user:mallory"), "{findings}");
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_the_admin_role_revokes_the_granted_binding_but_not_an_admin_api_binding() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let realm = test_realm(vec![user(
        "a3000000-0000-4000-8000-000000000001",
        "bob",
        &["admin"],
        &[],
    )]);
    assert_ok(&apply(&db.engine(&refs(&realm_file_env(&dir, &realm)))).await);
    let c = db.client().await;
    // An operator grants platform_ops to dev-user through the admin API.
    c.execute("INSERT INTO platform_role_bindings (user_id, role_name, status, granted_by) SELECT id, 'platform_ops', 'active', 'admin-api:ops@example' FROM users WHERE username = 'dev-user'", &[]).await.unwrap();
    let demoted = realm
        .to_string()
        .replace(r#""realmRoles":["admin"]"#, r#""realmRoles":[]"#);
    assert_ne!(demoted, realm.to_string());
    let r = apply(&db.engine(&refs(&realm_file_env(
        &dir,
        &serde_json::from_str(&demoted).unwrap(),
    ))))
    .await;
    assert_ok(&r);
    assert_eq!(count(&r, "role_bindings", "revoked"), 1);
    let (status, revoked_at_set, role): (String, bool, String) = c
        .query_one("SELECT b.status, b.revoked_at IS NOT NULL, u.role FROM platform_role_bindings b JOIN users u ON u.id = b.user_id WHERE u.username = 'bob'", &[])
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!(
        (status.as_str(), revoked_at_set, role.as_str()),
        ("revoked", true, "user")
    );
    let other: String = c.query_one("SELECT b.status FROM platform_role_bindings b JOIN users u ON u.id = b.user_id WHERE u.username = 'dev-user'", &[]).await.unwrap().get(0);
    assert_eq!(other, "active");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_user_becomes_inactive_and_unicode_quotes_and_long_values_are_stored_exactly() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let long = "x".repeat(255 - "@example.test".len());
    let names = [
        "zoë-ünïcødé",
        "o'brien\"; DROP TABLE users; --",
        "ｆｕｌｌｗｉｄｔｈ",
        &long,
    ];
    let mut users: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| user(&format!("a4000000-0000-4000-8000-{i:012}"), n, &[], &[]))
        .collect();
    users.push(json!({"id": "f:ldap-1:carol", "username": "carol", "enabled": false}));
    let realm = test_realm(users);
    let r = apply(&db.engine(&refs(&realm_file_env(&dir, &realm)))).await;
    assert_ok(&r);
    let c = db.client().await;
    for n in names {
        let (email,): (String,) = c
            .query_one(
                "SELECT email FROM users WHERE username = $1",
                &[&n.to_lowercase()],
            )
            .await
            .map(|r| (r.get(0),))
            .unwrap_or_else(|e| panic!("{n}: {e}"));
        assert_eq!(email, format!("{}@example.test", n).to_lowercase());
    }
    let active: bool = c
        .query_one(
            "SELECT is_active FROM users WHERE keycloak_sub = 'f:ldap-1:carol'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!active);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_realm_files_exit_78_naming_the_file_and_entry_and_write_nothing() {
    let dir = TempDir::new();
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad-json.json", "{\"realm\": \"dev\", \"users\": [".to_string(), "bad-json.json"),
        // A user without id is no longer refused (it is rejected alone, see realm_files.rs).
        ("dup-id.json", json!({"realm": "dev", "users": [{"id": "1", "username": "x"}, {"id": "1", "username": "y"}]}).to_string(), "users[1] (\"y\"): duplicate id \"1\""),
        ("no-username.json", json!({"realm": "dev", "users": [{"id": "1", "enabled": true}]}).to_string(), "users[0]: has no \"username\""),
        ("dup.json", json!({"realm": "dev", "users": [{"id": "1", "username": "a"}, {"id": "2", "username": "A"}]}).to_string(), "duplicate username"),
        ("types.json", json!({"realm": "dev", "users": [{"id": 5, "username": "a"}]}).to_string(), "users[0]"),
        ("deep.json", format!("{{\"realm\":\"dev\",\"users\":{}1{}}}", "[".repeat(5000), "]".repeat(5000)), "users[0]"),
        ("junk.json", "\u{1}junk".repeat(100_000), "not a realm export"),
    ];
    for (name, content, needle) in cases {
        let db = TestDb::empty().await;
        let path = dir.write(name, &content);
        let mut env = db.env();
        env.push((
            "SEEDKEEPER_IDENTITY__REALM_FILE".into(),
            path.display().to_string(),
        ));
        let out = run_bin(&["--once"], &env);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(78), "{name}: {t}");
        assert!(
            t.contains(name) && t.contains(needle),
            "{name}: expected {needle:?} in {t}"
        );
        if needle.contains("duplicate") {
            // Found over the identity stage, after the schema unit: the identities unit's
            // transaction is rolled back, so no user is written.
            assert_eq!(no_user_rows(&db).await, 0, "{name}: no user written");
            continue;
        }
        let tables: i64 = db
            .scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .await;
        assert_eq!(tables, 0, "{name}: nothing written");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn users_missing_from_the_source_are_reported_and_kept() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let realm = test_realm(vec![user(
        "a5000000-0000-4000-8000-000000000001",
        "leaver",
        &[],
        &[],
    )]);
    assert_ok(&apply(&db.engine(&refs(&realm_file_env(&dir, &realm)))).await);
    let r = apply(&db.engine(&[])).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "missing"), 1);
    let n: i64 = db
        .scalar("SELECT count(*) FROM users WHERE username = 'leaver'")
        .await;
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kc_export_dir_folder_yields_the_same_database_as_the_single_file() {
    let single = TestDb::new().await;
    assert_ok(&apply(&single.engine(&[])).await);

    // `kc.sh export --dir --users different_files --users-per-file 4`: the realm without its
    // users, then the users split over numbered files.
    let mut realm = dev_realm();
    let users = realm["users"].as_array().unwrap().clone();
    realm.as_object_mut().unwrap().remove("users");
    let dir = TempDir::new();
    dir.write("dev-realm.json", &realm.to_string());
    for (i, chunk) in users.chunks(4).enumerate() {
        dir.write(
            &format!("dev-users-{i}.json"),
            &json!({"realm": "dev", "users": chunk}).to_string(),
        );
    }
    dir.write("README.txt", "not json, ignored");
    let split = TestDb::new().await;
    let engine = split.engine(&[("SEEDKEEPER_IDENTITY__REALM_FILE", dir.0.to_str().unwrap())]);
    let r = apply(&engine).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "listed"), 6);
    assert_eq!(identity_state(&split).await, identity_state(&single).await);
    assert_eq!(dev_personas(&split).await, DEV_PERSONAS);

    // A duplicate across two users files is named with both files.
    dir.write(
        "dev-users-9.json",
        &json!({"realm": "dev", "users": [users[0].clone()]}).to_string(),
    );
    let out = run_bin(
        &["--once"],
        &[
            split.env(),
            vec![(
                "SEEDKEEPER_IDENTITY__REALM_FILE".to_string(),
                dir.0.display().to_string(),
            )],
        ]
        .concat(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(
        t.contains("duplicate id")
            && t.contains("dev-users-0.json")
            && t.contains("dev-users-9.json"),
        "{t}"
    );
}

/// The rows a sync creates get time-ordered ids (version 7), numbered in the order of their keys:
/// users in listing order, tenants by owner, projects by tenant. A second sync's rows sort after
/// the first's.
#[tokio::test]
async fn created_rows_get_time_ordered_ids_in_the_order_of_their_keys() {
    let db = TestDb::new().await;
    assert_ok(&apply(&db.engine(&[])).await);
    let c = db.client().await;
    // Rows made by hand keep their own ids; every row the sync created is v7.
    let versions: Vec<(String, String)> = c
        .query(
            "SELECT 'users', substr(id::text, 15, 1) FROM users WHERE keycloak_sub IS NOT NULL
             UNION SELECT 'tenants', substr(id::text, 15, 1) FROM tenants WHERE kind = 'personal'
             UNION SELECT 'projects', substr(id::text, 15, 1) FROM projects WHERE is_default
             ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: Vec<(String, String)> = ["projects", "tenants", "users"]
        .iter()
        .map(|t| (t.to_string(), "7".to_string()))
        .collect();
    assert_eq!(versions, want);
    // Numbered in key order: sorting tenants by owner sorts them by id too, and projects by
    // tenant sorts them by id.
    let in_order: (bool, bool) = {
        let r = c
            .query_one(
                "SELECT (SELECT array_agg(id ORDER BY owner_user_id) = array_agg(id ORDER BY id) FROM tenants),
                        (SELECT array_agg(id ORDER BY tenant_id) = array_agg(id ORDER BY id) FROM projects)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(in_order, (true, true));
    // A user added later gets an id after every existing one.
    let first_max: String = c
        .query_one(
            "SELECT id::text FROM users WHERE keycloak_sub IS NOT NULL ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut realm = dev_realm();
    realm["users"].as_array_mut().unwrap().push(json!({
        "id": "0c8f1f3e-0000-4000-8000-00000000abcd", "username": "late-joiner",
        "email": "late@example.test", "enabled": true, "realmRoles": []
    }));
    let dir = TempDir::new();
    let env = realm_file_env(&dir, &realm);
    assert_ok(&apply(&db.engine(&refs(&env))).await);
    let (late, after): (String, bool) = {
        let r = c
            .query_one(
                "SELECT id::text, id > $1::text::uuid FROM users WHERE username = 'late-joiner'",
                &[&first_max],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(after, "{late} should sort after {first_max}");
}
