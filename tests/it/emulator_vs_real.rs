//! Issue 10: the emulator is held to the real Keycloak. The same realm is loaded into both, the
//! same requests go to both, and the answers must agree: status codes, JSON field names and
//! types, paging, and error bodies word for word. Values that are each server's own (ids that
//! Keycloak generates, timestamps, signatures, base URLs) are compared by shape only.

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::real_keycloak::*;
use crate::harness::*;

/// How two answers to one request must agree.
#[derive(Clone, Copy)]
enum Agree {
    /// Same status, same body.
    Exactly,
    /// Same status, same field names and JSON types, recursively.
    InShape,
    /// Same status; arrays of objects with the same `key` values in the same order, each
    /// element of the same shape.
    InOrder(&'static str),
    /// As `InOrder`, but the order is unspecified.
    AsSet(&'static str),
    /// Same status; every field the emulator serves exists in Keycloak's answer with the same
    /// type (Keycloak serves more, which seedkeeper does not read).
    Subset,
}

struct Side {
    base: String,
    http: reqwest::Client,
}

impl Side {
    async fn token(&self, realm: &str, form: &[(&str, &str)]) -> (u16, Value) {
        let res = self
            .http
            .post(format!(
                "{}/realms/{realm}/protocol/openid-connect/token",
                self.base
            ))
            .form(form)
            .send()
            .await
            .expect("token request");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn bearer(&self, realm: &str, client: &str) -> String {
        let (s, b) = self
            .token(
                realm,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", client),
                    ("client_secret", CLIENT_SECRET),
                ],
            )
            .await;
        assert_eq!(s, 200, "{client} token at {}: {b}", self.base);
        b["access_token"].as_str().unwrap().to_string()
    }

    async fn get(&self, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let mut req = self
            .http
            .request(Method::GET, format!("{}{path}", self.base));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(if text.is_empty() {
                Value::Null
            } else {
                Value::String(text)
            }),
        )
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Differences in field names and types between `real` and `emu`, each named by its path.
fn shape_diff(at: &str, real: &Value, emu: &Value, subset: bool, out: &mut Vec<String>) {
    match (real, emu) {
        (Value::Object(r), Value::Object(e)) => {
            for (k, ev) in e {
                match r.get(k) {
                    Some(rv) => shape_diff(&format!("{at}.{k}"), rv, ev, subset, out),
                    None => out.push(format!("{at}.{k}: served by the emulator, not by Keycloak")),
                }
            }
            if !subset {
                for k in r.keys().filter(|k| !e.contains_key(*k)) {
                    out.push(format!(
                        "{at}.{k}: served by Keycloak, missing from the emulator"
                    ));
                }
            }
        }
        (Value::Array(r), Value::Array(e)) => {
            if !subset && r.len() != e.len() {
                out.push(format!(
                    "{at}: Keycloak gave {} items, the emulator {}",
                    r.len(),
                    e.len()
                ));
            }
            for (i, (rv, ev)) in r.iter().zip(e).enumerate() {
                shape_diff(&format!("{at}[{i}]"), rv, ev, subset, out);
            }
        }
        (r, e) if type_name(r) != type_name(e) => out.push(format!(
            "{at}: Keycloak gave a {} ({r}), the emulator a {} ({e})",
            type_name(r),
            type_name(e)
        )),
        _ => {}
    }
}

fn keys_of(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x[key].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn compare(what: &str, how: Agree, real: &(u16, Value), emu: &(u16, Value), out: &mut Vec<String>) {
    if real.0 != emu.0 {
        out.push(format!(
            "{what}: status {} from Keycloak, {} from the emulator ({} / {})",
            real.0, emu.0, real.1, emu.1
        ));
        return;
    }
    let mut diffs = Vec::new();
    match how {
        Agree::Exactly => {
            if real.1 != emu.1 {
                diffs.push(format!(
                    "body {} from Keycloak, {} from the emulator",
                    real.1, emu.1
                ));
            }
        }
        Agree::InShape => shape_diff("", &real.1, &emu.1, false, &mut diffs),
        Agree::Subset => shape_diff("", &real.1, &emu.1, true, &mut diffs),
        Agree::InOrder(key) | Agree::AsSet(key) => {
            let (mut r, mut e) = (keys_of(&real.1, key), keys_of(&emu.1, key));
            let (mut rv, mut ev) = (
                real.1.as_array().cloned().unwrap_or_default(),
                emu.1.as_array().cloned().unwrap_or_default(),
            );
            if matches!(how, Agree::AsSet(_)) {
                r.sort();
                e.sort();
                rv.sort_by_key(|x| x[key].to_string());
                ev.sort_by_key(|x| x[key].to_string());
            }
            if r != e {
                diffs.push(format!(
                    "{key}s {r:?} from Keycloak, {e:?} from the emulator"
                ));
            }
            shape_diff("", &Value::Array(rv), &Value::Array(ev), false, &mut diffs);
        }
    }
    out.extend(diffs.into_iter().map(|d| format!("{what}: {d}")));
}

/// The dev realm plus what the comparison needs: a composite, a group holding a role with a
/// subgroup, more users than one small page, a user without email, a disabled one, a client
/// without service accounts and one whose service account may only query users.
fn realm_for_both(name: &str) -> Value {
    let (mut rep, _) = as_new_realm(&dev_realm(), name);
    rep["roles"]["realm"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "super", "composite": true, "composites": {"realm": ["admin"]}}));
    rep["groups"].as_array_mut().unwrap().push(json!({"name": "admins", "path": "/admins", "realmRoles": ["admin"],
        "subGroups": [{"name": "emea", "path": "/admins/emea", "realmRoles": [], "subGroups": []}]}));
    let users = rep["users"].as_array_mut().unwrap();
    for i in 0..7 {
        let mut u = json!({"id": uuid::Uuid::new_v4().to_string(), "username": format!("Extra{i}"),
            "enabled": i != 3, "firstName": "Extra", "lastName": format!("N{i}"), "createdTimestamp": 1700000000000i64 + i,
            "realmRoles": ["default-roles-dev"]});
        if i != 2 {
            u["email"] = json!(format!("extra{i}@example.test"));
            u["emailVerified"] = json!(i % 2 == 0);
        }
        if i == 4 {
            u["groups"] = json!(["/admins/emea"]);
        }
        if i == 5 {
            u["realmRoles"] = json!(["default-roles-dev", "super"]);
        }
        users.push(u);
    }
    users.push(json!({"id": uuid::Uuid::new_v4().to_string(), "username": "service-account-query-only", "enabled": true,
        "serviceAccountClientId": "query-only", "realmRoles": ["default-roles-dev"],
        "clientRoles": {"realm-management": ["query-users"]}}));
    users.push(json!({"id": uuid::Uuid::new_v4().to_string(), "username": "service-account-no-roles", "enabled": true,
        "serviceAccountClientId": "no-roles", "realmRoles": ["default-roles-dev"]}));
    rep["clients"].as_array_mut().unwrap().extend([
        json!({"clientId": "no-roles", "enabled": true, "publicClient": false, "secret": CLIENT_SECRET,
               "serviceAccountsEnabled": true, "standardFlowEnabled": false}),
        json!({"clientId": "no-sa", "enabled": true, "publicClient": false, "secret": CLIENT_SECRET,
               "serviceAccountsEnabled": false, "standardFlowEnabled": false}),
        json!({"clientId": "query-only", "enabled": true, "publicClient": false, "secret": CLIENT_SECRET,
               "serviceAccountsEnabled": true, "standardFlowEnabled": false}),
    ]);
    rep
}

#[tokio::test(flavor = "multi_thread")]
async fn the_emulator_answers_the_same_requests_as_the_real_keycloak() {
    let kc = real_keycloak();
    let name = realm_name("emu");
    let rep = realm_for_both(&name);
    let _realm = kc.create_realm(rep.clone()).await;
    let emulator = KeycloakEmulator::start(rep).await;
    let http = reqwest::Client::new();
    let real = Side {
        base: kc.base_url(),
        http: http.clone(),
    };
    let emu = Side {
        base: emulator.base_url(),
        http,
    };
    let mut diffs: Vec<String> = Vec::new();
    let r = &name;

    // Discovery: the emulator serves the fields seedkeeper needs, as Keycloak types them.
    let path = format!("/realms/{r}/.well-known/openid-configuration");
    let (rd, ed) = (real.get(&path, None).await, emu.get(&path, None).await);
    compare("discovery", Agree::Subset, &rd, &ed, &mut diffs);
    for field in ["issuer", "token_endpoint", "jwks_uri"] {
        let strip = |v: &Value, base: &str| v[field].as_str().unwrap_or("").replacen(base, "", 1);
        if strip(&rd.1, &real.base) != strip(&ed.1, &emu.base) {
            diffs.push(format!(
                "discovery.{field}: {} vs {}",
                rd.1[field], ed.1[field]
            ));
        }
    }
    let path = "/realms/no-such-realm/.well-known/openid-configuration";
    compare(
        "discovery of an unknown realm",
        Agree::Exactly,
        &real.get(path, None).await,
        &emu.get(path, None).await,
        &mut diffs,
    );

    // The token endpoint, its answer and its refusals.
    let cc = |client: &'static str, secret: &'static str| {
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", client),
            ("client_secret", secret),
        ]
    };
    type Form<'a> = Vec<(&'a str, &'a str)>;
    let token_cases: Vec<(&str, Form, Agree)> = vec![
        ("token", cc("seedkeeper", CLIENT_SECRET), Agree::InShape),
        (
            "token with a wrong secret",
            cc("seedkeeper", "wrong"),
            Agree::Exactly,
        ),
        (
            "token of an unknown client",
            cc("nobody", "wrong"),
            Agree::Exactly,
        ),
        (
            "token of a client without service accounts",
            cc("no-sa", CLIENT_SECRET),
            Agree::Exactly,
        ),
        (
            "token without client_id",
            vec![("grant_type", "client_credentials")],
            Agree::Exactly,
        ),
        (
            "token without grant_type",
            vec![
                ("client_id", "seedkeeper"),
                ("client_secret", CLIENT_SECRET),
            ],
            Agree::Exactly,
        ),
    ];
    for (what, form, how) in token_cases {
        compare(
            what,
            how,
            &real.token(r, &form).await,
            &emu.token(r, &form).await,
            &mut diffs,
        );
    }

    // The admin endpoints seedkeeper reads, with the service account's token of each side.
    let (rt, et) = (
        real.bearer(r, "seedkeeper").await,
        emu.bearer(r, "seedkeeper").await,
    );
    // Group ids are each server's own: find /admins through each side's listing.
    let group_id = |side: &Side, token: String| {
        let url = format!(
            "{}/admin/realms/{r}/roles/admin/groups?briefRepresentation=true",
            side.base
        );
        let http = side.http.clone();
        async move {
            let groups: Value = http
                .get(&url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            groups
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["name"] == "admins")
                .and_then(|g| g["id"].as_str())
                .unwrap_or_else(|| panic!("no /admins group at {url}: {groups}"))
                .to_string()
        }
    };
    let (rg, eg) = (
        group_id(&real, rt.clone()).await,
        group_id(&emu, et.clone()).await,
    );
    let admin_cases: Vec<(String, String, Agree)> = vec![
        (
            "users, first page of 4".into(),
            "users?first=0&max=4&briefRepresentation=true".into(),
            Agree::InOrder("username"),
        ),
        (
            "users, second page of 4".into(),
            "users?first=4&max=4&briefRepresentation=true".into(),
            Agree::InOrder("username"),
        ),
        (
            "users, the last page".into(),
            "users?first=12&max=4&briefRepresentation=true".into(),
            Agree::InOrder("username"),
        ),
        (
            "users, past the end".into(),
            "users?first=100&max=4&briefRepresentation=true".into(),
            Agree::Exactly,
        ),
        (
            "users, full representation".into(),
            "users?first=0&max=3&briefRepresentation=false".into(),
            Agree::InOrder("username"),
        ),
        ("users/count".into(), "users/count".into(), Agree::Exactly),
        (
            "roles".into(),
            "roles?first=0&max=100&briefRepresentation=true".into(),
            Agree::AsSet("name"),
        ),
        (
            "composites of super".into(),
            "roles/super/composites/realm".into(),
            Agree::AsSet("name"),
        ),
        (
            "direct members of admin".into(),
            "roles/admin/users?first=0&max=100&briefRepresentation=true".into(),
            Agree::AsSet("username"),
        ),
        (
            "groups holding admin".into(),
            "roles/admin/groups?first=0&max=100&briefRepresentation=true".into(),
            Agree::AsSet("name"),
        ),
        (
            "members of an unknown role".into(),
            "roles/no-such-role/users?first=0&max=100".into(),
            Agree::Exactly,
        ),
        (
            "users of an unknown realm".into(),
            "../no-such-realm/users?first=0&max=4".into(),
            Agree::Exactly,
        ),
    ];
    let mut cases = admin_cases;
    cases.push((
        "children of /admins".into(),
        "groups/{G}/children?first=0&max=100&briefRepresentation=true".to_string(),
        Agree::AsSet("name"),
    ));
    cases.push((
        "members of /admins".into(),
        "groups/{G}/members?first=0&max=100&briefRepresentation=true".to_string(),
        Agree::AsSet("username"),
    ));
    for (what, rel, how) in &cases {
        let rp = format!("/admin/realms/{r}/{}", rel.replace("{G}", &rg));
        let ep = format!("/admin/realms/{r}/{}", rel.replace("{G}", &eg));
        compare(
            what,
            *how,
            &real.get(&rp, Some(&rt)).await,
            &emu.get(&ep, Some(&et)).await,
            &mut diffs,
        );
    }
    // The subgroup's members, found through each side's own children listing.
    let sub = |side: &Side, token: String, gid: String| {
        let url = format!(
            "{}/admin/realms/{r}/groups/{gid}/children?briefRepresentation=true",
            side.base
        );
        let http = side.http.clone();
        async move {
            let c: Value = http
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            c[0]["id"].as_str().unwrap_or("").to_string()
        }
    };
    let (rs, es) = (
        sub(&real, rt.clone(), rg.clone()).await,
        sub(&emu, et.clone(), eg.clone()).await,
    );
    compare(
        "members of /admins/emea",
        Agree::AsSet("username"),
        &real.get(&format!("/admin/realms/{r}/groups/{rs}/members?first=0&max=100&briefRepresentation=true"), Some(&rt)).await,
        &emu.get(&format!("/admin/realms/{r}/groups/{es}/members?first=0&max=100&briefRepresentation=true"), Some(&et)).await,
        &mut diffs,
    );

    // Refusals: no token, a forged token, a token that may only query users.
    let users = format!("/admin/realms/{r}/users?first=0&max=4");
    compare(
        "users without a token",
        Agree::Exactly,
        &real.get(&users, None).await,
        &emu.get(&users, None).await,
        &mut diffs,
    );
    compare(
        "users with a forged token",
        Agree::Exactly,
        &real.get(&users, Some("not.a.token")).await,
        &emu.get(&users, Some("not.a.token")).await,
        &mut diffs,
    );
    let (rq, eq) = (
        real.bearer(r, "query-only").await,
        emu.bearer(r, "query-only").await,
    );
    compare(
        "users with query-users only",
        Agree::Exactly,
        &real.get(&users, Some(&rq)).await,
        &emu.get(&users, Some(&eq)).await,
        &mut diffs,
    );
    let (rn, en) = (
        real.bearer(r, "no-roles").await,
        emu.bearer(r, "no-roles").await,
    );
    for what in [
        "users?first=0&max=4",
        "users/count",
        "roles",
        "roles/admin/users",
    ] {
        let path = format!("/admin/realms/{r}/{what}");
        compare(
            &format!("{what} without realm-management roles"),
            Agree::Exactly,
            &real.get(&path, Some(&rn)).await,
            &emu.get(&path, Some(&en)).await,
            &mut diffs,
        );
    }
    let members = format!("/admin/realms/{r}/roles/admin/users?first=0&max=4");
    compare(
        "role members with query-users only",
        Agree::Exactly,
        &real.get(&members, Some(&rq)).await,
        &emu.get(&members, Some(&eq)).await,
        &mut diffs,
    );

    assert!(
        diffs.is_empty(),
        "the emulator differs from Keycloak {} in {} places:\n{}",
        kc.base_url(),
        diffs.len(),
        diffs
            .iter()
            .map(|d| format!("  - {d}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
