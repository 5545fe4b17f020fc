//! The vocabulary of a run: its units, what a unit counts and writes, what it finds, and the
//! reports that carry them.
//!
//! Everything that shows a run derives from these types: the evidence JSON in `seed_runs`
//! (`counts`, `findings`), the `--once` summary, `plan`, `status` and the metric labels. A new
//! unit, action or finding kind is added here, and the compiler points at each exhaustive
//! `match` that must say what it means.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::error::{Error, ErrorKind};
use crate::names::named;

named!(
    /// Plan computes the difference and writes nothing; apply writes only the difference.
    pub enum Mode {
        Plan => "plan",
        Apply => "apply",
    }
);

named!(
    /// What started a run (`seed_runs.trigger`, the `trigger` label of `seedkeeper_runs_total`,
    /// the `trigger` field of a run's log lines).
    pub enum Trigger {
        /// The daemon's first run, which waits for its dependencies (`startup.wait_timeout`).
        Startup => "startup",
        /// A tick of `schedule.cron`.
        Schedule => "schedule",
        /// A failed full run of the daemon run again after a backoff (`schedule.retry_initial`,
        /// doubling, capped at the schedule's interval).
        Retry => "retry",
        /// `seedkeeper --once`.
        Once => "once",
        /// `seedkeeper plan` (writes nothing, so never in `seed_runs`).
        Plan => "plan",
        /// A batch of users Keycloak's events touched.
        Event => "event",
        /// A full run the event follower asked for.
        EventFull => "event-full",
    }
);

impl Trigger {
    /// Whether a run with this trigger is a full run (everything but an event batch): only full
    /// runs move the series alerts read as "the realm is in sync" (see [`crate::metrics`]), since
    /// a batch re-syncs a handful of users and says nothing about the rest.
    pub(crate) fn is_full_run(self) -> bool {
        match self {
            Trigger::Event => false,
            Trigger::Startup
            | Trigger::Schedule
            | Trigger::Retry
            | Trigger::Once
            | Trigger::Plan
            | Trigger::EventFull => true,
        }
    }

    /// Whether a run with this trigger waits for a run lock another session holds (up to
    /// `startup.wait_timeout`) instead of being skipped. `--once` does: its exit 0 must mean
    /// that a run of its own has converged the database; and `plan`, which runs the apply's
    /// statements and must not plan against a database another run is changing. The daemon's
    /// runs come again on their own, and a replica holding the lock is already doing the work.
    pub(crate) fn waits_for_the_run_lock(self) -> bool {
        match self {
            Trigger::Once | Trigger::Plan => true,
            Trigger::Startup
            | Trigger::Schedule
            | Trigger::Retry
            | Trigger::Event
            | Trigger::EventFull => false,
        }
    }

    /// Whether the daemon starts runs with this trigger (their `seedkeeper_runs_total` series
    /// exist from the start).
    pub fn in_daemon(self) -> bool {
        match self {
            Trigger::Startup
            | Trigger::Schedule
            | Trigger::Retry
            | Trigger::Event
            | Trigger::EventFull => true,
            Trigger::Once | Trigger::Plan => false,
        }
    }

    /// Whether the daemon retries a failed run with this trigger (see `gate::RunGate::spawn_retries`):
    /// its full runs. Not `--once`, whose caller decides (a Job's `backoffLimit`, a CI step);
    /// not an event batch, whose checkpoint stays so that the follower reads it again; not `plan`.
    pub(crate) fn is_retried(self) -> bool {
        match self {
            Trigger::Startup | Trigger::Schedule | Trigger::Retry | Trigger::EventFull => true,
            Trigger::Once | Trigger::Plan | Trigger::Event => false,
        }
    }
}

named!(
    /// How a run ended (`seed_runs.outcome`, `seedkeeper_runs_total`).
    pub enum Outcome {
        Succeeded => "succeeded",
        Failed => "failed",
        Skipped => "skipped",
    }
);

