//! Following Keycloak's events between full runs, so a new user is provisioned and a lost
//! privilege revoked within seconds, at a cost that grows with the changes, not the realm.
//!
//! Every `events.poll_interval` the follower reads the user events (`GET events`) and the admin
//! events (`GET admin-events`) at or after its checkpoint, oldest first, page by page. An event
//! that concerns one user (a registration, a profile or email update, a user created, updated,
//! disabled, given or taken a role or a group) re-syncs that user: `GET users/{id}` and
//! `GET users/{id}/role-mappings/realm/composite` (the effective realm roles, composites and
//! groups expanded by Keycloak), then the same units and rules as a full run, under the same run
//! lock, leaving one `seed_runs` row with trigger `event` per applied batch. An event whose
//! effect on users is unknown (a role's composites, a group's roles or parent, a realm import)
//! asks the daemon for a full run at once.
//!
//! The checkpoint (table `event_follower`) holds, per stream, the time of the last event applied
//! and the ids applied at that millisecond: events sharing it are neither lost nor applied twice,
//! across restarts and replicas. A checkpoint older than the realm's event expiration means
//! events may have been dropped: a full run, and the checkpoint moves to now. Events are only an
//! accelerator: the scheduled full run stays and heals whatever they missed.
//!
//! Events not enabled on the realm, or a service account without `view-events`: one warning
//! naming the fix, then schedule-only mode (`seedkeeper_events_following` 0, shown by `status`).
//! Reads `events.*`, `keycloak.realm`.

mod checkpoint;
mod classify;
mod follower;

pub(crate) use checkpoint::status_lines;
#[cfg(feature = "testing")]
pub use checkpoint::{load_checkpoint, now_ms, save_checkpoint, save_not_following, Checkpoint};
pub(crate) use classify::StreamPosition;
pub use follower::{Follower, FollowerState};
#[cfg(feature = "testing")]
pub use follower::{NotFollowing, Poll};
