//! The Keycloak emulator behaves like Keycloak 26 where seedkeeper depends on it: each test is one
//! of the fidelity details of `shared/keycloak/SUMMARY.md`, asserted on the wire with a plain
//! HTTP client, so a drift of the emulator from Keycloak fails here and not in a seedkeeper test.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::harness::dev_realm;
use crate::harness::keycloak::{KeycloakEmulator, Release};

const SECRET: &str = "seedkeeper-dev-secret";

async fn post_token(kc: &KeycloakEmulator, form: &[(&str, &str)]) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!(
            "{}/realms/dev/protocol/openid-connect/token",
            kc.base_url()
        ))
        .form(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn token(kc: &KeycloakEmulator) -> String {
    let (s, v) = post_token(
        kc,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "seedkeeper"),
            ("client_secret", SECRET),
        ],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["access_token"].as_str().unwrap().to_string()
}

async fn admin_get(kc: &KeycloakEmulator, bearer: Option<&str>, path: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{}/admin/realms/dev/{path}", kc.base_url()));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn get_json(url: String) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

fn jwt_part(token: &str, i: usize) -> Value {
    let part = token.split('.').nth(i).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn token_responses_and_errors_have_keycloaks_shape() {
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let (s, v) = post_token(
        &kc,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "seedkeeper"),
            ("client_secret", SECRET),
        ],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 300);
    assert_eq!(v["refresh_expires_in"], 0);
    assert_eq!(v["not-before-policy"], 0);
    assert!(v.get("refresh_token").is_none() && v.get("id_token").is_none());

    // HTTP Basic works too, with only grant_type in the body.
    let basic = reqwest::Client::new()
        .post(format!(
            "{}/realms/dev/protocol/openid-connect/token",
            kc.base_url()
        ))
        .basic_auth("seedkeeper", Some(SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status().as_u16(), 200);

    for (form, status, error, description) in [
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", "seedkeeper"),
                ("client_secret", "wrong"),
            ],
            401,
            "unauthorized_client",
            "Invalid client or Invalid client credentials",
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", "nobody"),
                ("client_secret", "x"),
            ],
            401,
            "invalid_client",
            "Invalid client or Invalid client credentials",
        ),
        (
            vec![("grant_type", "client_credentials")],
            401,
            "invalid_client",
            "Invalid client or Invalid client credentials",
        ),
    ] {
        let (s, v) = post_token(&kc, &form).await;
        assert_eq!(
            (s, v),
            (
                status,
                json!({"error": error, "error_description": description})
            )
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_carry_keycloaks_claims_and_verify_against_the_published_key() {
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let t = token(&kc).await;
    let header = jwt_part(&t, 0);
    let claims = jwt_part(&t, 1);
    assert_eq!(header["alg"], "RS256");
    let kid = header["kid"].as_str().unwrap();
    let certs = get_json(format!(
        "{}/realms/dev/protocol/openid-connect/certs",
        kc.base_url()
    ))
    .await;
    assert!(certs["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["kid"] == kid));
    assert_eq!(claims["iss"], format!("{}/realms/dev", kc.base_url()));
    assert_eq!(claims["typ"], "Bearer");
    assert_eq!(claims["azp"], "seedkeeper");
    assert_eq!(claims["preferred_username"], "service-account-seedkeeper");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300
    );
    assert!(claims.get("sid").is_none());
    let realm_roles: Vec<&str> = claims["realm_access"]["roles"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        realm_roles.contains(&"default-roles-dev"),
        "{realm_roles:?}"
    );
    let mgmt: Vec<&str> = claims["resource_access"]["realm-management"]["roles"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // view-users is a composite of query-users and query-groups: effective roles are listed.
    for r in ["view-users", "view-realm", "query-users", "query-groups"] {
        assert!(mgmt.contains(&r), "{r} in {mgmt:?}");
    }
    // The claims of a service-account token recorded from a real Keycloak 26 (SUMMARY.md §8),
    // less those that come from client settings the dev realm does not use.
    for key in [
        "exp",
        "iat",
        "jti",
        "iss",
        "aud",
        "sub",
        "typ",
        "azp",
        "realm_access",
        "resource_access",
        "scope",
        "clientHost",
        "preferred_username",
        "clientAddress",
        "client_id",
    ] {
        assert!(claims.get(key).is_some(), "claim {key} missing");
    }
}

/// Keycloak 26.5 and 26.7 answer some requests differently from 26.4 (found by `emulator_vs_real`
/// against 26.4.7, 26.5.6 and 26.7.3); the emulator answers as any of them.
#[tokio::test(flavor = "multi_thread")]
async fn each_release_profile_answers_the_users_listing_and_role_members_as_that_release() {
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let t = token(&kc).await;
    let fields = |v: &Value, k: &str| v[0].get(k).is_some();
    for release in Release::ALL {
        kc.set_release(release);
        let (v26_4, v26_7) = (release == Release::V26_4, release == Release::V26_7);
        // 26.4 ignores briefRepresentation on the listing; 26.5 and 26.7 honour it.
        let (_, brief) = admin_get(&kc, Some(&t), "users?max=1&briefRepresentation=true").await;
        assert_eq!(fields(&brief, "requiredActions"), v26_4, "{release:?}");
        assert_eq!(fields(&brief, "userProfileMetadata"), v26_4, "{release:?}");
        assert!(fields(&brief, "access"), "{release:?}");
        assert_eq!(
            fields(&brief, "createdTimestamp"),
            !v26_4,
            "{release:?}: stamped on import"
        );
        // In full, 26.4 and 26.5 list the profile's metadata; 26.7 does not.
        let (_, full) = admin_get(&kc, Some(&t), "users?max=1").await;
        assert!(fields(&full, "requiredActions"), "{release:?}");
        assert_eq!(fields(&full, "userProfileMetadata"), !v26_7, "{release:?}");
        let id = full[0]["id"].as_str().unwrap().to_string();
        let (_, one) = admin_get(&kc, Some(&t), &format!("users/{id}")).await;
        assert!(one.get("userProfileMetadata").is_some(), "{release:?}");
        // Only 26.7's role members carry `access`.
        let (_, members) =
            admin_get(&kc, Some(&t), "roles/admin/users?briefRepresentation=true").await;
        assert_eq!(fields(&members, "access"), v26_7, "{release:?}");
        assert!(!fields(&members, "requiredActions"), "{release:?}");
    }
    assert_eq!(Release::of("26.4.0"), Release::V26_4);
    assert_eq!(Release::of("26.4.7"), Release::V26_4);
    assert_eq!(Release::of("26.5.6"), Release::V26_5);
    assert_eq!(Release::of("26.7.3"), Release::V26_7);
    assert_eq!(Release::of("25.0.6"), Release::V26_4);
    assert_eq!(Release::of("27.0.0"), Release::V26_7);
}

/// `GET /admin/serverinfo` as a realm's service account gets it: the profile's version with
/// manage-realm from 26.5 on (never on 26.4), no version with seedkeeper's view roles, 403 without realm-management roles,
/// 401 without a token.
#[tokio::test(flavor = "multi_thread")]
async fn serverinfo_answers_the_profiles_version_to_manage_realm_from_26_5() {
    let mut realm = dev_realm();
    realm["users"].as_array_mut().unwrap().extend([
        json!({"id": "00000000-0000-4000-8000-00000000f001", "username": "service-account-manager", "enabled": true,
            "serviceAccountClientId": "manager", "clientRoles": {"realm-management": ["manage-realm"]}}),
        json!({"id": "00000000-0000-4000-8000-00000000f002", "username": "service-account-nothing", "enabled": true,
            "serviceAccountClientId": "nothing"}),
    ]);
    for c in ["manager", "nothing"] {
        realm["clients"]
            .as_array_mut()
            .unwrap()
            .push(json!({"clientId": c, "enabled": true,
            "publicClient": false, "secret": "s", "serviceAccountsEnabled": true}));
    }
    let kc = KeycloakEmulator::start(realm).await;
    let http = reqwest::Client::new();
    let bearer = |client: &'static str, secret: &'static str| {
        let (http, base) = (http.clone(), kc.base_url());
        async move {
            let v: Value = http
                .post(format!("{base}/realms/dev/protocol/openid-connect/token"))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client),
                    ("client_secret", secret),
                ])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["access_token"].as_str().unwrap().to_string()
        }
    };
    let info = |t: Option<String>| {
        let (http, base) = (http.clone(), kc.base_url());
        async move {
            let mut req = http.get(format!("{base}/admin/serverinfo"));
            if let Some(t) = t {
                req = req.bearer_auth(t);
            }
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let manager = bearer("manager", "s").await;
    for release in Release::ALL {
        kc.set_release(release);
        let (status, body) = info(Some(manager.clone())).await;
        assert_eq!(status, 200);
        if release == Release::V26_4 {
            // 26.4 shows it to no realm service account, not even realm-admin.
            assert!(body.get("systemInfo").is_none(), "{body}");
        } else {
            assert_eq!(
                body["systemInfo"]["version"],
                release.version(),
                "{release:?}"
            );
        }
    }
    let (status, body) = info(Some(bearer("seedkeeper", "seedkeeper-dev-secret").await)).await;
    assert_eq!(status, 200);
    assert!(body.get("systemInfo").is_none(), "{body}");
    assert_eq!(
        info(Some(bearer("nothing", "s").await)).await,
        (403, json!({"error": "HTTP 403 Forbidden"}))
    );
    assert_eq!(info(None).await.0, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn users_are_paged_by_lower_cased_username_without_service_accounts() {
    let mut realm = dev_realm();
    for (i, name) in ["Zed", "amy", "Bob", "carl"].iter().enumerate() {
        realm["users"].as_array_mut().unwrap().push(json!({
            "id": format!("b0000000-0000-4000-8000-00000000000{i}"), "username": name, "enabled": true
        }));
    }
    let kc = KeycloakEmulator::start(realm).await;
    let t = token(&kc).await;
    let mut names = Vec::new();
    let mut first = 0;
    loop {
        let (s, page) = admin_get(
            &kc,
            Some(&t),
            &format!("users?first={first}&max=3&briefRepresentation=true"),
        )
        .await;
        assert_eq!(s, 200);
        let page = page.as_array().unwrap().clone();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        for u in &page {
            // Keycloak 26.4 ignores briefRepresentation on the users listing.
            assert!(u["requiredActions"].is_array() && u["userProfileMetadata"].is_object());
            // The dev realm's users were imported without createdTimestamp: Keycloak keeps none.
            assert!(u.get("createdTimestamp").is_none());
            names.push(u["username"].as_str().unwrap().to_string());
        }
        first += 3;
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "ordered by lower-cased username");
    assert!(
        names.contains(&"zed".to_string()),
        "usernames are lower-cased on import"
    );
    assert!(!names.iter().any(|n| n.starts_with("service-account-")));
    let (_, count) = admin_get(&kc, Some(&t), "users/count").await;
    assert_eq!(count, json!(names.len()));
    let (_, full) = admin_get(&kc, Some(&t), "users?first=0&max=1").await;
    assert!(full[0].get("requiredActions").is_some() && full[0].get("access").is_some());
    // Default page size is 100.
    let (_, default_page) = admin_get(&kc, Some(&t), "users").await;
    assert_eq!(default_page.as_array().unwrap().len(), names.len().min(100));
}

#[tokio::test(flavor = "multi_thread")]
async fn role_members_are_direct_only_and_errors_have_keycloaks_bodies() {
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let t = token(&kc).await;
    // dev-platform-admin holds platform-admin through the /platform-admins group only.
    let (s, direct) = admin_get(&kc, Some(&t), "roles/platform-admin/users").await;
    assert_eq!(s, 200);
    assert!(!direct
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["username"] == "dev-platform-admin"));
    let (_, admins) = admin_get(&kc, Some(&t), "roles/admin/users").await;
    assert!(admins
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["username"] == "dev-admin"));

    assert_eq!(
        admin_get(&kc, None, "users").await,
        (401, json!({"error": "HTTP 401 Unauthorized"}))
    );
    assert_eq!(
        admin_get(&kc, Some("not-a-token"), "users").await,
        (401, json!({"error": "HTTP 401 Unauthorized"}))
    );
    assert_eq!(
        admin_get(&kc, Some(&t), "roles/no-such-role/users").await,
        (404, json!({"error": "Could not find role"}))
    );
    let r = reqwest::Client::new()
        .get(format!("{}/admin/realms/elsewhere/users", kc.base_url()))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "Realm not found."})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn query_users_alone_lists_nothing_and_no_management_role_is_forbidden() {
    let set_roles = |roles: Value| {
        let mut realm = dev_realm();
        for u in realm["users"].as_array_mut().unwrap() {
            if u.get("serviceAccountClientId").is_some() {
                u["clientRoles"] = json!({ "realm-management": roles.clone() });
            }
        }
        realm
    };
    let kc = KeycloakEmulator::start(set_roles(json!(["query-users"]))).await;
    let t = token(&kc).await;
    assert_eq!(admin_get(&kc, Some(&t), "users").await, (200, json!([])));
    kc.set_realm(set_roles(json!([])));
    let t = token(&kc).await;
    assert_eq!(
        admin_get(&kc, Some(&t), "users").await,
        (403, json!({"error": "HTTP 403 Forbidden"}))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_points_at_the_realms_endpoints() {
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let d = get_json(format!(
        "{}/realms/dev/.well-known/openid-configuration",
        kc.base_url()
    ))
    .await;
    let iss = format!("{}/realms/dev", kc.base_url());
    assert_eq!(d["issuer"], iss);
    assert_eq!(
        d["token_endpoint"],
        format!("{iss}/protocol/openid-connect/token")
    );
    assert_eq!(
        d["jwks_uri"],
        format!("{iss}/protocol/openid-connect/certs")
    );
    let r = reqwest::get(format!(
        "{}/realms/nope/.well-known/openid-configuration",
        kc.base_url()
    ))
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}
