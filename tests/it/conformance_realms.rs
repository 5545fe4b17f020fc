//! Issue 17: realms in shapes found among public realm exports, against the real Keycloak
//! (`harness::real_keycloak`, throwaway realms `sk-*`) and the emulator.
//!
//! Point 5, a realm behind a frontend URL: the realm attribute `frontendUrl` makes Keycloak
//! announce its issuer and endpoints on a public host (here `auth.invalid`, which never
//! resolves) while seedkeeper reaches it on `keycloak.base_url`. The realm is synced, and a
//! `keycloak.issuer` that does not match exits 78 at once, naming both URLs and the key, with
//! nothing written; the emulator announces the same document as Keycloak and passes the same
//! cases.
//!
//! Point 6, group paths: Keycloak imports users whose `groups` name a group without its leading
//! slash or with a trailing one, and gives the same database as the realm-file source.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::real_keycloak::*;
use crate::harness::*;
use crate::identities::{identity_state, kc_env, realm_file_env, refs};

/// A host that never resolves (RFC 6761): reaching anything there would fail the run.
const FRONTEND: &str = "https://auth.invalid";

/// The dev realm as a new realm `name` whose frontend URL is [`FRONTEND`].
fn frontend_realm(name: &str) -> Value {
    let (mut rep, _) = as_new_realm(&dev_realm(), name);
    rep["attributes"] = json!({"frontendUrl": FRONTEND});
    rep
}

fn with(mut env: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

async fn tables(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .await
}

/// `seedkeeper --once` on a blocking thread (an in-process emulator keeps serving meanwhile):
/// its exit code, its output and how long it took.
async fn once(env: Vec<(String, String)>) -> (Option<i32>, String, Duration) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = run_bin(&["--once"], &env);
        (out.status.code(), text(&out), started.elapsed())
    })
    .await
    .unwrap()
}

/// `--once` syncs the realm through `base_url` (exit 0), logs the announced issuer, and gives
/// the same database as the realm-file source reading the same realm; pinning the announced
/// issuer with `keycloak.issuer` changes nothing.
async fn synced_behind_the_frontend_url(rep: &Value, kc_env: Vec<(String, String)>) {
    let realm = rep["realm"].as_str().unwrap();
    let announced = format!("{FRONTEND}/realms/{realm}");
    let db = TestDb::empty().await;
    let (code, t, _) = once([db.env(), kc_env.clone()].concat()).await;
    assert_eq!(code, Some(0), "{t}");
    assert!(
        t.contains("keycloak.issuer") && t.contains(&announced),
        "the announced issuer is logged: {t}"
    );
    let users = db
        .strings("SELECT username FROM users ORDER BY username")
        .await;
    assert_eq!(users.len(), 6, "the six personas: {users:?}");

    let file_db = TestDb::new().await;
    let dir = TempDir::new();
    let file_env = with(
        realm_file_env(&dir, rep),
        &[("SEEDKEEPER_KEYCLOAK__REALM", realm)],
    );
    assert_ok(&apply(&file_db.engine(&refs(&file_env))).await);
    assert_eq!(identity_state(&db).await, identity_state(&file_db).await);

    let pinned = with(kc_env, &[("SEEDKEEPER_KEYCLOAK__ISSUER", &announced)]);
    let (code, t, _) = once([db.env(), pinned].concat()).await;
    assert_eq!(code, Some(0), "the pinned issuer matches: {t}");
}

