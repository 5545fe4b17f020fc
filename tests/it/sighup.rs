//! SIGHUP, as logrotate's `postrotate`, a closing terminal or `systemctl reload` send it, is
//! logged and ignored: a `--once` run and a daemon's run it arrives in finish as without it,
//! with the same exit code. The real binary, a real PostgreSQL; the signal is sent while the
//! run waits on a lock another session holds, so it certainly lands mid-run.

use std::process::Child;
use std::time::Duration;

use crate::harness::spawn::Watched;
use crate::harness::*;

const IGNORED: &str = "SIGHUP received and ignored";

fn sighup(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -HUP {pid}");
}

/// `users` locked by a session of the test, so seedkeeper's identities unit waits.
async fn lock_users(db: &TestDb) -> tokio_postgres::Client {
    let c = db.client().await;
    c.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    c
}

/// Waits until a seedkeeper session on the test database waits on a lock: the run is in flight.
async fn until_waiting_on_the_lock(db: &TestDb) {
    let admin = connect(&admin_url()).await;
    until(
        "seedkeeper's run waits on the lock on users",
        30,
        || async {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1
                 AND application_name = 'seedkeeper' AND wait_event_type = 'Lock'",
                    &[&db.name],
                )
                .await
                .map(|r| r.get::<_, i64>(0) > 0)
                .unwrap_or(false)
        },
    )
    .await;
}

/// Sends SIGHUP and waits for the line saying it was ignored; the process must still run.
async fn hang_up_and_see_it_ignored(watched: &mut Watched, times: usize) {
    sighup(watched.child.id());
    until(
        "the log says SIGHUP was received and ignored",
        10,
        || async { watched.log().iter().filter(|l| l.contains(IGNORED)).count() >= times },
    )
    .await;
    assert!(
        still_running(&mut watched.child),
        "SIGHUP ended the process: {:?}",
        watched.log()
    );
}

fn still_running(child: &mut Child) -> bool {
    child.try_wait().expect("wait for seedkeeper").is_none()
}

async fn wait_exit(child: &mut Child, secs: u64) -> Option<i32> {
    for _ in 0..secs * 20 {
        if let Some(status) = child.try_wait().expect("wait for seedkeeper") {
            return status.code();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    panic!("seedkeeper did not exit within {secs}s");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_during_a_once_run_is_logged_and_ignored_and_the_run_exits_0() {
    let db = TestDb::new().await;
    let held = lock_users(&db).await;
    let mut watched = spawn_bin_watched(&["--once"], &db.env());
    until_waiting_on_the_lock(&db).await;
    hang_up_and_see_it_ignored(&mut watched, 1).await;
    held.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        wait_exit(&mut watched.child, 60).await,
        Some(0),
        "{:?}",
        watched.log()
    );
    let outcomes = db
        .strings("SELECT outcome FROM seed_runs ORDER BY started_at")
        .await;
    assert_eq!(
        outcomes,
        ["succeeded"],
        "one run, succeeded, none left running"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM users WHERE keycloak_sub IS NOT NULL")
            .await,
        6,
        "the dev realm's users were written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_during_and_after_a_daemon_run_is_logged_and_ignored_and_sigterm_still_exits_0() {
    let db = TestDb::new().await;
    let held = lock_users(&db).await;
    let listen = format!("127.0.0.1:{}", spawn::free_port());
    let mut env = db.env();
    env.extend([
        ("SEEDKEEPER_HTTP__LISTEN".to_string(), listen.clone()),
        // No tick during the test: the startup run is the one the signal lands in.
        (
            "SEEDKEEPER_SCHEDULE__CRON".to_string(),
            "0 0 0 1 1 *".to_string(),
        ),
    ]);
    let mut watched = spawn_bin_watched(&["run"], &env);
    until_waiting_on_the_lock(&db).await;
    hang_up_and_see_it_ignored(&mut watched, 1).await;
    held.batch_execute("COMMIT").await.unwrap();
    let readyz = format!("http://{listen}/readyz");
    until("ready after the startup run", 60, || async {
        status_of(&readyz).await == 200
    })
    .await;
    // Idle between runs, as when logrotate runs at night.
    hang_up_and_see_it_ignored(&mut watched, 2).await;
    assert_eq!(status_of(&format!("http://{listen}/healthz")).await, 200);
    assert_eq!(status_of(&readyz).await, 200);
    sigterm(watched.child.id());
    assert_eq!(
        wait_exit(&mut watched.child, 30).await,
        Some(0),
        "{:?}",
        watched.log()
    );
    let outcomes = db.strings("SELECT outcome FROM seed_runs").await;
    assert_eq!(outcomes, ["succeeded"]);
}
