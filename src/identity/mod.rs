//! Where identities come from: the live Keycloak Admin API or a realm export file.
//!
//! Both sources produce the same stream of [`Identity`] batches (sub, username, email, names,
//! enabled, effective realm roles restricted to the roles seedkeeper maps), sent through a
//! bounded channel so memory does not grow with the realm. Service-account users are not
//! identities (Keycloak's user list hides them too). Nothing here touches the database.
//! Reads `identity.*` and `keycloak.*`.

pub mod keycloak;
pub mod realm_file;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::IdentitySettings;
use crate::error::Result;
use crate::progress::Progress;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The column limit for subs, usernames, emails and names (Keycloak's own limit is 255 too).
pub(crate) const MAX_FIELD_CHARS: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The OIDC `sub`: Keycloak's user id, an opaque string.
    pub sub: String,
    pub username: String,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub enabled: bool,
    /// Effective realm roles that seedkeeper maps, sorted.
    pub realm_roles: Vec<String>,
    /// Where the user sits in a realm file, for the duplicate checks that run over the stage
    /// (`None` from Keycloak, whose users are unique by construction). Boxed: most identities
    /// have none, and every one passes through the channel.
    pub origin: Option<Box<Origin>>,
}

/// A realm-file user's place in its input and the names Keycloak's import compares. It goes
/// into the stage beside the identity so that duplicates are found by PostgreSQL over the
/// stage, not by a set in memory that would grow with the realm, and are still named the way
/// the file names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file among the input's parts (a `kc.sh export --dir` folder has several).
    pub part: u32,
    /// The user's index in that file's `users`.
    pub entry: u32,
    /// The username as the file spells it (for messages).
    pub username: String,
    /// The lower-cased file username, when the identity's username is something else (the
    /// email, under `registrationEmailAsUsername`): Keycloak compares the file's usernames.
    pub name_key: Option<String>,
}

/// Which of the stage's keys the source's input must hold once only. A realm file's
/// duplicates refuse the whole file, as Keycloak's import refuses the realm; Keycloak's own
/// listing can repeat a user while paging, which the stage merely de-duplicates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UniqueKeys {
    pub ids: bool,
    pub usernames: bool,
    pub emails: bool,
}

impl UniqueKeys {
    pub(crate) fn any(&self) -> bool {
        self.ids || self.usernames || self.emails
    }
}

/// Which key two staged users share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicateKey {
    Id,
    Username,
    Email,
}

/// A user that holds a key an earlier user of the same listing holds: found over the stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub key: DuplicateKey,
    /// The value as compared (an id, a lower-cased username or email).
    pub value: String,
    pub at: Origin,
    /// The closest earlier user with the same value.
    pub prev: Origin,
}

/// Counts a source reports about its listing.
#[derive(Debug, Clone, Default)]
pub struct SourceStats {
    pub listed: u64,
    pub requests: u64,
    /// Users listed but not sent as identities because they have no knowable sub (a realm-file
    /// user without `"id"`): all counted, the first `REJECTIONS_KEPT` described. The identities
    /// unit reports them as `rejected`, like an identity with an invalid value.
    pub rejected: u64,
    pub rejections: Vec<Rejection>,
    /// Set when the listing returned fewer distinct users than the source counts (Keycloak's
    /// `users/count`): the run is narrowed to the listed users, and nothing is concluded from
    /// absence.
    pub shortfall: Option<Shortfall>,
    /// The source's own count of its users (Keycloak's `users/count`, service accounts
    /// included), checked against the distinct users listed once the stage has de-duplicated
    /// them: the source keeps no set of the ids it listed. Fewer is a [`Shortfall`].
    pub counted: Option<u64>,
    /// Distinct users listed but never sent (service accounts): added to the stage's distinct
    /// subs for the check against `counted`.
    pub unsent: u64,
}

/// What a source sends to the identity stage, batch by batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    Identities(Vec<Identity>),
    /// Mapped realm roles resolved beside the listing, for identities sent without them so that
    /// no page waited for the resolution. They go into the stage as they are found, never held
    /// together (a role can be held by every user of the realm), and are given to the staged
    /// identities once the listing is complete. A sub may come more than once, and may be one
    /// the listing never sends (a service account): neither matters.
    Grants(Vec<Grant>),
}

