//! The follower loop: checks that the realm saves events and the service account may read them,
//! then polls both streams from the checkpoint and applies each batch through the daemon's run
//! gate ([`RunGate::event_batch`]), which also runs the full runs it asks for.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::checkpoint::{load_checkpoint, now_ms, save_checkpoint, save_not_following, Checkpoint};
use super::classify::{classify_admin, classify_user, EventKey, Resync, StreamPosition};
use crate::config::DatabaseSettings;
use crate::error::{Error, Result};
use crate::gate::RunGate;
use crate::identity::keycloak::{AdminEvent, KeycloakSource, Lookup, Stream, UserEvent};
use crate::identity::FetchedBatch;
use crate::metrics::EventMetrics;
use crate::reconcile::{Outcome, RunReport, Tally, Unit};
use crate::retry;
use crate::store;

/// Events read per request.
const PAGE: u32 = 100;
/// More events than this in one poll is a burst better served by one full run.
const BURST: usize = 5_000;
/// The checkpoint starts this far back: clocks of Keycloak and seedkeeper may differ a little,
/// and applying an event twice is harmless.
const START_MARGIN_MS: i64 = 5_000;

/// The follower's state: why it does not follow, if it does not, and whether its checkpoint
/// table exists yet. Its series are [`EventMetrics`].
#[derive(Debug, Default)]
pub struct FollowerState {
    pub reason: Mutex<Option<String>>,
    /// Set once the checkpoint table exists (the first full run's migration creates it).
    checkpoint_table: AtomicBool,
}

/// What one poll did.
#[derive(Debug, Default)]
pub struct Poll {
    pub events: usize,
    pub users: usize,
    pub report: Option<RunReport>,
    pub full_run: Option<String>,
}

/// Why events are not followed (the reason `status` shows), and whether it may pass by itself.
#[derive(Debug)]
pub struct NotFollowing {
    pub reason: String,
    /// Keycloak did not answer: the follower checks again, every `events.poll_interval` (at
    /// least 5 s). Otherwise the fix is in Keycloak, and only a restart checks again.
    pub transient: bool,
}

/// The event follower of one daemon.
pub struct Follower {
    pub kc: Arc<KeycloakSource>,
    /// Where its batches run (trigger `event`), and the full runs it asks for (`event-full`):
    /// the daemon's own gate, so a batch never overlaps a full run.
    pub gate: Arc<RunGate>,
    /// Where the checkpoint lives.
    pub database: DatabaseSettings,
    pub realm: String,
    pub poll_interval: Duration,
    pub state: Arc<FollowerState>,
    /// Its `/metrics` instruments (registered by the daemon's [`crate::metrics::Metrics`]).
    pub metrics: EventMetrics,
}

impl Follower {
    /// Whether the realm and the service account allow following (the realm's event
    /// expiration, if any); why not when not.
    pub async fn check(
        &self,
        cancel: &CancellationToken,
    ) -> std::result::Result<Option<i64>, NotFollowing> {
        self.kc.reconnect().await;
        match self.kc.events_config(cancel).await {
            Ok(cfg) if !cfg.events_enabled || !cfg.admin_events_enabled => Err(NotFollowing { transient: false, reason: format!(
                "events are not saved in realm {:?} (user events {}, admin events {}): enable both in Keycloak (Realm settings > Events > User events settings and Admin events settings, Save events on)",
                self.realm,
                if cfg.events_enabled { "on" } else { "off" },
                if cfg.admin_events_enabled { "on" } else { "off" },
            )}),
            Ok(cfg) => Ok(cfg.events_expiration.filter(|s| *s > 0)),
            Err(e) => Err(NotFollowing {
                transient: matches!(e, Error::KeycloakUnavailable { .. }),
                reason: e.to_string(),
            }),
        }
    }

