//! A read-only server (a hot standby, or `default_transaction_read_only` on) is named as such,
//! with the fix (point `database.url` at the primary), by `--once` (exit 69), by `/readyz`'s
//! body and by `seedkeeper status`, where before a run failed with a bare "cannot execute
//! INSERT in a read-only transaction". Real PostgreSQL: the test's own database made read-only.

use std::time::Duration;

use crate::harness::*;

async fn make_read_only(db: &TestDb) {
    connect(&admin_url())
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            db.name
        ))
        .await
        .unwrap();
}

const NAMED: &str = "a read-only server (a replica?)";
const FIX: &str = "Point database.url (SEEDKEEPER_DATABASE__URL) at the primary";

#[tokio::test(flavor = "multi_thread")]
async fn once_against_a_read_only_database_exits_69_naming_a_replica_and_the_primary() {
    let db = TestDb::new().await;
    assert_eq!(run_bin(&["--once"], &db.env()).status.code(), Some(0));
    make_read_only(&db).await;
    let out = run_bin(&["--once"], &db.env());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(69), "{t}");
    assert!(t.contains(NAMED), "{t}");
    assert!(t.contains("default_transaction_read_only is on"), "{t}");
    assert!(t.contains(FIX), "{t}");
    // Its own kind, in the JSON error line (and so in seedkeeper_run_errors_total).
    let mut json = db.env();
    json.push(("SEEDKEEPER_LOG__FORMAT".into(), "json".into()));
    let out = run_bin(&["--once"], &json);
    assert_eq!(out.status.code(), Some(69));
    let kinds: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["error.kind"] == "database_read_only")
        .collect();
    assert!(!kinds.is_empty(), "{}", text(&out));

    // status: said first, with the runs the primary recorded.
    let out = run_bin(&["status"], &db.env());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.lines()
            .next()
            .is_some_and(|l| l.contains(NAMED) && l.contains(FIX)),
        "{t}"
    );
    assert!(t.contains("succeeded"), "{t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_read_only_database_is_named_when_its_migration_is_refused_and_by_status() {
    // The migration is the first write: SQLSTATE 25006 names the server, not the migration.
    let db = TestDb::empty().await;
    make_read_only(&db).await;
    let out = run_bin(&["--once"], &db.env());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(69), "{t}");
    assert!(t.contains(NAMED), "{t}");
    assert!(t.contains("SQLSTATE 25006"), "{t}");
    assert!(t.contains(FIX), "{t}");
    // No seed_runs table, and none can be made: status still says why.
    let out = run_bin(&["status"], &db.env());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains(NAMED), "{t}");
    assert!(t.contains("no runs recorded"), "{t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_names_a_read_only_database_in_its_body() {
    let db = TestDb::new().await;
    make_read_only(&db).await;
    let listen = format!("127.0.0.1:{}", spawn::free_port());
    let mut env = db.env();
    env.push(("SEEDKEEPER_HTTP__LISTEN".into(), listen.clone()));
    let mut child = spawn_bin(&["run"], &env);
    let url = format!("http://{listen}/readyz");
    let body = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    until("/readyz names the read-only server", 30, || {
        let (url, body) = (url.clone(), body.clone());
        async move {
            let Ok(r) = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            else {
                return false;
            };
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            let named = status == 503 && text.contains(NAMED);
            *body.lock().unwrap() = text;
            named
        }
    })
    .await;
    let body = body.lock().unwrap().clone();
    assert!(body.contains("primary"), "{body}");
    sigterm(child.id());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_hot_standby_is_named_by_once_and_status_and_the_primary_runs() {
    use crate::harness::cluster::OwnCluster;
    let primary = OwnCluster::new();
    let standby = OwnCluster::standby_of(&primary);
    let at = |c: &OwnCluster| {
        vec![(
            "SEEDKEEPER_DATABASE__URL".to_string(),
            format!("postgres://postgres@127.0.0.1:{}/platform", c.port),
        )]
    };
    connect(&primary.url())
        .await
        .batch_execute("CREATE DATABASE platform")
        .await
        .unwrap();
    let out = run_bin(&["--once"], &at(&primary));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The standby has the primary's run once it has replayed it.
    let standby_url = at(&standby)[0].1.clone();
    until("the standby replays the primary's run", 30, || async {
        match tokio_postgres::connect(&standby_url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                c.query_one(
                    "SELECT count(*) FROM seed_runs WHERE outcome = 'succeeded'",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
            }
            Err(_) => false,
        }
    })
    .await;

    let out = run_bin(&["--once"], &at(&standby));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(69), "{t}");
    assert!(t.contains(NAMED), "{t}");
    assert!(
        t.contains("it is a hot standby in recovery (pg_is_in_recovery() is true)"),
        "{t}"
    );
    assert!(t.contains(FIX), "{t}");
    let out = run_bin(&["status"], &at(&standby));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.lines()
            .next()
            .is_some_and(|l| l.contains("hot standby") && l.contains(FIX)),
        "{t}"
    );
    assert!(t.contains("succeeded"), "the primary's run: {t}");
    // The primary still runs.
    let out = run_bin(&["--once"], &at(&primary));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
