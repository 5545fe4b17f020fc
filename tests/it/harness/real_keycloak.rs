//! The real Keycloak 26 of the conformance suite: `make test` starts one with
//! `scripts/keycloak.sh start` (the dev realm imported with `--import-realm`, as the compose
//! stack does) and names it in `SEEDKEEPER_TEST_KEYCLOAK_URL`. Tests that need it fail loudly
//! without it. Each test works in realms of its own (unique names, fresh user ids), created
//! through the admin API and deleted when the test's [`TestRealm`] is dropped.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::TempDir;

pub const CLIENT_SECRET: &str = "seedkeeper-dev-secret";

pub struct RealKeycloak {
    base: String,
    http: reqwest::Client,
    admin: (String, String),
    token: Mutex<Option<(String, Instant)>>,
}

/// The shared instance, or a panic that says how to get one.
pub fn real_keycloak() -> Arc<RealKeycloak> {
    static KC: OnceLock<Arc<RealKeycloak>> = OnceLock::new();
    KC.get_or_init(|| {
        let base = std::env::var("SEEDKEEPER_TEST_KEYCLOAK_URL").unwrap_or_else(|_| {
            panic!(
                "a real Keycloak is required for the conformance tests and SEEDKEEPER_TEST_KEYCLOAK_URL is unset: \
                 run `make test` (it starts one with scripts/keycloak.sh), or start one with \
                 `scripts/keycloak.sh start` and set SEEDKEEPER_TEST_KEYCLOAK_URL to the URL it prints \
                 (or KEYCLOAK_URL for an existing Keycloak with the dev realm imported)"
            )
        });
        let admin = std::env::var("SEEDKEEPER_TEST_KEYCLOAK_ADMIN").unwrap_or_else(|_| "admin:admin".into());
        let (u, p) = admin.split_once(':').expect("SEEDKEEPER_TEST_KEYCLOAK_ADMIN is user:password");
        Arc::new(RealKeycloak {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(180))
                // No idle keep-alive connections: Keycloak closes idle ones, and a request sent on
                // one it just closed fails at the transport (seen once in CI on POST /admin/realms).
                .pool_max_idle_per_host(0)
                .build()
                .expect("http client"),
            admin: (u.to_string(), p.to_string()),
            token: Mutex::new(None),
        })
    })
    .clone()
}

/// What one request got back: status, headers of interest and the body (JSON when it parses,
/// else a JSON string of the text).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
}

impl RealKeycloak {
    pub fn base_url(&self) -> String {
        self.base.clone()
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// An admin token of the master realm's `admin-cli` (60 s lifespan there), renewed at 30 s.
    pub async fn admin_token(&self) -> String {
        if let Some((t, at)) = self.token.lock().unwrap().clone() {
            if at.elapsed() < Duration::from_secs(30) {
                return t;
            }
        }
        let res = self
            .http
            .post(format!(
                "{}/realms/master/protocol/openid-connect/token",
                self.base
            ))
            .form(&[
                ("grant_type", "password"),
                ("client_id", "admin-cli"),
                ("username", &self.admin.0),
                ("password", &self.admin.1),
            ])
            .send()
            .await
            .unwrap_or_else(|e| panic!("Keycloak at {} is not reachable: {e}", self.base));
        let status = res.status();
        let body: Value = res.json().await.expect("token body");
        assert!(status.is_success(), "admin token: {status} {body}");
        let t = body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string();
        *self.token.lock().unwrap() = Some((t.clone(), Instant::now()));
        t
    }

    /// One request with a bearer token (`None` = the admin token) to `path` under the base URL.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> Answer {
        let token = match bearer {
            Some(t) => t.to_string(),
            None => self.admin_token().await,
        };
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        answer(res).await
    }