/// A user (by sub) holding a mapped realm role, directly or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub sub: String,
    pub role: String,
}

/// The channel a source sends its batches into.
pub type StageSender = mpsc::Sender<Staged>;

/// A listing that ended short of the source's own count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// Distinct users the listing returned (service accounts included, as the count does).
    pub listed: u64,
    /// Users the source counts.
    pub counted: u64,
}

impl Shortfall {
    pub(crate) fn unlisted(&self) -> u64 {
        self.counted.saturating_sub(self.listed)
    }
}

/// How many rejections a source describes; the rest are only counted.
pub(crate) const REJECTIONS_KEPT: usize = 50;

/// A user the source left out: the evidence entity (`user:<username>`) and why, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub entity: String,
    pub detail: String,
}

impl SourceStats {
    pub(crate) fn reject(&mut self, entity: String, detail: String) {
        self.rejected += 1;
        if self.rejections.len() < REJECTIONS_KEPT {
            self.rejections.push(Rejection { entity, detail });
        }
    }
}

pub trait IdentityProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Checks the input before a run writes anything (a realm file is parsed and validated).
    /// `cancel` is the run's: it fires when the run is stopped, and ends any retry wait.
    fn preflight(self: Arc<Self>, cancel: CancellationToken) -> BoxFuture<'static, Result<()>>;
    /// `None` when the stream is the whole realm (a full listing); the subs of the users it is
    /// limited to when it is an event batch. Only a complete listing can tell that a user is
    /// missing from the realm or that a username moved to a new sub; a batch's derived units
    /// look at its users' rows only ([`crate::reconcile::Scope`]).
    fn batch(&self) -> Option<Vec<String>> {
        None
    }
    /// Subs the source knows are gone from the realm (an event batch's `GET users/{id}` answered
    /// 404): offboarded by the identities unit. Empty for a full listing, whose absences say the
    /// same for every user at once.
    fn gone(&self) -> Vec<String> {
        Vec::new()
    }
    /// Sends every identity, in batches, then returns. An error means the listing is incomplete.
    /// `cancel` as for [`IdentityProvider::preflight`]. `progress` is told when the listing
    /// starts (with the source's count of users, when it has one), the users listed so far (once
    /// per page or batch) and when it is complete.
    fn stream(
        self: Arc<Self>,
        out: StageSender,
        cancel: CancellationToken,
        progress: Progress,
    ) -> BoxFuture<'static, Result<SourceStats>>;
    /// The keys its input must hold once only, checked over the stage after the listing (none:
    /// repeats are de-duplicated). No default, so that a wrapper cannot drop it unnoticed.
    fn unique_keys(&self) -> UniqueKeys;
    /// The error that refuses the input for the duplicates the stage found: `found` the first
    /// of them in listing order, `total` how many there are. Only asked when
    /// [`IdentityProvider::unique_keys`] names a key.
    fn refuse_duplicates(&self, found: Vec<Duplicate>, total: u64) -> crate::error::Error;
    /// What the preflight read, when the source can name it exactly (a realm file: a digest of
    /// its bytes): the identities unit then need not stage a listing it has already applied to
    /// users rows that have not changed since (see `reconcile::identities`). `None` for a source
    /// that must be listed to be known (Keycloak, an event batch). No default, as above.
    fn fingerprint(&self) -> Option<Fingerprint>;
}

/// A source's input named by its content ([`IdentityProvider::fingerprint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// A digest (hex) of everything the listing is made from: the same digest, the same
    /// identities in the same order.
    pub digest: String,
    /// The users the listing sends.
    pub users: u64,
}

/// [`IdentityProvider::refuse_duplicates`] of a source whose keys need not be unique: never
/// asked, but worded in case.
pub fn duplicates_not_refused(
    source: &str,
    found: &[Duplicate],
    total: u64,
) -> crate::error::Error {
    let first = found.first().map(|d| d.value.as_str()).unwrap_or_default();
    crate::error::Error::Io(format!(
        "{source}: {total} duplicate key(s) in the identity stage, the first {first:?}"
    ))
}

/// The realm roles seedkeeper cares about: admin roles and role_map keys.
#[derive(Debug, Clone)]
pub struct RoleFilter {
    pub relevant: BTreeSet<String>,
}

