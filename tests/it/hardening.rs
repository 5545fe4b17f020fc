//! Hardening. Faults survived (the run fails cleanly or succeeds, nothing lost or
//! duplicated, the next run converges), bad inputs refused (a clear error, exit 78, nothing
//! written), hostile identity values stored exactly or refused per identity, canary secrets never
//! leaked, TLS verified by default. docs/hardening.md's fault matrix points at these tests.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::cluster::OwnCluster;
use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::*;
use crate::identities::{identity_state, kc_env, refs, test_realm, user};

fn many_users(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            user(
                &format!("d0000000-0000-4000-8000-{i:012}"),
                &format!("bulk{i:06}"),
                if i % 97 == 0 { &["admin"] } else { &[] },
                &[],
            )
        })
        .collect()
}

/// Counts that must never show a duplicate: one row per sub, one personal tenant per user, one
/// active superadmin binding per admin.
async fn assert_no_duplicates(db: &TestDb) {
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM users), (SELECT count(DISTINCT keycloak_sub) FROM users),
                    (SELECT count(*) FROM tenants WHERE kind = 'personal'), (SELECT count(DISTINCT owner_user_id) FROM tenants WHERE kind = 'personal'),
                    (SELECT count(*) FROM platform_role_bindings WHERE status = 'active'),
                    (SELECT count(*) FROM (SELECT DISTINCT user_id, role_name FROM platform_role_bindings WHERE status = 'active') d)",
            &[],
        )
        .await
        .unwrap();
    let v: Vec<i64> = (0..6).map(|i| row.get(i)).collect();
    assert_eq!(v[0], v[1], "one users row per sub");
    assert_eq!(v[2], v[3], "one personal tenant per user");
    assert_eq!(v[4], v[5], "one active binding per user and role");
}

async fn users(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM users").await
}

async fn public_tables(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .await
}

fn statuses(kc: &KeycloakEmulator) -> Vec<u16> {
    kc.journal().iter().map(|j| j.status).collect()
}

// ---------------------------------------------------------------------------------------------
// Keycloak faults