named!(
    /// The units of a run, in the order they run.
    pub enum Unit {
        /// The embedded migrations.
        Schema => "schema",
        /// The reference seed's catalogs, policies, plans, roles and apps.
        ReferenceSeed => "reference_seed",
        /// Realm users as `users` rows.
        Identities => "identities",
        /// Platform role bindings derived from the users.
        RoleBindings => "role_bindings",
        /// Personal tenants, projects and their owner memberships.
        Tenants => "tenants",
    }
);

impl Unit {
    /// The writes this unit can make: their `seedkeeper_rows_changed_total` series start at 0.
    pub(crate) fn actions(self) -> &'static [Action] {
        match self {
            Unit::Schema => &[Action::Applied],
            Unit::ReferenceSeed => &[Action::Inserted, Action::Updated],
            Unit::Identities => &[
                Action::Inserted,
                Action::Updated,
                Action::Realigned,
                Action::Deactivated,
                Action::Reactivated,
            ],
            Unit::RoleBindings => &[Action::Inserted, Action::Revoked],
            Unit::Tenants => &[Action::Inserted],
        }
    }
}

named!(
    /// A write a unit makes: apply counts the rows it wrote, plan the rows it would write.
    pub enum Action {
        Inserted => "inserted",
        Updated => "updated",
        Revoked => "revoked",
        Realigned => "realigned",
        /// Users offboarded: gone from the realm, row kept, `is_active = false`.
        Deactivated => "deactivated",
        /// Offboarded users back in the realm under the same sub.
        Reactivated => "reactivated",
        Applied => "applied",
    }
);

named!(
    /// Something a unit counts that is not a write.
    pub enum Tally {
        /// Rows already as they should be.
        Unchanged => "unchanged",
        /// Reference rows that differ from the seed (corrected or kept, by ownership).
        Drift => "drift",
        /// Reference rows the seed no longer lists (kept).
        NotInSeed => "not_in_seed",
        /// Reference rows another row's unique value kept out.
        Blocked => "blocked",
        /// Users the source listed.
        Listed => "listed",
        /// Users refused one by one (no sub, a bad field, a username listed twice).
        Rejected => "rejected",
        /// Users the listing returned twice.
        Duplicates => "duplicates",
        /// Users of an event batch left to a full run.
        Deferred => "deferred",
        /// Realm users whose username another row holds.
        Clashes => "clashes",
        /// Rows with a sub that a complete listing lacks: offboarded, kept.
        Missing => "missing",
        /// Users Keycloak counts (`users/count`) but its listing did not return: the run was
        /// narrowed to the listed users, nothing concluded from absence.
        Unlisted => "unlisted",
        /// Users whose tenant chain was checked.
        UsersCovered => "users_covered",
        TenantsInserted => "tenants_inserted",
        ProjectsInserted => "projects_inserted",
        TenantMembershipsUpdated => "tenant_memberships_updated",
        TenantMembershipsInserted => "tenant_memberships_inserted",
        ProjectMembershipsUpdated => "project_memberships_updated",
        ProjectMembershipsInserted => "project_memberships_inserted",
        /// The most users this run could offboard (`identity.offboard_limit`, resolved).
        OffboardLimit => "offboard_limit",
        /// `--allow-offboard N`: the exact number an operator let through.
        OffboardAllowed => "offboard_allowed",
        /// Users this run would have offboarded and did not: over the limit.
        OffboardStopped => "offboard_stopped",
    }
);

impl Tally {
    /// Whether `status` shows it beside the writes: it asks for a look.
    pub(crate) fn notable(self) -> bool {
        match self {
            Tally::Drift
            | Tally::Clashes
            | Tally::Rejected
            | Tally::Unlisted
            | Tally::OffboardStopped
            | Tally::OffboardAllowed => true,
            Tally::Unchanged
            | Tally::Missing
            | Tally::NotInSeed
            | Tally::Blocked
            | Tally::Listed
            | Tally::Duplicates
            | Tally::Deferred
            | Tally::UsersCovered
            | Tally::TenantsInserted
            | Tally::ProjectsInserted
            | Tally::TenantMembershipsUpdated
            | Tally::TenantMembershipsInserted
            | Tally::ProjectMembershipsUpdated
            | Tally::ProjectMembershipsInserted
            | Tally::OffboardLimit => false,
        }
    }
}

