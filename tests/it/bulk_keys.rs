//! A bulk write of the tenants unit (a first run, or a quarter of the users new at once) sets the
//! foreign keys of its four tables aside and adds them back, every row checked, before it
//! commits: the constraints after the run are the same ones, comments included, and a
//! constraint added `NOT VALID` by someone else is left as it was. When a table is in use by
//! another session, or the run's role does not own the tables, the keys stay and each row is
//! checked as it is written, without waiting and without failing.

use crate::harness::spawn::run_bin;
use crate::harness::*;

/// Every foreign key of the schema: table, name, definition, validated, comment.
const FOREIGN_KEYS: &str =
    "SELECT concat_ws(' | ', conrelid::regclass, conname, pg_get_constraintdef(oid), convalidated,
                                   coalesce(obj_description(oid, 'pg_constraint'), '-'))
                            FROM pg_constraint WHERE contype = 'f' ORDER BY 1";

/// A database where a first run wrote 10 users, and the environment of a run of `users` users
/// from a realm file in `dir`, logging the foreign keys' lines.
async fn ten_users_then(dir: &TempDir, users: usize) -> (TestDb, Vec<(String, String)>) {
    let db = TestDb::new().await;
    let realm = dir.0.join("realm.json");
    crate::memory::write_realm(&realm, 10);
    let mut env = db.env();
    env.push((
        "SEEDKEEPER_IDENTITY__REALM_FILE".into(),
        realm.display().to_string(),
    ));
    env.push((
        "SEEDKEEPER_LOG__FILTER".into(),
        "info,seedkeeper::store::foreign_keys=debug".into(),
    ));
    once_ok(&env);
    crate::memory::write_realm(&realm, users);
    (db, env)
}

/// Users with a whole chain: tenant, default project, both memberships active owners.
async fn chains(db: &TestDb) -> i64 {
    db.scalar(
        "SELECT count(*) FROM users u
         JOIN tenants t ON t.kind = 'personal' AND t.owner_user_id = u.id
         JOIN projects p ON p.tenant_id = t.id AND p.is_default
         JOIN tenant_memberships tm ON tm.tenant_id = t.id AND tm.user_id = u.id AND tm.role = 'owner' AND tm.status = 'active'
         JOIN project_memberships pm ON pm.project_id = p.id AND pm.user_id = u.id AND pm.role = 'owner' AND pm.status = 'active'",
    )
    .await
}

/// One `--once` of `env`, which must succeed: its output.
fn once_ok(env: &[(String, String)]) -> String {
    let out = run_bin(&["--once"], env);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    t
}

