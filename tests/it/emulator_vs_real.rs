//! The emulator is held to the real Keycloak. The same realm is loaded into both, the
//! same requests go to both, and the answers must agree: status codes, JSON field names and
//! types, paging, and error bodies word for word. Values that are each server's own (ids that
//! Keycloak generates, timestamps, signatures, base URLs) are compared by shape only.

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::keycloak::{KeycloakEmulator, Release};
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
        let text = res
            .text()
            .await
            .unwrap_or_else(|e| panic!("the token answer's body at {}: {e}", self.base));
        (status, body_value(text))
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
        let text = res
            .text()
            .await
            .unwrap_or_else(|e| panic!("the body of GET {}{path}: {e}", self.base));
        (status, body_value(text))
    }
}

/// An answer's body as JSON, else the text itself as a JSON string (null when empty), so a
/// comparison shows what came back.
fn body_value(text: String) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&text).unwrap_or(Value::String(text))
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

/// Keycloak and the emulator side by side, and the differences found so far.
struct Both {
    real: Side,
    emu: Side,
    diffs: Vec<String>,
}

impl Both {
    /// GETs a path from each side, each with its own token (ids and tokens are each server's
    /// own), and compares the answers.
    async fn get(&mut self, what: &str, how: Agree, paths: [&str; 2], tokens: [Option<&str>; 2]) {
        let real = self.real.get(paths[0], tokens[0]).await;
        let emu = self.emu.get(paths[1], tokens[1]).await;
        compare(what, how, &real, &emu, &mut self.diffs);
    }

    /// Posts the same token request to both sides and compares the answers.
    async fn token(&mut self, what: &str, how: Agree, realm: &str, form: &[(&str, &str)]) {
        let real = self.real.token(realm, form).await;
        let emu = self.emu.token(realm, form).await;
        compare(what, how, &real, &emu, &mut self.diffs);
    }

    /// The service account token of `client` at each side.
    async fn bearers(&self, realm: &str, client: &str) -> [String; 2] {
        [
            self.real.bearer(realm, client).await,
            self.emu.bearer(realm, client).await,
        ]
    }
}

/// The dev realm plus what the comparison needs: a composite, a group holding a role with a
/// subgroup, more users than one small page, a user without email, a disabled one, a client
/// without service accounts and one whose service account may only query users, and a client
/// `app` whose roles hold `admin` (`super`, and `chain` through `super`), held by a user and by
/// a group.
fn realm_for_both(name: &str) -> Value {
    let (mut rep, _) = as_new_realm(&dev_realm(), name);
    rep["roles"]["realm"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "super", "composite": true, "composites": {"realm": ["admin"]}}));
    rep["groups"].as_array_mut().unwrap().push(json!({"name": "admins", "path": "/admins", "realmRoles": ["admin"],
        "subGroups": [{"name": "emea", "path": "/admins/emea", "realmRoles": [], "subGroups": []}]}));
    rep["groups"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "app-admins", "path": "/app-admins",
        "clientRoles": {"app": ["super"]}, "subGroups": []}));
    rep["roles"]["client"] = json!({"app": [
        {"name": "super", "composite": true, "composites": {"realm": ["admin"]}},
        {"name": "chain", "composite": true, "composites": {"client": {"app": ["super"]}}},
        {"name": "plain", "composite": false}]});
    let users = rep["users"].as_array_mut().unwrap();
    users.push(
        json!({"id": CLIENT_ROLE_ADMIN, "username": "client-role-admin", "enabled": true,
        "clientRoles": {"app": ["chain"]}, "groups": ["/app-admins"]}),
    );
    users.push(
        json!({"id": uuid::Uuid::new_v4().to_string(), "username": "app-super", "enabled": true,
        "clientRoles": {"app": ["super"]}}),
    );
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
    users.push(json!({"id": uuid::Uuid::new_v4().to_string(), "username": "service-account-realm-manager", "enabled": true,
        "serviceAccountClientId": "realm-manager", "realmRoles": ["default-roles-dev"],
        "clientRoles": {"realm-management": ["manage-realm"]}}));
    rep["clients"].as_array_mut().unwrap().extend([
        json!({"clientId": "app", "enabled": true, "publicClient": true, "standardFlowEnabled": false}),
        json!({"clientId": "no-roles", "enabled": true, "publicClient": false, "secret": CLIENT_SECRET,
               "serviceAccountsEnabled": true, "standardFlowEnabled": false}),
        json!({"clientId": "no-sa", "enabled": true, "publicClient": false, "secret": CLIENT_SECRET,
               "serviceAccountsEnabled": false, "standardFlowEnabled": false}),
        json!({"clientId": "query-only", "enabled": true, "publicClient": false, "secret": CLIENT_SECRET,
               "serviceAccountsEnabled": true, "standardFlowEnabled": false}),
        json!({"clientId": "realm-manager", "enabled": true, "publicClient": false, "secret": CLIENT_SECRET,
               "serviceAccountsEnabled": true, "standardFlowEnabled": false}),
    ]);
    rep
}

