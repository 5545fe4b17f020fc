//! The one retry policy at its callers: a shutdown ends a Keycloak retry or a PostgreSQL wait at
//! once, and what is not worth repeating (the events endpoints' 403) is not repeated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::harness::keycloak::KeycloakEmulator;
use crate::harness::*;
use crate::identities::kc_env;
use seedkeeper::config::{self, Settings, Sources};
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
    config::load(&Sources {
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
        apply: Arc::new(|_, _| Box::pin(async { None })),
        database: s.database.clone(),
        realm: s.keycloak.realm.clone(),
        poll_interval: Duration::from_millis(200),
        full_run: Arc::new(|_: &str| {}),
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
    let kc =
        KeycloakEmulator::start(realm_where_seedkeeper_holds(&["view-users", "view-realm"])).await;
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

    // Retries enough for minutes of backoff; the shutdown comes during the third wait.
    let mut env = kc_env(&kc);
    env.push(("SEEDKEEPER_KEYCLOAK__MAX_RETRIES".into(), "50".into()));
    let f = follower(&settings(env));
    kc.fail_next_admin(1000, 503);
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let asked = requests_to(&kc, "events/config");
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.cancel();
    });
    let started = Instant::now();
    let r = f.kc.events_config(&cancel).await;
    let took = started.elapsed();
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(
        took < Duration::from_millis(1500),
        "the wait outlived the shutdown: {took:?}"
    );
    let made = requests_to(&kc, "events/config") - asked;
    assert!(
        (2..=4).contains(&made),
        "{made} requests before the shutdown"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        requests_to(&kc, "events/config") - asked,
        made,
        "nothing is asked after the shutdown"
    );
}

#[tokio::test]
async fn a_shutdown_ends_the_wait_for_postgresql_at_once() {
    let s = settings(Vec::new());
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    let started = Instant::now();
    let r =
        seedkeeper::store::connect_with_wait(&s.database, Duration::from_secs(60), &cancel).await;
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Without a shutdown the wait is `startup.wait_timeout`, then PostgreSQL is unavailable.
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
