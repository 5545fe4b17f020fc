//! Where users run it. What can run here: `make db-reset-fast` end to end, and the
//! least-privilege database role of docs/configuration.md.

use crate::harness::*;

const MAKE_NEEDED: &str =
    "make is needed for this test: install Debian's make package (apt-get install make)";

/// `make` with this process's environment but none of its `SEEDKEEPER_*` variables: the
/// harness's own (`SEEDKEEPER_TEST_DATABASE_URL`, ...) are not configuration keys, and
/// seedkeeper refuses an unknown `SEEDKEEPER_*` variable as it refuses an unknown key.
fn make() -> std::process::Command {
    let mut cmd = std::process::Command::new("make");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SEEDKEEPER_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn make_db_reset_fast_leaves_the_seeded_state() {
    let db = TestDb::new().await;
    let out = make()
        .args([
            "--no-print-directory",
            "db-reset-fast",
            &format!("DB={}", db.name),
            &format!("SEEDKEEPER={}", env!("CARGO_BIN_EXE_seedkeeper")),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", admin_url())
        .output()
        .unwrap_or_else(|e| panic!("{MAKE_NEEDED}: {e}"));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("db-reset-fast:") && t.contains("ms (exit 0)"),
        "{t}"
    );
    let users: i64 = db.scalar("SELECT count(*) FROM users").await;
    let skus: i64 = db.scalar("SELECT count(*) FROM sku_catalog").await;
    assert_eq!((users, skus), (6, 7));
}

/// A `DATABASE_URL` that names a database is the database of every `make` target: no `DB=`.
#[tokio::test(flavor = "multi_thread")]
async fn make_db_reset_fast_resets_the_database_database_url_names() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE left_over (x int)")
        .await
        .unwrap();
    drop(c);
    let out = make()
        .args([
            "--no-print-directory",
            "db-reset-fast",
            &format!("SEEDKEEPER={}", env!("CARGO_BIN_EXE_seedkeeper")),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DB")
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap_or_else(|e| panic!("{MAKE_NEEDED}: {e}"));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let left_over: i64 = db
        .scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'left_over'")
        .await;
    let users: i64 = db.scalar("SELECT count(*) FROM users").await;
    assert_eq!((left_over, users), (0, 6), "{t}");
}

/// The block of docs/configuration.md between `<!-- grants:verify -->` markers, with the
/// database and role names of this test: the test runs exactly what operators are told to run.
fn readme_grants(db: &str, role: &str) -> String {
    let readme = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .expect("docs/configuration.md");
    let start = readme
        .find("<!-- grants:verify -->")
        .expect("grants marker in docs/configuration.md");
    let end = readme
        .find("<!-- /grants:verify -->")
        .expect("grants end marker");
    let block = &readme[start..end];
    let sql: String = block
        .lines()
        .filter(|l| !l.starts_with("```") && !l.starts_with("<!--"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(sql.contains("GRANT"), "no GRANT in the grants block");
    sql.replace("DATABASE platform", &format!("DATABASE {db}"))
        .replace("seedkeeper", role)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_least_privilege_role_from_the_readme_can_reconcile() {
    let db = TestDb::new().await;
    let out = run_bin(&["migrate"], &db.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let role = format!("sk_lp_{}", &db.name[8..]);
    let c = db.client().await;
    c.batch_execute(&format!("REVOKE ALL ON DATABASE {} FROM PUBLIC", db.name))
        .await
        .unwrap();
    c.batch_execute(&readme_grants(&db.name, &role))
        .await
        .unwrap();
    let env = vec![
        (
            "SEEDKEEPER_DATABASE__URL".to_string(),
            db.url.replace("postgres@", &format!("{role}@")),
        ),
        ("SEEDKEEPER_SCHEMA__MODE".to_string(), "verify".to_string()),
    ];
    for _ in 0..2 {
        let out = run_bin(&["--once"], &env);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let users: i64 = db.scalar("SELECT count(*) FROM users").await;
    assert_eq!(users, 6);
    // It cannot delete user data even if it tried.
    let denied = c
        .batch_execute(&format!("SET ROLE {role}; DELETE FROM users"))
        .await;
    assert!(denied.is_err());
    c.batch_execute("RESET ROLE").await.ok();
    drop(c);
    let admin = connect(&admin_url()).await;
    let _ = admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE); DROP ROLE IF EXISTS {role}",
            db.name
        ))
        .await;
}

/// `scripts/test-deps.sh` run by a user who is not root, on a machine missing the suite's tools
/// (a PATH of a folder holding only what the script itself needs and a fake `apt-get`): it stops
/// at once with the one command to run, and runs nothing else (the fake `apt-get` records any
/// call). As root the test runs the script as `nobody`; otherwise as the user running it.
#[test]
fn test_deps_as_a_non_root_user_stops_with_the_one_command_and_installs_nothing() {
    let dir = TempDir::new();
    let bin = dir.0.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["bash", "id", "ls"] {
        let real = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found in /usr/bin or /bin"));
        std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
    }
    let called = dir.0.join("apt-get-called");
    let fake = bin.join("apt-get");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", called.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = dir.write("test-deps.sh", include_str!("../../scripts/test-deps.sh"));
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        == b"0\n";
    let mut cmd = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "nobody", "--", "/usr/bin/env"]);
        c
    } else {
        std::process::Command::new("/usr/bin/env")
    };
    let out = cmd
        .arg("-i")
        .arg(format!("PATH={}", bin.display()))
        .arg(bin.join("bash"))
        .arg(&script)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // psql, mvn, curl, python3 and make are not on that PATH; every package stays named.
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("test-deps: missing postgresql postgresql-client ")
            && first.ends_with("; install them once with: sudo bash scripts/test-deps.sh"),
        "{stderr}"
    );
    for package in ["maven", "curl", "python3", "make"] {
        assert!(
            first.contains(&format!(" {package} ")),
            "{package}: {stderr}"
        );
    }
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line, nothing else: {stderr}"
    );
    assert!(!called.exists(), "apt-get was run: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