/// A user holding `app/chain` and, through `/app-admins`, `app/super`: `admin` only through
/// client roles. A fixed id per run, so both sides are asked for the same user.
const CLIENT_ROLE_ADMIN: &str = "e7000000-0000-4000-8000-000000000001";

#[tokio::test(flavor = "multi_thread")]
async fn the_emulator_answers_the_same_requests_as_the_real_keycloak() {
    let kc = real_keycloak();
    let name = realm_name("emu");
    let mut rep = realm_for_both(&name);
    // User ids are unique across a Keycloak's realms: a fresh one for this run.
    let admin_id = uuid::Uuid::new_v4().to_string();
    for u in rep["users"].as_array_mut().unwrap() {
        if u["id"] == CLIENT_ROLE_ADMIN {
            u["id"] = json!(admin_id);
        }
    }
    let _realm = kc.create_realm(rep.clone()).await;
    let emulator = KeycloakEmulator::start(rep).await;
    // The emulator answers as the release it is compared with.
    let version = kc.version().await;
    emulator.set_release(Release::of(&version));
    let http = reqwest::Client::new();
    let mut both = Both {
        real: Side {
            base: kc.base_url(),
            http: http.clone(),
        },
        emu: Side {
            base: emulator.base_url(),
            http,
        },
        diffs: Vec::new(),
    };
    let r = &name;

    // Discovery: the emulator serves the fields seedkeeper needs, as Keycloak types them.
    let path = format!("/realms/{r}/.well-known/openid-configuration");
    let (rd, ed) = (
        both.real.get(&path, None).await,
        both.emu.get(&path, None).await,
    );
    compare("discovery", Agree::Subset, &rd, &ed, &mut both.diffs);
    for field in ["issuer", "token_endpoint", "jwks_uri"] {
        let strip = |v: &Value, base: &str| v[field].as_str().unwrap_or("").replacen(base, "", 1);
        if strip(&rd.1, &both.real.base) != strip(&ed.1, &both.emu.base) {
            both.diffs.push(format!(
                "discovery.{field}: {} vs {}",
                rd.1[field], ed.1[field]
            ));
        }
    }
    let path = "/realms/no-such-realm/.well-known/openid-configuration";
    both.get(
        "discovery of an unknown realm",
        Agree::Exactly,
        [path, path],
        [None, None],
    )
    .await;

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
        both.token(what, how, r, &form).await;
    }

    // The admin endpoints seedkeeper reads, with the service account's token of each side.
    let [rt, et] = both.bearers(r, "seedkeeper").await;
    // Ids are each server's own: the first group named `name` in a listing, at each side.
    let id_in = |side: &Side, token: String, path: String, name: Option<&'static str>| {
        let url = format!("{}/admin/realms/{r}/{path}", side.base);
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
                .find(|g| name.is_none_or(|n| g["name"] == n))
                .and_then(|g| g["id"].as_str())
                .unwrap_or_else(|| panic!("no group {name:?} at {url}: {groups}"))
                .to_string()
        }
    };
    // /admins, through each side's groups holding admin.
    let groups_of_admin = "roles/admin/groups?briefRepresentation=true".to_string();
    let (rg, eg) = (
        id_in(
            &both.real,
            rt.clone(),
            groups_of_admin.clone(),
            Some("admins"),
        )
        .await,
        id_in(&both.emu, et.clone(), groups_of_admin, Some("admins")).await,
    );
    // /admins/emea, through each side's children of /admins.
    let children = |g: &str| format!("groups/{g}/children?briefRepresentation=true");
    let (rs, es) = (
        id_in(&both.real, rt.clone(), children(&rg), None).await,
        id_in(&both.emu, et.clone(), children(&eg), None).await,
    );
    let cases: Vec<(&str, &str, Agree)> = vec![
        (
            "users, first page of 4",
            "users?first=0&max=4&briefRepresentation=true",
            Agree::InOrder("username"),
        ),
        (
            "users, second page of 4",
            "users?first=4&max=4&briefRepresentation=true",
            Agree::InOrder("username"),
        ),
        (
            "users, the last page",
            "users?first=12&max=4&briefRepresentation=true",
            Agree::InOrder("username"),
        ),
        (
            "users, past the end",
            "users?first=100&max=4&briefRepresentation=true",
            Agree::Exactly,
        ),
        (
            "users, full representation",
            "users?first=0&max=3&briefRepresentation=false",
            Agree::InOrder("username"),
        ),
        ("users/count", "users/count", Agree::Exactly),
        (
            "roles",
            "roles?first=0&max=100&briefRepresentation=true",
            Agree::AsSet("name"),
        ),
        (
            "composites of super",
            "roles/super/composites/realm",
            Agree::AsSet("name"),
        ),
        (
            "direct members of admin",
            "roles/admin/users?first=0&max=100&briefRepresentation=true",
            Agree::AsSet("username"),
        ),
        (
            "groups holding admin",
            "roles/admin/groups?first=0&max=100&briefRepresentation=true",
            Agree::AsSet("name"),
        ),
        (
            "members of an unknown role",
            "roles/no-such-role/users?first=0&max=100",
            Agree::Exactly,
        ),
        (
            "users of an unknown realm",
            "../no-such-realm/users?first=0&max=4",
            Agree::Exactly,
        ),
        (
            "children of /admins",
            "groups/{G}/children?first=0&max=100&briefRepresentation=true",
            Agree::AsSet("name"),
        ),
        (
            "members of /admins",
            "groups/{G}/members?first=0&max=100&briefRepresentation=true",
            Agree::AsSet("username"),
        ),
        (
            "members of /admins/emea",
            "groups/{S}/members?first=0&max=100&briefRepresentation=true",
            Agree::AsSet("username"),
        ),
    ];
    for (what, rel, how) in cases {
        let at = |g: &str, s: &str| {
            format!(
                "/admin/realms/{r}/{}",
                rel.replace("{G}", g).replace("{S}", s)
            )
        };
        let (rp, ep) = (at(&rg, &rs), at(&eg, &es));
        both.get(what, how, [&rp, &ep], [Some(&rt), Some(&et)])
            .await;
    }

    // Client roles: the clients (the emulator serves those seedkeeper walks, a subset of
    // Keycloak's built-in ones), a client's roles, a client role's composites, direct holders
    // and groups, a realm role's composites naming client roles, and the effective realm roles
    // of a user who holds `admin` through client roles only.
    let clients = format!("/admin/realms/{r}/clients?first=0&max=100");
    let (rc, ec) = (
        both.real.get(&clients, Some(&rt)).await,
        both.emu.get(&clients, Some(&et)).await,
    );
    compare("clients", Agree::Subset, &rc, &ec, &mut both.diffs);
    let (real_ids, emu_ids) = (keys_of(&rc.1, "clientId"), keys_of(&ec.1, "clientId"));
    if let Some(extra) = emu_ids.iter().find(|c| !real_ids.contains(c)) {
        both.diffs.push(format!(
            "clients: {extra} served by the emulator, not by Keycloak"
        ));
    }
    let app_id = |v: &Value| {
        v.as_array()
            .and_then(|a| a.iter().find(|c| c["clientId"] == "app"))
            .and_then(|c| c["id"].as_str())
            .unwrap_or_else(|| panic!("no client app in {v}"))
            .to_string()
    };
    let (ra, ea) = (app_id(&rc.1), app_id(&ec.1));
    let client_cases: Vec<(&str, String, Agree)> = vec![
        (
            "roles of app",
            "clients/{A}/roles?first=0&max=100&briefRepresentation=true".into(),
            Agree::AsSet("name"),
        ),
        (
            "composites of app/chain",
            "clients/{A}/roles/chain/composites".into(),
            Agree::AsSet("name"),
        ),
        (
            "composites of app/super",
            "clients/{A}/roles/super/composites".into(),
            Agree::AsSet("name"),
        ),
        (
            "direct holders of app/super",
            "clients/{A}/roles/super/users?first=0&max=100&briefRepresentation=true".into(),
            Agree::AsSet("username"),
        ),
        (
            "groups holding app/super",
            "clients/{A}/roles/super/groups?first=0&max=100&briefRepresentation=true".into(),
            Agree::AsSet("name"),
        ),
        (
            "composites of the default role, client roles included",
            "roles/default-roles-dev/composites".into(),
            Agree::AsSet("name"),
        ),
        (
            "effective realm roles of a client-role admin",
            format!("users/{admin_id}/role-mappings/realm/composite"),
            Agree::AsSet("name"),
        ),
        (
            "roles of an unknown client",
            "clients/no-such-client/roles".into(),
            Agree::Exactly,
        ),
        (
            "composites of an unknown client role",
            "clients/{A}/roles/no-such-role/composites".into(),
            Agree::Exactly,
        ),
    ];
    for (what, rel, how) in client_cases {
        let at = |a: &str| format!("/admin/realms/{r}/{}", rel.replace("{A}", a));
        let (rp, ep) = (at(&ra), at(&ea));
        both.get(what, how, [&rp, &ep], [Some(&rt), Some(&et)])
            .await;
    }

    // Refusals: no token, a forged token, a token that may only query users, one without
    // realm-management roles.
    let [rq, eq] = both.bearers(r, "query-only").await;
    let [rn, en] = both.bearers(r, "no-roles").await;
    let users = format!("/admin/realms/{r}/users?first=0&max=4");
    let members = format!("/admin/realms/{r}/roles/admin/users?first=0&max=4");
    let forged = Some("not.a.token");
    let mut refusals: Vec<(String, String, [Option<&str>; 2])> = vec![
        ("users without a token".into(), users.clone(), [None, None]),
        (
            "users with a forged token".into(),
            users.clone(),
            [forged, forged],
        ),
        (
            "users with query-users only".into(),
            users,
            [Some(&rq), Some(&eq)],
        ),
        (
            "role members with query-users only".into(),
            members,
            [Some(&rq), Some(&eq)],
        ),
    ];
    refusals.push((
        "clients with query-users only".into(),
        format!("/admin/realms/{r}/clients?first=0&max=4"),
        [Some(&rq), Some(&eq)],
    ));
    for what in [
        "users?first=0&max=4",
        "users/count",
        "roles",
        "roles/admin/users",
        "clients",
    ] {
        refusals.push((
            format!("{what} without realm-management roles"),
            format!("/admin/realms/{r}/{what}"),
            [Some(&rn), Some(&en)],
        ));
    }
    for (what, path, tokens) in &refusals {
        both.get(what, Agree::Exactly, [path, path], *tokens).await;
    }

    // The server's version, as seedkeeper reads it at start: `GET /admin/serverinfo` with a realm
    // service account's token. Refused without any realm-management role; `systemInfo` (the
    // version) only for manage-realm, absent for the view and query roles seedkeeper holds.
    let serverinfo = "/admin/serverinfo";
    for (what, tokens) in [
        ("serverinfo without a token", [None, None]),
        (
            "serverinfo without realm-management roles",
            [Some(rn.as_str()), Some(en.as_str())],
        ),
    ] {
        both.get(what, Agree::Exactly, [serverinfo, serverinfo], tokens)
            .await;
    }
    let [rm, em] = both.bearers(r, "realm-manager").await;
    for (what, tokens) in [
        (
            "serverinfo with seedkeeper's roles",
            [Some(rt.as_str()), Some(et.as_str())],
        ),
        (
            "serverinfo with query-users only",
            [Some(rq.as_str()), Some(eq.as_str())],
        ),
        (
            "serverinfo with manage-realm",
            [Some(rm.as_str()), Some(em.as_str())],
        ),
    ] {
        let real = both.real.get(serverinfo, tokens[0]).await;
        let emu = both.emu.get(serverinfo, tokens[1]).await;
        compare(what, Agree::Subset, &real, &emu, &mut both.diffs);
        let has = |v: &Value| v.pointer("/systemInfo/version").is_some();
        if has(&real.1) != has(&emu.1) {
            both.diffs.push(format!(
                "{what}: systemInfo.version {} by Keycloak, {} by the emulator",
                if has(&real.1) { "served" } else { "not served" },
                if has(&emu.1) { "served" } else { "not served" },
            ));
        }
    }
    let diffs = both.diffs;

    assert!(
        diffs.is_empty(),
        "the emulator (answering as {:?}) differs from Keycloak {version} at {} in {} places:\n{}",
        Release::of(&version),
        kc.base_url(),
        diffs.len(),
        diffs
            .iter()
            .map(|d| format!("  - {d}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