    /// Follows until `cancel`: checks once, then polls. Not following is a warning and a state,
    /// never a crash: the schedule goes on.
    pub async fn run(self, cancel: CancellationToken) {
        let expiration = loop {
            let checked = tokio::select! {
                _ = cancel.cancelled() => return,
                c = self.check(&cancel) => c,
            };
            match checked {
                Ok(exp) => break exp,
                Err(NotFollowing { reason, transient }) => {
                    self.metrics.following.set(0);
                    *self.state.reason.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(reason.clone());
                    if !transient {
                        tracing::warn!(realm = %self.realm, reason = %reason, "not following Keycloak events; the schedule alone keeps the database in sync");
                        self.record_not_following(&reason, &cancel).await;
                        return;
                    }
                    let wait = self.poll_interval.max(Duration::from_secs(5));
                    if retry::sleep_or_cancel(wait, &cancel).await.is_err() {
                        return;
                    }
                }
            }
        };
        self.metrics.following.set(1);
        *self.state.reason.lock().unwrap_or_else(|p| p.into_inner()) = None;
        tracing::info!(realm = %self.realm, poll_ms = self.poll_interval.as_millis() as u64, expiration_s = expiration, "following Keycloak events");
        let mut db: Option<store::Db> = None;
        let mut failures = 0u32;
        loop {
            if retry::sleep_or_cancel(self.poll_interval, &cancel)
                .await
                .is_err()
            {
                return;
            }
            if db.as_ref().map(|d| d.client.is_closed()).unwrap_or(true) {
                db = store::connect(&self.database).await.ok();
            }
            let Some(conn) = db.as_ref() else { continue };
            let polled = tokio::select! {
                _ = cancel.cancelled() => return,
                p = self.poll(&conn.client, expiration, &cancel) => p,
            };
            match polled {
                Ok(p) => {
                    failures = 0;
                    if p.events > 0 {
                        tracing::debug!(events = p.events, users = p.users, "events applied");
                    }
                }
                Err(e) => {
                    failures += 1;
                    // One line per outage, then quiet until it ends.
                    if failures == 1 {
                        tracing::warn!(error = %e, "reading Keycloak events failed; retrying every poll");
                    }
                }
            }
        }
    }

    /// Records why events are not followed, for `seedkeeper status`, once the startup run has
    /// created the table.
    async fn record_not_following(&self, reason: &str, cancel: &CancellationToken) {
        loop {
            if let Ok(db) = store::connect(&self.database).await {
                if store::table_exists(&db.client, "event_follower")
                    .await
                    .unwrap_or(false)
                {
                    let _ = save_not_following(&db.client, &self.realm, reason, now_ms()).await;
                    return;
                }
            }
            let wait = self.poll_interval.max(Duration::from_secs(1));
            if retry::sleep_or_cancel(wait, cancel).await.is_err() {
                return;
            }
        }
    }

    /// Every event of `stream` not yet applied, oldest first.
    async fn read<T: DeserializeOwned + EventKey>(
        &self,
        stream: Stream,
        mark: &StreamPosition,
        cancel: &CancellationToken,
    ) -> Result<Vec<T>> {
        let mut out: Vec<T> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut first = 0u32;
        loop {
            let page: Vec<T> = self
                .kc
                .events_page(stream, mark.time, first, PAGE, cancel)
                .await?;
            if page.is_empty() {
                return Ok(out);
            }
            let n = page.len();
            first += n as u32;
            for e in page {
                let k = e.key();
                if !mark.covers(e.time(), &k) && seen.insert(k) {
                    out.push(e);
                }
            }
            // A page shorter than asked ends the read: the events endpoints filter nothing
            // after the query. (A server that capped `max` only slows the catch-up: the
            // checkpoint moves to what was read, and the next poll goes on from there.) So an
            // idle poll is one request a stream, even though `dateFrom` includes the events at
            // the checkpoint's own millisecond.
            if out.len() > BURST || n < PAGE as usize {
                return Ok(out);
            }
        }
    }

