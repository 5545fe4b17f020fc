//! A realm file already applied is not staged again: a run whose file bytes (with the settings
//! that decide the listing) and users rows both match the state the last settled run recorded
//! (`seed_runs.identities_state`) proves the listing unchanged from two digests. Any change to
//! either side, the file, the settings or a users row, is still seen and applied; a run that
//! ends with something to report records no state.

use serde_json::Value;

use crate::harness::spawn::run_bin;
use crate::harness::*;
use crate::identities::{realm_file_env, test_realm, user};

const ALICE: &str = "c5000000-0000-4000-8000-000000000001";
const BOB: &str = "c5000000-0000-4000-8000-000000000002";

/// What the run's log says when it takes the recorded state for the listing.
const NOT_STAGED: &str = "nothing staged";

fn realm(bob_first_name: &str) -> Value {
    let mut bob = user(BOB, "bob", &[], &[]);
    bob["firstName"] = Value::String(bob_first_name.into());
    test_realm(vec![user(ALICE, "alice", &["ops-lead"], &["/admins"]), bob])
}

/// One `--once` of `env`: whether it took the recorded state (else it staged the listing), and
/// its summary line of the identities unit.
fn once(env: &[(String, String)]) -> (bool, String) {
    let out = run_bin(&["--once"], env);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "--once failed: {stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("identities "))
        .unwrap_or_else(|| panic!("no identities line in {stdout}"))
        .trim()
        .to_string();
    (stderr.contains(NOT_STAGED), line)
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
    let env = [db.env(), realm_file_env(&dir, &realm("Bob"))].concat();

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
        "SELECT count(DISTINCT identities_state) FROM seed_runs WHERE identities_state IS NOT NULL";
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
    assert!(String::from_utf8_lossy(&out.stderr).contains(NOT_STAGED));

    // Every change to a users row the unit owns is seen, and undone by the next run.
    let tampered = [
        "UPDATE users SET email = 'someone@else.test' WHERE username = 'bob'",
        "UPDATE users SET role = 'user', realm_roles = '{}' WHERE username = 'alice'",
        "UPDATE users SET is_active = false, offboarded_at = now() WHERE username = 'bob'",
        "UPDATE users SET first_name = NULL WHERE username = 'alice'",
    ];
    for sql in tampered {
        let bob = row(&db, "bob").await;
        db.client().await.batch_execute(sql).await.expect(sql);
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
    let env = [db.env(), realm_file_env(&dir, &realm("Robert"))].concat();
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
    let env = [db.env(), realm_file_env(&dir, &r)].concat();
    for _ in 0..3 {
        let (fast, line) = once(&env);
        assert!(!fast, "a listing with a refused user was taken as settled");
        assert!(line.contains("rejected=1"), "{line}");
    }
    let recorded = "SELECT count(*) FROM seed_runs WHERE identities_state IS NOT NULL";
    assert_eq!(db.scalar(recorded).await, 0);

    // Once the file is fixed, the run settles and the one after it is not staged.
    let env = [db.env(), realm_file_env(&dir, &realm("Bob"))].concat();
    assert!(!once(&env).0);
    assert!(once(&env).0);
}
