//! The realm-file source accepts every realm Keycloak accepts. Users without an id are
//! rejected alone, service accounts are skipped whatever they carry, undeclared realm roles are
//! plain roles, and a multi-realm export (an array of realms, or a `kc.sh export --dir` folder
//! of several realms) is read for `keycloak.realm`. Real exports are in tests/fixtures/realms.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::harness::*;
use crate::identities::{identity_state, realm_file_env, refs};
use seedkeeper::reconcile::{FindingKind, Unit};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/realms")
        .join(rel)
}

fn read_fixture(rel: &str) -> String {
    std::fs::read_to_string(fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// (username, group path) for each way Keycloak's import accepts a group path: canonical, without
/// the leading slash, with a trailing one; for a group and its subgroup.
pub(crate) const GROUP_PATH_SPELLINGS: [(&str, &str); 6] = [
    ("canon-admin", "/Admin"),
    ("bare-admin", "Admin"),
    ("trailing-admin", "Admin/"),
    ("canon-ops", "/Admin/Ops"),
    ("bare-ops", "Admin/Ops"),
    ("trailing-ops", "Admin/Ops/"),
];

/// (sub, username, role) of every users row, by username.
async fn rows(db: &TestDb) -> Vec<(String, String, String)> {
    db.triples("SELECT keycloak_sub, username, role FROM users ORDER BY username")
        .await
}

fn row(sub: &str, username: &str, role: &str) -> (String, String, String) {
    (sub.to_string(), username.to_string(), role.to_string())
}

/// (entity, detail) of the identities unit's findings of `kind`.
fn findings(r: &seedkeeper::reconcile::RunReport, kind: FindingKind) -> Vec<(String, String)> {
    r.unit(Unit::Identities)
        .expect("identities unit")
        .findings
        .iter()
        .filter(|f| f.kind == kind)
        .map(|f| (f.entity.clone(), f.detail.clone()))
        .collect()
}

fn realm_env(path: &std::path::Path) -> Vec<(String, String)> {
    vec![(
        "SEEDKEEPER_IDENTITY__REALM_FILE".into(),
        path.display().to_string(),
    )]
}

/// Runs the binary once on `input`, expecting exit 78 and nothing written; returns its output.
async fn refused(input: &std::path::Path, extra: &[(&str, &str)]) -> String {
    let db = TestDb::empty().await;
    let mut env = db.env();
    env.extend(realm_env(input));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let out = run_bin(&["--once"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    let tables: i64 = db
        .scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .await;
    assert_eq!(tables, 0, "nothing written: {t}");
    t
}

/// Like [`refused`], for a realm refused over the identity stage (duplicate ids, usernames or
/// emails, which PostgreSQL finds once the users are staged, so that no set of them grows in
/// memory with the realm): the schema and the reference seed went in before it, the identities
/// unit's transaction was rolled back, so no user was written.
async fn refused_by_stage(input: &std::path::Path) -> String {
    let db = TestDb::empty().await;
    let mut env = db.env();
    env.extend(realm_env(input));
    let out = run_bin(&["--once"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert_eq!(no_user_rows(&db).await, 0, "no user written: {t}");
    t
}

const ANN: &str = "b1000000-0000-4000-8000-000000000001";
const BOB: &str = "b1000000-0000-4000-8000-000000000002";
const CAROL: &str = "b1000000-0000-4000-8000-000000000003";

#[tokio::test(flavor = "multi_thread")]
async fn users_without_id_are_rejected_alone_and_service_accounts_and_undeclared_roles_are_accepted(
) {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    // roles.realm declares neither `admin` nor `ops`: Keycloak's import creates them as plain
    // roles, so they still count.
    let realm = json!({
        "realm": "dev",
        "roles": {"realm": [{"name": "user"}]},
        "groups": [{"name": "oncall", "path": "/oncall", "realmRoles": ["ops"], "subGroups": []}],
        "users": [
            {"id": ANN, "username": "Ann", "enabled": true, "realmRoles": ["admin"]},
            {"username": "no-id-one", "enabled": true, "realmRoles": ["user", "admin"]},
            {"id": BOB, "username": "bob", "enabled": true, "groups": ["/oncall"]},
            {"username": "No-Id-Two", "email": "two@example.test"},
            {"id": CAROL, "username": "carol", "enabled": true, "realmRoles": ["user", "never-declared"]},
            // Service accounts: skipped whatever they carry (no id, no username, a username
            // given twice or too long for a column).
            {"serviceAccountClientId": "ci"},
            {"username": "service-account-reporting", "realmRoles": ["admin"]},
            {"username": "service-account-reporting", "serviceAccountClientId": "reporting"},
            {"username": format!("service-account-{}", "x".repeat(300)), "enabled": true},
        ],
    });
    let env = realm_file_env(&dir, &realm);
    let file = dir.0.join("realm.json").display().to_string();
    let engine = db.engine(&refs(&env));
    let r = apply(&engine).await;
    assert_ok(&r);
    assert_eq!(
        rows(&db).await,
        vec![
            row(ANN, "ann", "admin"),
            row(BOB, "bob", "user"),
            row(CAROL, "carol", "user")
        ]
    );
    assert_eq!(count(&r, "identities", "listed"), 5);
    assert_eq!(count(&r, "identities", "inserted"), 3);
    assert_eq!(count(&r, "identities", "rejected"), 2);
    let rejected = findings(&r, FindingKind::Rejected);
    let entities: Vec<&str> = rejected.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(
        entities,
        ["user:no-id-one", "user:no-id-two"],
        "{rejected:#?}"
    );
    for ((_, detail), (name, at)) in rejected
        .iter()
        .zip([("no-id-one", "users[1]"), ("No-Id-Two", "users[3]")])
    {
        for needle in [
            format!("{name:?}"),
            at.to_string(),
            file.clone(),
            "has no \"id\"".into(),
            "kc.sh export".into(),
            "add an \"id\"".into(),
        ] {
            assert!(detail.contains(&needle), "{needle:?} not in {detail}");
        }
    }
    let state = identity_state(&db).await;
    let bindings: Vec<&String> = state.iter().filter(|s| s.starts_with("binding")).collect();
    assert_eq!(
        bindings,
        [
            "binding ann platform_superadmin active seedkeeper",
            "binding bob platform_ops active seedkeeper"
        ],
        "{state:#?}"
    );

    // The next run reports the same users again and writes nothing.
    db.settle_stats(1).await;
    let before = db.tuples_written().await;
    let r = apply(&engine).await;
    assert_ok(&r);
    assert_eq!(findings(&r, FindingKind::Rejected).len(), 2);
    db.settle_stats(2).await;
    assert_eq!(
        db.tuples_written().await,
        before,
        "a no-op run writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn real_import_files_without_ids_sync_no_row_and_report_each_human_user() {
    // keycloak-quickstarts: no ids anywhere; `offline_access` is used but not declared; the
    // servlet one also holds a service account without id.
    for (name, humans) in [
        (
            "quickstarts-jaxrs-resource-server-realm-import.json",
            vec!["alice", "admin"],
        ),
        (
            "quickstarts-servlet-authz-client-realm-import.json",
            vec!["alice", "jdoe", "admin"],
        ),
    ] {
        let db = TestDb::new().await;
        let path = fixture(name);
        let r = apply(&db.engine(&refs(&realm_env(&path)))).await;
        assert_ok(&r);
        assert_eq!(rows(&db).await, vec![], "{name}");
        let rejected = findings(&r, FindingKind::Rejected);
        let entities: Vec<String> = rejected.iter().map(|f| f.0.clone()).collect();
        let want: Vec<String> = humans.iter().map(|h| format!("user:{h}")).collect();
        assert_eq!(entities, want, "{name}");
        assert!(
            rejected
                .iter()
                .all(|f| f.1.contains(&path.display().to_string())),
            "{rejected:#?}"
        );
        assert_eq!(count(&r, "identities", "rejected"), humans.len() as i64);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_array_export_is_read_for_keycloak_realm_and_a_missing_realm_names_the_realms_found() {
    let dir = TempDir::new();
    // The same user exists in both realms (with another role in master): only dev's is read.
    // Master's second user lacks a username, which only matters if master were read.
    let master = json!({
        "realm": "master",
        "roles": {"realm": [{"name": "admin"}]},
        "users": [
            {"id": "m-1", "username": "ann", "enabled": true, "realmRoles": ["admin"]},
            {"id": "m-2", "enabled": true},
        ],
    });
    let dev = json!({
        "realm": "dev",
        "users": [
            {"id": ANN, "username": "ann", "enabled": true, "realmRoles": []},
            {"id": BOB, "username": "bob", "enabled": true, "realmRoles": ["admin"]},
        ],
    });
    let path = dir.write("realms.json", &json!([master, dev]).to_string());

    let db = TestDb::new().await;
    let r = apply(&db.engine(&refs(&realm_env(&path)))).await;
    assert_ok(&r);
    assert_eq!(
        rows(&db).await,
        vec![row(ANN, "ann", "user"), row(BOB, "bob", "admin")]
    );

    // keycloak.realm = master reads master, where the user without username is a problem.
    let t = refused(&path, &[("SEEDKEEPER_KEYCLOAK__REALM", "master")]).await;
    assert!(t.contains("realms[0] users[1]: has no \"username\""), "{t}");
    let only_master = dir.write(
        "master.json",
        &json!([{"realm": "master", "users": [{"id": "m-1", "username": "ann", "realmRoles": ["admin"]}]}, dev])
            .to_string(),
    );
    let db = TestDb::new().await;
    let r = apply(&db.engine(&[
        (
            "SEEDKEEPER_IDENTITY__REALM_FILE",
            only_master.to_str().unwrap(),
        ),
        ("SEEDKEEPER_KEYCLOAK__REALM", "master"),
    ]))
    .await;
    assert_ok(&r);
    assert_eq!(rows(&db).await, vec![row("m-1", "ann", "admin")]);

    // A realm the export does not hold.
    let t = refused(&path, &[("SEEDKEEPER_KEYCLOAK__REALM", "staging")]).await;
    for needle in [
        "realms.json",
        "\"master\", \"dev\"",
        "\"staging\"",
        "keycloak.realm",
        "SEEDKEEPER_KEYCLOAK__REALM",
    ] {
        assert!(t.contains(needle), "{needle:?} not in {t}");
    }

    // An array of one realm is read whatever its name, like a single realm object.
    let one = dir.write(
        "one.json",
        &json!([{"realm": "acme", "users": [{"id": CAROL, "username": "carol"}]}]).to_string(),
    );
    let db = TestDb::new().await;
    assert_ok(&apply(&db.engine(&refs(&realm_env(&one)))).await);
    assert_eq!(rows(&db).await, vec![row(CAROL, "carol", "user")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_realm_is_read_whatever_its_name() {
    // Today's behaviour, kept: keycloak.realm does not have to match a single realm's name.
    let dir = TempDir::new();
    let realm = json!({"realm": "acme", "users": [{"id": ANN, "username": "ann", "realmRoles": ["admin"]}]});
    let db = TestDb::new().await;
    assert_ok(&apply(&db.engine(&refs(&realm_file_env(&dir, &realm)))).await);
    assert_eq!(rows(&db).await, vec![row(ANN, "ann", "admin")]);

    // A real Keycloak 26.5.5 export of master (no users) is read as an empty realm.
    let db = TestDb::new().await;
    let r = apply(&db.engine(&refs(&realm_env(&fixture("kc26.5.5-master-realm.json"))))).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "listed"), 0);
}

/// The dev realm as `kc.sh export --dir` writes it: the realm without users, the users in
/// files of three.
fn write_dev_dir(dir: &TempDir) -> Vec<Value> {
    let mut realm = dev_realm();
    let users = realm["users"].as_array().unwrap().clone();
    realm.as_object_mut().unwrap().remove("users");
    dir.write("dev-realm.json", &realm.to_string());
    for (i, chunk) in users.chunks(3).enumerate() {
        dir.write(
            &format!("dev-users-{i}.json"),
            &json!({"realm": "dev", "users": chunk}).to_string(),
        );
    }
    users
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dir_export_of_several_realms_is_read_for_keycloak_realm() {
    let single = TestDb::new().await;
    assert_ok(&apply(&single.engine(&[])).await);

    let dir = TempDir::new();
    write_dev_dir(&dir);
    // Master: a real Keycloak 26.5.5 realm file, and a users file whose user has the id and
    // username of a dev user, as admin.
    dir.write(
        "master-realm.json",
        &read_fixture("kc26.5.5-master-realm.json"),
    );
    dir.write(
        "master-users-0.json",
        &json!({"realm": "master", "users": [
            {"id": "a1000000-0000-4000-8000-000000000001", "username": "dev-user", "enabled": true, "realmRoles": ["admin"]},
            {"id": "m-2", "username": "root", "enabled": true, "realmRoles": ["admin"]},
        ]})
        .to_string(),
    );
    // Not users files of dev: federated users, and files of a realm without a realm file.
    dir.write(
        "dev-federated-users-0.json",
        &json!({"realm": "dev", "federatedUsers": [{"id": "f-1", "username": "fed"}]}).to_string(),
    );
    dir.write(
        "ghost-users-0.json",
        &json!({"realm": "ghost", "users": [{"id": "g-1", "username": "ghost"}]}).to_string(),
    );

    let db = TestDb::new().await;
    let engine = db.engine(&[("SEEDKEEPER_IDENTITY__REALM_FILE", dir.0.to_str().unwrap())]);
    let r = apply(&engine).await;
    assert_ok(&r);
    assert_eq!(count(&r, "identities", "listed"), 6);
    assert_eq!(identity_state(&db).await, identity_state(&single).await);

    // keycloak.realm = master reads master's users only.
    let db = TestDb::new().await;
    let r = apply(&db.engine(&[
        ("SEEDKEEPER_IDENTITY__REALM_FILE", dir.0.to_str().unwrap()),
        ("SEEDKEEPER_KEYCLOAK__REALM", "master"),
    ]))
    .await;
    assert_ok(&r);
    assert_eq!(
        rows(&db).await,
        vec![
            row("a1000000-0000-4000-8000-000000000001", "dev-user", "admin"),
            row("m-2", "root", "admin")
        ]
    );

    // A realm the folder does not hold.
    let t = refused(&dir.0, &[("SEEDKEEPER_KEYCLOAK__REALM", "staging")]).await;
    for needle in [
        dir.0.to_str().unwrap(),
        "\"dev\", \"master\"",
        "not \"staging\"",
        "keycloak.realm",
        "SEEDKEEPER_KEYCLOAK__REALM",
    ] {
        assert!(t.contains(needle), "{needle:?} not in {t}");
    }

    // A users file of dev whose "realm" says otherwise is refused, as Keycloak refuses it.
    dir.write(
        "dev-users-7.json",
        &json!({"realm": "master", "users": [{"id": "x-1", "username": "stray"}]}).to_string(),
    );
    let t = refused(&dir.0, &[]).await;
    assert!(
        t.contains("dev-users-7.json") && t.contains("\"master\"") && t.contains("realm \"dev\""),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn real_dir_exports_are_read() {
    // Keycloak 22.0.3 `kc.sh export --dir`: one human with an id, one service account.
    let kc22 = fixture("kc22-dir");
    let db = TestDb::new().await;
    let r = apply(&db.engine(&refs(&realm_env(&kc22)))).await;
    assert_ok(&r);
    assert_eq!(
        rows(&db).await,
        vec![row("60b8ba5f-c73f-4976-b0da-48d0e53335de", "tneal", "user")]
    );
    assert_eq!(count(&r, "identities", "listed"), 1);

    // With a master realm beside it, the folder holds two realms: keycloak.realm picks one.
    let dir = TempDir::new();
    for f in [
        "pid-issuer-realm-realm.json",
        "pid-issuer-realm-users-0.json",
    ] {
        dir.write(f, &read_fixture(&format!("kc22-dir/{f}")));
    }
    dir.write(
        "master-realm.json",
        &read_fixture("kc26.5.5-master-realm.json"),
    );
    let t = refused(&dir.0, &[]).await;
    assert!(
        t.contains("\"master\", \"pid-issuer-realm\"") && t.contains("not \"dev\""),
        "{t}"
    );
    let db = TestDb::new().await;
    let r = apply(&db.engine(&[
        ("SEEDKEEPER_IDENTITY__REALM_FILE", dir.0.to_str().unwrap()),
        ("SEEDKEEPER_KEYCLOAK__REALM", "pid-issuer-realm"),
    ]))
    .await;
    assert_ok(&r);
    assert_eq!(rows(&db).await.len(), 1);

    // Keycloak's testsuite users file (no realm file, a user without id): read, user rejected.
    let db = TestDb::new().await;
    let r = apply(&db.engine(&refs(&realm_env(&fixture("testsuite-dir-import"))))).await;
    assert_ok(&r);
    assert_eq!(rows(&db).await, vec![]);
    let rejected = findings(&r, FindingKind::Rejected);
    assert_eq!(rejected.len(), 1, "{rejected:#?}");
    assert_eq!(rejected[0].0, "user:alice");
    assert!(
        rejected[0].1.contains("dir-import-migration-users-0.json")
            && rejected[0].1.contains("users[0]"),
        "{rejected:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn structural_damage_is_still_refused_whole() {
    let dir = TempDir::new();
    let duplicates: Vec<(&str, String, &str)> = vec![
        (
            "dup-id.json",
            json!({"realm": "dev", "users": [{"id": "1", "username": "a"}, {"id": "1", "username": "b"}]}).to_string(),
            "users[1] (\"b\"): duplicate id \"1\" (also ",
        ),
        (
            // A user without id still counts for duplicate usernames (Keycloak refuses both).
            "dup-name-no-id.json",
            json!({"realm": "dev", "users": [{"id": "1", "username": "a"}, {"username": "A"}]}).to_string(),
            "users[1] (\"A\"): duplicate username \"A\" (also ",
        ),
    ];
    for (name, content, needle) in duplicates {
        let path = dir.write(name, &content);
        let t = refused_by_stage(&path).await;
        assert!(
            t.contains(name) && t.contains(needle) && t.contains("users[0]"),
            "{name}: expected {needle:?} in {t}"
        );
    }
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "no-username.json",
            json!({"realm": "dev", "users": [{"id": "1"}]}).to_string(),
            "has no \"username\"",
        ),
        (
            "array-type.json",
            json!([{"realm": "dev", "users": [{"id": "1", "username": "a", "enabled": "yes"}]}]).to_string(),
            "realms[0] users[0]",
        ),
        (
            "array-empty.json",
            "[]".to_string(),
            "empty array of realms",
        ),
        (
            // Keycloak 26.4 answers 500 "Cannot parse the JSON" to such a realm.
            "bad-profile.json",
            json!({"realm": "dev", "users": [{"id": "1", "username": "a"}],
                   "components": {"org.keycloak.userprofile.UserProfileProvider": [
                       {"providerId": "declarative-user-profile", "config": {"kc.user.profile.config": ["not json"]}}]}})
            .to_string(),
            "kc.user.profile.config) is not a valid profile",
        ),
        (
            "unknown-group.json",
            json!({"realm": "dev", "users": [{"id": "1", "username": "a", "groups": ["/nope"]}]}).to_string(),
            "group \"/nope\" is not defined",
        ),
    ];
    for (name, content, needle) in cases {
        let path = dir.write(name, &content);
        let t = refused(&path, &[]).await;
        assert!(
            t.contains(name) && t.contains(needle),
            "{name}: expected {needle:?} in {t}"
        );
    }
    // A folder's realm file is one realm object, never an array.
    let folder = TempDir::new();
    folder.write("dev-realm.json", &json!([{"realm": "dev"}]).to_string());
    let t = refused(&folder.0, &[]).await;
    assert!(
        t.contains("dev-realm.json") && t.contains("not a realm export"),
        "{t}"
    );
}

/// Users' group paths spelled as Keycloak's import accepts them (one optional
/// leading and one optional trailing `/`) resolve to the same groups as the canonical paths;
/// anything more is still an unknown group.
#[tokio::test(flavor = "multi_thread")]
async fn group_paths_without_leading_or_with_trailing_slash_resolve_as_keycloak_resolves_them() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let spellings = GROUP_PATH_SPELLINGS;
    let users: Vec<Value> = spellings
        .iter()
        .enumerate()
        .map(|(i, (name, group))| {
            json!({"id": format!("c1000000-0000-4000-8000-00000000000{i}"), "username": name,
                   "enabled": true, "groups": [group]})
        })
        .collect();
    // The subgroup's `path` is written the way some hand-made realms do: no leading slash.
    let realm = json!({
        "realm": "dev",
        "groups": [{"name": "Admin", "path": "/Admin", "realmRoles": ["admin"],
                    "subGroups": [{"name": "Ops", "path": "Admin/Ops/", "realmRoles": ["ops"], "subGroups": []}]}],
        "users": users,
    });
    let env = realm_file_env(&dir, &realm);
    let r = apply(&db.engine(&refs(&env))).await;
    assert_ok(&r);
    let state = identity_state(&db).await;
    let bindings: Vec<&str> = state
        .iter()
        .filter(|s| s.starts_with("binding"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        bindings,
        [
            "binding bare-admin platform_superadmin active seedkeeper",
            "binding bare-ops platform_ops active seedkeeper",
            "binding bare-ops platform_superadmin active seedkeeper",
            "binding canon-admin platform_superadmin active seedkeeper",
            "binding canon-ops platform_ops active seedkeeper",
            "binding canon-ops platform_superadmin active seedkeeper",
            "binding trailing-admin platform_superadmin active seedkeeper",
            "binding trailing-ops platform_ops active seedkeeper",
            "binding trailing-ops platform_superadmin active seedkeeper",
        ],
        "{state:#?}"
    );
    // The effective realm roles each spelling gives equal the canonical path's.
    let roles = |name: &str| {
        state
            .iter()
            .find(|s| s.starts_with("user ") && s.split(' ').nth(2) == Some(name))
            .map(|s| s.rsplit(' ').next().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("no row for {name}: {state:#?}"))
    };
    for (canon, others) in [
        ("canon-admin", ["bare-admin", "trailing-admin"]),
        ("canon-ops", ["bare-ops", "trailing-ops"]),
    ] {
        for other in others {
            assert_eq!(roles(other), roles(canon), "{other} against {canon}");
        }
    }

    // Keycloak strips one slash at each end, no more: `//Admin` names no group.
    let bad = dir.write(
        "two-slashes.json",
        &json!({"realm": "dev", "groups": [{"name": "Admin", "path": "/Admin"}],
                "users": [{"id": "1", "username": "a", "groups": ["//Admin"]}]})
        .to_string(),
    );
    let t = refused(&bad, &[]).await;
    assert!(t.contains("group \"//Admin\" is not defined"), "{t}");
}

/// Client roles that hold realm roles: `zed` holds `app/super` (which holds admin), `gus` through
/// the group `/app-admins`, `nes` through the parent of its group, two client roles away
/// (`app/chain` holds `app/super`); the default role holds `app/opsy`, which holds `ops`, for
/// the users whose `realmRoles` name it (`dee`, and the personas); `pla` holds nothing and
/// `pia` a client role that holds no realm role. Keycloak computes the same (the conformance
/// suite compares each user with its `role-mappings/realm/composite`).
#[tokio::test(flavor = "multi_thread")]
async fn client_role_composites_give_realm_roles_directly_through_groups_and_the_default_role() {
    let db = TestDb::new().await;
    let r = apply(&db.engine(&refs(&realm_env(&fixture("client-role-admins-realm.json"))))).await;
    assert_ok(&r);
    let got = db
        .strings(
            "SELECT username || ' ' || role || ' ' || array_to_string(realm_roles, ',') FROM users
             WHERE username IN ('zed', 'gus', 'nes', 'dee', 'pla', 'pia', 'dev-user') ORDER BY 1",
        )
        .await;
    assert_eq!(
        got,
        [
            "dee user ops",
            "dev-user user ops",
            "gus admin admin",
            "nes admin admin",
            "pia user ",
            "pla user ",
            "zed admin admin",
        ]
    );
}

/// Emails that differ only in case refuse the whole file, as Keycloak's import refuses the realm
/// (409): exit 78, both users and the setting named, nothing written. `duplicateEmailsAllowed`
/// lets both in with the same email.
#[tokio::test(flavor = "multi_thread")]
async fn emails_differing_only_in_case_refuse_the_file_unless_the_realm_allows_duplicates() {
    let t = refused_by_stage(&fixture("duplicate-emails-realm.json")).await;
    for needle in [
        "users[8] (\"lower\")",
        "users[7] (\"upper\")",
        "\"same@x.test\"",
        "\"duplicateEmailsAllowed\": true",
        "SEEDKEEPER_IDENTITY__REALM_FILE",
    ] {
        assert!(t.contains(needle), "{needle} missing from: {t}");
    }
    let mut realm: Value =
        serde_json::from_str(&read_fixture("duplicate-emails-realm.json")).unwrap();
    realm["duplicateEmailsAllowed"] = json!(true);
    let db = TestDb::new().await;
    let dir = TempDir::new();
    assert_ok(&apply(&db.engine(&refs(&realm_file_env(&dir, &realm)))).await);
    let got = db
        .strings(
            "SELECT username || ' ' || email FROM users WHERE email = 'same@x.test' ORDER BY 1",
        )
        .await;
    assert_eq!(got, ["lower same@x.test", "upper same@x.test"]);
}

/// What Keycloak 26 stores on import, read from the file: under `registrationEmailAsUsername`
/// the lower-cased email is the username (not with `duplicateEmailsAllowed`, and not for a user
/// without email); names the declarative user profile does not declare are left out, whatever
/// its `unmanagedAttributePolicy`.
#[tokio::test(flavor = "multi_thread")]
async fn usernames_and_names_are_stored_as_keycloaks_import_stores_them() {
    let cases: Vec<(&str, Option<&str>, Vec<&str>)> = vec![
        (
            "email-as-username-realm.json",
            None,
            vec![
                "no-email No-Email Roles",
                "test_user@example.com Test_User Roles",
            ],
        ),
        (
            "email-as-username-realm.json",
            Some("duplicateEmailsAllowed"),
            vec!["no-email No-Email Roles", "test_user Test_User Roles"],
        ),
        ("profile-without-names-realm.json", None, vec!["named - -"]),
        (
            "profile-first-name-only-realm.json",
            None,
            vec!["named Named -"],
        ),
    ];
    for (file, setting, want) in cases {
        let mut realm: Value = serde_json::from_str(&read_fixture(file)).unwrap();
        if let Some(s) = setting {
            realm[s] = json!(true);
        }
        let db = TestDb::new().await;
        let dir = TempDir::new();
        assert_ok(&apply(&db.engine(&refs(&realm_file_env(&dir, &realm)))).await);
        let got = db
            .strings(
                "SELECT username || ' ' || coalesce(first_name, '-') || ' ' || coalesce(last_name, '-') FROM users
                 WHERE keycloak_sub LIKE 'f2000000-%' ORDER BY 1",
            )
            .await;
        assert_eq!(got, want, "{file} {setting:?}");
    }
}
