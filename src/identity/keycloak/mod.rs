//! Identity source `keycloak`: the live Admin REST API of Keycloak 26.
//!
//! Token: the discovery document of `{base_url}/realms/{realm}` and the client-credentials grant
//! (through `openidconnect`); the token is cached until shortly before it expires and renewed once
//! when the API answers 401.
//!
//! Every endpoint is reached through `keycloak.base_url`, whatever host the discovery document
//! names: a realm's `frontendUrl` (or Keycloak's `--hostname`) makes Keycloak announce its public
//! URL, which seedkeeper inside a cluster may not reach or resolve. So the document is fetched
//! here rather than by openidconnect's discovery (which refuses an issuer other than the URL it
//! was asked, and fetches the JWKS from the announced host), and the token endpoint is rebased
//! onto `base_url`. The announced issuer is accepted when it names the configured realm (its path
//! ends in `/realms/{realm}`), or when it equals `keycloak.issuer`, which pins it; anything else
//! is a configuration error, never retried as Keycloak being unavailable. Every request has a timeout; 429 (honouring `Retry-After`), 5xx,
//! timeouts, connection errors and malformed bodies are retried with bounded backoff. TLS is
//! rustls trusting the OS trust store plus `keycloak.ca_file` ([`crate::trust`]); a certificate
//! that does not verify fails the run at once (exit 78) naming it; redirects are never followed.
//!
//! Effective roles: `roles/{role}/users` lists direct members only (keycloak#37209), so for each
//! mapped role the source finds every role, realm or client, that grants it through composites
//! (a client role can hold realm roles), then the direct members of those roles and the members
//! of the groups (and subgroups) that carry them (see `roles`). The holders are resolved beside
//! the user listing, not before it, and neither is held: the users are streamed page by page
//! (`first`/`max`, `keycloak.concurrency` pages in flight), each page sent to the stage as it
//! arrives, without roles; each page of a role's or a group's members goes to the stage too, as
//! grants of the mapped roles it carries, and the identities unit gives the staged users their
//! roles once both are done.
//!
//! A page shorter than asked is not the end of a listing: Keycloak filters results after the
//! query (fine-grained admin permissions), federation providers cap what they return, and a
//! server may cap `max`. Every listing advances `first` by what was returned and ends at an
//! empty page; the small ones (roles, clients, groups) deduplicate by id. The user listing and
//! the members' listings keep no set of the ids they saw: the identities unit removes
//! users repeated by paging from its stage and checks the distinct users against `users/count`
//! there: fewer is a [`crate::identity::Shortfall`], which narrows the run to the listed users
//! (nothing is concluded from absence) instead of failing it.
//!
//! The client secret is exposed only in the token request; the token only in the
//! `Authorization` header. Error messages carry the API path and Keycloak's `error` field, never
//! a response body. Reads `keycloak.*`.

mod auth;
mod client;
mod events;
mod listing;
mod roles;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub(crate) use client::AdminClient;
pub(crate) use events::{AdminEvent, Lookup, Stream, UserEvent};

use crate::error::Result;
use crate::identity::{
    BoxFuture, Duplicate, IdentityProvider, RoleFilter, SourceStats, StageSender, UniqueKeys,
};
use crate::metrics::KeycloakOutcome;
use crate::progress::Progress;

/// The Keycloak versions the conformance suite and the emulator comparison have passed against
/// (docs/testing.md, "Versions run"): the newest patch of each 26.x minor Maven Central serves
/// (26.6 was never published). A server from the oldest minor to the newest one here is in the
/// tested range; anything else is warned about once at start.
pub const TESTED_VERSIONS: &[&str] = &["26.4.7", "26.5.6", "26.7.3"];