impl RoleFilter {
    pub fn new(s: &IdentitySettings) -> Self {
        let mut relevant: BTreeSet<String> = s.admin_roles.iter().cloned().collect();
        relevant.extend(s.role_map.keys().cloned());
        RoleFilter { relevant }
    }

    pub(crate) fn keep(&self, roles: impl IntoIterator<Item = String>) -> Vec<String> {
        let set: BTreeSet<String> = roles
            .into_iter()
            .filter(|r| self.relevant.contains(r))
            .collect();
        set.into_iter().collect()
    }
}

/// Why an identity cannot be stored, if it cannot.
/// A value for logs and evidence entities: control characters escaped, length capped.
pub(crate) fn printable(s: &str) -> String {
    let escaped: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().count() > 80 {
        format!("{escaped}…")
    } else {
        escaped
    }
}

pub(crate) fn check_identity(i: &Identity) -> std::result::Result<(), String> {
    check_key_field("id (sub)", &i.sub)?;
    check_key_field("username", &i.username)?;
    for (name, v) in [
        ("email", &i.email),
        ("firstName", &i.first_name),
        ("lastName", &i.last_name),
    ] {
        if let Some(v) = v {
            if v.chars().count() > MAX_FIELD_CHARS {
                return Err(format!(
                    "{name} is longer than {MAX_FIELD_CHARS} characters"
                ));
            }
            if v.contains('\0') {
                return Err(format!("{name} contains a NUL character"));
            }
        }
    }
    Ok(())
}

