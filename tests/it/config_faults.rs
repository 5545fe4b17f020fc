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