/// One key of a unit's counts: a write (an [`Action`]) or a tally (a [`Tally`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Count {
    Write(Action),
    Tally(Tally),
}

impl Count {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Count::Write(a) => a.as_str(),
            Count::Tally(t) => t.as_str(),
        }
    }

    /// The count with this text, if any.
    #[cfg(feature = "testing")]
    pub fn from_name(name: &str) -> Option<Self> {
        Count::all().find(|c| c.as_str() == name)
    }

    /// Every count: the writes, then the tallies.
    pub(crate) fn all() -> impl Iterator<Item = Count> {
        let wrote = Action::ALL.iter().map(|&a| Count::Write(a));
        wrote.chain(Tally::ALL.iter().map(|&t| Count::Tally(t)))
    }

    /// The counts `status` shows: every write and the notable tallies.
    pub(crate) fn notable(self) -> bool {
        match self {
            Count::Write(_) => true,
            Count::Tally(t) => t.notable(),
        }
    }
}

impl From<Action> for Count {
    fn from(a: Action) -> Self {
        Count::Write(a)
    }
}

impl From<Tally> for Count {
    fn from(t: Tally) -> Self {
        Count::Tally(t)
    }
}

/// A unit's counts, keyed by their text so the evidence JSON and the summary list them in the
/// same (alphabetical) order as always.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Counts(BTreeMap<&'static str, i64>);

impl Counts {
    pub(crate) fn bump(&mut self, key: impl Into<Count>, n: i64) {
        *self.0.entry(key.into().as_str()).or_insert(0) += n;
    }

    pub(crate) fn get(&self, key: impl Into<Count>) -> i64 {
        self.0.get(key.into().as_str()).copied().unwrap_or(0)
    }

    /// The counts set, by text.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'static str, i64)> + '_ {
        self.0.iter().map(|(k, v)| (*k, *v))
    }

    /// Rows written (apply) or to write (plan).
    pub fn writes(&self) -> i64 {
        Action::ALL.iter().map(|&a| self.get(a)).sum()
    }
}

named!(
    /// What a finding is about.
    pub enum FindingKind {
        /// A user refused alone (identities).
        Rejected => "rejected",
        /// An event batch's user left to a full run (identities).
        Deferred => "deferred",
        /// A row moved to its user's new sub after a re-import (identities).
        Realigned => "realigned",
        /// A username held by another row; never taken over (identities).
        Clash => "clash",
        /// A user gone from the realm: row kept, deactivated, its bindings revoked (identities).
        Offboarded => "offboarded",
        /// An offboarded user back under the same sub (identities).
        Reactivated => "reactivated",
        /// A listing shorter than `users/count`: the run was narrowed (identities).
        Unlisted => "unlisted",
        /// A reference row the seed no longer lists; kept (reference_seed).
        NotInSeed => "not_in_seed",
        /// A reference row set back to the seed (reference_seed, converge).
        DriftCorrected => "drift_corrected",
        /// A reference row left as an admin set it (reference_seed, insert-missing).
        DriftKept => "drift_kept",
        /// A reference row another row's unique value kept out (reference_seed).
        Blocked => "blocked",
        /// A binding granted (role_bindings).
        Granted => "granted",
        /// A binding revoked (role_bindings).
        Revoked => "revoked",
        /// Offboarding stopped: more users than `identity.offboard_limit` would have gone, or the
        /// listing was empty (identities).
        OffboardStopped => "offboard_stopped",
    }
);

impl FindingKind {
    /// Whether an operator should look at it: `plan` lists these under `!`.
    pub fn needs_attention(self) -> bool {
        match self {
            FindingKind::DriftKept
            | FindingKind::NotInSeed
            | FindingKind::Clash
            | FindingKind::Unlisted
            | FindingKind::Rejected
            | FindingKind::Blocked
            | FindingKind::OffboardStopped => true,
            FindingKind::Deferred
            | FindingKind::Offboarded
            | FindingKind::Reactivated
            | FindingKind::Realigned
            | FindingKind::DriftCorrected
            | FindingKind::Granted
            | FindingKind::Revoked => false,
        }
    }