    /// One poll: read both streams from the checkpoint, apply, move the checkpoint.
    pub async fn poll(
        &self,
        db: &Client,
        expiration_s: Option<i64>,
        cancel: &CancellationToken,
    ) -> Result<Poll> {
        self.metrics.polls.inc();
        let now = now_ms();
        let Some(cp) = self.checkpoint(db, now).await? else {
            return Ok(Poll::default());
        };
        // Events older than the expiration may be gone: what happened since is unknown.
        if let Some(exp) = expiration_s {
            let oldest = cp.user.time.min(cp.admin.time);
            if now - oldest > exp * 1000 {
                let why = format!(
                    "the event checkpoint is {} s old, beyond the realm's event expiration of {exp} s",
                    (now - oldest) / 1000
                );
                return self.gap(db, now, why).await;
            }
        }
        let users: Vec<UserEvent> = self.read(Stream::User, &cp.user, cancel).await?;
        let admins: Vec<AdminEvent> = self.read(Stream::Admin, &cp.admin, cancel).await?;
        let mut poll = Poll {
            events: users.len() + admins.len(),
            ..Poll::default()
        };
        if poll.events == 0 {
            return Ok(poll);
        }
        if poll.events > BURST {
            return self
                .gap(db, now, format!("more than {BURST} events in one poll"))
                .await;
        }
        let mut wanted = Resync::default();
        users.iter().for_each(|e| classify_user(e, &mut wanted));
        admins.iter().for_each(|e| classify_admin(e, &mut wanted));
        let next = Checkpoint {
            user: cp
                .user
                .advance(&users.iter().map(|e| (e.time, e.key())).collect::<Vec<_>>()),
            admin: cp
                .admin
                .advance(&admins.iter().map(|e| (e.time, e.key())).collect::<Vec<_>>()),
        };
        if let Some(why) = wanted.full_run.clone() {
            // The full run covers the users of this batch too.
            self.ask_full_run(&why);
            poll.full_run = Some(why);
            save_checkpoint(db, &self.realm, &next).await?;
            return Ok(poll);
        }
        if self.apply_users(&wanted.users, &mut poll, cancel).await? {
            save_checkpoint(db, &self.realm, &next).await?;
        }
        Ok(poll)
    }

    /// The checkpoint to read from. `None` while there is nothing to read from yet: before the
    /// first full run has made the table, and on the first poll, which starts the checkpoint
    /// (a little before `now`).
    async fn checkpoint(&self, db: &Client, now: i64) -> Result<Option<Checkpoint>> {
        if !self.state.checkpoint_table.load(Ordering::Relaxed) {
            if !store::table_exists(db, "event_follower").await? {
                return Ok(None);
            }
            // Migrations never drop it: not looked up again.
            self.state.checkpoint_table.store(true, Ordering::Relaxed);
        }
        if let Some(cp) = load_checkpoint(db, &self.realm).await? {
            return Ok(Some(cp));
        }
        let start = StreamPosition {
            time: now - START_MARGIN_MS,
            ids: Vec::new(),
        };
        let cp = Checkpoint {
            user: start.clone(),
            admin: start,
        };
        save_checkpoint(db, &self.realm, &cp).await?;
        Ok(None)
    }

    /// Re-syncs the users a batch touched, through the engine's units. `false` when the batch
    /// must wait for the next poll (a run is in flight here or in another replica): the
    /// checkpoint then stays.
    async fn apply_users(
        &self,
        users: &BTreeSet<String>,
        poll: &mut Poll,
        cancel: &CancellationToken,
    ) -> Result<bool> {
        let mut batch = FetchedBatch::default();
        for id in users {
            match self.kc.user_identity(id, cancel).await? {
                Lookup::Found(i) => batch.users.push(i),
                // Deleted in Keycloak: offboarded by this batch.
                Lookup::Gone => batch.gone.push(id.clone()),
                Lookup::NotAnIdentity => {}
            }
        }
        poll.users = batch.users.len() + batch.gone.len();
        if poll.users == 0 {
            return Ok(true);
        }
        let Some(mut report) = self.gate.event_batch(batch, cancel).await else {
            return Ok(false);
        };
        if report.outcome == Outcome::Skipped {
            return Ok(false);
        }
        // The batch's own error, whatever failed (its run is counted by its cause already).
        if let Some(e) = report.error.take() {
            return Err(e);
        }
        self.metrics.users_applied.inc_by(poll.users as u64);
        let deferred = report
            .unit(Unit::Identities)
            .map(|u| u.get(Tally::Deferred));
        if deferred.unwrap_or(0) > 0 {
            self.ask_full_run("an event batch met a username held by another row");
        }
        poll.report = Some(report);
        Ok(true)
    }

    async fn gap(&self, db: &Client, now: i64, why: String) -> Result<Poll> {
        tracing::warn!(reason = %why, "events may have been missed; starting a full run");
        self.ask_full_run(&why);
        let start = StreamPosition {
            time: now - START_MARGIN_MS,
            ids: Vec::new(),
        };
        save_checkpoint(
            db,
            &self.realm,
            &Checkpoint {
                user: start.clone(),
                admin: start,
            },
        )
        .await?;
        Ok(Poll {
            full_run: Some(why),
            ..Poll::default()
        })
    }

    fn ask_full_run(&self, why: &str) {
        self.metrics.full_runs_asked.inc();
        tracing::info!(reason = %why, "a full run is due");
        self.gate.ask_full_run();
    }
}
