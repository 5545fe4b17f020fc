//! The user listing: `GET users` cut into windows of `keycloak.page_size`, `keycloak.concurrency`
//! in flight, streamed in batches and never held whole, checked against `users/count`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::{stream, StreamExt};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::client::{FirstPage, Keyed, Window, REPEATS_ALLOWED};
use super::KeycloakSource;
use crate::error::{Error, Result};
use crate::identity::{Identity, SourceStats, StageSender, Staged};
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

impl Keyed for UserRep {
    fn key(&self) -> &str {
        &self.id
    }
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
            origin: None,
        }
    }
}

impl KeycloakSource {
    /// The listing, with the resolution of the mapped roles' holders beside it rather than
    /// before it: pages go to the stage as they arrive, without roles, and the holders' roles
    /// go there too, as [`Staged::Grants`], as their pages arrive.
    pub(super) async fn stream_users(
        &self,
        out: StageSender,
        cancel: &CancellationToken,
        progress: &Progress,
    ) -> Result<SourceStats> {
        let (_, stats) = futures_util::future::try_join(
            self.send_grants(&out, cancel),
            self.list_users(&out, cancel, progress),
        )
        .await?;
        Ok(stats)
    }

    /// `GET users` in windows, each page sent on as it arrives.
    async fn list_users(
        &self,
        out: &StageSender,
        cancel: &CancellationToken,
        progress: &Progress,
    ) -> Result<SourceStats> {
        // The client's request count is the process's (earlier runs, the event follower): this
        // listing's own is the difference.
        let requests_before = self.client.request_count();
        let page = u64::from(self.client.settings.page_size);
        let brief = [("briefRepresentation", "true".to_string())];
        // The count is taken before the listing's first window (the preflight's, when it was
        // answered just before: `fresh_count`): users deleted before the listing ends show up
        // as a shortfall (the next run retries), users created only as extra. It includes
        // service accounts, as `unsent` does. Not beside the first windows: a window left
        // unpolled while it holds the token renewal's lock would keep the count waiting for it
        // forever.
        let expected: u64 = match self.fresh_count() {
            Some(n) => n,
            None => self.client.get("users/count", &[], cancel).await?,
        };
        // The listing is cut into windows of `page_size`, `concurrency` in flight, each sent on
        // as it arrives, whatever its place: a slow window does not hold back the start of the
        // next ones (the COPY and the checks after it take the users in any order). No new
        // window is started once one has found nothing at its start.
        let ended = AtomicBool::new(false);
        let ended = &ended;
        let brief = &brief;
        // Windows past the count are asked one at a time, and not at all once one has found
        // nothing: with the count right, the first of them ends the listing, where 4 in flight
        // would ask 3 more windows past its end and wait for their answers (Keycloak: 8 ms of
        // its CPU each, the listing's last 30 ms). With the count short (users created since),
        // the listing goes on past it, a window at a time.
        let past_count = tokio::sync::Semaphore::new(1);
        let past_count = &past_count;
        let mut windows = stream::iter((0u64..).take_while(|_| !ended.load(Ordering::Acquire)))
            .map(|k| async move {
                let _one_at_a_time = if k * page >= expected {
                    let permit = past_count.acquire().await.ok();
                    if ended.load(Ordering::Acquire) {
                        return Ok(Window {
                            items: Vec::new(),
                            ended: true,
                            short: 0,
                        });
                    }
                    permit
                } else {
                    None
                };
                let w = self
                    .client
                    .window::<UserRep>("users", brief, k * page, (k + 1) * page, cancel)
                    .await;
                if matches!(&w, Ok(w) if w.ended) {
                    ended.store(true, Ordering::Release);
                }
                w
            })
            .buffer_unordered(self.client.settings.concurrency.max(1));
        progress.listing_started(Some(expected));
        let mut stats = SourceStats {
            counted: Some(expected),
            ..SourceStats::default()
        };
        let mut first = FirstPage::default();
        // Service accounts listed (a few, one per client): counted once each, never sent.
        let mut service_accounts: HashSet<String> = HashSet::new();
        let (mut filled, mut short, mut received) = (0u64, 0u64, 0u64);
        while let Some(w) = windows.next().await {
            let w = w?;
            short += w.short;
            if w.items.is_empty() {
                continue;
            }
            filled += 1;
            if !first.advances(&w.items) {
                return Err(Error::keycloak("users", format!(
                    "GET users: paging does not advance ({received} users in {filled} windows, the last {REPEATS_ALLOWED} holding only the first window's users again); Keycloak or a proxy in front of it ignores the first parameter"
                )));
            }
            let n = w.items.len() as u64;
            received += n;
            stats.listed += self.send_page(w.items, out, &mut service_accounts).await?;
            // Once per page: the whole cost of progress reporting to the listing.
            progress.listed(n);
        }
        stats.unsent = service_accounts.len() as u64;
        progress.listing_done();
        stats.requests = self.client.request_count().saturating_sub(requests_before);
        tracing::debug!(
            users.received = received,
            users.count = expected,
            short_pages = short,
            requests = stats.requests,
            "user listing complete"
        );
        Ok(stats)
    }

    /// Sends one page on as it arrives (in batches of at most `batch_size`): the COPY takes it
    /// while the next pages are fetched. Service accounts are kept apart, never sent. Returns
    /// the identities sent.
    async fn send_page(
        &self,
        items: Vec<UserRep>,
        out: &StageSender,
        service_accounts: &mut HashSet<String>,
    ) -> Result<u64> {
        let mut sent = 0u64;
        let mut batch = Vec::with_capacity(items.len().min(self.batch_size));
        for u in items {
            if u.is_service_account() {
                service_accounts.insert(u.id);
                continue;
            }
            batch.push(u.into_identity(Vec::new()));
            sent += 1;
            if batch.len() >= self.batch_size {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_size));
                out.send(Staged::Identities(full))
                    .await
                    .map_err(|_| Error::Cancelled)?;
            }
        }
        if !batch.is_empty() {
            out.send(Staged::Identities(batch))
                .await
                .map_err(|_| Error::Cancelled)?;
        }
        Ok(sent)
    }
}
