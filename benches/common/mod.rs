//! What both benches need: the PostgreSQL server (`SEEDKEEPER_TEST_DATABASE_URL`), a database
//! made fresh by name, and the generated realm of `n` users. The binary is started through
//! `tests/it/harness/spawn.rs`, as the tests start it.

use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

pub fn admin_url() -> String {
    std::env::var("SEEDKEEPER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The admin URL with its database replaced by `name` (its query string kept).
pub fn db_url(name: &str) -> String {
    let a = admin_url();
    let i = a.rfind('/').unwrap();
    let query = a[i..].find('?').map(|q| &a[i + q..]).unwrap_or("");
    format!("{}/{name}{query}", &a[..i])
}

pub async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    tokio::spawn(conn);
    c
}

/// Drops `name` if it exists and creates it empty; its URL.
pub async fn fresh_db(admin: &Client, name: &str) -> String {
    drop_db(admin, name).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    db_url(name)
}

pub async fn drop_db(admin: &Client, name: &str) {
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}

/// A realm `bench` of `n` users: one in a hundred an admin directly, one through the
/// `/admins/emea` subgroup, one through the composite `super`, one `ops`; one in fifty disabled.
/// The `seedkeeper` client's service account holds `service_account_roles` of
/// realm-management.
pub fn generate_realm(n: usize, service_account_roles: &[&str]) -> Value {
    let mut users = Vec::with_capacity(n + 1);
    for i in 0..n {
        let mut roles = vec![];
        let mut groups = vec![];
        match i % 100 {
            0 => roles.push("admin"),
            1 => groups.push("/admins/emea"),
            2 => roles.push("super"),
            3 => roles.push("ops"),
            _ => {}
        }
        users.push(json!({
            "id": format!("{:08x}-0000-4000-8000-{:012x}", i, i), "username": format!("user{i:07}"),
            "email": format!("user{i:07}@bench.example"), "firstName": "Bench", "lastName": format!("User {i}"),
            "enabled": i % 50 != 7, "realmRoles": roles, "groups": groups
        }));
    }
    users.push(json!({"id": "ffffffff-0000-4000-8000-0000000000ff", "username": "service-account-seedkeeper", "enabled": true,
        "serviceAccountClientId": "seedkeeper", "clientRoles": {"realm-management": service_account_roles}}));
    json!({
        "realm": "bench",
        "roles": {"realm": [{"name": "admin"}, {"name": "ops"}, {"name": "platform-admin"}, {"name": "super", "composite": true, "composites": {"realm": ["admin"]}}]},
        "groups": [{"name": "admins", "path": "/admins", "realmRoles": ["admin"], "subGroups": [{"name": "emea", "path": "/admins/emea", "realmRoles": [], "subGroups": []}]}],
        "users": users,
        "clients": [{"clientId": "seedkeeper", "secret": "bench-secret", "enabled": true, "publicClient": false, "serviceAccountsEnabled": true}]
    })
}