/// A `keycloak.issuer` other than the one announced: exit 78 within 2 s (no waiting, no retry
/// as "unavailable"), both URLs and the key named, nothing written.
async fn a_wrong_pin_is_refused(realm: &str, kc_env: Vec<(String, String)>) {
    let announced = format!("{FRONTEND}/realms/{realm}");
    let wrong = format!("https://auth.example.com/realms/{realm}");
    let db = TestDb::empty().await;
    let env = with(kc_env, &[("SEEDKEEPER_KEYCLOAK__ISSUER", &wrong)]);
    let (code, t, took) = once([db.env(), env].concat()).await;
    assert_eq!(code, Some(78), "{t}");
    assert!(took < Duration::from_secs(2), "exited after {took:?}: {t}");
    for needle in [
        announced.as_str(),
        wrong.as_str(),
        "keycloak.issuer",
        "SEEDKEEPER_KEYCLOAK__ISSUER",
    ] {
        assert!(t.contains(needle), "{needle:?} missing from: {t}");
    }
    assert!(
        !t.contains("unavailable"),
        "not reported as unavailable: {t}"
    );
    assert_eq!(tables(&db).await, 0, "nothing written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_realm_behind_an_unresolvable_frontend_url_is_synced_through_base_url() {
    let kc = real_keycloak();
    // Keycloak keeps the users' ids of an imported representation: the realm-file source reads
    // the same subs from `rep`.
    let rep = frontend_realm(&realm_name("frontend"));
    let realm = kc.create_realm(rep.clone()).await;
    synced_behind_the_frontend_url(&rep, realm.env()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_keycloak_issuer_exits_78_within_2s_naming_both_urls_and_the_key() {
    let kc = real_keycloak();
    let realm = kc.create_realm(frontend_realm(&realm_name("pinned"))).await;
    a_wrong_pin_is_refused(&realm.name, realm.env()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn emulator_a_realm_behind_an_unresolvable_frontend_url_is_synced_through_base_url() {
    let rep = frontend_realm("sk-frontend-emulated");
    let kc = KeycloakEmulator::start(rep.clone()).await;
    synced_behind_the_frontend_url(&rep, kc_env(&kc)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn emulator_a_wrong_keycloak_issuer_exits_78_within_2s_naming_both_urls_and_the_key() {
    let kc = KeycloakEmulator::start(frontend_realm("sk-pinned-emulated")).await;
    a_wrong_pin_is_refused(&kc.realm_name(), kc_env(&kc)).await;
}

/// The emulator announces what Keycloak announces for a realm with a frontend URL: the issuer
/// and every endpoint on the frontend host, and that issuer in the token's `iss`.
#[tokio::test(flavor = "multi_thread")]
async fn the_emulator_announces_a_frontend_url_as_keycloak_does() {
    let kc = real_keycloak();
    let rep = frontend_realm(&realm_name("frontend-doc"));
    let realm = kc.create_realm(rep.clone()).await;
    let emulator = KeycloakEmulator::start(rep).await;
    let http = reqwest::Client::new();
    let mut seen = Vec::new();
    for base in [kc.base_url(), emulator.base_url()] {
        let doc: Value = http
            .get(format!(
                "{base}/realms/{}/.well-known/openid-configuration",
                realm.name
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token: Value = http
            .post(format!(
                "{base}/realms/{}/protocol/openid-connect/token",
                realm.name
            ))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "seedkeeper"),
                ("client_secret", CLIENT_SECRET),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let payload = token["access_token"]
            .as_str()
            .and_then(|t| t.split('.').nth(1))
            .expect("a JWT");
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload.trim_end_matches('='))
                .unwrap(),
        )
        .unwrap();
        seen.push(json!({
            "issuer": doc["issuer"],
            "token_endpoint": doc["token_endpoint"],
            "jwks_uri": doc["jwks_uri"],
            "iss": claims["iss"],
        }));
    }
    let issuer = format!("{FRONTEND}/realms/{}", realm.name);
    assert_eq!(seen[0]["issuer"], json!(issuer), "Keycloak: {}", seen[0]);
    assert_eq!(seen[0]["iss"], json!(issuer), "Keycloak: {}", seen[0]);
    assert_eq!(seen[0], seen[1], "Keycloak, then the emulator");
}

/// Keycloak's import resolves `"Admin"`, `"Admin/"` and `"Admin/Ops/"` to `/Admin` and
/// `/Admin/Ops`; the realm-file source reads the same file to the same database.
#[tokio::test(flavor = "multi_thread")]
async fn group_paths_without_leading_or_with_trailing_slash_import_as_the_realm_file_reads_them() {
    let kc = real_keycloak();
    let (mut rep, _) = as_new_realm(&dev_realm(), &realm_name("group-paths"));
    rep["groups"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "Admin", "path": "/Admin",
        "realmRoles": ["admin"], "subGroups": [{"name": "Ops", "path": "/Admin/Ops",
        "realmRoles": ["ops"], "subGroups": []}]}));
    let spellings = crate::realm_files::GROUP_PATH_SPELLINGS;
    for (name, group) in spellings {
        rep["users"].as_array_mut().unwrap().push(json!({
            "id": uuid::Uuid::new_v4().to_string(), "username": name, "enabled": true,
            "email": format!("{name}@example.test"), "groups": [group]}));
    }
    let realm = kc.create_realm(rep.clone()).await;
    // Keycloak itself puts every spelling in the canonical group.
    for (name, group) in spellings {
        let id = realm.user_id(name).await;
        let groups = realm.get(&format!("/users/{id}/groups")).await;
        let want = format!("/{}", group.trim_matches('/'));
        assert_eq!(groups[0]["path"], json!(want), "{name}: {groups}");
    }

    let kc_db = TestDb::new().await;
    assert_ok(&apply(&kc_db.engine(&refs(&realm.env()))).await);
    let file_db = TestDb::new().await;
    let dir = TempDir::new();
    let file_env = with(
        realm_file_env(&dir, &rep),
        &[("SEEDKEEPER_KEYCLOAK__REALM", &realm.name)],
    );
    assert_ok(&apply(&file_db.engine(&refs(&file_env))).await);
    let state = identity_state(&kc_db).await;
    assert_eq!(state, identity_state(&file_db).await);
    for name in ["bare-ops", "trailing-ops"] {
        for role in ["platform_ops", "platform_superadmin"] {
            let want = format!("binding {name} {role} active seedkeeper");
            assert!(state.contains(&want), "{want}: {state:#?}");
        }
    }
}

/// `keycloak.issuer` must be an http(s) URL; anything else is refused when the configuration
/// is loaded, naming the key.
#[tokio::test(flavor = "multi_thread")]
async fn a_keycloak_issuer_that_is_not_an_http_url_is_refused_naming_the_key() {
    let env: Vec<(String, String)> = [
        ("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
        ("SEEDKEEPER_KEYCLOAK__BASE_URL", "http://keycloak:8080"),
        ("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "x"),
        ("SEEDKEEPER_KEYCLOAK__ISSUER", "auth.example.com/realms/dev"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (code, t) = tokio::task::spawn_blocking(move || {
        let out = run_bin(&["config"], &env);
        (out.status.code(), text(&out))
    })
    .await
    .unwrap();
    assert_eq!(code, Some(78), "{t}");
    assert!(
        t.contains("keycloak.issuer") && t.contains("SEEDKEEPER_KEYCLOAK__ISSUER"),
        "{t}"
    );
}
