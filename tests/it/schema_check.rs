//! The schema is verified as it is, not as it was recorded: an object of an applied migration
//! dropped afterwards (a column, a table, a unique constraint, a partial unique index) fails the
//! run naming it and the repair, `plan` and `schema.mode = "verify"` too, and
//! `seedkeeper migrate --repair` re-creates it so the next run succeeds. Real PostgreSQL, the
//! real binary.

use std::collections::BTreeSet;

use seedkeeper::store::schema_check::{self, EXPECTED};

use crate::harness::*;

#[tokio::test]
async fn the_expected_objects_are_exactly_those_a_freshly_migrated_database_has() {
    let db = TestDb::empty().await;
    let out = run_bin(&["migrate"], &db.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let client = db.client().await;
    let have: BTreeSet<(schema_check::Kind, String)> = schema_check::present(&client)
        .await
        .unwrap()
        .into_iter()
        // The migrations' own record is made by the runner, not by a migration.
        .filter(|(_, name)| !name.starts_with("seedkeeper_migrations"))
        .collect();
    let expected: BTreeSet<(schema_check::Kind, String)> = EXPECTED
        .iter()
        .map(|(k, n, _)| (*k, n.to_string()))
        .collect();
    let unlisted: Vec<_> = have.difference(&expected).collect();
    let unmade: Vec<_> = expected.difference(&have).collect();
    assert!(
        unlisted.is_empty(),
        "objects the migrations make but src/store/schema_check.rs EXPECTED does not list: {unlisted:?}"
    );
    assert!(
        unmade.is_empty(),
        "objects EXPECTED lists but the migrations do not make: {unmade:?}"
    );
    assert!(schema_check::missing(&client).await.unwrap().is_empty());
    // Every object belongs to an embedded migration.
    for (_, name, v) in EXPECTED {
        assert!(
            seedkeeper::store::migrate::MIGRATIONS
                .iter()
                .any(|m| m.version == *v),
            "{name}: V{v}"
        );
    }
}

/// A database with a first run done (rows in every table), then `drop` run on it: with
/// `schema.mode = "verify"` each run and `plan` fail naming `object` and the repair; `migrate`
/// without `--repair` too; `migrate --repair` re-creates it and the next run succeeds, twice.
/// Dropped again: in apply mode `plan` lists the repair, and the run re-creates the object itself
/// before any unit relies on it, and says so.
async fn dropped_then_repaired(drop: &str, object: &str) {
    let db = TestDb::new().await;
    let env = db.env();
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    db.client().await.batch_execute(drop).await.unwrap();

    let mut verify = env.clone();
    verify.push(("SEEDKEEPER_SCHEMA__MODE".into(), "verify".into()));
    for (what, args, env) in [
        ("verify --once", &["--once"][..], &verify),
        ("verify plan", &["plan"][..], &verify),
        ("migrate", &["migrate"][..], &env),
    ] {
        let out = run_bin(args, env);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{drop}: {what}: {t}");
        assert!(
            t.contains(object),
            "{drop}: {what}: {object} not named: {t}"
        );
        assert!(t.contains("are missing"), "{drop}: {what}: {t}");
        assert!(
            t.contains("seedkeeper migrate --repair"),
            "{drop}: {what}: {t}"
        );
    }
    let failed = db
        .scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'failed' AND error LIKE '%migrate --repair%'")
        .await;
    assert!(
        failed >= 1,
        "{drop}: the failed runs are recorded with the repair"
    );

    let out = run_bin(&["migrate", "--repair"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{drop}: {t}");
    assert!(t.contains("repaired: "), "{t}");
    let client = db.client().await;
    assert!(schema_check::missing(&client).await.unwrap().is_empty());
    // Nothing of the scratch schema stays.
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'seedkeeper_repair%'")
            .await,
        0
    );
    for _ in 0..2 {
        let out = run_bin(&["--once"], &env);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{drop}: after the repair: {}",
            text(&out)
        );
    }
    // A repair with nothing missing changes nothing.
    let out = run_bin(&["migrate", "--repair"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("repaired: "), "{}", text(&out));

    // Dropped again, in apply mode: the plan lists the repair, the run makes it and goes on.
    db.client().await.batch_execute(drop).await.unwrap();
    let out = run_bin(&["plan"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{drop}: plan: {t}");
    assert!(t.contains("+ repair schema:"), "{drop}: plan: {t}");
    assert!(
        !schema_check::missing(&client).await.unwrap().is_empty(),
        "plan repaired for good"
    );
    let out = run_bin(&["--once"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{drop}: apply: {t}");
    assert!(t.contains("re-created"), "{drop}: apply: {t}");
    assert!(schema_check::missing(&client).await.unwrap().is_empty());
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("re-created"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_offboarded_at_column_is_named_and_repaired() {
    dropped_then_repaired(
        "ALTER TABLE users DROP COLUMN offboarded_at",
        "column users.offboarded_at (made by V3__identity_lifecycle)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_tenants_and_projects_tables_are_named_and_repaired() {
    dropped_then_repaired(
        "DROP TABLE projects, tenants CASCADE",
        "table tenants (made by V1__db_schema_v1)",
    )
    .await;
    dropped_then_repaired(
        "DROP TABLE projects CASCADE",
        "table projects (made by V1__db_schema_v1)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_keycloak_sub_unique_constraint_is_named_and_repaired() {
    dropped_then_repaired(
        "ALTER TABLE users DROP CONSTRAINT users_keycloak_sub_key",
        "constraint users.users_keycloak_sub_key (made by V1__db_schema_v1)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_one_active_binding_index_is_named_and_repaired() {
    dropped_then_repaired(
        "DROP INDEX platform_role_bindings_one_active",
        "index platform_role_bindings_one_active (made by V1__db_schema_v1)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repair_that_meets_duplicate_rows_changes_nothing_and_names_them() {
    let db = TestDb::new().await;
    let env = db.env();
    assert_eq!(run_bin(&["--once"], &env).status.code(), Some(0));
    let c = db.client().await;
    c.batch_execute(
        "DROP INDEX platform_role_bindings_one_active;
         INSERT INTO platform_role_bindings (user_id, role_name, status, granted_by)
           SELECT user_id, role_name, status, 'someone-else' FROM platform_role_bindings WHERE status = 'active' LIMIT 1",
    )
    .await
    .unwrap();
    let out = run_bin(&["migrate", "--repair"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("platform_role_bindings_one_active"), "{t}");
    assert!(t.contains("nothing was changed"), "{t}");
    assert_eq!(
        schema_check::missing(&c).await.unwrap().len(),
        1,
        "still missing, nothing half-done"
    );
}