/// `major.minor` of a version such as `26.7.3` (or `26.7.3-SNAPSHOT`); `None` when it does not
/// start with two numbers.
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether `version` lies within the minors of [`TESTED_VERSIONS`] (any patch of them, and any
/// minor between the oldest and the newest).
pub fn in_tested_range(version: &str) -> bool {
    let tested = TESTED_VERSIONS.iter().filter_map(|v| major_minor(v));
    let (Some(low), Some(high)) = (tested.clone().min(), tested.max()) else {
        return false;
    };
    major_minor(version).is_some_and(|v| low <= v && v <= high)
}

/// The part of `GET /admin/serverinfo` that holds the version. For a realm's service account,
/// `systemInfo` is served from 26.5 on to realm-management `manage-realm` (or `realm-admin`),
/// never to the view and query roles seedkeeper otherwise needs, and on 26.4 to no realm
/// service account at all (checked on 26.4.7, 26.5.6 and 26.7.3).
#[derive(Debug, Deserialize)]
struct ServerInfo {
    #[serde(default, rename = "systemInfo")]
    system_info: Option<SystemInfo>,
}

#[derive(Debug, Deserialize)]
struct SystemInfo {
    #[serde(default)]
    version: Option<String>,
}

/// Identity source `keycloak`: the realm's users and their mapped roles, read through an
/// [`AdminClient`] it may share (with the event follower).
pub struct KeycloakSource {
    client: Arc<AdminClient>,
    filter: RoleFilter,
    batch_size: usize,
    /// The preflight's `users/count` and when it was answered: the listing that starts right
    /// after it takes it as its own count instead of asking again (see [`COUNT_KEPT_FOR`]).
    counted: std::sync::Mutex<Option<(u64, std::time::Instant)>>,
}

/// How long the preflight's `users/count` stands in for the listing's own. Any count taken
/// before the listing's first window means the same to it (users deleted before the listing
/// ends show up as a shortfall, users created only as extra), but the older it is the likelier
/// a shortfall that narrows the run: a run that waited for PostgreSQL or for the run lock asks
/// again. Between the two in a `--once`: about 20 ms (one request to Keycloak saved, and its
/// round trip before the first window).
const COUNT_KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(1);

impl KeycloakSource {
    /// A source with a client of its own, counting into instruments of its own (commands and
    /// tests; the daemon shares one client through [`KeycloakSource::with_client`]).
    #[cfg(feature = "testing")]
    pub fn new(
        settings: &crate::config::KeycloakSettings,
        filter: RoleFilter,
        batch_size: usize,
        wait: std::time::Duration,
    ) -> Result<Self> {
        let client = AdminClient::new(settings, wait, crate::metrics::KeycloakMetrics::new())?;
        Ok(Self::with_client(Arc::new(client), filter, batch_size))
    }

    /// A source reading through `client`.
    pub(crate) fn with_client(client: Arc<AdminClient>, filter: RoleFilter, batch_size: usize) -> Self {
        KeycloakSource {
            client,
            filter,
            batch_size,
            counted: std::sync::Mutex::new(None),
        }
    }

    /// The preflight's count, once, when it was answered less than [`COUNT_KEPT_FOR`] ago.
    fn fresh_count(&self) -> Option<u64> {
        let taken = self.counted.lock().ok()?.take();
        taken
            .filter(|(_, at)| at.elapsed() < COUNT_KEPT_FOR)
            .map(|(n, _)| n)
    }

    /// The client's request and retry counters.
    #[cfg(feature = "testing")]
    pub fn metrics(&self) -> &crate::metrics::KeycloakMetrics {
        self.client.metrics()
    }

    /// A fresh discovery and token, as a run's preflight does (the event follower's start).
    pub(crate) async fn reconnect(&self) {
        self.client.reconnect().await;
    }

    /// Requests made so far through its client (every attempt counts).
    #[cfg(feature = "testing")]
    pub fn request_count(&self) -> u64 {
        self.client.request_count()
    }
}

impl IdentityProvider for KeycloakSource {
    fn name(&self) -> &'static str {
        "keycloak"
    }

    fn preflight(self: Arc<Self>, cancel: CancellationToken) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            // Every run starts from a fresh discovery document and token, so a Keycloak that moved
            // its endpoints or rotated its keys between runs is followed without a restart.
            self.client.reconnect().await;
            // Discovery, token, and one cheap call that needs view-users: a wrong secret, a missing
            // role or an unknown realm fails here, before anything is written. The token first
            // (a Keycloak that gives none fails the preflight once), then the version beside
            // the count, never failing the preflight.
            self.client.token(&cancel).await?;
            let (counted, ()) = futures_util::future::join(
                async {
                    let counted = self
                        .client
                        .get::<serde_json::Value>("users/count", &[], &cancel)
                        .await;
                    (counted, std::time::Instant::now())
                },
                async {
                    if !self.client.version_asked.load(Ordering::Relaxed) {
                        self.client.read_server_version(&cancel).await;
                    }
                },
            )
            .await;
            // When it was answered, not when the version beside it was.
            let (counted, at) = counted;
            let counted = counted?;
            if let Ok(mut kept) = self.counted.lock() {
                *kept = counted.as_u64().map(|n| (n, at));
            }
            Ok(())
        })
    }

    fn stream(
        self: Arc<Self>,
        out: StageSender,
        cancel: CancellationToken,
        progress: Progress,
    ) -> BoxFuture<'static, Result<SourceStats>> {
        Box::pin(async move { self.stream_users(out, &cancel, &progress).await })
    }

    /// Keycloak's users are unique by construction; a user repeated by paging is removed from
    /// the stage, not refused.
    fn unique_keys(&self) -> UniqueKeys {
        UniqueKeys::default()
    }

    fn refuse_duplicates(&self, found: Vec<Duplicate>, total: u64) -> crate::error::Error {
        crate::identity::duplicates_not_refused(self.name(), &found, total)
    }

    /// The realm is only known by listing it.
    fn fingerprint(&self) -> Option<crate::identity::Fingerprint> {
        None
    }
}