    /// An admin request that must succeed; its body.
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let a = self
            .send(
                method.clone(),
                &format!("/admin/realms{path}"),
                None,
                body.as_ref(),
            )
            .await;
        assert!(
            (200..300).contains(&a.status),
            "{method} /admin/realms{path}: {} {}",
            a.status,
            a.body
        );
        a.body
    }

    pub async fn get(&self, path: &str) -> Value {
        self.admin(reqwest::Method::GET, path, None).await
    }

    /// The server's version (`GET /admin/serverinfo`), such as `26.4.0`.
    pub async fn version(&self) -> String {
        let a = self
            .send(reqwest::Method::GET, "/admin/serverinfo", None, None)
            .await;
        assert_eq!(a.status, 200, "GET /admin/serverinfo: {}", a.body);
        let v = a.body["systemInfo"]["version"].as_str();
        v.expect("systemInfo.version in serverinfo").to_string()
    }

    /// Creates a realm from a full representation (the import code `--import-realm` uses).
    pub async fn create_realm(self: &Arc<Self>, rep: Value) -> TestRealm {
        let name = rep["realm"].as_str().expect("realm name").to_string();
        let a = self
            .send(reqwest::Method::POST, "/admin/realms", None, Some(&rep))
            .await;
        assert_eq!(a.status, 201, "create realm {name}: {}", a.body);
        TestRealm {
            kc: self.clone(),
            name,
        }
    }

    /// The client-credentials token of a realm's client, as seedkeeper gets it.
    pub async fn client_token(&self, realm: &str, client_id: &str, secret: &str) -> Answer {
        let res = self
            .http
            .post(format!(
                "{}/realms/{realm}/protocol/openid-connect/token",
                self.base
            ))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret),
            ])
            .send()
            .await
            .expect("token request");
        answer(res).await
    }
}

async fn answer(res: reqwest::Response) -> Answer {
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = res
        .text()
        .await
        .unwrap_or_else(|e| panic!("the body of a {status} answer from Keycloak: {e}"));
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Answer {
        status,
        content_type,
        body,
    }
}

/// A realm of one test, deleted on drop.
pub struct TestRealm {
    pub kc: Arc<RealKeycloak>,
    pub name: String,
}

impl TestRealm {
    /// `path` relative to this realm's admin root (`/users`, `/roles/admin`, ...).
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.kc
            .admin(method, &format!("/{}{path}", self.name), body)
            .await
    }

    pub async fn get(&self, path: &str) -> Value {
        self.admin(reqwest::Method::GET, path, None).await
    }

    pub async fn user_id(&self, username: &str) -> String {
        let found = self
            .get(&format!(
                "/users?exact=true&username={}",
                urlencode(username)
            ))
            .await;
        found[0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no user {username} in {}: {found}", self.name))
            .to_string()
    }

    pub async fn group_id(&self, path: &str) -> String {
        let g = self
            .get(&format!("/group-by-path/{}", path.trim_start_matches('/')))
            .await;
        g["id"].as_str().expect("group id").to_string()
    }

    pub async fn role(&self, name: &str) -> Value {
        self.get(&format!("/roles/{}", urlencode(name))).await
    }

    /// Creates a user through the admin API (Keycloak generates its id); returns the id.
    pub async fn create_user(&self, rep: Value) -> String {
        let username = rep["username"].as_str().expect("username").to_string();
        self.admin(reqwest::Method::POST, "/users", Some(rep)).await;
        self.user_id(&username).await
    }

    pub async fn grant_realm_roles(&self, user_id: &str, roles: &[&str]) {
        let mut reps = Vec::new();
        for r in roles {
            reps.push(self.role(r).await);
        }
        self.admin(
            reqwest::Method::POST,
            &format!("/users/{user_id}/role-mappings/realm"),
            Some(Value::Array(reps)),
        )
        .await;
    }

    pub async fn revoke_realm_roles(&self, user_id: &str, roles: &[&str]) {
        let mut reps = Vec::new();
        for r in roles {
            reps.push(self.role(r).await);
        }
        self.admin(
            reqwest::Method::DELETE,
            &format!("/users/{user_id}/role-mappings/realm"),
            Some(Value::Array(reps)),
        )
        .await;
    }

    /// The seedkeeper environment for this realm (keycloak source).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SEEDKEEPER_IDENTITY__SOURCE".into(), "keycloak".into()),
            ("SEEDKEEPER_KEYCLOAK__BASE_URL".into(), self.kc.base_url()),
            ("SEEDKEEPER_KEYCLOAK__REALM".into(), self.name.clone()),
            (
                "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET".into(),
                CLIENT_SECRET.into(),
            ),
            ("SEEDKEEPER_KEYCLOAK__REQUEST_TIMEOUT".into(), "20s".into()),
        ]
    }

    /// `kc.sh export` of this realm, through `scripts/keycloak.sh export` (the instance that
    /// script started): one file, or a `--dir` folder with `users_per_file` users a file.
    pub fn export(&self, dir: &TempDir, users_per_file: Option<u32>) -> std::path::PathBuf {
        let mut args: Vec<String> = vec!["export".into(), "--realm".into(), self.name.clone()];
        let out = match users_per_file {
            None => {
                let f = dir.0.join(format!("{}-export.json", self.name));
                args.extend(["--file".into(), f.display().to_string()]);
                f
            }
            Some(n) => {
                let d = dir.0.join(format!("{}-export", self.name));
                args.extend([
                    "--dir".into(),
                    d.display().to_string(),
                    "--users".into(),
                    "different_files".into(),
                    "--users-per-file".into(),
                    n.to_string(),
                ]);
                d
            }
        };
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/keycloak.sh");
        let o = std::process::Command::new("bash")
            .arg(script)
            .args(&args)
            .output()
            .expect("run scripts/keycloak.sh export");
        assert!(
            o.status.success(),
            "kc.sh export of {} failed (it needs the Keycloak that scripts/keycloak.sh started): {}{}",
            self.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }
}

