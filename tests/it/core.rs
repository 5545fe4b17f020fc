//! Config, schema, reference seed, one-shot reconcile with evidence.

use serde_json::{json, Value};

use crate::harness::*;
use seedkeeper::reconcile::{FindingKind, Tally, Unit};

#[tokio::test(flavor = "multi_thread")]
async fn fresh_database_gets_every_reference_row_as_seed_000_lists_it() {
    let db = TestDb::new().await;
    let r = apply(&db.engine(&[])).await;
    assert_ok(&r);
    let c = db.client().await;

    let skus = c.query("SELECT sku, vendor, display_name, gpus, gpu_hourly_price_minor, resource_profile FROM sku_catalog ORDER BY sku", &[]).await.unwrap();
    let got: Vec<(String, String, String, i32, i64)> = skus
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let want = [
        ("cs-3", "Cerebras", "Cerebras CS-3", 1, 500),
        ("cs-4", "Cerebras", "Cerebras CS-4", 1, 500),
        ("h100", "NVIDIA", "NVIDIA H100", 8, 200),
        ("h200", "NVIDIA", "NVIDIA H200", 8, 400),
        ("mi210x", "AMD", "AMD MI210X", 8, 200),
        ("mi300x", "AMD", "AMD MI300X", 8, 400),
    ];
    for w in want {
        assert!(
            got.iter()
                .any(|g| (g.0.as_str(), g.1.as_str(), g.2.as_str(), g.3, g.4) == w),
            "missing or wrong SKU {w:?} in {got:?}"
        );
    }
    assert_eq!(got.len(), 7, "six SKUs plus h200-sxm-slice");
    let slice: Value = skus
        .iter()
        .find(|r| r.get::<_, String>(0) == "h200-sxm-slice")
        .expect("slice sku")
        .get(5);
    assert_eq!(slice["default_slice_vm_profile"], json!("h200_1g_24c_64g"));
    let profiles: Vec<(String, i64, i64, i64)> = slice["slice_vm_profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["gpu_count"].as_i64().unwrap(),
                p["vcpu"].as_i64().unwrap(),
                p["memory_gib"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        profiles,
        vec![
            ("h200_1g_12c_64g".to_string(), 1, 12, 64),
            ("h200_1g_24c_64g".to_string(), 1, 24, 64),
            ("h200_2g_48c_128g".to_string(), 2, 48, 128),
            ("h200_4g_96c_256g".to_string(), 4, 96, 256),
            ("h200_8g_192c_512g".to_string(), 8, 192, 512),
        ]
    );

    let defs = c.query("SELECT key, value_type, default_value, min_value, max_value, allowed_values FROM policy_definitions", &[]).await.unwrap();
    assert_eq!(defs.len(), 17);
    let def = |k: &str| {
        defs.iter()
            .find(|r| r.get::<_, String>(0) == k)
            .unwrap_or_else(|| panic!("policy {k}"))
    };
    let d = def("billing.low_balance_threshold_minor");
    assert_eq!(
        (
            d.get::<_, String>(1),
            d.get::<_, Value>(2),
            d.get::<_, Option<i64>>(3),
            d.get::<_, Option<i64>>(4)
        ),
        ("integer".into(), json!(500), Some(1), Some(100000))
    );
    let d = def("terminal.session_max_ttl_seconds");
    assert_eq!(
        (
            d.get::<_, Value>(2),
            d.get::<_, Option<i64>>(3),
            d.get::<_, Option<i64>>(4)
        ),
        (json!(14400), Some(300), Some(86400))
    );
    let d = def("allocation.isolation_model");
    assert_eq!(
        (
            d.get::<_, String>(1),
            d.get::<_, Value>(2),
            d.get::<_, Option<Value>>(5)
        ),
        (
            "string".into(),
            json!("user-revoke"),
            Some(json!(["user-revoke", "full-reimage"]))
        )
    );
    let d = def("maas.enabled");
    assert_eq!(
        (
            d.get::<_, String>(1),
            d.get::<_, Value>(2),
            d.get::<_, Option<i64>>(3)
        ),
        ("boolean".into(), json!(false), None)
    );

    let mismatched: i64 = db.scalar("SELECT count(*) FROM policy_values v JOIN policy_definitions d ON d.key = v.policy_key WHERE v.scope_type = 'global' AND v.value = d.default_value").await;
    assert_eq!(
        mismatched, 17,
        "one global value per policy, equal to its default"
    );

    let plan = c
        .query_one("SELECT id::text, is_default FROM pricing_plans", &[])
        .await
        .unwrap();
    assert_eq!(
        (plan.get::<_, String>(0), plan.get::<_, bool>(1)),
        ("10000000-0000-4000-8000-000000000001".to_string(), true)
    );

    let roles: Vec<(String, i32, bool)> = c
        .query(
            "SELECT role_name, version, is_active FROM platform_role_versions ORDER BY role_name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("platform_ops".into(), 1, true),
            ("platform_superadmin".into(), 1, true),
            ("platform_user".into(), 1, true)
        ]
    );

    let apps: Vec<(String, String)> = c
        .query(
            "SELECT slug, runtime_backend FROM app_catalog ORDER BY slug",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expect = [
        ("meta-llama-3-8b", "bare_metal"),
        ("mlflow", "bare_metal"),
        ("nginx", "bare_metal"),
        ("ollama", "bare_metal"),
        ("open-webui", "bare_metal"),
        ("postgresql", "bare_metal"),
        ("rke2-self-managed", "rke2"),
        ("slurm-reference", "slurm"),
    ];
    assert_eq!(
        apps,
        expect
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );
    let active: i64 = db
        .scalar("SELECT count(*) FROM app_catalog_versions WHERE is_active")
        .await;
    assert_eq!(active, 8);

    let run = c
        .query_one("SELECT outcome, seed_digest, counts FROM seed_runs", &[])
        .await
        .unwrap();
    assert_eq!(run.get::<_, String>(0), "succeeded");
    assert_eq!(run.get::<_, String>(1), r.seed_digest);
    assert!(
        run.get::<_, Value>(2)["reference_seed"]["inserted"]
            .as_i64()
            .unwrap()
            > 40
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn second_run_writes_zero_tuples() {
    let db = TestDb::new().await;
    let engine = db.engine(&[]);
    assert_ok(&apply(&engine).await);
    db.settle_stats(1).await;
    let after_first = db.tuples_written().await;
    assert!(after_first > 50, "the first run wrote rows ({after_first})");
    let r = apply(&engine).await;
    assert_ok(&r);
    db.settle_stats(2).await;
    assert_eq!(
        db.tuples_written().await,
        after_first,
        "a run on a database in sync wrote tuples"
    );
    assert_eq!(
        count(&r, "reference_seed", "inserted") + count(&r, "reference_seed", "updated"),
        0
    );
    assert!(count(&r, "identities", "unchanged") >= 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sku_price_changed_by_hand_is_corrected_and_reported_as_drift() {
    let db = TestDb::new().await;
    let engine = db.engine(&[]);
    assert_ok(&apply(&engine).await);
    let c = db.client().await;
    c.execute(
        "UPDATE sku_catalog SET gpu_hourly_price_minor = 1 WHERE sku = 'h100'",
        &[],
    )
    .await
    .unwrap();
    let p = plan(&engine).await;
    assert!(p.changes_pending());
    let r = apply(&engine).await;
    assert_ok(&r);
    assert_eq!(count(&r, "reference_seed", "drift"), 1);
    assert_eq!(count(&r, "reference_seed", "updated"), 1);
    let f = &r.unit(Unit::ReferenceSeed).unwrap().findings;
    assert!(
        f.iter()
            .any(|f| f.kind == FindingKind::DriftCorrected && f.entity == "sku_catalog:h100"),
        "{f:?}"
    );
    let price: i64 = db
        .scalar("SELECT gpu_hourly_price_minor FROM sku_catalog WHERE sku = 'h100'")
        .await;
    assert_eq!(price, 200);
    let findings: Value = c
        .query_one("SELECT findings FROM seed_runs WHERE id = $1", &[&r.id])
        .await
        .unwrap()
        .get(0);
    assert!(findings.to_string().contains("sku_catalog:h100"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_global_policy_value_changed_by_an_admin_is_left_alone_and_shown_by_plan() {
    let db = TestDb::new().await;
    let engine = db.engine(&[]);
    assert_ok(&apply(&engine).await);
    let c = db.client().await;
    c.execute("UPDATE policy_values SET value = '77' WHERE policy_key = 'billing.window_seconds' AND scope_type = 'global'", &[]).await.unwrap();
    let p = plan(&engine).await;
    assert!(!p.changes_pending(), "insert-missing: nothing to apply");
    let text = seedkeeper::cli::render_plan(&p);
    assert!(
        text.contains("drift_kept policy_values:billing.window_seconds"),
        "{text}"
    );
    let r = apply(&engine).await;
    assert_ok(&r);
    let v: Value = c
        .query_one(
            "SELECT value FROM policy_values WHERE policy_key = 'billing.window_seconds'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, json!(77));
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_exits_2_with_changes_pending_and_0_in_sync_and_writes_nothing() {
    let db = TestDb::empty().await;
    let out = run_bin(&["plan"], &db.env());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let c = db.client().await;
    let tables: i64 = db
        .scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .await;
    assert_eq!(tables, 0, "plan created tables");
    let out = run_bin(&["--once"], &db.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = run_bin(&["plan", "--format", "json"], &db.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("plan json");
    assert_eq!(v["outcome"], json!("succeeded"));
    c.execute(
        "UPDATE app_catalog SET runtime_backend = 'slurm' WHERE slug = 'nginx'",
        &[],
    )
    .await
    .unwrap();
    let out = run_bin(&["plan"], &db.env());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("app_catalog:nginx"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_database_secret_exits_78_names_the_key_and_connects_to_nothing() {
    let out = run_bin(&["--once"], &[]);
    assert_eq!(out.status.code(), Some(78));
    let t = text(&out);
    assert!(
        t.contains("database.url") && t.contains("SEEDKEEPER_DATABASE__URL"),
        "{t}"
    );
    assert!(!t.contains("seeding_started"), "it started a run: {t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_seed_default_outside_its_bounds_exits_78_naming_the_policy_key_and_writes_nothing() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let seed =
        seedkeeper::seed::EMBEDDED_SEED.replacen("default_value = 60", "default_value = 5", 1);
    assert_ne!(
        seed,
        seedkeeper::seed::EMBEDDED_SEED,
        "the seed has billing.window_seconds = 60"
    );
    let path = dir.write("seed.toml", &seed);
    let mut env = db.env();
    env.push(("SEEDKEEPER_SEED__PATH".into(), path.display().to_string()));
    let out = run_bin(&["--once"], &env);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("billing.window_seconds") && t.contains("below min_value 30"),
        "{t}"
    );
    let tables: i64 = db
        .scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .await;
    assert_eq!(tables, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_validation_reports_every_problem_at_once() {
    let bad = seedkeeper::seed::EMBEDDED_SEED
        .replacen("default_value = 60", "default_value = 5", 1)
        .replacen(
            "runtime_backend = \"slurm\"",
            "runtime_backend = \"k8s\"",
            1,
        )
        .replacen("format = 1", "format = 1\nsurprise = true", 1);
    let e = seedkeeper::seed::ReferenceSeed::parse("t.toml", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("surprise"), "unknown field refused: {e}");
    let bad = seedkeeper::seed::EMBEDDED_SEED
        .replacen("default_value = 60", "default_value = 5", 1)
        .replacen(
            "runtime_backend = \"slurm\"",
            "runtime_backend = \"k8s\"",
            1,
        );
    let e = seedkeeper::seed::ReferenceSeed::parse("t.toml", &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("billing.window_seconds") && e.contains("\"k8s\""),
        "{e}"
    );
    assert_eq!(
        seedkeeper::error::Error::Seed {
            source_name: String::new(),
            problems: seedkeeper::error::Problems(vec![])
        }
        .exit_code(),
        78
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edited_applied_migration_is_refused() {
    // Empty: the migrations this test edits are the ones its own first run applied.
    let db = TestDb::empty().await;
    let engine = db.engine(&[]);
    assert_ok(&apply(&engine).await);
    let c = db.client().await;
    c.execute(
        "UPDATE seedkeeper_migrations SET checksum = 'deadbeef' WHERE version = 1",
        &[],
    )
    .await
    .unwrap();
    let r = apply(&engine).await;
    assert_eq!(r.outcome, seedkeeper::reconcile::Outcome::Failed);
    let e = r.error.unwrap().to_string();
    assert!(
        e.contains("V1__db_schema_v1") && e.contains("append-only"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_mode_refuses_to_run_while_migrations_are_pending() {
    let db = TestDb::empty().await;
    let r = apply(&db.engine(&[("SEEDKEEPER_SCHEMA__MODE", "verify")])).await;
    assert_eq!(r.outcome, seedkeeper::reconcile::Outcome::Failed);
    assert!(r.error.unwrap().to_string().contains("seedkeeper migrate"));
    let out = run_bin(&["migrate"], &db.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Every migration applied, and nothing of PostgreSQL's about the bookkeeping table in the
    // log (it is created once, not asked for again in each migration's transaction).
    let log = text(&out);
    let all = seedkeeper::store::migrate::MIGRATIONS.len();
    assert_eq!(log.matches("migration applied").count(), all, "{log}");
    assert!(!log.contains("NOTICE"), "{log}");
    assert_ok(&apply(&db.engine(&[("SEEDKEEPER_SCHEMA__MODE", "verify")])).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_concurrent_run_is_skipped_not_blocked_or_duplicated() {
    let db = TestDb::new().await;
    let engine = db.engine(&[]);
    assert_ok(&apply(&engine).await);
    let holder = db.hold_run_lock().await;
    let r = apply(&engine).await;
    assert_eq!(r.outcome, seedkeeper::reconcile::Outcome::Skipped);
    let rows: Vec<String> = db
        .strings("SELECT outcome FROM seed_runs ORDER BY started_at")
        .await;
    assert_eq!(rows, vec!["succeeded", "skipped"]);
    release_run_lock(&holder).await;
    assert_ok(&apply(&engine).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn export_sql_applied_with_psql_gives_the_same_reference_data() {
    let db = TestDb::new().await;
    let out = run_bin(&["migrate"], &db.env());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let sql = run_bin(&["export-sql"], &[]);
    assert_eq!(sql.status.code(), Some(0));
    let dir = TempDir::new();
    let path = dir.write("seed.sql", &String::from_utf8_lossy(&sql.stdout));
    for _ in 0..2 {
        let psql = std::process::Command::new("psql")
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-f"])
            .arg(&path)
            .arg(&db.url)
            .output()
            .unwrap_or_else(|e| {
                panic!("psql is needed for this test: install Debian's postgresql-client package (apt-get install postgresql-client): {e}")
            });
        assert!(
            psql.status.success(),
            "{}",
            String::from_utf8_lossy(&psql.stderr)
        );
    }
    let p = plan(&db.engine(&[])).await;
    let seed = p.unit(Unit::ReferenceSeed).unwrap();
    assert_eq!(
        seed.writes(),
        0,
        "the engine finds the exported seed complete: {:?}",
        seed.changes
    );
    assert_eq!(seed.get(Tally::Drift), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_secret_never_appears_in_config_errors_or_trace_logs() {
    let db = TestDb::new().await;
    let canary = "CanaryPw-7b1e9f";
    let client = db.client().await;
    let role = format!("sk_canary_{}", &db.name[8..]);
    client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{canary}' SUPERUSER"
        ))
        .await
        .unwrap();
    let url = db.url.replace("postgres@", &format!("{role}@"));
    let env = vec![
        ("SEEDKEEPER_DATABASE__URL".to_string(), url.clone()),
        (
            "SEEDKEEPER_DATABASE__PASSWORD".to_string(),
            canary.to_string(),
        ),
        (
            "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET".to_string(),
            format!("{canary}-kc"),
        ),
        ("RUST_LOG".to_string(), "trace".to_string()),
    ];
    let mut outputs = vec![
        run_bin(&["config"], &env),
        run_bin(&["--once"], &env),
        run_bin(&["status"], &env),
        run_bin(&["plan", "--format", "json"], &env),
    ];
    let mut bad = env.clone();
    // Trust auth accepts any password, so an unknown role stands in for a refused login.
    bad[0].1 = db.url.replace("postgres@", "sk_no_such_role@");
    outputs.push(run_bin(&["--once"], &bad));
    for o in &outputs {
        let t = text(o);
        assert!(!t.contains(canary), "secret leaked: {t}");
    }
    assert_eq!(outputs[1].status.code(), Some(0), "{}", text(&outputs[1]));
    assert_eq!(
        outputs[4].status.code(),
        Some(78),
        "a wrong password is a config error: {}",
        text(&outputs[4])
    );
    let evidence: String = client.query_one("SELECT string_agg(counts::text || findings::text || coalesce(error, ''), '') FROM seed_runs", &[]).await.unwrap().get(0);
    assert!(!evidence.contains(canary));
    drop(client);
    let admin = connect(&admin_url()).await;
    let _ = admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE); DROP ROLE IF EXISTS {role}",
            db.name
        ))
        .await;
}

/// In production `http://` is refused for a Keycloak on another host (the secret and
/// tokens would travel in clear) and accepted on loopback, where nothing leaves the machine.
#[test]
fn production_accepts_http_to_keycloak_on_loopback_only() {
    for (base_url, refused) in [
        ("http://kc.example", true),
        ("http://10.1.2.3:8080", true),
        ("http://[2001:db8::1]:8080", true),
        ("http://127.0.0.1:8080", false),
        ("http://localhost:8080", false),
        ("http://[::1]:8080", false),
        ("https://kc.example", false),
    ] {
        let env: Vec<(String, String)> = [
            ("SEEDKEEPER_ENVIRONMENT", "production"),
            ("SEEDKEEPER_DATABASE__URL", "postgres://u@127.0.0.1/db"),
            ("SEEDKEEPER_IDENTITY__SOURCE", "keycloak"),
            ("SEEDKEEPER_KEYCLOAK__BASE_URL", base_url),
            ("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "x"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r = seedkeeper::config::load(&seedkeeper::config::ConfigLayers { file: None, env });
        match (refused, r) {
            (true, Err(e)) => {
                let e = e.to_string();
                assert!(
                    e.contains("refuses keycloak.base_url") && e.contains("https://"),
                    "{base_url}: {e}"
                );
                assert_eq!(e.matches("keycloak.base_url").count(), 1, "{base_url}: {e}");
            }
            (true, Ok(_)) => panic!("{base_url}: accepted in production"),
            (false, Err(e)) => panic!("{base_url}: refused: {e}"),
            (false, Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn config_reports_every_problem_and_refuses_unsafe_production_settings() {
    let env = vec![
        (
            "SEEDKEEPER_ENVIRONMENT".to_string(),
            "production".to_string(),
        ),
        (
            "SEEDKEEPER_SCHEDULE__CRON".to_string(),
            "every minute".to_string(),
        ),
        ("SEEDKEEPER_HTTP__LISTEN".to_string(), "nowhere".to_string()),
        (
            "SEEDKEEPER_KEYCLOAK__TLS_VERIFY".to_string(),
            "false".to_string(),
        ),
    ];
    let e = seedkeeper::config::load(&seedkeeper::config::ConfigLayers { file: None, env })
        .unwrap_err()
        .to_string();
    for needle in [
        "database.url",
        "schedule.cron",
        "http.listen",
        "realm-file",
        "tls_verify",
    ] {
        assert!(e.contains(needle), "missing {needle}: {e}");
    }
    let env = vec![("SEEDKEEPER_DATABASE__URLL".to_string(), "x".to_string())];
    let e = seedkeeper::config::load(&seedkeeper::config::ConfigLayers { file: None, env })
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown key `database.urll`"), "{e}");
    let dir = TempDir::new();
    let f = dir.write("c.toml", "[databse]\nurl = 'postgres://x@h/db'\n");
    let e = seedkeeper::config::load(&seedkeeper::config::ConfigLayers {
        file: Some(f),
        env: vec![],
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("databse"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_come_from_files_and_numeric_values_stay_exact() {
    let dir = TempDir::new();
    let f = dir.write("pw", "007\n");
    let env = vec![
        (
            "SEEDKEEPER_DATABASE__URL".to_string(),
            "postgres://u@127.0.0.1/db".to_string(),
        ),
        (
            "SEEDKEEPER_DATABASE__PASSWORD_FILE".to_string(),
            f.display().to_string(),
        ),
        (
            "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET".to_string(),
            "0012".to_string(),
        ),
    ];
    let s =
        seedkeeper::config::load(&seedkeeper::config::ConfigLayers { file: None, env }).unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(s.database.password.as_ref().unwrap().expose_secret(), "007");
    assert_eq!(
        s.keycloak.client_secret.as_ref().unwrap().expose_secret(),
        "0012"
    );
    let empty = dir.write("empty", "");
    let env = vec![
        (
            "SEEDKEEPER_DATABASE__URL_FILE".to_string(),
            empty.display().to_string(),
        ),
        (
            "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE".to_string(),
            "/nonexistent/secret".to_string(),
        ),
    ];
    let e = seedkeeper::config::load(&seedkeeper::config::ConfigLayers { file: None, env })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("file is empty") && e.contains("file does not exist"),
        "{e}"
    );
    let creds = TempDir::new();
    creds.write("database.url", "postgres://u@127.0.0.1/db");
    let env = vec![
        (
            "CREDENTIALS_DIRECTORY".to_string(),
            creds.0.display().to_string(),
        ),
        (
            "SEEDKEEPER_DATABASE__URL".to_string(),
            "postgres://v@h/db".to_string(),
        ),
    ];
    let e = seedkeeper::config::load(&seedkeeper::config::ConfigLayers { file: None, env })
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than once"), "{e}");
}