    /// Whether the run summary lists it one by one (grants are many and routine: counted only).
    pub(crate) fn in_summary(self) -> bool {
        self != FindingKind::Granted
    }
}

/// The users rows a run's derived units (`role_bindings`, `tenants`) look at: every row in a full
/// run; in an event batch only the rows of the users it re-synced, so one changed user costs the
/// same at a hundred users as at 100,000. Whatever a batch leaves out, the next full run covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    /// The rows with these `users.id`s.
    Users(Vec<Uuid>),
}

impl Scope {
    /// The rows of the users with these subs (`users.keycloak_sub`), or every row for `None`.
    pub(crate) async fn of(
        tx: &tokio_postgres::Transaction<'_>,
        subs: Option<Vec<String>>,
    ) -> crate::error::Result<Scope> {
        let Some(subs) = subs else {
            return Ok(Scope::All);
        };
        // Unnamed (query_typed): nothing prepared is left on a pooler's backend.
        let rows = tx
            .query_typed(
                "SELECT id FROM users WHERE keycloak_sub = ANY($1)",
                &[(&subs, tokio_postgres::types::Type::TEXT_ARRAY)],
            )
            .await
            // Error::db directly, not `crate::store::db_error`: the store builds on this vocabulary,
            // and the model naming the store back would make the two one module.
            .map_err(|e| Error::db("finding the event batch's users rows", e))?;
        Ok(Scope::Users(rows.iter().map(|r| r.get(0)).collect()))
    }

    /// An SQL condition keeping `column` (a users id) in scope, with the ids as parameter
    /// `$param`; `None` for every row.
    pub(crate) fn condition(&self, column: &str, param: usize) -> Option<String> {
        match self {
            Scope::All => None,
            Scope::Users(_) => Some(format!("{column} = ANY(${param}::uuid[])")),
        }
    }

    /// [`Scope::condition`] to append to a WHERE clause: `" AND …"`, or nothing.
    pub(crate) fn and(&self, column: &str, param: usize) -> String {
        self.condition(column, param)
            .map(|c| format!(" AND {c}"))
            .unwrap_or_default()
    }

    /// [`Scope::params`] with their types, for `query_typed` (an unnamed statement, which holds
    /// behind a connection pooler in transaction mode).
    pub(crate) fn typed_params(&self) -> Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> {
        match self {
            Scope::All => Vec::new(),
            Scope::Users(ids) => vec![(ids, Type::UUID_ARRAY)],
        }
    }

}

/// Findings listed per kind are capped so a 100,000-user re-import does not make a 100,000-entry
/// evidence row; the counts stay exact.
pub const FINDINGS_PER_KIND: usize = 50;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub unit: Unit,
    pub kind: FindingKind,
    pub entity: String,
    pub detail: String,
}

impl Finding {
    pub fn new(
        unit: Unit,
        kind: FindingKind,
        entity: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Finding {
            unit,
            kind,
            entity: entity.into(),
            detail: detail.into(),
        }
    }
}

/// One row a run writes (apply) or would write (plan), named by a key that is the same in both
/// (a sub, a username, a catalog key: never a generated id), so that a plan and the apply that
/// follows it can be compared item by item.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Change {
    /// What is done to the row: `insert`, `update`, `realign`, `reactivate`, `offboard`,
    /// `grant`, `revoke`, `apply`.
    pub action: &'static str,
    /// The row: `<table>:<key>`, e.g. `users:sub=…`, `platform_role_bindings:dev-admin/platform_superadmin`.
    pub entity: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.action, self.entity)
    }
}

/// How many changes a unit lists one by one when a run lists them (`plan`, or a run asked to):
/// every one up to this, then only counted (`changes_unlisted`). The counts stay exact.
pub(crate) const CHANGES_LISTED: usize = 10_000;