#[tokio::test(flavor = "multi_thread")]
async fn keycloak_bursts_of_5xx_429_malformed_and_html_answers_are_retried_to_success() {
    let kc = KeycloakEmulator::start(test_realm(many_users(40))).await;
    let mut env = kc_env(&kc);
    env.push(("SEEDKEEPER_KEYCLOAK__PAGE_SIZE".into(), "7".into()));
    env.push(("SEEDKEEPER_KEYCLOAK__CONCURRENCY".into(), "2".into()));
    let reference = TestDb::new().await;
    assert_ok(&apply(&reference.engine(&refs(&env))).await);
    let expected = identity_state(&reference).await;

    type Inject = fn(&KeycloakEmulator);
    let cases: [(&str, Inject, u16); 6] = [
        ("500 burst", |k| k.fail_next_admin(3, 500), 500),
        ("502 burst", |k| k.fail_next_admin(3, 502), 502),
        ("503 burst", |k| k.fail_next_admin(3, 503), 503),
        ("429 with Retry-After", |k| k.fail_next_admin(2, 429), 429),
        ("truncated JSON body", |k| k.malformed_next_admin(2), 200),
        ("HTML error page", |k| k.html_next_admin(2, 502), 502),
    ];
    for (name, inject, status) in cases {
        let db = TestDb::new().await;
        let engine = db.engine(&refs(&env));
        kc.clear_journal();
        inject(&kc);
        let start = Instant::now();
        let r = apply(&engine).await;
        assert_ok(&r);
        assert!(statuses(&kc).contains(&status), "{name}: fault was served");
        if status == 429 {
            assert!(
                start.elapsed() >= Duration::from_secs(2),
                "{name}: Retry-After: 1 honoured twice ({:?})",
                start.elapsed()
            );
        }
        assert_eq!(identity_state(&db).await, expected, "{name}: same result");
        assert_no_duplicates(&db).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keycloak_outages_beyond_the_retries_fail_the_run_cleanly_and_the_next_run_converges() {
    let kc = KeycloakEmulator::start(test_realm(many_users(25))).await;
    let mut env = kc_env(&kc);
    env.push(("SEEDKEEPER_KEYCLOAK__PAGE_SIZE".into(), "5".into()));
    env.push(("SEEDKEEPER_KEYCLOAK__MAX_RETRIES".into(), "1".into()));
    env.push(("SEEDKEEPER_KEYCLOAK__REQUEST_TIMEOUT".into(), "1s".into()));
    let db = TestDb::new().await;
    let engine = db.engine(&refs(&env));

    // After three pages, a 503 burst longer than the retries: the identities transaction rolls
    // back, so no half-listed realm is written.
    let mut one_at_a_time = env.clone();
    one_at_a_time.push(("SEEDKEEPER_KEYCLOAK__CONCURRENCY".into(), "1".into()));
    let engine1 = db.engine(&refs(&one_at_a_time));
    // Count the admin calls before the first users page, on a clean run elsewhere.
    let probe = TestDb::new().await;
    kc.clear_journal();
    assert_ok(&apply(&probe.engine(&refs(&one_at_a_time))).await);
    // The role holders are resolved beside the listing, so their calls and the pages come in
    // no fixed order. The outage starts once as many admin calls went through as the probe made
    // besides its users pages, plus two: whatever the order, at least two pages were served and
    // staged by then, and some call of the run is still to come (a page or a holders' call: either
    // fails the run). It lasts until it is cleared.
    let users_path = format!("/admin/realms/{}/users", kc.realm_name());
    let admin_calls = kc
        .journal()
        .iter()
        .filter(|j| j.path.contains("/admin/"))
        .count();
    let pages_probed = kc
        .journal()
        .iter()
        .filter(|j| j.path.ends_with(&users_path))
        .count();
    assert!(pages_probed > 3, "{pages_probed} users pages in the probe");
    let second_page = admin_calls - pages_probed + 2;
    kc.clear_journal();
    kc.faults_after_admin_calls(second_page);
    kc.fail_next_admin(1000, 503);
    let r = apply(&engine1).await;
    kc.clear_admin_faults();
    assert_eq!(r.outcome.as_str(), "failed");
    let err = error_of(&r);
    assert!(err.contains("503"), "{err}");
    assert_eq!(users(&db).await, 0, "nothing half-written");
    let pages = kc
        .journal()
        .iter()
        .filter(|j| {
            j.path
                .ends_with(&format!("/admin/realms/{}/users", kc.realm_name()))
                && j.status == 200
        })
        .count();
    assert!(
        pages >= 2,
        "the burst came once pages were staged: {pages} of {pages_probed} users pages served"
    );

    // Slower than the request timeout: every attempt times out.
    kc.set_latency(Duration::from_millis(1500));
    let r = apply(&engine).await;
    assert_eq!(r.outcome.as_str(), "failed");
    let err = error_of(&r);
    assert_eq!(
        r.error.as_ref().map(|e| e.kind()),
        Some(seedkeeper::error::ErrorKind::KeycloakUnavailable),
        "every attempt timed out: {err}"
    );
    assert_eq!(users(&db).await, 0);

    // Keycloak is back: the next run converges with the same engine (no restart).
    kc.set_latency(Duration::ZERO);
    let r = apply(&engine).await;
    assert_ok(&r);
    assert_eq!(users(&db).await, 25 + 6);
    assert_no_duplicates(&db).await;
    let outcomes: Vec<String> = db
        .strings("SELECT outcome FROM seed_runs ORDER BY started_at")
        .await;
    // The timed-out run failed in its preflight, before connecting to the database: its evidence
    // is the log line and the metrics, not a row.
    assert_eq!(outcomes, ["failed", "succeeded"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_discovery_document_that_changes_between_runs_is_followed() {
    let kc = KeycloakEmulator::start(dev_realm()).await;
    let db = TestDb::new().await;
    let engine = db.engine(&refs(&kc_env(&kc)));
    assert_ok(&apply(&engine).await);
    kc.move_token_endpoint();
    kc.clear_journal();
    let r = apply(&engine).await;
    assert_ok(&r);
    assert!(
        kc.journal().iter().any(|j| j.path.starts_with("/moved/")
            && j.path.ends_with("/token")
            && j.status == 200),
        "the token came from the moved endpoint: {:?}",
        kc.journal()
            .iter()
            .map(|j| j.path.clone())
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL and process faults

/// Waits until a seedkeeper backend on `db` runs a statement of the identities unit, then
/// terminates every seedkeeper backend on it. Returns how many were terminated.
async fn kill_backends_mid_identities(db: &TestDb) -> i64 {
    let admin = connect(&admin_url()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let n: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = 'seedkeeper'
                   AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = $1
                               AND a.application_name = 'seedkeeper'
                               AND (a.query ILIKE '%sk_stage%' OR a.query ILIKE 'COPY%'))",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the identities unit never started");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_killed_mid_run_fail_it_cleanly_and_the_next_run_converges() {
    let dir = TempDir::new();
    let realm = test_realm(many_users(20_000));
    let path = dir.write("realm.json", &realm.to_string());
    let db = TestDb::new().await;
    let engine = db.engine(&[("SEEDKEEPER_IDENTITY__REALM_FILE", path.to_str().unwrap())]);
    // The kill lands in the identities unit of the first run; the seed before it is committed.
    let (r, killed) = tokio::join!(apply(&engine), kill_backends_mid_identities(&db));
    assert!(killed > 0);
    assert_eq!(r.outcome.as_str(), "failed", "{:?}", r.error);
    let err = error_of(&r);
    assert!(
        err.contains("connection") || err.contains("terminat"),
        "{err}"
    );
    // Nothing of the identities transaction survived.
    assert_eq!(users(&db).await, 0);

    let r = apply(&engine).await;
    assert_ok(&r);
    assert_eq!(users(&db).await, 20_006);
    assert_no_duplicates(&db).await;
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE outcome = 'running'), count(*) FILTER (WHERE outcome = 'failed' AND error LIKE 'interrupted%')
             FROM seed_runs",
            &[],
        )
        .await
        .unwrap();
    let (running, interrupted): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(running, 0, "no run left 'running'");
    assert_eq!(interrupted, 1, "the killed run is recorded as interrupted");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_run_leaves_no_lock_and_the_next_process_converges() {
    let dir = TempDir::new();
    let realm = test_realm(many_users(20_000));
    let path = dir.write("realm.json", &realm.to_string());
    let db = TestDb::new().await;
    let mut env = db.env();
    env.push((
        "SEEDKEEPER_IDENTITY__REALM_FILE".into(),
        path.display().to_string(),
    ));
    let mut child = spawn_bin(&["--once"], &env);
    let admin = connect(&admin_url()).await;
    until("the run is writing identities", 60, || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'seedkeeper'
                 AND (query ILIKE '%sk_stage%' OR query ILIKE 'COPY%')",
                &[&db.name],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    until("the advisory lock is released", 30, || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                 WHERE l.locktype = 'advisory' AND d.datname = $1",
                &[&db.name],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 0)
            .unwrap_or(false)
    })
    .await;
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(users(&db).await, 20_006);
    assert_no_duplicates(&db).await;
    let open: i64 = db
        .scalar("SELECT count(*) FROM seed_runs WHERE outcome = 'running'")
        .await;
    assert_eq!(open, 0);
}

// ---------------------------------------------------------------------------------------------
// Bad inputs

/// Runs `--once` with `env` on a fresh database; asserts exit 78, every needle in the output,
/// and an untouched database.
async fn refused(case: &str, env: Vec<(String, String)>, needles: &[&str]) {
    let db = TestDb::empty().await;
    let mut all = db.env();
    all.extend(env);
    let out = run_bin(&["--once"], &all);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{case}: {t}");
    for n in needles {
        assert!(t.contains(n), "{case}: {n:?} missing in: {t}");
    }
    assert!(!t.contains("panicked"), "{case}: {t}");
    assert_eq!(public_tables(&db).await, 0, "{case}: nothing written");
}

fn e(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_config_inputs_are_refused_naming_the_key_and_write_nothing() {
    let dir = TempDir::new();
    let toml_typo = dir.write("typo.toml", "[keycloak]\npage_sise = 100\n");
    let toml_type = dir.write("type.toml", "[keycloak]\npage_size = \"lots\"\n");
    let toml_syntax = dir.write("syntax.toml", "[keycloak\npage_size = 1\n");
    let empty = dir.write("empty-secret", "");
    // The whole clause: the file's name holds "empty" too, so a shorter needle proves nothing.
    let empty_refused = format!(
        "database.password from SEEDKEEPER_DATABASE__PASSWORD_FILE={}: file is empty: point \
         SEEDKEEPER_DATABASE__PASSWORD_FILE at a readable, non-empty regular file",
        empty.display()
    );
    let missing = dir.0.join("no-such-secret");
    type Case<'a> = (&'a str, Vec<(String, String)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "unknown key in the file",
            vec![e("SEEDKEEPER_CONFIG", toml_typo.to_str().unwrap())],
            vec!["page_sise", "typo.toml"],
        ),
        (
            "unknown key in the environment",
            vec![e("SEEDKEEPER_KEYCLOAK__PAGESIZE", "10")],
            vec!["keycloak.pagesize", "SEEDKEEPER_KEYCLOAK__PAGESIZE"],
        ),
        (
            "wrong type in the file",
            vec![e("SEEDKEEPER_CONFIG", toml_type.to_str().unwrap())],
            vec!["keycloak.page_size"],
        ),
        (
            "wrong type in the environment",
            vec![e("SEEDKEEPER_DATABASE__BATCH_SIZE", "many")],
            vec!["database.batch_size", "SEEDKEEPER_DATABASE__BATCH_SIZE"],
        ),
        (
            "TOML syntax error",
            vec![e("SEEDKEEPER_CONFIG", toml_syntax.to_str().unwrap())],
            vec!["syntax.toml"],
        ),
        (
            "invalid cron",
            vec![e("SEEDKEEPER_SCHEDULE__CRON", "*/5 * * * *")],
            vec!["schedule.cron", "SEEDKEEPER_SCHEDULE__CRON"],
        ),
        (
            "invalid duration",
            vec![e("SEEDKEEPER_SHUTDOWN__GRACE", "soon")],
            vec!["shutdown.grace"],
        ),
        (
            "secret file missing",
            vec![
                e("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
                e("SEEDKEEPER_KEYCLOAK__BASE_URL", "http://127.0.0.1:9"),
                e(
                    "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE",
                    missing.to_str().unwrap(),
                ),
            ],
            vec!["SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE", "no-such-secret"],
        ),
        (
            "secret file empty",
            vec![e(
                "SEEDKEEPER_DATABASE__PASSWORD_FILE",
                empty.to_str().unwrap(),
            )],
            vec![empty_refused.as_str()],
        ),
        (
            "secret file unreadable (a directory)",
            vec![e(
                "SEEDKEEPER_DATABASE__PASSWORD_FILE",
                dir.0.to_str().unwrap(),
            )],
            vec!["SEEDKEEPER_DATABASE__PASSWORD_FILE"],
        ),
        (
            "production with the realm-file source",
            vec![e("SEEDKEEPER_ENVIRONMENT", "production")],
            vec!["realm-file", "SEEDKEEPER_IDENTITY__SOURCE"],
        ),
        (
            "production without TLS verification",
            vec![
                e("SEEDKEEPER_ENVIRONMENT", "production"),
                e("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
                e("SEEDKEEPER_KEYCLOAK__BASE_URL", "https://kc.example"),
                e("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "x"),
                e("SEEDKEEPER_KEYCLOAK__TLS_VERIFY", "false"),
            ],
            vec!["tls_verify"],
        ),
        (
            "production with http:// to a remote Keycloak",
            vec![
                e("SEEDKEEPER_ENVIRONMENT", "production"),
                e("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
                e("SEEDKEEPER_KEYCLOAK__BASE_URL", "http://kc.example:8080/"),
                e("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "x"),
            ],
            vec![
                "keycloak.base_url http://kc.example:8080",
                "non-loopback host kc.example",
                "in clear",
                "https://",
                "SEEDKEEPER_KEYCLOAK__BASE_URL",
            ],
        ),
    ];
    for (case, env, needles) in cases {
        refused(case, env, &needles).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listen_address_that_cannot_be_bound_exits_78() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db = TestDb::empty().await;
    let mut env = db.env();
    env.push(e("SEEDKEEPER_HTTP__LISTEN", &addr));
    let out = run_bin(&["run"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(t.contains("http.listen") && t.contains(&addr), "{t}");
    assert_eq!(public_tables(&db).await, 0, "nothing written");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_seed_files_are_refused_naming_the_file_and_write_nothing() {
    let dir = TempDir::new();
    let seed = include_str!("../../config/reference-seed.toml");
    const ITEM: &str = "[[sku_catalog.items]]\n";
    let first_sku = seed.find(ITEM).expect("a SKU table in the seed");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "duplicate key",
            seed.replacen(ITEM, &format!("{ITEM}gpus = 1\ngpus = 2\n"), 1),
            vec!["duplicate key"],
        ),
        (
            "unknown section",
            format!("{seed}\n[extras]\nx = 1\n"),
            vec!["extras"],
        ),
        (
            "unknown field",
            format!(
                "{}{ITEM}flavour = \"mint\"\n{}",
                &seed[..first_sku],
                &seed[first_sku + ITEM.len()..]
            ),
            vec!["flavour"],
        ),
        ("not TOML", "\u{0}\u{1}binary".to_string(), vec!["seed"]),
    ];
    for (case, content, needles) in cases {
        let p = dir.write(&format!("{}.toml", case.replace(' ', "-")), &content);
        let mut needles = needles;
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        needles.push(&name);
        refused(
            case,
            vec![e("SEEDKEEPER_SEED__PATH", p.to_str().unwrap())],
            &needles,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_junk_and_deeply_nested_realm_files_are_refused_without_crashing() {
    let dir = TempDir::new();
    // 100 MB of junk, written in chunks.
    let junk = dir.0.join("junk.json");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&junk).unwrap());
        let pattern = b"{[\"x:,]}\x01 ";
        let chunk: Vec<u8> = (0..1024 * 1024)
            .map(|i| pattern[i % pattern.len()])
            .collect();
        for _ in 0..100 {
            f.write_all(&chunk).unwrap();
        }
    }
    // Nesting where seedkeeper reads values (a user's realm roles)...
    let deep = dir.write(
        "deep.json",
        &format!(
            "{{\"realm\":\"dev\",\"users\":[{{\"id\":\"1\",\"username\":\"a\",\"realmRoles\":{}\"x\"{}}}]}}",
            "[".repeat(200_000),
            "]".repeat(200_000)
        ),
    );
    // ...and in the recursive group tree (serde_json's recursion limit, not the stack, stops it).
    let deep_object = dir.write(
        "deep-object.json",
        &format!(
            "{{\"realm\":\"dev\",\"groups\":{}{}}}",
            "[{\"name\":\"g\",\"subGroups\":".repeat(50_000),
            "[]}]".repeat(50_000)
        ),
    );
    for p in [junk, deep, deep_object] {
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        refused(
            &name,
            vec![e("SEEDKEEPER_IDENTITY__REALM_FILE", p.to_str().unwrap())],
            &[&name],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_identity_values_are_stored_exactly_or_refused_one_by_one() {
    let long = "x".repeat(10_000);
    let stored: Vec<(&str, &str, &str)> = vec![
        // (id, username, firstName)
        (
            "e0000000-0000-4000-8000-000000000001",
            "robert'); drop table users;--",
            "Bobby \"Tables\"",
        ),
        ("f:6b0c1d2e-ldap:jdoe", "jdoe", "J\\. Doe $1 %s {0}"),
        (
            "e0000000-0000-4000-8000-000000000003",
            "dev-\u{0430}dmin",
            "Cyrillic a",
        ), // confusable
        (
            "e0000000-0000-4000-8000-000000000004",
            "zoë.ﬁ",
            "\u{202e}reversed\u{7}bell",
        ),
        ("e0000000-0000-4000-8000-000000000005", "🦀crab", ""),
    ];
    let refused: Vec<(&str, String, &str)> = vec![
        (
            "e0000000-0000-4000-8000-000000000010",
            String::new(),
            "username is empty",
        ),
        (
            "e0000000-0000-4000-8000-000000000011",
            long.clone(),
            "username is longer than 255",
        ),
        (
            "e0000000-0000-4000-8000-000000000012",
            "tab\tname".to_string(),
            "control characters",
        ),
        (&long, "long-id".to_string(), "id (sub) is longer than 255"),
    ];
    let mut list: Vec<Value> = stored
        .iter()
        .map(|(id, un, first)| {
            json!({"id": id, "username": un, "enabled": true, "firstName": first, "email": format!("{}@x.test", un.len())})
        })
        .collect();
    list.extend(
        refused
            .iter()
            .map(|(id, un, _)| json!({"id": id, "username": un, "enabled": true})),
    );
    list.push(json!({"id": "e0000000-0000-4000-8000-000000000020", "username": "long-name", "enabled": true, "lastName": long}));
    let kc = KeycloakEmulator::start(test_realm(list)).await;
    let db = TestDb::new().await;
    let engine = db.engine(&refs(&kc_env(&kc)));
    let r = apply(&engine).await;
    assert_eq!(
        r.outcome.as_str(),
        "succeeded",
        "rejects do not fail the run: {:?}",
        r.error
    );
    assert_eq!(count(&r, "identities", "rejected"), 5);
    let c = db.client().await;
    for (id, un, first) in &stored {
        let row = c
            .query_one(
                "SELECT username, coalesce(first_name, '') FROM users WHERE keycloak_sub = $1",
                &[id],
            )
            .await
            .unwrap_or_else(|e| panic!("{un:?} stored: {e}"));
        assert_eq!(row.get::<_, String>(0), un.to_lowercase());
        assert_eq!(row.get::<_, String>(1), *first);
    }
    // The confusable is its own person: dev-admin keeps its row and its binding alone.
    let admins: Vec<String> = db.strings("SELECT u.username FROM platform_role_bindings b JOIN users u ON u.id = b.user_id WHERE b.status = 'active' AND b.role_name = 'platform_superadmin' ORDER BY 1").await;
    assert!(admins.contains(&"dev-admin".to_string()));
    assert!(!admins.iter().any(|a| a.contains('\u{0430}')));
    let findings: Vec<String> = db.strings("SELECT f->>'detail' FROM seed_runs r, jsonb_array_elements(r.findings) f WHERE f->>'kind' = 'rejected'").await;
    for (_, _, why) in &refused {
        assert!(
            findings.iter().any(|f| f.contains(why)),
            "{why} in {findings:?}"
        );
    }
    assert!(findings.iter().any(|f| f.contains("lastName")));
    assert_eq!(users(&db).await, 6 + stored.len() as i64);
    // The tables are intact and a second run writes nothing.
    db.settle_stats(1).await;
    let before = db.tuples_written().await;
    let r = apply(&engine).await;
    assert_eq!(r.outcome.as_str(), "succeeded");
    db.settle_stats(2).await;
    assert_eq!(db.tuples_written().await, before);
}

// ---------------------------------------------------------------------------------------------
// Secrets and TLS

#[tokio::test(flavor = "multi_thread")]
async fn canary_secrets_never_appear_in_any_output() {
    const DB_CANARY: &str = "canary-db-7f3a9c1e";
    const KC_CANARY: &str = "canary-kc-5d2b8e4f";
    // The dev realm with the canary as the seedkeeper client's secret.
    let canary_realm = || {
        let mut realm = dev_realm();
        for c in realm["clients"].as_array_mut().unwrap() {
            if c["clientId"] == "seedkeeper" {
                c["secret"] = json!(KC_CANARY);
            }
        }
        realm
    };
    let kc = KeycloakEmulator::start(canary_realm()).await;
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let db_secret = dir.write("db-password", &format!("{DB_CANARY}\n"));
    let kc_secret = dir.write("kc-secret", KC_CANARY);
    let port = spawn::free_port();
    let env = vec![
        e("SEEDKEEPER_DATABASE__URL", &db.url),
        e(
            "SEEDKEEPER_DATABASE__PASSWORD_FILE",
            db_secret.to_str().unwrap(),
        ),
        e("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
        e("SEEDKEEPER_KEYCLOAK__BASE_URL", &kc.base_url()),
        e(
            "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE",
            kc_secret.to_str().unwrap(),
        ),
        e("SEEDKEEPER_LOG__FILTER", "trace"),
        e("SEEDKEEPER_HTTP__LISTEN", &format!("127.0.0.1:{port}")),
        e("SEEDKEEPER_SCHEDULE__CRON", "*/1 * * * * *"),
    ];
    let mut seen = String::new();
    for args in [
        vec!["--once"],
        vec!["plan"],
        vec!["status"],
        vec!["status", "--format", "json"],
        vec!["config"],
        vec!["--once", "--log-format", "json"],
    ] {
        let out = run_bin(&args, &env);
        assert!(
            out.status.code().is_some_and(|c| c == 0 || c == 2),
            "{args:?}: {}",
            text(&out)
        );
        seen.push_str(&text(&out));
    }
    // Error paths: a wrong database password is accepted by trust auth, so break the URL and the
    // client secret instead, with the canaries still configured.
    let mut broken = env.clone();
    broken[0].1 = format!("postgres://postgres@127.0.0.1:1/{}", db.name);
    broken.push(e("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "1s"));
    let out = run_bin(&["--once"], &broken);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    seen.push_str(&text(&out));
    kc.set_realm(dev_realm()); // the configured secret is now wrong
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    seen.push_str(&text(&out));
    kc.set_realm(canary_realm());
    // The daemon: its HTTP endpoints and its command line and environment. Its trace logs go to
    // files: a pipe nobody reads would fill up and stall it.
    let log = dir.0.join("daemon.out");
    let err_log = dir.0.join("daemon.err");
    let mut child = spawn::command(&["run"], &env)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&err_log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let ready = format!("{base}/readyz");
    until("the daemon is ready", 30, || async {
        status_of(&ready).await == 200
    })
    .await;
    for p in ["/healthz", "/readyz", "/metrics"] {
        seen.push_str(
            &reqwest::get(format!("{base}{p}"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    let pid = child.id();
    // The daemon is running: what it exposes there must be read, not taken as empty.
    seen.push_str(&String::from_utf8_lossy(
        &std::fs::read(format!("/proc/{pid}/cmdline")).expect("the daemon's /proc/pid/cmdline"),
    ));
    seen.push_str(&String::from_utf8_lossy(
        &std::fs::read(format!("/proc/{pid}/environ")).expect("the daemon's /proc/pid/environ"),
    ));
    sigterm(pid);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    seen.push_str(&std::fs::read_to_string(&log).unwrap());
    seen.push_str(&std::fs::read_to_string(&err_log).unwrap());
    // The evidence table, whole.
    let c = db.client().await;
    for r in c
        .query("SELECT row_to_json(s)::text FROM seed_runs s", &[])
        .await
        .unwrap()
    {
        seen.push_str(&r.get::<_, String>(0));
    }
    // A panic prints Debug or Display of what it holds: the settings' Debug is redacted.
    let settings = seedkeeper::config::load(&seedkeeper::config::ConfigLayers {
        file: None,
        env: env.clone(),
    })
    .unwrap();
    seen.push_str(&format!("{settings:?}"));

    assert!(seen.len() > 10_000, "the outputs were collected");
    assert!(seen.contains("seeding_completed") && seen.contains("seedkeeper_runs_total"));
    for canary in [DB_CANARY, KC_CANARY] {
        assert_eq!(
            seen.matches(canary).count(),
            0,
            "{canary} leaked: {}",
            &seen[seen.find(canary).unwrap().saturating_sub(200)..][..400]
        );
    }
}

/// A TLS server with a self-signed certificate for 127.0.0.1 (`openssl s_server`).
struct TlsServer {
    child: std::process::Child,
    port: u16,
    cert: std::path::PathBuf,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const OPENSSL_NEEDED: &str =
    "the openssl command is needed for the TLS test: install Debian's openssl package (apt-get install openssl)";

fn tls_server(dir: &TempDir) -> TlsServer {
    let cert = dir.0.join("cert.pem");
    let key = dir.0.join("key.pem");
    // An end-entity certificate (CA:FALSE), as a server presents; openssl's default is a CA.
    let conf = dir.write(
        "req.cnf",
        "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n[dn]\nCN = 127.0.0.1\n\
         [ext]\nbasicConstraints = critical, CA:FALSE\nsubjectAltName = IP:127.0.0.1\n\
         keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
    );
    let st = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .arg("-config")
        .arg(&conf)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{OPENSSL_NEEDED}: {e}"));
    assert!(
        st.success(),
        "openssl req (a self-signed certificate): {st}"
    );
    let port = spawn::free_port();
    let child = std::process::Command::new("openssl")
        .args(["s_server", "-www", "-quiet", "-accept", &port.to_string()])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{OPENSSL_NEEDED}: {e}"));
    let mut server = TlsServer { child, port, cert };
    spawn::wait_for_port("openssl s_server", port, &mut server.child, 5);
    server
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_keycloak_is_verified_by_default_and_a_ca_file_is_honoured() {
    let dir = TempDir::new();
    let server = tls_server(&dir);
    let db = TestDb::empty().await;
    let mut env = db.env();
    env.extend([
        e("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
        e(
            "SEEDKEEPER_KEYCLOAK__BASE_URL",
            &format!("https://127.0.0.1:{}", server.port),
        ),
        e("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "x"),
        e("SEEDKEEPER_STARTUP__WAIT_TIMEOUT", "1s"),
    ]);
    // Self-signed and not trusted: refused, with the certificate named as the reason.
    let out = run_bin(&["--once"], &env);
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(r#"the certificate "CN=127.0.0.1" issued by "CN=127.0.0.1" (unknown issuer)"#),
        "the refusal names the certificate, its subject and issuer: {t}"
    );
    // Trusted through keycloak.ca_file: TLS succeeds; the server is not Keycloak, so discovery
    // fails after the handshake, with no certificate complaint.
    env.push(e(
        "SEEDKEEPER_KEYCLOAK__CA_FILE",
        server.cert.to_str().unwrap(),
    ));
    let out = run_bin(&["--once"], &env);
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(!t.to_lowercase().contains("certificate"), "{t}");
    assert_eq!(public_tables(&db).await, 0, "nothing written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_under_the_running_daemon_is_survived() {
    let cluster = std::sync::Arc::new(tokio::task::spawn_blocking(OwnCluster::new).await.unwrap());
    let url = cluster.url();
    let daemon = start_ready_daemon(
        &[
            ("SEEDKEEPER_DATABASE__URL", &url),
            ("SEEDKEEPER_SCHEDULE__CRON", "*/1 * * * * *"),
            ("SEEDKEEPER_DATABASE__CONNECT_TIMEOUT", "1s"),
        ],
        60,
    )
    .await;
    let ready = daemon.url("/readyz");

    // The server goes away (every connection closed) and comes back on the same port.
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.stop())
        .await
        .unwrap();
    until("not ready while PostgreSQL is down", 30, || async {
        status_of(&ready).await == 503
    })
    .await;
    let before: i64 = {
        let cl = cluster.clone();
        tokio::task::spawn_blocking(move || cl.start())
            .await
            .unwrap();
        let c = connect(&cluster.url()).await;
        c.query_one(
            "SELECT count(*) FROM seed_runs WHERE outcome = 'succeeded'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    daemon
        .until_ready("ready again after the restart", 60)
        .await;
    until(
        "a run succeeded after the restart, without restarting seedkeeper",
        60,
        || {
            let url = url.clone();
            async move {
                connect(&url)
                    .await
                    .query_one(
                        "SELECT count(*) FROM seed_runs WHERE outcome = 'succeeded'",
                        &[],
                    )
                    .await
                    .map(|r| r.get::<_, i64>(0) > before)
                    .unwrap_or(false)
            }
        },
    )
    .await;
    daemon.cancel.cancel();
    daemon.task.await.unwrap().unwrap();
    let c = connect(&cluster.url()).await;
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM seed_runs WHERE outcome = 'succeeded'),
                    (SELECT count(*) FROM users), (SELECT count(DISTINCT keycloak_sub) FROM users),
                    (SELECT count(*) FROM tenants)",
            &[],
        )
        .await
        .unwrap();
    let (after, users, subs, tenants): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert!(
        after > before,
        "runs succeeded after the restart: {before} -> {after}"
    );
    assert_eq!((users, subs, tenants), (6, 6, 6));
}