impl AdminClient {
    /// Reads the server's version (`GET /admin/serverinfo`), logs it, exports it as
    /// `seedkeeper_keycloak_info` and warns when it is outside [`TESTED_VERSIONS`]. Never fails
    /// the run: the version is information, and the service account may lawfully lack the role
    /// that shows it (a 403, or a 200 without `systemInfo`), which is logged at debug only. One
    /// attempt, no retries: an unanswered request is asked again at the next preflight.
    async fn read_server_version(&self, cancel: &CancellationToken) {
        let url = format!("{}/admin/serverinfo", self.base);
        // A token that cannot be had fails the preflight's own request before this one.
        let Ok(token) = self.token(cancel).await else {
            return;
        };
        let answer = match self.fetch(&url, &[], &token).await {
            Ok(a) => a,
            Err(_) => {
                tracing::debug!(
                    url,
                    "Keycloak version not read: no answer; asked again at the next run"
                );
                return;
            }
        };
        if answer.status >= 500 {
            // Keycloak failing now says nothing of the version: asked again at the next run.
            tracing::debug!(
                url,
                status = answer.status,
                "Keycloak version not read: server error; asked again at the next run"
            );
            return;
        }
        self.version_asked.store(true, Ordering::Relaxed);
        if answer.status != 200 {
            // fetch counted it; 403 is a service account without any realm-management role
            // serverinfo accepts.
            tracing::debug!(
                url,
                status = answer.status,
                "Keycloak version not read: serverinfo refused"
            );
            return;
        }
        let version = match serde_json::from_slice::<ServerInfo>(&answer.body) {
            Ok(info) => {
                self.metrics.request(KeycloakOutcome::Ok, answer.took);
                info.system_info.and_then(|s| s.version)
            }
            Err(_) => {
                self.metrics
                    .request(KeycloakOutcome::Malformed, answer.took);
                None
            }
        };
        let Some(version) = version else {
            tracing::debug!(
                url,
                "Keycloak version not read: serverinfo shows it only to realm-management manage-realm (Keycloak 26.5 and later; 26.4 to no realm service account), which the service account need not have"
            );
            return;
        };
        let tested = in_tested_range(&version);
        self.metrics.set_server_version(&version, tested);
        tracing::info!(keycloak.version = %version, "Keycloak server version");
        if !tested {
            tracing::warn!(
                keycloak.version = %version,
                tested = %TESTED_VERSIONS.join(", "),
                "Keycloak version outside the tested range: seedkeeper was tested against Keycloak {} to {}; run the conformance suite against this version (docs/testing.md)",
                TESTED_VERSIONS.first().copied().unwrap_or("?"),
                TESTED_VERSIONS.last().copied().unwrap_or("?"),
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_tested_range_spans_the_tested_minors_and_their_patches() {
        for v in [
            "26.4.0", "26.4.7", "26.4.9", "26.5.6", "26.6.0", "26.7.3", "26.7.12",
        ] {
            assert!(in_tested_range(v), "{v}");
        }
        for v in ["26.3.5", "25.0.6", "26.8.0", "27.0.0", "nightly", "", "26"] {
            assert!(!in_tested_range(v), "{v}");
        }
        assert!(in_tested_range("26.5.0-SNAPSHOT"));
        for v in TESTED_VERSIONS {
            assert!(in_tested_range(v), "{v}");
        }
    }
}