/// What one unit found (plan) or did (apply).
#[derive(Debug, Clone, Serialize)]
pub struct UnitReport {
    pub unit: Unit,
    pub counts: Counts,
    pub findings: Vec<Finding>,
    /// The rows written (apply) or to write (plan), each with its key, when the run lists them
    /// (always in a plan); up to [`CHANGES_LISTED`].
    pub changes: Vec<Change>,
    /// Changes beyond [`CHANGES_LISTED`], counted only.
    #[serde(skip_serializing_if = "is_zero")]
    pub changes_unlisted: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Findings that make the run's outcome failed (username clashes, offboarding stopped), with
    /// the kind of failure each is.
    #[serde(skip)]
    pub blocking: Vec<(ErrorKind, String)>,
    /// The unit's entry in `seed_runs.unit_states`: what it left when a run with the same inputs
    /// would change nothing ([`crate::reconcile`]'s `settled_row`).
    #[serde(skip)]
    pub state: Option<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl UnitReport {
    pub fn new(unit: Unit) -> Self {
        UnitReport {
            unit,
            counts: Counts::default(),
            findings: Vec::new(),
            changes: Vec::new(),
            changes_unlisted: 0,
            error: None,
            blocking: Vec::new(),
            state: None,
        }
    }

    pub(crate) fn bump(&mut self, key: impl Into<Count>, n: i64) {
        self.counts.bump(key, n);
    }

    pub fn get(&self, key: impl Into<Count>) -> i64 {
        self.counts.get(key)
    }

    /// Records a finding; past [`FINDINGS_PER_KIND`] of its kind it is only counted.
    pub(crate) fn find(
        &mut self,
        kind: FindingKind,
        entity: impl Into<String>,
        detail: impl Into<String>,
    ) {
        let same = self.findings.iter().filter(|x| x.kind == kind).count();
        if same < FINDINGS_PER_KIND {
            self.findings
                .push(Finding::new(self.unit, kind, entity, detail));
        }
    }

    /// A unit that failed: its error, no counts.
    pub(crate) fn failed(unit: Unit, error: &Error) -> Self {
        let mut report = UnitReport::new(unit);
        report.error = Some(error.to_string());
        report
    }

    /// Lists a change; past [`CHANGES_LISTED`] it is only counted.
    pub(crate) fn add_change(&mut self, action: &'static str, entity: impl Into<String>) {
        if self.changes.len() < CHANGES_LISTED {
            self.changes.push(Change {
                action,
                entity: entity.into(),
            });
        } else {
            self.changes_unlisted += 1;
        }
    }

    /// Changes of which the statement that made them returned `listed` keys out of `total`
    /// rows: the keys listed, the rest counted.
    pub(crate) fn add_changes(
        &mut self,
        action: &'static str,
        total: i64,
        listed: impl IntoIterator<Item = String>,
    ) {
        let mut n = 0i64;
        for entity in listed {
            self.add_change(action, entity);
            n += 1;
        }
        self.changes_unlisted += (total - n).max(0);
    }

    /// Rows apply would write (plan) or wrote (apply).
    pub fn writes(&self) -> i64 {
        self.counts.writes()
    }
}

/// The result of one run (apply) or plan.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub id: Uuid,
    pub trigger: Trigger,
    pub mode: Mode,
    pub outcome: Outcome,
    pub seed_digest: String,
    pub duration_ms: u64,
    pub units: Vec<UnitReport>,
    /// Why the run failed: its error, or the findings that failed it ([`RunReport::settle`]).
    /// `None` for a run that succeeded or was skipped. Held once, as the typed error: its text
    /// (the evidence, the summary, the JSON) is its `Display`.
    #[serde(serialize_with = "error_text")]
    pub error: Option<Error>,
}

/// A run's error as JSON: its text.
fn error_text<S: serde::Serializer>(e: &Option<Error>, s: S) -> Result<S::Ok, S::Error> {
    match e {
        Some(e) => s.serialize_some(&e.to_string()),
        None => s.serialize_none(),
    }
}

