//! The user listing: `GET users` cut into windows of `keycloak.page_size`, `keycloak.concurrency`
//! in flight, streamed in batches and never held whole, checked against `users/count`.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::{stream, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::KeycloakSource;
use crate::error::{Error, Result};
use crate::identity::{Identity, SourceStats};
use crate::progress::Progress;

#[derive(Debug, Deserialize)]
pub(super) struct UserRep {
    pub(super) id: String,
    pub(super) username: String,
    #[serde(default)]
    pub(super) email: Option<String>,
    #[serde(default, rename = "firstName")]
    pub(super) first_name: Option<String>,
    #[serde(default, rename = "lastName")]
    pub(super) last_name: Option<String>,
    #[serde(default)]
    pub(super) enabled: Option<bool>,
    #[serde(default, rename = "serviceAccountClientId")]
    pub(super) service_account_client_id: Option<String>,
}

impl UserRep {
    /// A client's service account: listed by Keycloak, never an identity.
    pub(super) fn is_service_account(&self) -> bool {
        self.service_account_client_id.is_some() || self.username.starts_with("service-account-")
    }

    /// The identity of this user, holding `realm_roles` (already filtered to the mapped ones).
    pub(super) fn into_identity(self, realm_roles: Vec<String>) -> Identity {
        Identity {
            sub: self.id,
            username: self.username,
            email: self.email,
            first_name: self.first_name,
            last_name: self.last_name,
            enabled: self.enabled.unwrap_or(false),
            realm_roles,
        }
    }
}

/// The user ids seen in one listing, as 64-bit hashes keyed at random per listing: 8 bytes per
/// user rather than a string (about 1.2 MiB at 100,000 users against 7.6 MiB for a set of the
/// ids). Two ids collide with a chance of about 3 in 10^10 per listing of 100,000; the second is
/// then taken for a duplicate, and the count check narrows the run (unless as many users were
/// created during the listing, when that user is offboarded for one run and reactivated by the
/// next).
struct IdSet {
    seen: HashSet<u64>,
    keys: RandomState,
}

impl IdSet {
    /// `expected` sizes the set once (bounded, since it comes from the server).
    fn with_expected(expected: u64) -> Self {
        IdSet {
            seen: HashSet::with_capacity(expected.min(1 << 20) as usize),
            keys: RandomState::new(),
        }
    }

    /// `true` when `id` was not seen before.
    fn insert(&mut self, id: &str) -> bool {
        self.seen.insert(self.keys.hash_one(id))
    }
}

impl KeycloakSource {
    pub(super) async fn stream_users(
        &self,
        out: mpsc::Sender<Vec<Identity>>,
        cancel: &CancellationToken,
        progress: &Progress,
    ) -> Result<SourceStats> {
        // The client's request count is the process's (earlier runs, the event follower): this
        // listing's own is the difference.
        let requests_before = self.client.request_count();
        // The count is taken as the listing starts, beside the role resolution: users deleted
        // before the listing ends show up as a shortfall (the next run retries), users created
        // only as extra.
        let (privileged, expected) = futures_util::future::try_join(
            self.privileged(cancel),
            self.client.get::<u64>("users/count", &[], cancel),
        )
        .await?;
        // The count includes service accounts, as `distinct` below does.
        progress.listing_started(Some(expected));
        let page = u64::from(self.client.settings.page_size);
        let brief = [("briefRepresentation", "true".to_string())];
        // The listing is cut into windows of `page_size`, fetched `concurrency` at a time and
        // taken in order. No new window is started once one has found nothing at its start.
        let ended = AtomicBool::new(false);
        let ended = &ended;
        let brief = &brief;
        let mut windows = stream::iter((0u64..).take_while(|_| !ended.load(Ordering::Acquire)))
            .map(|k| async move {
                let w = self
                    .client
                    .window::<UserRep>("users", brief, k * page, (k + 1) * page, cancel)
                    .await;
                if matches!(&w, Ok(w) if w.ended) {
                    ended.store(true, Ordering::Release);
                }
                w
            })
            .buffered(self.client.settings.concurrency);
        let mut stats = SourceStats::default();
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut seen = IdSet::with_expected(expected);
        let (mut distinct, mut filled, mut short) = (0u64, 0u64, 0u64);
        while let Some(w) = windows.next().await {
            let w = w?;
            short += w.short;
            if !w.items.is_empty() {
                filled += 1;
            }
            let distinct_before = distinct;
            for u in w.items {
                if !seen.insert(&u.id) {
                    continue;
                }
                distinct += 1;
                if u.is_service_account() {
                    continue;
                }
                let roles = privileged
                    .get(&u.id)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                batch.push(u.into_identity(roles));
                stats.listed += 1;
                if batch.len() >= self.batch_size {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_size));
                    out.send(full).await.map_err(|_| Error::Cancelled)?;
                }
            }
            // Once per page: the whole cost of progress reporting to the listing.
            progress.listed(distinct - distinct_before);
            // Each window holds at least one user at a position of its own, so an honest server
            // never fills many more windows than there are distinct users. Past that it ignores
            // `first`, and the listing would never reach an empty window.
            if filled > 2 * distinct + 16 {
                return Err(Error::keycloak("users", format!(
                    "GET users: paging does not advance ({distinct} distinct users in {filled} windows); Keycloak or a proxy in front of it ignores the first parameter"
                )));
            }
        }
        // Short of the count: the run goes on narrowed to the listed users (the identities unit
        // concludes nothing from absence and says so), instead of one unlistable user stopping
        // every full run.
        if distinct < expected {
            stats.shortfall = Some(crate::identity::Shortfall {
                listed: distinct,
                counted: expected,
            });
        }
        if !batch.is_empty() {
            out.send(batch).await.map_err(|_| Error::Cancelled)?;
        }
        progress.listing_done();
        stats.requests = self.client.request_count().saturating_sub(requests_before);
        tracing::debug!(
            users.distinct = distinct,
            users.count = expected,
            short_pages = short,
            requests = stats.requests,
            "user listing complete"
        );
        Ok(stats)
    }
}