fn check_key_field(name: &str, v: &str) -> std::result::Result<(), String> {
    if v.is_empty() {
        return Err(format!("{name} is empty"));
    }
    if v.chars().count() > MAX_FIELD_CHARS {
        return Err(format!(
            "{name} is longer than {MAX_FIELD_CHARS} characters"
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{name} contains control characters"));
    }
    Ok(())
}

/// A role of a realm: a realm role by name, or a client role by its client and name. A client
/// role can be a composite that holds realm roles (Keycloak puts those in the holder's
/// `realm_access.roles`), so effective realm roles are resolved over both kinds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum RoleKey {
    Realm(String),
    /// The client as the source names it (a realm file's `clientId`, the Admin API's internal
    /// client id), then the role's name.
    Client(String, String),
}

impl RoleKey {
    pub(crate) fn realm(name: &str) -> RoleKey {
        RoleKey::Realm(name.to_string())
    }

}

/// The role graph of a realm: which roles each composite role contains, realm and client roles
/// alike.
#[derive(Debug, Clone, Default)]
pub(crate) struct RoleGraph {
    pub composites: HashMap<RoleKey, Vec<RoleKey>>,
}

impl RoleGraph {
    /// Every role reachable from `start`, including the start roles.
    pub(crate) fn closure(&self, start: impl IntoIterator<Item = RoleKey>) -> HashSet<RoleKey> {
        let mut seen: HashSet<RoleKey> = HashSet::new();
        let mut stack: Vec<RoleKey> = start.into_iter().collect();
        while let Some(r) = stack.pop() {
            if !seen.contains(&r) {
                if let Some(children) = self.composites.get(&r) {
                    stack.extend(children.iter().cloned());
                }
                seen.insert(r);
            }
        }
        seen
    }

    /// The realm roles reachable from `start` (what Keycloak puts in `realm_access.roles`).
    pub(crate) fn realm_closure(&self, start: impl IntoIterator<Item = RoleKey>) -> Vec<String> {
        self.closure(start)
            .into_iter()
            .filter_map(|r| match r {
                RoleKey::Realm(n) => Some(n),
                RoleKey::Client(..) => None,
            })
            .collect()
    }

    /// Roles whose effective set contains `target` (the role itself and every composite, realm
    /// or client, that reaches it): holding any of them means holding `target`.
    pub(crate) fn holders_of(&self, target: &RoleKey) -> BTreeSet<RoleKey> {
        let mut parents: HashMap<&RoleKey, Vec<&RoleKey>> = HashMap::new();
        for (role, children) in &self.composites {
            for c in children {
                parents.entry(c).or_default().push(role);
            }
        }
        let mut out = BTreeSet::new();
        let mut stack = vec![target];
        while let Some(r) = stack.pop() {
            if out.insert(r.clone()) {
                if let Some(p) = parents.get(r) {
                    stack.extend(p.iter().copied());
                }
            }
        }
        out
    }
}

/// Maps each relevant realm role to the roles (realm or client) that grant it.
pub(crate) fn granting_roles(
    graph: &RoleGraph,
    filter: &RoleFilter,
) -> BTreeMap<String, BTreeSet<RoleKey>> {
    filter
        .relevant
        .iter()
        .map(|r| (r.clone(), graph.holders_of(&RoleKey::realm(r))))
        .collect()
}

/// A fixed set of identities, already fetched (the users an event batch touched): not the whole
/// realm, so nothing is concluded from absence and no row is re-aligned on its strength. `gone`
/// are the batch's users Keycloak answered 404 for: deleted, so offboarded.
#[derive(Debug, Clone, Default)]
pub(crate) struct FetchedBatch {
    pub users: Vec<Identity>,
    pub gone: Vec<String>,
}

impl IdentityProvider for FetchedBatch {
    fn name(&self) -> &'static str {
        "keycloak events"
    }

    fn batch(&self) -> Option<Vec<String>> {
        let subs = self.users.iter().map(|u| u.sub.clone());
        Some(subs.chain(self.gone.iter().cloned()).collect())
    }

    fn gone(&self) -> Vec<String> {
        self.gone.clone()
    }

    fn preflight(self: Arc<Self>, _: CancellationToken) -> BoxFuture<'static, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn unique_keys(&self) -> UniqueKeys {
        UniqueKeys::default()
    }

    fn refuse_duplicates(&self, found: Vec<Duplicate>, total: u64) -> crate::error::Error {
        duplicates_not_refused(self.name(), &found, total)
    }

    fn stream(
        self: Arc<Self>,
        out: StageSender,
        _: CancellationToken,
        progress: Progress,
    ) -> BoxFuture<'static, Result<SourceStats>> {
        Box::pin(async move {
            let listed = self.users.len() as u64;
            progress.listing_started(Some(listed));
            if listed > 0 {
                out.send(Staged::Identities(self.users.clone()))
                    .await
                    .map_err(|_| crate::error::Error::Cancelled)?;
            }
            progress.listed(listed);
            progress.listing_done();
            Ok(SourceStats {
                listed,
                ..SourceStats::default()
            })
        })
    }

    /// A batch is not the realm.
    fn fingerprint(&self) -> Option<Fingerprint> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(c: &str, r: &str) -> RoleKey {
        RoleKey::Client(c.to_string(), r.to_string())
    }

    /// realm `default-roles` > client `app/chain` > client `app/super` > realm `admin`.
    fn graph() -> RoleGraph {
        let mut g = RoleGraph::default();
        g.composites.insert(
            RoleKey::realm("default-roles"),
            vec![RoleKey::realm("offline_access"), client("app", "chain")],
        );
        g.composites
            .insert(client("app", "chain"), vec![client("app", "super")]);
        g.composites
            .insert(client("app", "super"), vec![RoleKey::realm("admin")]);
        g
    }

    #[test]
    fn realm_roles_reached_through_client_role_composites_are_effective() {
        let mut got = graph().realm_closure([client("app", "chain")]);
        got.sort();
        assert_eq!(got, vec!["admin".to_string()]);
        let mut got = graph().realm_closure([RoleKey::realm("default-roles")]);
        got.sort();
        assert_eq!(got, ["admin", "default-roles", "offline_access"]);
        assert!(graph().realm_closure([client("app", "other")]).is_empty());
    }

    #[test]
    fn every_role_reaching_a_realm_role_through_client_roles_grants_it() {
        let got = graph().holders_of(&RoleKey::realm("admin"));
        let want: BTreeSet<RoleKey> = [
            RoleKey::realm("admin"),
            client("app", "super"),
            client("app", "chain"),
            RoleKey::realm("default-roles"),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_composite_cycle_ends() {
        let mut g = graph();
        g.composites
            .insert(RoleKey::realm("admin"), vec![client("app", "chain")]);
        assert_eq!(g.realm_closure([RoleKey::realm("admin")]), ["admin"]);
        assert_eq!(g.holders_of(&RoleKey::realm("admin")).len(), 4);
    }
}