impl RunReport {
    /// A run about to start: failed until it settles, no units yet.
    pub fn new(trigger: Trigger, mode: Mode, seed_digest: String) -> Self {
        RunReport {
            id: Uuid::new_v4(),
            trigger,
            mode,
            outcome: Outcome::Failed,
            seed_digest,
            duration_ms: 0,
            units: Vec::new(),
            error: None,
        }
    }

    /// `seed_runs.counts`: per unit, its counts.
    pub(crate) fn counts_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for u in &self.units {
            m.insert(u.unit.as_str().to_string(), json!(u.counts));
        }
        Value::Object(m)
    }

    /// `seed_runs.findings`: every unit's findings, in run order.
    pub(crate) fn findings_json(&self) -> Value {
        json!(self
            .units
            .iter()
            .flat_map(|u| u.findings.iter())
            .collect::<Vec<_>>())
    }

    pub fn unit(&self, unit: Unit) -> Option<&UnitReport> {
        self.units.iter().find(|u| u.unit == unit)
    }

    /// After the units ran without an error: the outcome, failed when a unit left blocking
    /// findings (username clashes, offboarding stopped), which then become the run's error.
    pub(crate) fn settle(&mut self) {
        let blocking: Vec<&(ErrorKind, String)> =
            self.units.iter().flat_map(|u| u.blocking.iter()).collect();
        let Some((kind, _)) = blocking.first() else {
            self.outcome = Outcome::Succeeded;
            return;
        };
        let message = blocking
            .iter()
            .map(|(_, m)| m.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        self.fail(Error::Findings {
            kind: *kind,
            message,
        });
    }

    /// The run failed with `e`.
    pub(crate) fn fail(&mut self, e: Error) {
        self.outcome = Outcome::Failed;
        self.error = Some(e);
    }

    /// Every change listed, in one order (unit, then action and key), for comparing a plan with
    /// the apply that followed it.
    #[cfg(feature = "testing")]
    pub fn changes_sorted(&self) -> Vec<(Unit, Change)> {
        let mut all: Vec<(Unit, Change)> = self
            .units
            .iter()
            .flat_map(|u| u.changes.iter().map(|c| (u.unit, c.clone())))
            .collect();
        all.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
        all
    }

    /// Plan: whether apply would change anything.
    pub fn changes_pending(&self) -> bool {
        self.units.iter().any(|u| u.writes() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_count_has_its_own_text() {
        let mut seen = std::collections::BTreeSet::new();
        for c in Count::all() {
            assert!(seen.insert(c.as_str()), "{} twice", c.as_str());
        }
        assert_eq!(seen.len(), Action::ALL.len() + Tally::ALL.len());
    }

    #[test]
    fn counts_serialize_as_text_keys_and_only_actions_are_writes() {
        let mut c = Counts::default();
        c.bump(Action::Inserted, 2);
        c.bump(Tally::Unchanged, 5);
        c.bump(Action::Realigned, 1);
        assert_eq!(
            json!(c),
            json!({"inserted": 2, "realigned": 1, "unchanged": 5})
        );
        assert_eq!(c.writes(), 3);
    }

    #[test]
    fn findings_are_capped_per_kind_and_carry_their_unit() {
        let mut u = UnitReport::new(Unit::Identities);
        for i in 0..FINDINGS_PER_KIND + 5 {
            u.find(FindingKind::Offboarded, format!("user:{i}"), "kept");
        }
        u.find(FindingKind::Clash, "user:x", "held");
        assert_eq!(u.findings.len(), FINDINGS_PER_KIND + 1);
        assert_eq!(
            json!(u.findings.last()),
            json!({"unit": "identities", "kind": "clash", "entity": "user:x", "detail": "held"})
        );
    }

    #[test]
    fn names_read_back() {
        for &u in Unit::ALL {
            assert_eq!(Unit::from_name(u.as_str()), Some(u));
        }
        assert_eq!(Mode::from_name("plan"), Some(Mode::Plan));
        assert_eq!(FindingKind::from_name("nope"), None);
    }
}
