//! Configuration faults an operator makes by accident, with the real binary: a password in a
//! URL that is not percent-encoded, config and secret files that are not regular files (a FIFO,
//! a device, a directory) or are too big, and a config file picked up from the working
//! directory. Each is refused at once with exit 78, naming the input and the fix, and never
//! printing a secret.

use std::time::{Duration, Instant};

use crate::harness::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs the binary and gives its exit code, its output and how long it took; fails the test if
/// it runs longer than `secs` (a hang is what several of these faults used to cause).
fn run_within(secs: u64, args: &[&str], env: &[(String, String)]) -> (i32, String, Duration) {
    let start = Instant::now();
    let mut child = spawn::command(args, env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn seedkeeper");
    let deadline = start + Duration::from_secs(secs);
    loop {
        if child.try_wait().expect("wait for seedkeeper").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "seedkeeper {args:?} did not exit within {secs}s; it printed: {}",
                text(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed();
    let out = child.wait_with_output().expect("output");
    (out.status.code().unwrap_or(-1), text(&out), took)
}

#[test]
fn a_database_password_with_an_unencoded_at_sign_exits_78_naming_percent_encoding_and_no_part_of_it(
) {
    // A host nothing answers on: before the fix, the tail of the password was the host.
    let e = env(&[(
        "SEEDKEEPER_DATABASE__URL",
        "postgres://seedkeeper:S3cr@tPart2@127.0.0.1:1/platform",
    )]);
    for args in [
        &["--once"][..],
        &["config"],
        &["plan"],
        &["migrate"],
        &["status"],
    ] {
        let (code, out, _) = run_within(10, args, &e);
        assert_eq!(code, 78, "{args:?}: {out}");
        assert!(out.contains("percent-encode"), "{args:?}: {out}");
        assert!(out.contains("database.password"), "{args:?}: {out}");
        assert!(
            out.contains("SEEDKEEPER_DATABASE__PASSWORD_FILE"),
            "{args:?}: {out}"
        );
        for fragment in ["S3cr", "tPart2", "r@tP", "@tPart"] {
            assert!(
                !out.contains(fragment),
                "{args:?} printed {fragment:?}: {out}"
            );
        }
    }
    // Percent-encoded, the same URL is accepted (`config` connects to nothing).
    let ok = env(&[(
        "SEEDKEEPER_DATABASE__URL",
        "postgres://seedkeeper:S3cr%40tPart2@127.0.0.1:1/platform",
    )]);
    let (code, out, _) = run_within(10, &["config"], &ok);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("tPart2"), "{out}");
}

#[test]
fn a_user_or_password_in_keycloak_base_url_exits_78_and_is_never_printed() {
    for base in [
        "https://seedkeeper:Kc%40Pw0rd@kc.example/",
        "https://seedkeeper:Kc@Pw0rd@kc.example/",
    ] {
        let e = env(&[
            (
                "SEEDKEEPER_DATABASE__URL",
                "postgres://u@127.0.0.1:1/platform",
            ),
            ("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
            ("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "a-client-secret"),
            ("SEEDKEEPER_KEYCLOAK__BASE_URL", base),
        ]);
        let (code, out, _) = run_within(10, &["config"], &e);
        assert_eq!(code, 78, "{out}");
        assert!(out.contains("keycloak.base_url"), "{out}");
        assert!(out.contains("carries a user or password"), "{out}");
        assert!(out.contains("[REDACTED]@kc.example"), "{out}");
        assert!(!out.contains("Pw0rd"), "{out}");
    }
}

// ---------------------------------------------------------------------------------------------
// Files that are not regular files, or too big

/// A case: its name, the arguments, the environment, what the output must say.
type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<String>);

fn mkfifo(dir: &TempDir, name: &str) -> String {
    let p = dir.0.join(name);
    let st = std::process::Command::new("mkfifo")
        .arg(&p)
        .status()
        .expect("run mkfifo");
    assert!(st.success(), "mkfifo {}", p.display());
    p.display().to_string()
}

#[test]
fn fifos_devices_directories_and_oversized_files_as_config_or_secret_exit_78_within_a_second() {
    let dir = TempDir::new();
    let fifo = mkfifo(&dir, "fifo");
    let big_secret = dir.write("big-secret", &"x".repeat(100 * 1024));
    let big_config = dir.write("big.toml", &format!("# {}\n", "x".repeat(2 * 1024 * 1024)));
    let subdir = dir.0.join("subdir");
    std::fs::create_dir(&subdir).unwrap();
    let subdir = subdir.display().to_string();
    let creds = dir.0.join("creds");
    std::fs::create_dir(&creds).unwrap();
    let cred_fifo = creds.join("database.url");
    assert!(std::process::Command::new("mkfifo")
        .arg(&cred_fifo)
        .status()
        .unwrap()
        .success());
    // A `kc.sh export --dir` folder whose users file is a FIFO: opening it would block.
    std::fs::create_dir(dir.0.join("export")).unwrap();
    dir.write(
        "export/bench-realm.json",
        r#"{"realm": "bench", "users": []}"#,
    );
    let export = dir.0.join("export").display().to_string();
    let users_fifo = mkfifo(&dir, "export/bench-users-0.json");
    let db = (
        "SEEDKEEPER_DATABASE__URL",
        "postgres://u@127.0.0.1:1/platform",
    );
    let cases: Vec<Case> = vec![
        (
            "realm export folder holding a FIFO",
            vec!["--once"],
            vec![db, ("SEEDKEEPER_IDENTITY__REALM_FILE", &export)],
            vec![format!("invalid realm file {users_fifo}: is a FIFO (named pipe), not a regular file")],
        ),
        (
            "--config FIFO",
            vec!["--config", &fifo, "--once"],
            vec![db],
            vec![format!("config file {fifo} (from --config) is a FIFO (named pipe), not a regular file")],
        ),
        (
            "SEEDKEEPER_CONFIG=/dev/zero",
            vec!["--once"],
            vec![db, ("SEEDKEEPER_CONFIG", "/dev/zero")],
            vec!["config file /dev/zero (from SEEDKEEPER_CONFIG) is a character device".into()],
        ),
        (
            "--config directory",
            vec!["--config", &subdir, "config"],
            vec![db],
            vec![format!("config file {subdir} (from --config) is a directory")],
        ),
        (
            "--config 2 MiB",
            vec!["--config", big_config.to_str().unwrap(), "--once"],
            vec![db],
            vec!["more than the 1 MiB allowed".into()],
        ),
        (
            "_FILE=FIFO",
            vec!["--once"],
            vec![("SEEDKEEPER_DATABASE__URL_FILE", &fifo)],
            vec![format!("database.url from SEEDKEEPER_DATABASE__URL_FILE={fifo}: file is a FIFO (named pipe), not a regular file")],
        ),
        (
            "_FILE=/dev/zero",
            vec!["--once"],
            vec![db, ("SEEDKEEPER_DATABASE__PASSWORD_FILE", "/dev/zero")],
            vec!["database.password from SEEDKEEPER_DATABASE__PASSWORD_FILE=/dev/zero: file is a character device, not a regular file".into()],
        ),
        (
            "_FILE=directory",
            vec!["--once"],
            vec![db, ("SEEDKEEPER_DATABASE__PASSWORD_FILE", &subdir)],
            vec!["file is a directory, not a regular file".into()],
        ),
        (
            "_FILE of 100 KiB",
            vec!["--once"],
            vec![db, ("SEEDKEEPER_DATABASE__PASSWORD_FILE", big_secret.to_str().unwrap())],
            vec!["file is 102400 bytes, more than the 64 KiB allowed".into()],
        ),
        (
            "credential FIFO",
            vec!["--once"],
            vec![("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())],
            vec![
                "database.url from systemd credential".into(),
                "is a FIFO (named pipe), not a regular file".into(),
            ],
        ),
        (
            "realm file FIFO",
            vec!["--once"],
            vec![db, ("SEEDKEEPER_IDENTITY__REALM_FILE", &fifo)],
            vec![format!("identity.realm_file {fifo} is a FIFO (named pipe), not a regular file or a directory")],
        ),
    ];
    for (case, args, pairs, needles) in cases {
        let (code, out, took) = run_within(10, &args, &env(&pairs));
        assert_eq!(code, 78, "{case}: {out}");
        for n in &needles {
            assert!(out.contains(n.as_str()), "{case}: no {n:?} in {out}");
        }
        assert!(
            took < Duration::from_secs(1),
            "{case}: took {took:?} to refuse"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Where the configuration file came from

/// A working directory of its own holding `config/seedkeeper.toml` with `content`.
fn workdir_with_config(content: &str) -> TempDir {
    let dir = TempDir::new();
    std::fs::create_dir(dir.0.join("config")).unwrap();
    dir.write("config/seedkeeper.toml", content);
    dir
}

/// Runs the binary in `cwd`, to its end.
fn run_in(cwd: &std::path::Path, args: &[&str], env: &[(String, String)]) -> (i32, String) {
    let out = spawn::command(args, env)
        .current_dir(cwd)
        .output()
        .expect("run seedkeeper");
    (out.status.code().unwrap_or(-1), text(&out))
}

#[test]
fn the_config_file_loaded_is_logged_and_shown_by_config_with_how_it_was_chosen() {
    let dir = workdir_with_config("[evidence]\nretention = 7\n");
    let in_cwd = std::fs::canonicalize(dir.0.join("config/seedkeeper.toml")).unwrap();
    let other = dir.write("other.toml", "[evidence]\nretention = 9\n");
    let db = env(&[(
        "SEEDKEEPER_DATABASE__URL",
        "postgres://u@127.0.0.1:1/platform",
    )]);

    // Picked up from the working directory: said so, in the log and in `config`.
    let (code, out) = run_in(&dir.0, &["config"], &db);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("retention = 7"), "{out}");
    let shown = format!(
        "# configuration file {} (chosen by the working directory)",
        in_cwd.display()
    );
    assert!(out.contains(&shown), "{out}");
    assert!(out.contains("configuration file loaded"), "{out}");
    assert!(
        out.contains("config.chosen_by=\"the working directory\""),
        "{out}"
    );

    // --config wins over the working directory, and says so.
    let (code, out) = run_in(
        &dir.0,
        &["--config", other.to_str().unwrap(), "config"],
        &db,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("retention = 9"), "{out}");
    assert!(
        out.contains(&format!(
            "# configuration file {} (chosen by --config)",
            other.display()
        )),
        "{out}"
    );

    // SEEDKEEPER_CONFIG likewise.
    let mut with_var = db.clone();
    with_var.push(("SEEDKEEPER_CONFIG".into(), other.display().to_string()));
    let (code, out) = run_in(&dir.0, &["config"], &with_var);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "# configuration file {} (chosen by SEEDKEEPER_CONFIG)",
            other.display()
        )),
        "{out}"
    );

    // None at all: said too.
    let empty = TempDir::new();
    let (code, out) = run_in(&empty.0, &["config"], &db);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("# no configuration file"), "{out}");
    assert!(out.contains("no configuration file loaded"), "{out}");
}

#[test]
fn production_refuses_a_config_file_picked_up_from_the_working_directory() {
    let production = [
        (
            "SEEDKEEPER_DATABASE__URL",
            "postgres://u@127.0.0.1:1/platform",
        ),
        ("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
        ("SEEDKEEPER_KEYCLOAK__BASE_URL", "http://127.0.0.1:1"),
        ("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "a-client-secret"),
    ];
    // The file says production itself, or the environment does.
    for (content, extra) in [
        (
            "environment = \"production\"\n[identity]\nadmin_roles = [\"default-roles-dev\"]\n",
            None,
        ),
        (
            "[identity]\nadmin_roles = [\"default-roles-dev\"]\n",
            Some(("SEEDKEEPER_ENVIRONMENT", "production")),
        ),
    ] {
        let dir = workdir_with_config(content);
        let path = std::fs::canonicalize(dir.0.join("config/seedkeeper.toml")).unwrap();
        let mut e = env(&production);
        e.extend(extra.map(|(k, v)| (k.to_string(), v.to_string())));
        for args in [&["--once"][..], &["config"]] {
            let (code, out) = run_in(&dir.0, args, &e);
            assert_eq!(code, 78, "{args:?}: {out}");
            assert!(
                out.contains(&format!("refuses the config file {}", path.display())),
                "{out}"
            );
            assert!(
                out.contains("picked up from the working directory"),
                "{out}"
            );
            assert!(
                out.contains(&format!("--config {}", path.display())),
                "{out}"
            );
            assert!(
                out.contains(&format!("SEEDKEEPER_CONFIG={}", path.display())),
                "{out}"
            );
        }
        // Named, the same file is accepted.
        let mut named = e.clone();
        named.push(("SEEDKEEPER_CONFIG".into(), path.display().to_string()));
        let (code, out) = run_in(&dir.0, &["config"], &named);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("(chosen by SEEDKEEPER_CONFIG)"), "{out}");
        let (code, out) = run_in(
            &dir.0,
            &["--config", "config/seedkeeper.toml", "config"],
            &e,
        );
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("(chosen by --config)"), "{out}");
    }
}