impl Drop for TestRealm {
    fn drop(&mut self) {
        // Best effort, on a thread of its own: Drop cannot await.
        let kc = self.kc.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let token = kc.admin_token().await;
                let _ = kc
                    .http
                    .delete(format!("{}/admin/realms/{name}", kc.base))
                    .bearer_auth(token)
                    .send()
                    .await;
            });
        })
        .join();
    }
}

/// A path segment, percent-encoded as Keycloak's admin client expects (all but RFC 3986's
/// unreserved characters).
pub fn urlencode(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// A unique realm name for a test.
pub fn realm_name(test: &str) -> String {
    format!(
        "sk-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// `base` (a realm export, for example the dev realm) made importable beside the realm it came
/// from: a new name, no realm/client/role/group ids (Keycloak generates them), and every user
/// id replaced by a fresh one (user ids are unique across realms). Returns the representation
/// and the old -> new user id map.
pub fn as_new_realm(base: &Value, name: &str) -> (Value, Vec<(String, String)>) {
    let mut rep = base.clone();
    rep["realm"] = json!(name);
    let obj = rep.as_object_mut().expect("realm object");
    obj.remove("id");
    let mut ids = Vec::new();
    if let Some(users) = obj.get_mut("users").and_then(Value::as_array_mut) {
        for u in users {
            if let Some(old) = u.get("id").and_then(Value::as_str).map(str::to_string) {
                let new = uuid::Uuid::new_v4().to_string();
                u["id"] = json!(new);
                ids.push((old, new));
            }
        }
    }
    for list in ["clients", "groups"] {
        if let Some(items) = obj.get_mut(list).and_then(Value::as_array_mut) {
            for item in items {
                strip_ids(item);
            }
        }
    }
    if let Some(roles) = obj.get_mut("roles").and_then(Value::as_object_mut) {
        for (_, v) in roles.iter_mut() {
            strip_ids(v);
        }
    }
    if let Some(dr) = obj.get_mut("defaultRole") {
        strip_ids(dr);
    }
    (rep, ids)
}

/// The same realm with every user given a new id, as a fresh import of an id-less file would.
pub fn with_new_user_ids(rep: &Value) -> (Value, Vec<(String, String)>) {
    let mut rep = rep.clone();
    let mut ids = Vec::new();
    for u in rep["users"].as_array_mut().expect("users").iter_mut() {
        if let Some(old) = u.get("id").and_then(Value::as_str).map(str::to_string) {
            let new = uuid::Uuid::new_v4().to_string();
            u["id"] = json!(new);
            ids.push((old, new));
        }
    }
    (rep, ids)
}

fn strip_ids(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("id");
            m.remove("containerId");
            for (_, x) in m.iter_mut() {
                strip_ids(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_ids),
        _ => {}
    }
}
