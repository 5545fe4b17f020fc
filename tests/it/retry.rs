//! The one retry policy at its callers: a shutdown ends a Keycloak retry or a PostgreSQL wait at
//! once, and what is not worth repeating (the events endpoints' 403) is not repeated.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::*;
use crate::identities::kc_env;
use seedkeeper::config::{self, ConfigLayers, Settings};
use seedkeeper::error::{exit, Error, Refusal};
use seedkeeper::events::{Follower, FollowerState, NotFollowing};
use seedkeeper::identity::keycloak::KeycloakSource;
use seedkeeper::identity::RoleFilter;

/// A database nothing listens on: every connection is refused, which is worth waiting out.
const NO_DATABASE: &str = "postgres://seedkeeper@127.0.0.1:1/none";

fn settings(env: Vec<(String, String)>) -> Settings {
    let mut all = vec![(
        "SEEDKEEPER_DATABASE__URL".to_string(),
        NO_DATABASE.to_string(),
    )];
    all.extend(env);
    config::load(&ConfigLayers {
        file: None,
        env: all,
    })
    .unwrap_or_else(|e| panic!("test settings: {e}"))
}

/// The dev realm, its service account holding these realm-management roles.
fn realm_where_seedkeeper_holds(roles: &[&str]) -> Value {
    let mut realm = dev_realm();
    for u in realm["users"].as_array_mut().unwrap() {
        if u.get("serviceAccountClientId").is_some() {
            u["clientRoles"] = json!({ "realm-management": roles });
        }
    }
    realm
}

fn source(s: &Settings) -> KeycloakSource {
    KeycloakSource::new(
        &s.keycloak,
        RoleFilter::new(&s.identity),
        100,
        Duration::from_secs(2),
    )
    .unwrap()
}

fn follower(s: &Settings) -> Follower {
    Follower {
        kc: Arc::new(source(s)),
        // Never asked for a run here: these tests stop at the follower's checks.
        gate: seedkeeper::app::build(s.clone()).unwrap().into_gate(),
        database: s.database.clone(),
        realm: s.keycloak.realm.clone(),
        poll_interval: Duration::from_millis(200),
        state: Arc::new(FollowerState::default()),
        metrics: Default::default(),
    }
}

fn requests_to(kc: &KeycloakEmulator, path: &str) -> usize {
    kc.journal()
        .iter()
        .filter(|e| e.path.ends_with(path))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_events_403_names_view_events_at_the_first_answer_and_is_not_retried() {
    let kc = KeycloakEmulator::start(realm_where_seedkeeper_holds(&[
        "view-users",
        "view-realm",
        "view-clients",
    ]))
    .await;
    let s = settings(kc_env(&kc));
    let f = follower(&s);
    let Err(NotFollowing { reason, transient }) = f.check(&CancellationToken::new()).await else {
        panic!("followed without view-events");
    };
    assert!(!transient, "a missing role does not pass by waiting");
    assert!(
        reason.contains("GET events/config: 403")
            && reason.contains("lacks realm-management role view-events"),
        "{reason}"
    );
    assert_eq!(requests_to(&kc, "events/config"), 1);
    // The typed status carries the advice, and the exit code stays that of a refusal.
    let e =
        f.kc.events_config(&CancellationToken::new())
            .await
            .unwrap_err();
    assert!(
        matches!(&e, Error::KeycloakAuth(Refusal { status: Some(403), message }) if message.contains("view-events")),
        "{e:?}"
    );
    assert_eq!(e.exit_code(), exit::CONFIG);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keycloak_down_for_the_follower_is_transient_and_a_shutdown_ends_its_retries_at_once() {
    let kc = KeycloakEmulator::start(realm_where_seedkeeper_holds(&[
        "view-users",
        "view-realm",
        "view-clients",
        "view-events",
    ]))
    .await;
    let mut env = kc_env(&kc);
    env.push(("SEEDKEEPER_KEYCLOAK__MAX_RETRIES".into(), "1".into()));
    let f = follower(&settings(env));
    kc.fail_next_admin(2, 503);
    let Err(NotFollowing { reason, transient }) = f.check(&CancellationToken::new()).await else {
        panic!("followed through an outage");
    };
    assert!(transient, "an outage is checked again: {reason}");
    assert!(reason.contains("503"), "{reason}");

    // Retries enough for minutes of backoff (200 ms doubling); the shutdown comes during the
    // third wait (800 ms), as soon as the third request is answered 503.
    let mut env = kc_env(&kc);
    env.push(("SEEDKEEPER_KEYCLOAK__MAX_RETRIES".into(), "50".into()));
    let f = follower(&settings(env));
    kc.fail_next_admin(1000, 503);
    let cancel = CancellationToken::new();
    let asked = requests_to(&kc, "events/config");
    let (r, cancelled_at) = tokio::join!(f.kc.events_config(&cancel), async {
        until("the third events/config request answered", 10, || async {
            requests_to(&kc, "events/config") - asked >= 3
        })
        .await;
        cancel.cancel();
        Instant::now()
    });
    let took = cancelled_at.elapsed();
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(
        took < Duration::from_millis(500),
        "the wait outlived the shutdown by {took:?}"
    );
    assert_eq!(
        requests_to(&kc, "events/config") - asked,
        3,
        "requests before the shutdown"
    );
    // A fixed wait, on purpose: it asserts that nothing is asked within it, longer than the
    // third wait the shutdown cut short.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        requests_to(&kc, "events/config") - asked,
        3,
        "nothing is asked after the shutdown"
    );
}

/// A PostgreSQL that hangs up on every connection (as a server going down does), counting the
/// attempts: 127.0.0.1 and the port it listens on.
async fn hanging_up_server() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, attempts)
}

#[tokio::test]
async fn a_shutdown_ends_the_wait_for_postgresql_at_once() {
    // Attempts 100 ms apart, doubling: the shutdown comes during the fourth wait (800 ms), as
    // soon as the fourth attempt is seen.
    let (port, attempts) = hanging_up_server().await;
    let url = format!("postgres://seedkeeper@127.0.0.1:{port}/none?sslmode=disable");
    let s = settings_from(&[("SEEDKEEPER_DATABASE__URL", &url)]);
    let cancel = CancellationToken::new();
    let (r, cancelled_at) = tokio::join!(
        seedkeeper::store::connect_with_wait(&s.database, Duration::from_secs(60), &cancel),
        async {
            until("the fourth connection attempt", 10, || async {
                attempts.load(Ordering::SeqCst) >= 4
            })
            .await;
            cancel.cancel();
            Instant::now()
        }
    );
    let took = cancelled_at.elapsed();
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    assert!(
        took < Duration::from_millis(500),
        "the wait outlived the shutdown by {took:?}"
    );
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        4,
        "attempts before the shutdown"
    );
    // A fixed wait, on purpose: it asserts that no attempt comes within it, longer than the
    // fourth wait the shutdown cut short.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        4,
        "no attempt after the shutdown"
    );
    // Without a shutdown the wait is `startup.wait_timeout`, then PostgreSQL is unavailable.
    let s = settings(Vec::new());
    let r = seedkeeper::store::connect_with_wait(
        &s.database,
        Duration::from_millis(500),
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(&r, Err(Error::DatabaseUnavailable { target, .. }) if target.contains("127.0.0.1:1")),
        "{:?}",
        r.err()
    );
    assert_eq!(r.err().map(|e| e.exit_code()), Some(exit::UNAVAILABLE));
}
