//! What a settled run skips: a unit whose inputs match the state the last settled run recorded
//! (`seed_runs.unit_states`) knows it has nothing to do without comparing row by row. A realm
//! file already applied is not staged again (its bytes, the settings that decide the listing and
//! the users rows all match), and the role_bindings and tenants units do not join their tables
//! when those and the users rows they derive from match. Any change to any input, the file, the
//! settings, a users row, a binding, a tenant or a membership, is still seen and applied; a run
//! that ends with something to report records no state.

use serde_json::Value;

use crate::harness::spawn::run_bin;
use crate::harness::*;
use crate::identities::{realm_file_env, test_realm, user};

const ALICE: &str = "c5000000-0000-4000-8000-000000000001";
const BOB: &str = "c5000000-0000-4000-8000-000000000002";

/// What the run's log says (at debug) of a unit that found its recorded state.
const SETTLED: &str = "unit_settled:";
/// ... and of a unit whose writes, accounted for by their hashes, proved it settled.
const AS_WRITTEN: &str = "unit_settled_as_written:";

fn realm(bob_first_name: &str) -> Value {
    let mut bob = user(BOB, "bob", &[], &[]);
    bob["firstName"] = Value::String(bob_first_name.into());
    test_realm(vec![user(ALICE, "alice", &["ops-lead"], &["/admins"]), bob])
}

/// The units of a run that found their recorded state, in run order.
fn settled_units(stderr: &str) -> Vec<String> {
    units_saying(stderr, SETTLED)
}

/// The units of a run whose debug lines say `what`, in run order.
fn units_saying(stderr: &str, what: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            l.split("unit=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_string)
        })
        .collect()
}

/// The environment of a run with `realm` in `dir` on `db`, logging the units' debug lines.
fn run_env(db: &TestDb, dir: &TempDir, realm: &Value) -> Vec<(String, String)> {
    let mut env = [db.env(), realm_file_env(dir, realm)].concat();
    env.push((
        "SEEDKEEPER_LOG__FILTER".into(),
        "info,seedkeeper::reconcile=debug".into(),
    ));
    env
}

/// One `--once` of `env`: whether the identities unit took the recorded state (else it staged
/// the listing), and its summary line of the identities unit.
fn once(env: &[(String, String)]) -> (bool, String) {
    let (units, lines) = once_all(env);
    (units.iter().any(|u| u == "identities"), lines[0].clone())
}

/// One `--once` of `env`, which must succeed: its stdout and stderr.
fn run_once(env: &[(String, String)]) -> (String, String) {
    let out = run_bin(&["--once"], env);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "--once failed: {stdout}\n{stderr}");
    (stdout, stderr)
}

/// One `--once` of `env`: the units that took their recorded state, and the summary lines of
/// identities, role_bindings and tenants.
fn once_all(env: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let (stdout, stderr) = run_once(env);
    let line = |unit: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{unit} ")))
            .unwrap_or_else(|| panic!("no {unit} line in {stdout}"))
            .trim()
            .to_string()
    };
    let lines = ["identities", "role_bindings", "tenants"]
        .map(line)
        .to_vec();
    (settled_units(&stderr), lines)
}