/// `env` with the database reached at `url` instead.
fn with_url(env: Vec<(String, String)>, url: String) -> Vec<(String, String)> {
    env.into_iter()
        .filter(|(k, _)| k != "SEEDKEEPER_DATABASE__URL")
        .chain([("SEEDKEEPER_DATABASE__URL".into(), url)])
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_write_puts_back_the_same_foreign_keys_checked_and_leaves_not_valid_ones_alone() {
    let dir = TempDir::new();
    let (db, env) = ten_users_then(&dir, 3_000).await;
    db.execute(
        "COMMENT ON CONSTRAINT tenant_memberships_user_id_fkey ON tenant_memberships IS 'the member''s user';
         ALTER TABLE projects ADD CONSTRAINT projects_tenant_extra FOREIGN KEY (tenant_id) REFERENCES tenants (id) NOT VALID",
    )
    .await;
    let before = db.strings(FOREIGN_KEYS).await;
    assert!(
        before.iter().any(|k| k.contains("the member's user"))
            && before
                .iter()
                .any(|k| k.starts_with("projects | projects_tenant_extra") && k.contains("| f |")),
        "{before:#?}"
    );
    let t = once_ok(&env);
    assert!(
        t.contains("foreign keys set aside for a bulk write") && t.contains("constraints=6"),
        "the six validated keys of the four tables, not the NOT VALID one: {t}"
    );
    assert_eq!(db.strings(FOREIGN_KEYS).await, before);
    assert_eq!(chains(&db).await, 3_000);
    // Checked when put back: a row without its parent is refused now as before the run.
    let c = db.client().await;
    let e = c
        .batch_execute(
            "INSERT INTO tenant_memberships (tenant_id, user_id, role, status)
             SELECT id, gen_random_uuid(), 'member', 'active' FROM tenants LIMIT 1",
        )
        .await
        .expect_err("a membership of a user that does not exist");
    assert!(
        e.to_string().contains("violates foreign key constraint")
            || format!("{e:?}").contains("23503"),
        "{e:?}"
    );
    // A second run of the same users writes nothing and sets nothing aside.
    let t = once_ok(&env);
    assert!(!t.contains("set aside"), "{t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_in_use_by_another_session_keeps_its_foreign_keys_and_the_run_does_not_wait() {
    let dir = TempDir::new();
    let (db, mut env) = ten_users_then(&dir, 3_000).await;
    let before = db.strings(FOREIGN_KEYS).await;
    // A reader in an open transaction: its lock on tenants is not one a bulk write may wait for
    // (it would wait out database.lock_timeout, 60 s here, then fail the unit).
    let reader = db.client().await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM tenants")
        .await
        .unwrap();
    env.push(("SEEDKEEPER_DATABASE__LOCK_TIMEOUT".into(), "60s".into()));
    let started = std::time::Instant::now();
    let t = once_ok(&env);
    let took = started.elapsed();
    assert!(
        t.contains("foreign keys kept for a bulk write") && t.contains("lock"),
        "{t}"
    );
    assert!(!t.contains("set aside for a bulk write"), "{t}");
    assert!(took.as_secs() < 30, "the run waited: {took:?}");
    assert_eq!(chains(&db).await, 3_000);
    reader.batch_execute("COMMIT").await.unwrap();
    assert_eq!(db.strings(FOREIGN_KEYS).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_does_not_own_the_tables_keeps_their_foreign_keys_and_writes_row_by_row() {
    let dir = TempDir::new();
    let (db, env) = ten_users_then(&dir, 3_000).await;
    let before = db.strings(FOREIGN_KEYS).await;
    let (role, url) = db
        .login_role("sk_rw", "SELECT, INSERT, UPDATE, DELETE")
        .await;
    let env = with_url(env, url);
    let t = once_ok(&env);
    assert!(
        t.contains("foreign keys kept for a bulk write") && t.contains("owner"),
        "{t}"
    );
    assert_eq!(chains(&db).await, 3_000);
    assert_eq!(db.strings(FOREIGN_KEYS).await, before);
    db.drop_role(&role).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_write_behind_pgbouncer_in_transaction_mode_sets_the_keys_aside_and_puts_them_back()
{
    use crate::harness::pooler::{PgBouncer, PoolMode};
    let dir = TempDir::new();
    let (db, env) = ten_users_then(&dir, 3_000).await;
    let before = db.strings(FOREIGN_KEYS).await;
    let pgb = PgBouncer::start(
        PoolMode::Transaction,
        3,
        &["ignore_startup_parameters = options"],
    );
    let mut env = with_url(env, pgb.url(&db.name));
    env.push(("SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT".into(), "0".into()));
    env.push(("SEEDKEEPER_DATABASE__LOCK_TIMEOUT".into(), "0".into()));
    let out = run_bin(&["--once"], &env);
    let t = text(&out);
    assert!(out.status.success(), "{t}\n{}", pgb.log());
    assert!(
        t.contains("foreign keys set aside for a bulk write") && t.contains("constraints=6"),
        "{t}"
    );
    assert_eq!(chains(&db).await, 3_000);
    assert_eq!(db.strings(FOREIGN_KEYS).await, before);
}
