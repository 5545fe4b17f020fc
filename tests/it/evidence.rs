//! Evidence is never lost: each unit's counts commit with its writes in the run's `seed_runs`
//! row, so a run that dies after a unit, or whose closing write fails (a full disk), is still
//! described by what it committed, never as "killed" with empty counts.

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;
use crate::identities::{test_realm, user};

fn many(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            user(
                &format!("e0000000-0000-4000-8000-{i:012}"),
                &format!("ev{i:06}"),
                if i % 100 == 0 { &["admin"] } else { &[] },
                &[],
            )
        })
        .collect()
}

/// Every row of `seed_runs`: outcome, counts, error, oldest first.
async fn rows(db: &TestDb) -> Vec<(String, Value, String)> {
    let c = db.client().await;
    c.query(
        "SELECT outcome, counts, coalesce(error, '') FROM seed_runs ORDER BY started_at",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn realm_env(db: &TestDb, dir: &TempDir, users: usize) -> Vec<(String, String)> {
    let path = dir.write("realm.json", &test_realm(many(users)).to_string());
    let mut env = db.env();
    env.push((
        "SEEDKEEPER_IDENTITY__REALM_FILE".into(),
        path.display().to_string(),
    ));
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_killed_after_its_identities_unit_is_described_by_what_it_committed() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let env = realm_env(&db, &dir, 30_000);
    let mut child = spawn_bin(&["--once"], &env);
    // SIGKILL as soon as the bindings unit has committed (its counts are in the row), while the
    // tenants unit writes 120,000 rows.
    let c = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let committed: i64 = c
            .query_one(
                "SELECT count(*) FROM seed_runs WHERE outcome = 'running' AND counts ? 'role_bindings'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if committed > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bindings unit never committed"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let users = db.scalar("SELECT count(*) FROM users").await;
    let granted = db
        .scalar("SELECT count(*) FROM platform_role_bindings WHERE granted_by = 'seedkeeper'")
        .await;
    assert_eq!(users, 30_006);
    assert!(granted > 300, "{granted}");
    let tenants = db.scalar("SELECT count(*) FROM tenants").await;
    assert_eq!(
        tenants, 0,
        "the kill landed before the tenants unit committed"
    );

    // The row left running already holds every committed write.
    let r = rows(&db).await;
    assert_eq!(r.len(), 1);
    let (outcome, counts, _) = &r[0];
    assert_eq!(outcome, "running");
    assert_eq!(counts["identities"]["inserted"].as_i64(), Some(users));
    assert_eq!(counts["role_bindings"]["inserted"].as_i64(), Some(granted));
    assert!(counts.get("tenants").is_none(), "{counts}");

    // The next run closes it by what it committed, and converges the rest.
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let r = rows(&db).await;
    let (outcome, counts, error) = &r[0];
    assert_eq!(outcome, "failed");
    assert_eq!(
        counts["identities"]["inserted"].as_i64(),
        Some(users),
        "counts kept"
    );
    assert!(
        error.starts_with("interrupted: the process ended before the run finished")
            && error.contains("identities")
            && error.contains("role_bindings")
            && error.contains("(their counts are in this row)"),
        "{error}"
    );
    assert_eq!(r[1].0, "succeeded");
    assert_eq!(db.scalar("SELECT count(*) FROM tenants").await, 30_006);
}

/// A tmpfs of `size` mounted for the PostgreSQL server's user, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(size: &str, uid: u32) -> SmallDisk {
        let dir = std::env::temp_dir().join(format!("sk-full-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700,uid={uid}"),
                "tmpfs",
            ])
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("this test mounts a small tmpfs (a full disk) and needs `mount`: {e}")
            });
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs as a PostgreSQL tablespace and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tablespace_that_fills_up_mid_run_loses_no_evidence_of_what_was_committed() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let data_dir: String = c
        .query_one("SHOW data_directory", &[])
        .await
        .unwrap()
        .get(0);
    let uid = std::fs::metadata(&data_dir)
        .unwrap_or_else(|e| panic!("the test PostgreSQL runs on this machine ({data_dir}): {e}"))
        .uid();
    let disk = SmallDisk::mount("1536k", uid);
    let space = format!("sk_full_{}", &db.name[8..]);
    c.batch_execute(&format!(
        "CREATE TABLESPACE {space} LOCATION '{}'",
        disk.0.display()
    ))
    .await
    .unwrap();
    // The tenant chain and the evidence on the small disk; users and bindings beside them.
    c.batch_execute(&format!(
        "ALTER TABLE tenants SET TABLESPACE {space}; ALTER TABLE projects SET TABLESPACE {space};
         ALTER TABLE tenant_memberships SET TABLESPACE {space}; ALTER TABLE project_memberships SET TABLESPACE {space};
         ALTER TABLE seed_runs SET TABLESPACE {space};"
    ))
    .await
    .unwrap();
    let dir = TempDir::new();
    let env = realm_env(&db, &dir, 20_000);
    let out = run_bin(&["--once"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("No space left on device") || t.contains("53100"),
        "{t}"
    );
    let users = db.scalar("SELECT count(*) FROM users").await;
    let granted = db
        .scalar("SELECT count(*) FROM platform_role_bindings WHERE granted_by = 'seedkeeper'")
        .await;
    assert_eq!(users, 20_006, "the identities unit committed");
    assert!(granted > 200, "{granted}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM tenants").await,
        0,
        "the tenants unit did not"
    );

    // Its row, closed or left running, holds what it committed; once the disk has room, the
    // next run describes it the same way.
    let r = rows(&db).await;
    assert_eq!(r.len(), 1, "{r:?}");
    let (outcome, counts, _) = &r[0];
    println!("the run's row after ENOSPC: {outcome} {counts}");
    assert!(outcome == "failed" || outcome == "running", "{outcome}");
    assert_eq!(
        counts["identities"]["inserted"].as_i64(),
        Some(users),
        "{counts}"
    );
    assert_eq!(
        counts["role_bindings"]["inserted"].as_i64(),
        Some(granted),
        "{counts}"
    );

    c.batch_execute(
        "ALTER TABLE tenants SET TABLESPACE pg_default; ALTER TABLE projects SET TABLESPACE pg_default;
         ALTER TABLE tenant_memberships SET TABLESPACE pg_default; ALTER TABLE project_memberships SET TABLESPACE pg_default;
         ALTER TABLE seed_runs SET TABLESPACE pg_default;",
    )
    .await
    .unwrap();
    c.batch_execute(&format!("DROP TABLESPACE {space}"))
        .await
        .unwrap();
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let r = rows(&db).await;
    assert_eq!(r[0].0, "failed");
    assert_eq!(r[0].1["identities"]["inserted"].as_i64(), Some(users));
    assert_eq!(r[1].0, "succeeded");
    drop(disk);
}