async fn row(db: &TestDb, username: &str) -> String {
    db.strings(&format!(
        "SELECT concat_ws(' ', email, first_name, role, is_active, realm_roles::text, offboarded_at IS NULL)
         FROM users WHERE username = '{username}'"
    ))
    .await
    .join("")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_applied_realm_file_is_not_staged_again_until_the_file_the_settings_or_a_users_row_changes(
) {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let env = run_env(&db, &dir, &realm("Bob"));

    // The cold run stages and writes, and records the settled state.
    let (fast, cold) = once(&env);
    assert!(!fast, "the first run has nothing recorded to rely on");
    let listed = cold
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listed="))
        .unwrap_or_else(|| panic!("{cold}"))
        .to_string();
    assert_eq!(
        cold,
        format!("identities inserted={listed} listed={listed}")
    );
    let states =
        "SELECT count(DISTINCT unit_states ->> 'identities') FROM seed_runs WHERE unit_states ? 'identities'";
    assert_eq!(db.scalar(states).await, 1);
    let alice = row(&db, "alice").await;
    assert_eq!(alice, "alice@example.test F admin t {admin,ops} t");

    // The same file over the same rows: not staged, nothing written, the full run's counts.
    let before = db.tuples_written().await;
    let (fast, noop) = once(&env);
    assert!(
        fast,
        "an unchanged file over unchanged rows is staged again"
    );
    let unchanged = format!("identities listed={listed} unchanged={listed}");
    assert_eq!(noop, unchanged);
    assert_eq!(db.tuples_written().await, before);
    // A plan reads the same state and shows nothing to do.
    let out = run_bin(&["plan"], &env);
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && plan.contains("identities: in sync"),
        "{plan}"
    );
    let units = settled_units(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(units, ["identities", "role_bindings", "tenants"]);

    // Every change to a users row the unit owns is seen, and undone by the next run.
    let tampered = [
        "UPDATE users SET email = 'someone@else.test' WHERE username = 'bob'",
        "UPDATE users SET role = 'user', realm_roles = '{}' WHERE username = 'alice'",
        "UPDATE users SET is_active = false, offboarded_at = now() WHERE username = 'bob'",
        "UPDATE users SET first_name = NULL WHERE username = 'alice'",
    ];
    for sql in tampered {
        let bob = row(&db, "bob").await;
        db.execute(sql).await;
        let (fast, line) = once(&env);
        assert!(!fast, "after `{sql}` the listing was not staged");
        assert!(
            line.contains("updated=1") || line.contains("reactivated=1"),
            "`{sql}` was not undone: {line}"
        );
        assert_eq!(row(&db, "alice").await, alice, "after {sql}");
        assert_eq!(row(&db, "bob").await, bob, "after {sql}");
        let (fast, _) = once(&env);
        assert!(fast, "after `{sql}` was undone the next run staged again");
    }

    // A changed file is staged and applied.
    let env = run_env(&db, &dir, &realm("Robert"));
    let (fast, line) = once(&env);
    assert!(!fast && line.contains("updated=1"), "{line}");
    assert!(row(&db, "bob").await.contains(" Robert "));
    assert!(once(&env).0);

    // So is a change of the settings that decide the listing: admin no longer makes an admin.
    let mut env = env;
    env.push((
        "SEEDKEEPER_IDENTITY__ADMIN_ROLES".into(),
        r#"["realm-admin"]"#.into(),
    ));
    let (fast, line) = once(&env);
    assert!(!fast && line.contains(" updated="), "{line}");
    assert!(row(&db, "alice").await.contains(" user "));
    assert!(once(&env).0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_reports_something_records_no_state_and_the_next_run_stages_again() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    // A user without id is refused by every run (a finding): nothing is ever settled.
    let mut r = realm("Bob");
    r["users"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"username": "nobody", "enabled": true}));
    let env = run_env(&db, &dir, &r);
    for _ in 0..3 {
        let (fast, line) = once(&env);
        assert!(!fast, "a listing with a refused user was taken as settled");
        assert!(line.contains("rejected=1"), "{line}");
    }
    let recorded = "SELECT count(*) FROM seed_runs WHERE unit_states ? 'identities'";
    assert_eq!(db.scalar(recorded).await, 0);

    // Once the file is fixed, the run settles and the one after it is not staged.
    let env = run_env(&db, &dir, &realm("Bob"));
    assert!(!once(&env).0);
    assert!(once(&env).0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bindings_tenants_and_memberships_edited_by_hand_are_restored_by_a_run_after_settled_ones()
{
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let env = run_env(&db, &dir, &realm("Bob"));
    let all = ["identities", "role_bindings", "tenants"];
    let (units, cold) = once_all(&env);
    assert!(units.is_empty(), "{units:?}");
    let (units, settled) = once_all(&env);
    assert_eq!(
        units, all,
        "the run after a settled one compared row by row"
    );
    assert!(cold[1] != settled[1] && cold[2] != settled[2]);
    let state = "SELECT string_agg(b.role_name || '/' || b.status, ',' ORDER BY b.role_name, b.status)
                        || ' ' || (SELECT count(*) FROM tenants t JOIN projects p ON p.tenant_id = t.id
                                   JOIN tenant_memberships tm ON tm.tenant_id = t.id AND tm.role = 'owner' AND tm.status = 'active'
                                   JOIN project_memberships pm ON pm.project_id = p.id AND pm.role = 'owner' AND pm.status = 'active'
                                   JOIN users u ON u.id = t.owner_user_id WHERE u.username = 'alice')
                 FROM platform_role_bindings b JOIN users u ON u.id = b.user_id
                 WHERE u.username = 'alice' AND b.status = 'active'";
    let alice = db.strings(state).await;
    assert_eq!(alice, ["platform_ops/active,platform_superadmin/active 1"]);

    // (edit, the unit that must see it and restore the rows)
    let alice_id = "(SELECT id FROM users WHERE username = 'alice')";
    let edits = [
        (format!("UPDATE platform_role_bindings SET status = 'revoked', revoked_at = now(), revoked_by = 'someone'
                  WHERE user_id = {alice_id} AND role_name = 'platform_superadmin'"), "role_bindings"),
        (format!("DELETE FROM platform_role_bindings WHERE user_id = {alice_id} AND role_name = 'platform_ops'"), "role_bindings"),
        (format!("UPDATE tenant_memberships SET status = 'suspended' WHERE user_id = {alice_id}"), "tenants"),
        (format!("DELETE FROM project_memberships WHERE user_id = {alice_id}"), "tenants"),
        (format!("UPDATE project_memberships SET role = 'viewer' WHERE user_id = {alice_id}"), "tenants"),
    ];
    for (sql, unit) in &edits {
        db.execute(sql).await;
        let (units, lines) = once_all(&env);
        assert!(
            !units.contains(&unit.to_string()),
            "after `{sql}`, {unit} was taken as settled: {units:?}"
        );
        assert!(units.contains(&"identities".to_string()), "{units:?}");
        let line = if *unit == "tenants" {
            &lines[2]
        } else {
            &lines[1]
        };
        assert!(
            line != &settled[if *unit == "tenants" { 2 } else { 1 }],
            "`{sql}` was not undone: {line}"
        );
        assert_eq!(db.strings(state).await, alice, "after `{sql}`");
        let (units, _) = once_all(&env);
        assert_eq!(units, all, "after `{sql}` was undone");
    }

    // A users row edited by hand is restored by the identities unit first: the units after it
    // then find the rows they derive from as recorded.
    db.execute("UPDATE users SET role = 'user' WHERE username = 'alice'")
        .await;
    let (units, _) = once_all(&env);
    assert_eq!(units, ["role_bindings", "tenants"]);
    assert_eq!(db.strings(state).await, alice);

    // A users row no listing owns (made by hand, no sub) is kept by identities, and covered by
    // tenants: every unit reads it as a change.
    db.execute("INSERT INTO users (username, role) VALUES ('walk-in', 'admin')")
        .await;
    let (units, lines) = once_all(&env);
    assert!(units.is_empty(), "{units:?}");
    assert!(
        lines[1].contains("inserted=1") && lines[2].contains("inserted=4"),
        "{lines:?}"
    );
    let (units, _) = once_all(&env);
    assert_eq!(units, all);

    // A state another build recorded (here: another state format) is never taken for settled.
    db.execute(
        "UPDATE seed_runs SET unit_states = (SELECT jsonb_object_agg(k, 'state-0' || substr(v, 8))
                                                 FROM jsonb_each_text(unit_states) AS e(k, v))
             WHERE unit_states <> '{}'",
    )
    .await;
    let (units, _) = once_all(&env);
    assert!(
        units.is_empty(),
        "an older build's state was taken: {units:?}"
    );
    let (units, _) = once_all(&env);
    assert_eq!(units, all);
}

/// A first run that writes 12,000 users (past the 10,000 rows after which a unit analyzes what
/// it wrote) takes the row counts and the statistics of the columns its checks join and filter
/// on, inside its own transaction, and leaves the other columns, and the tables' counts of
/// changed rows, to autovacuum: the platform's queries get every column analyzed after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_first_run_analyzes_the_columns_it_joins_and_leaves_the_rest_to_autovacuum() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let realm = dir.0.join("realm.json");
    crate::memory::write_realm(&realm, 12_000);
    let mut env = db.env();
    env.push((
        "SEEDKEEPER_IDENTITY__REALM_FILE".into(),
        realm.display().to_string(),
    ));
    let out = run_bin(&["--once"], &env);
    assert!(out.status.success(), "{}", text(&out));
    for table in [
        "users",
        "tenants",
        "projects",
        "tenant_memberships",
        "project_memberships",
    ] {
        let counted = db
            .scalar(&format!(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = 'public.{table}'::regclass"
            ))
            .await;
        assert_eq!(
            counted, 12_000,
            "{table}: the row count the run's ANALYZE took"
        );
    }
    let analyzed = |table: &str| {
        format!(
            "SELECT string_agg(attname, ' ' ORDER BY attname) FROM pg_stats WHERE schemaname = 'public' AND tablename = '{table}'"
        )
    };
    assert_eq!(
        db.strings(&analyzed("users")).await.join(""),
        "id is_active keycloak_sub offboarded_at role username"
    );
    assert_eq!(
        db.strings(&analyzed("tenants")).await.join(""),
        "id kind owner_user_id"
    );
    // The counts of changed rows reach the statistics collector when the run's backend ends.
    let mut pending = 0;
    for _ in 0..50 {
        pending = db
            .scalar("SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = 'users'")
            .await;
        if pending >= 12_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        pending >= 12_000,
        "users: {pending} rows changed since the last ANALYZE, autovacuum would not analyze every column"
    );
}

/// A run that wrote proves itself settled with one digest of the tables it wrote, when that
/// digest is the one its check read plus the hashes of the rows it wrote: then nobody else
/// changed a row meanwhile. A row changed by anyone else while the unit writes (here a trigger
/// of the unit's own insert, the closest a test gets to another session between two
/// statements) makes the digest differ: the unit checks every row again, finds the change, and
/// records no state, so the next run compares row by row and undoes it. Were the counts of
/// rows written trusted instead, the tampered rows would be recorded as settled and never
/// looked at again.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_changed_by_anyone_else_while_a_unit_writes_is_seen_and_undone_by_the_next_run() {
    let all = ["identities", "role_bindings", "tenants"];
    // Untouched: the cold run's identities and tenants prove themselves settled as written.
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let env = run_env(&db, &dir, &realm("Bob"));
    let (_, stderr) = run_once(&env);
    assert_eq!(units_saying(&stderr, AS_WRITTEN), ["identities", "tenants"]);
    assert_eq!(once_all(&env).0, all);

    let db = TestDb::new().await;
    let dir = TempDir::new();
    let env = run_env(&db, &dir, &realm("Bob"));
    let migrate = run_bin(&["migrate"], &db.env());
    assert!(migrate.status.success(), "{}", text(&migrate));
    db.execute(
        "CREATE FUNCTION sk_test_tamper_users() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN UPDATE users SET email = 'tampered@example.test' WHERE username = 'bob'; RETURN NULL; END $$;
         CREATE TRIGGER sk_test_tamper AFTER INSERT ON users
             FOR EACH STATEMENT EXECUTE FUNCTION sk_test_tamper_users();
         CREATE FUNCTION sk_test_tamper_tenants() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN UPDATE tenant_memberships SET status = 'suspended'
               WHERE user_id = (SELECT id FROM users WHERE username = 'alice'); RETURN NULL; END $$;
         CREATE TRIGGER sk_test_tamper AFTER INSERT ON project_memberships
             FOR EACH STATEMENT EXECUTE FUNCTION sk_test_tamper_tenants();",
    )
    .await;
    let (_, stderr) = run_once(&env);
    assert!(
        units_saying(&stderr, AS_WRITTEN).is_empty(),
        "a unit took rows changed by another writer for its own: {stderr}"
    );
    let recorded =
        "SELECT count(*) FROM seed_runs WHERE unit_states ?| array['identities', 'tenants']";
    assert_eq!(db.scalar(recorded).await, 0);
    let tampered = "SELECT (SELECT email FROM users WHERE username = 'bob') || ' ' ||
                           (SELECT string_agg(status, ',') FROM tenant_memberships
                            WHERE user_id = (SELECT id FROM users WHERE username = 'alice'))";
    assert_eq!(
        db.strings(tampered).await,
        ["tampered@example.test suspended"]
    );

    db.execute(
        "DROP TRIGGER sk_test_tamper ON users; DROP TRIGGER sk_test_tamper ON project_memberships",
    )
    .await;
    let (units, lines) = once_all(&env);
    assert_eq!(units, ["role_bindings"], "{lines:?}");
    assert!(
        lines[0].contains("updated=1") && lines[2].contains("updated=1"),
        "{lines:?}"
    );
    assert_eq!(db.strings(tampered).await, ["bob@example.test active"]);
    assert_eq!(once_all(&env).0, all);
}
