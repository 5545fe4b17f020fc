//! Identity source `realm-file`: a Keycloak realm export (`--import-realm` input), either one
//! file or a `kc.sh export --dir` folder (`<realm>-realm.json` plus `<realm>-users-<N>.json`).
//!
//! The file is streamed, never held whole: users are deserialized one at a time and sent on in
//! batches, so memory stays near the size of one batch plus the role and group definitions.
//! Keycloak's import rules apply: usernames are lower-cased, a user without `"enabled": true`
//! is disabled, service-account users are not identities, and a realm role a user or group names
//! without `roles.realm` declaring it is a plain role (Keycloak's import creates it), and a group
//! named by path is looked up with one optional leading and one optional trailing `/` (`"Admin"`
//! and `"Admin/Ops/"` name `/Admin` and `/Admin/Ops`). Effective
//! roles are resolved the way Keycloak puts them in `realm_access.roles`: direct realm and client
//! roles, the roles of the user's groups and their parent groups, and everything their
//! composites hold, client roles holding realm roles included.
//!
//! What Keycloak 26's import stores of a user, observed on 26.4.7, is what is read: under
//! `registrationEmailAsUsername` (and without `duplicateEmailsAllowed`) the lower-cased email is
//! the username; `firstName` and `lastName` that the realm's declarative user profile does not
//! declare are left out (Keycloak never shows them); emails that differ only in case refuse the
//! whole realm (Keycloak answers 409 and imports nothing) unless `duplicateEmailsAllowed`.
//!
//! A multi-realm export (a file whose top level is an array of realms, or a folder holding
//! several `<realm>-realm.json`) is read for the realm `keycloak.realm` names; a single realm is
//! read whatever its name.
//!
//! Structural problems (bad JSON, wrong types, a user without username, unknown groups, a users
//! file of another realm) are found by `preflight`, before a run writes anything, and refuse the
//! whole input. Duplicate ids, usernames or emails refuse it too, but are found over the
//! identity stage once the users are in PostgreSQL ([`RealmFileSource::unique_keys`]): a set of
//! them in memory would grow with the realm. Each user carries its place in the file
//! ([`crate::identity::Origin`]) into the stage, so the refusal names both users as the file
//! does; the identities unit's transaction is rolled back with it, so no user is written.
//!
//! A human user without `"id"` has no knowable sub (Keycloak generates one on import): it is
//! left out alone and reported as `rejected`, and the rest is synced. Refused when `environment = "production"` (checked in config). Reads
//! `identity.realm_file` and `keycloak.realm`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::identity::{
    check_identity, printable, BoxFuture, Duplicate, DuplicateKey, Fingerprint, Identity,
    IdentityProvider, Origin, RoleFilter, RoleGraph, RoleKey, SourceStats, StageSender, Staged,
    UniqueKeys,
};
use crate::progress::Progress;
use crate::seed::hex;

pub const EMBEDDED_REALM: &str = include_str!("../../realms/dev-realm.json");
pub(crate) const EMBEDDED_NAME: &str = "embedded realms/dev-realm.json";

/// The realm read from a multi-realm export when none is set (`keycloak.realm`'s default).
pub(crate) const DEFAULT_REALM: &str = "dev";

/// Problems listed in one error before the rest are only counted.
const MAX_LISTED_PROBLEMS: usize = 20;

#[derive(Debug, Clone)]
pub enum RealmInput {
    Embedded,
    File(PathBuf),
    /// `kc.sh export --dir` output: its realms by name, as Keycloak names them (from the file
    /// names), each with its realm file and users files.
    Dir {
        dir: PathBuf,
        realms: BTreeMap<String, DirRealm>,
    },
}

/// One realm of a `kc.sh export --dir` folder.
#[derive(Debug, Clone, Default)]
pub struct DirRealm {
    /// `<realm>-realm.json`, when the folder holds it.
    pub realm_file: Option<PathBuf>,
    /// `<realm>-users-<N>.json`, in N order.
    pub users: Vec<PathBuf>,
}

/// `<realm>-users-<N>.json` -> (realm, N).
fn users_file_name(name: &str) -> Option<(&str, u64)> {
    let (realm, n) = name.strip_suffix(".json")?.rsplit_once("-users-")?;
    if realm.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((realm, n.parse().unwrap_or(u64::MAX)))
}

impl RealmInput {
    pub(crate) fn from_setting(path: Option<&Path>) -> Result<Self> {
        let Some(p) = path else {
            return Ok(RealmInput::Embedded);
        };
        if !p.is_dir() {
            return Ok(RealmInput::File(p.to_path_buf()));
        }
        let entries = std::fs::read_dir(p).map_err(|e| {
            realm_err(
                &p.display().to_string(),
                format!("cannot list the folder: {e}"),
            )
        })?;
        let mut realms: BTreeMap<String, DirRealm> = BTreeMap::new();
        let mut users: Vec<(String, u64, PathBuf)> = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let users_file = users_file_name(&name);
            let exported = users_file.is_some() || name.ends_with("-realm.json");
            // A FIFO among them would block the read that opens it, a device never end.
            if let Some(why) = exported
                .then(|| crate::config::files::check_regular(&path, None).err())
                .flatten()
            {
                return Err(realm_err(&path.display().to_string(), format!("{why}: a `kc.sh export --dir` folder holds regular files; replace it with the exported file, or remove it from {}", p.display())));
            }
            if let Some((realm, n)) = users_file {
                users.push((realm.to_string(), n, path));
            } else if let Some(realm) = name.strip_suffix("-realm.json") {
                if !realm.is_empty() {
                    realms.entry(realm.to_string()).or_default().realm_file = Some(path);
                }
            }
        }
        // Keycloak imports the realms of the *-realm.json files, each with the users files
        // named after it (so `<realm>-federated-users-<N>.json` is not one of them). A folder
        // holding users files only is read as the realms those files name.
        let users_only = realms.is_empty();
        users.sort();
        for (realm, _, path) in users {
            if users_only && !realm.ends_with("-federated") {
                realms.entry(realm).or_default().users.push(path);
            } else if let Some(r) = realms.get_mut(&realm) {
                r.users.push(path);
            }
        }
        if realms.is_empty() {
            return Err(realm_err(&p.display().to_string(), "holds no <realm>-realm.json or <realm>-users-<N>.json files (a `kc.sh export --dir` folder expected)".into()));
        }
        Ok(RealmInput::Dir {
            dir: p.to_path_buf(),
            realms,
        })
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            RealmInput::Embedded => EMBEDDED_NAME.to_string(),
            RealmInput::File(p) => p.display().to_string(),
            RealmInput::Dir { dir, .. } => dir.display().to_string(),
        }
    }

    /// The files to scan for realm `wanted`, in order: the realm file first (it defines roles
    /// and groups), then its users files. A folder of one realm is read whatever its name.
    fn parts(&self, wanted: &str) -> Result<Vec<Part>> {
        match self {
            RealmInput::Embedded => Ok(vec![Part::whole(Source::Embedded)]),
            RealmInput::File(p) => Ok(vec![Part::whole(Source::File(p.clone()))]),
            RealmInput::Dir { dir, realms } => {
                let (name, realm) = match realms.iter().next() {
                    Some(only) if realms.len() == 1 => only,
                    _ => realms.get_key_value(wanted).ok_or_else(|| {
                        let found: Vec<&str> = realms.keys().map(String::as_str).collect();
                        realm_err(&dir.display().to_string(), missing_realm(&found, wanted))
                    })?,
                };
                let realm_part = realm.realm_file.iter().map(|p| Part {
                    source: Source::File(p.clone()),
                    arrays: false,
                    users_of: None,
                });
                let users_parts = realm.users.iter().map(|p| Part {
                    source: Source::File(p.clone()),
                    arrays: false,
                    users_of: Some(name.clone()),
                });
                Ok(realm_part.chain(users_parts).collect())
            }
        }
    }
}

/// The error text for a multi-realm export that lacks the realm `keycloak.realm` names.
fn missing_realm(found: &[&str], wanted: &str) -> String {
    let found: Vec<String> = found.iter().map(|r| format!("{r:?}")).collect();
    format!(
        "holds the realms {} but not {wanted:?}, the realm keycloak.realm names: set keycloak.realm (SEEDKEEPER_KEYCLOAK__REALM) to the realm to read",
        found.join(", ")
    )
}

enum Source {
    Embedded,
    File(PathBuf),
}

/// One file to scan.
struct Part {
    source: Source,
    /// Whether the top level may be an array of realms (a single file, not a folder's).
    arrays: bool,
    /// A users file of a folder: the realm its name says it belongs to.
    users_of: Option<String>,
}

impl Part {
    fn whole(source: Source) -> Part {
        Part {
            source,
            arrays: true,
            users_of: None,
        }
    }

    fn name(&self) -> String {
        match &self.source {
            Source::Embedded => EMBEDDED_NAME.to_string(),
            Source::File(p) => p.display().to_string(),
        }
    }
}

/// The problems of one validation: the first `MAX_LISTED_PROBLEMS` in full, the rest counted.
#[derive(Default)]
struct Listed {
    shown: Vec<String>,
    more: usize,
}

impl Listed {
    fn push(&mut self, p: String) {
        if self.shown.len() < MAX_LISTED_PROBLEMS {
            self.shown.push(p);
        } else {
            self.more += 1;
        }
    }
}

fn realm_err(path: &str, message: String) -> Error {
    Error::RealmFile {
        path: path.to_string(),
        message,
    }
}

#[derive(Debug, Deserialize)]
struct RealmUser {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default, rename = "firstName")]
    first_name: Option<String>,
    #[serde(default, rename = "lastName")]
    last_name: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default, rename = "realmRoles")]
    realm_roles: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    /// clientId -> client roles held directly.
    #[serde(default, rename = "clientRoles")]
    client_roles: HashMap<String, Vec<String>>,
    #[serde(default, rename = "serviceAccountClientId")]
    service_account_client_id: Option<String>,
}

impl RealmUser {
    /// The email as Keycloak stores it: lower-cased, and none when empty.
    fn email(&self) -> Option<String> {
        self.email
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(str::to_lowercase)
    }
}

/// The realm and client roles named by a user or a group.
fn role_keys<'a>(
    realm: &'a [String],
    client: &'a HashMap<String, Vec<String>>,
) -> impl Iterator<Item = RoleKey> + 'a {
    let realm = realm.iter().map(|r| RoleKey::realm(r));
    let client = client
        .iter()
        .flat_map(|(c, roles)| roles.iter().map(|r| RoleKey::Client(c.clone(), r.clone())));
    realm.chain(client)
}

#[derive(Debug, Default, Deserialize)]
struct RolesRep {
    #[serde(default)]
    realm: Vec<RoleRep>,
    /// clientId -> the client's roles.
    #[serde(default)]
    client: HashMap<String, Vec<RoleRep>>,
}

#[derive(Debug, Deserialize)]
struct RoleRep {
    name: String,
    #[serde(default)]
    composites: Option<CompositesRep>,
}

#[derive(Debug, Default, Deserialize)]
struct CompositesRep {
    #[serde(default)]
    realm: Vec<String>,
    /// clientId -> client roles the composite holds.
    #[serde(default)]
    client: HashMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct GroupRep {
    name: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default, rename = "realmRoles")]
    realm_roles: Vec<String>,
    #[serde(default, rename = "clientRoles")]
    client_roles: HashMap<String, Vec<String>>,
    #[serde(default, rename = "subGroups")]
    sub_groups: Vec<GroupRep>,
}

/// The realm's `components` as far as the user profile goes.
#[derive(Debug, Default, Deserialize)]
struct ComponentsRep {
    #[serde(default, rename = "org.keycloak.userprofile.UserProfileProvider")]
    user_profile: Vec<ComponentRep>,
}

#[derive(Debug, Default, Deserialize)]
struct ComponentRep {
    /// A MultivaluedHashMap: every value is a list of strings.
    #[serde(default)]
    config: HashMap<String, Vec<String>>,
}

/// The declarative user profile (`kc.user.profile.config`), as far as the import goes.
#[derive(Debug, Deserialize)]
struct ProfileRep {
    #[serde(default)]
    attributes: Vec<ProfileAttribute>,
}

#[derive(Debug, Deserialize)]
struct ProfileAttribute {
    name: String,
}

/// What the realm's user profile lets a user keep of the names a realm file gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Profile {
    first_name: bool,
    last_name: bool,
}

impl Default for Profile {
    /// Keycloak's default profile declares both.
    fn default() -> Self {
        Profile {
            first_name: true,
            last_name: true,
        }
    }
}

/// The user profile a realm's `components` configure: Keycloak hides `firstName` and
/// `lastName` when the profile does not declare them, whatever its `unmanagedAttributePolicy`
/// (which governs custom attributes only: observed on Keycloak 26.4).
fn profile_of(components: &ComponentsRep) -> std::result::Result<Profile, String> {
    let Some(raw) = components
        .user_profile
        .iter()
        .find_map(|c| c.config.get("kc.user.profile.config"))
        .and_then(|v| v.first())
    else {
        return Ok(Profile::default());
    };
    let rep: ProfileRep = serde_json::from_str(raw).map_err(|e| {
        format!("components: the user profile (org.keycloak.userprofile.UserProfileProvider, kc.user.profile.config) is not a valid profile: {e}; fix it or remove the component (Keycloak then uses its default profile)")
    })?;
    let declares = |n: &str| rep.attributes.iter().any(|a| a.name == n);
    Ok(Profile {
        first_name: declares("firstName"),
        last_name: declares("lastName"),
    })
}

/// Roles and groups of the realm, enough to resolve effective roles.
#[derive(Debug, Default)]
pub(crate) struct RealmIndex {
    pub realm: Option<String>,
    graph: RoleGraph,
    /// Group path -> roles (realm and client) of the group and all its parents.
    group_roles: HashMap<String, Vec<RoleKey>>,
    /// The realm's import settings that change what Keycloak stores of a user.
    settings: ImportSettings,
    /// In a file whose top level is an array of realms: the element read.
    element: Option<usize>,
    /// The human users the check counted (the total of the listing's progress bar).
    users: u64,
    /// SHA-256 (hex) of what the check read ([`IdentityProvider::fingerprint`]).
    digest: String,
}

impl RealmIndex {
    fn add_groups(&mut self, groups: &[GroupRep], parent_path: &str, inherited: &[RoleKey]) {
        for g in groups {
            let path = g
                .path
                .as_deref()
                .map(group_path)
                .unwrap_or_else(|| format!("{parent_path}/{}", g.name));
            let mut roles: Vec<RoleKey> = inherited.to_vec();
            roles.extend(role_keys(&g.realm_roles, &g.client_roles));
            self.add_groups(&g.sub_groups, &path, &roles);
            self.group_roles.insert(path, roles);
        }
    }

    /// The realm roles of the group a realm file names by `path`, spelled as Keycloak's import
    /// accepts it (see [`group_path`]); `None` for a group the realm does not define.
    fn group(&self, path: &str) -> Option<&Vec<RoleKey>> {
        self.group_roles.get(&group_path(path))
    }

    /// Effective realm roles: direct realm and client roles, group roles and everything they
    /// contain, client-role composites included (a client role holding a realm role puts it in
    /// `realm_access.roles`). A role `roles` does not declare is a plain role: it is its own
    /// effective set. The default role (`default-roles-<realm>`) counts when the user holds it:
    /// Keycloak's import gives it only to users whose `realmRoles` name it.
    fn effective(&self, u: &RealmUser) -> Vec<String> {
        // Most users of a large realm hold nothing: no role graph to walk for them.
        if u.realm_roles.is_empty() && u.client_roles.is_empty() && u.groups.is_empty() {
            return Vec::new();
        }
        let mut start: Vec<RoleKey> = role_keys(&u.realm_roles, &u.client_roles).collect();
        for g in &u.groups {
            if let Some(r) = self.group(g) {
                start.extend(r.iter().cloned());
            }
        }
        self.graph.realm_closure(start)
    }
}

/// A group path as Keycloak's import looks it up (`KeycloakModelUtils.findGroupByPath`): one
/// optional leading and one optional trailing `/` are stripped before the path is split, so
/// `"Admin"`, `"/Admin"` and `"Admin/"` all name `/Admin`. Realm files written by hand or by
/// Helm charts use every spelling; refusing them would refuse realms Keycloak imports.
fn group_path(raw: &str) -> String {
    let p = raw.strip_prefix('/').unwrap_or(raw);
    let p = p.strip_suffix('/').unwrap_or(p);
    format!("/{p}")
}

/// Service accounts are not identities, whatever fields they carry: Keycloak marks them with
/// `serviceAccountClientId` and names them `service-account-<clientId>`.
fn is_service_account(u: &RealmUser) -> bool {
    u.service_account_client_id.is_some()
        || u.username.as_deref().is_some_and(|n| {
            n.get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case("service-account-"))
        })
}

/// Where a user sits, for messages: `realms[1] users[3] ("alice")`.
fn position(element: Option<usize>, i: usize, username: Option<&str>) -> String {
    format!(
        "{}users[{i}]{}",
        element.map(|e| format!("realms[{e}] ")).unwrap_or_default(),
        username.map(|n| format!(" ({n:?})")).unwrap_or_default()
    )
}

/// What one scan saw at the top level of a realm object.
#[derive(Default)]
struct Top {
    realm: Option<String>,
    roles: Option<RolesRep>,
    groups: Option<Vec<GroupRep>>,
    registration_email_as_username: Option<bool>,
    duplicate_emails_allowed: Option<bool>,
    components: Option<ComponentsRep>,
}

/// The settings of a realm that change what Keycloak's import stores of a user.
#[derive(Debug, Clone, Copy, Default)]
struct ImportSettings {
    /// `registrationEmailAsUsername`, in effect only without `duplicateEmailsAllowed`.
    email_as_username: bool,
    duplicate_emails_allowed: bool,
    profile: Profile,
}

/// What one scan of a file saw: one `Top` per realm (several when the top level is an array).
struct Scanned {
    tops: Vec<Top>,
    array: bool,
}

/// Called with each user: the realm's element in a top-level array (`None` for an object), the
/// user's index in `users`, and the user.
type OnUser<'a> =
    dyn FnMut(Option<usize>, usize, RealmUser) -> std::result::Result<(), String> + 'a;

/// The top level of a file: one realm object, or (where allowed) an array of them.
struct FileSeed<'a, 'b> {
    scanned: &'a mut Scanned,
    on_user: &'a mut OnUser<'b>,
    arrays: bool,
    /// In an array: the only element to read; the others are skipped unread.
    only: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for FileSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FileSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.arrays {
            f.write_str("a realm export (a JSON object, or an array of them)")
        } else {
            f.write_str("a realm export (a JSON object)")
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<(), A::Error> {
        let mut top = Top::default();
        TopSeed {
            top: &mut top,
            element: None,
            on_user: self.on_user,
        }
        .visit_map(map)?;
        self.scanned.tops.push(top);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        if !self.arrays {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        }
        self.scanned.array = true;
        let mut e = 0usize;
        loop {
            let mut top = Top::default();
            let more = if self.only.is_some_and(|o| o != e) {
                seq.next_element::<IgnoredAny>()?.is_some()
            } else {
                seq.next_element_seed(TopSeed {
                    top: &mut top,
                    element: Some(e),
                    on_user: &mut *self.on_user,
                })?
                .is_some()
            };
            if !more {
                return Ok(());
            }
            self.scanned.tops.push(top);
            e += 1;
        }
    }
}

struct TopSeed<'a, 'b> {
    top: &'a mut Top,
    element: Option<usize>,
    on_user: &'a mut OnUser<'b>,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a realm export (a JSON object)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "realm" => self.top.realm = Some(map.next_value()?),
                "roles" => self.top.roles = Some(map.next_value()?),
                "groups" => self.top.groups = Some(map.next_value()?),
                "registrationEmailAsUsername" => {
                    self.top.registration_email_as_username = map.next_value()?
                }
                "duplicateEmailsAllowed" => self.top.duplicate_emails_allowed = map.next_value()?,
                "components" => self.top.components = Some(map.next_value()?),
                "users" => map.next_value_seed(UsersSeed {
                    element: self.element,
                    on_user: &mut *self.on_user,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct UsersSeed<'a, 'b> {
    element: Option<usize>,
    on_user: &'a mut OnUser<'b>,
}

impl<'de> DeserializeSeed<'de> for UsersSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for UsersSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of users")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let next = seq.next_element::<RealmUser>().map_err(|e| {
                de::Error::custom(format!("{}: {e}", position(self.element, i, None)))
            })?;
            let Some(u) = next else { break };
            (self.on_user)(self.element, i, u).map_err(de::Error::custom)?;
            i += 1;
        }
        Ok(())
    }
}

/// One pass over `part`, each user to `on_user`; every byte read also goes to `digest` when
/// given.
fn scan(
    part: &Part,
    only: Option<usize>,
    on_user: &mut OnUser<'_>,
    digest: Option<&mut Sha256>,
) -> Result<Scanned> {
    match &part.source {
        Source::Embedded => {
            let bytes = EMBEDDED_REALM.as_bytes();
            if let Some(d) = digest {
                d.update(bytes);
            }
            scan_from(part, bytes, only, on_user)
        }
        Source::File(p) => {
            let f = File::open(p).map_err(|e| {
                // Out of descriptors is the process's limit, not the file's fault.
                if crate::error::is_too_many_open_files(&e) {
                    return Error::TooManyOpenFiles {
                        doing: format!("opening the realm file {}", p.display()),
                    };
                }
                realm_err(&p.display().to_string(), format!("cannot open: {e}; fix identity.realm_file (SEEDKEEPER_IDENTITY__REALM_FILE)"))
            })?;
            let inner = Digesting { inner: f, digest };
            scan_from(part, BufReader::with_capacity(256 * 1024, inner), only, on_user)
        }
    }
}

/// A reader that feeds what it reads to a digest. It sits under the `BufReader`, so the digest
/// takes whole buffers (SHA-256 of a 195 MB realm file: about 0.1 s on a CPU with SHA
/// instructions), not the single bytes serde_json asks for.
struct Digesting<'a, R> {
    inner: R,
    digest: Option<&'a mut Sha256>,
}

impl<R: Read> Read for Digesting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(d) = self.digest.as_mut() {
            d.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// [`scan`] of one reader. serde_json reads it a byte at a time, so its type is concrete: through
/// a `Box<dyn Read>` each byte was a virtual call (0.56 s of each pass over a 195 MB realm file),
/// where a `BufReader` serves it from its buffer.
fn scan_from<R: Read>(
    part: &Part,
    reader: R,
    only: Option<usize>,
    on_user: &mut OnUser<'_>,
) -> Result<Scanned> {
    let mut scanned = Scanned {
        tops: Vec::new(),
        array: false,
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let seed = FileSeed {
        scanned: &mut scanned,
        on_user,
        arrays: part.arrays,
        only,
    };
    seed.deserialize(&mut de).and_then(|_| de.end()).map_err(|e| {
        let msg = e.to_string();
        let located = msg.starts_with("users[") || msg.starts_with("realms[");
        realm_err(&part.name(), if located { msg } else { format!("not a realm export (a JSON object with realm, roles, groups and users): {msg}") })
    })?;
    Ok(scanned)
}

/// The checks of one realm's users that need nothing per user: group references (one entry per
/// group named), the problems found, the count. Duplicate ids, usernames and emails are found
/// over the identity stage once the listing is in PostgreSQL ([`RealmFileSource::unique_keys`]):
/// sets of them here grew with the realm (some 240 bytes a user at 1,000,000, docs/benchmark.md).
#[derive(Default)]
struct RealmCheck {
    group_refs: HashMap<String, String>,
    problems: Listed,
    /// Users seen (service accounts excepted), as the sync lists them.
    users: u64,
}

impl RealmCheck {
    /// One user: it has a username, and its groups are remembered to check once every group
    /// is known.
    fn user(&mut self, u: &RealmUser, at: &dyn Fn() -> String) {
        self.users += 1;
        if u.username.is_none() {
            self.problems.push(format!("{}: has no \"username\"", at()));
        }
        for g in &u.groups {
            if !self.group_refs.contains_key(g) {
                self.group_refs.insert(g.clone(), at());
            }
        }
    }

    /// The realm's verdict once `index` knows its groups: every problem in one error naming the
    /// file (`input`) and the fix, or none.
    fn into_result(self, index: &RealmIndex, input: &str) -> Result<()> {
        let RealmCheck {
            group_refs,
            mut problems,
            ..
        } = self;
        let mut refs: Vec<String> = group_refs
            .iter()
            .filter(|(g, _)| index.group(g).is_none())
            .map(|(g, at)| format!("{at}: group {g:?} is not defined in groups"))
            .collect();
        refs.sort();
        for p in refs {
            problems.push(p);
        }
        refusal(problems, input)
    }
}

/// One error naming the file (`input`), every problem listed (the first
/// `MAX_LISTED_PROBLEMS`, the rest counted) and the fix; none without problems.
fn refusal(problems: Listed, input: &str) -> Result<()> {
    let Listed { shown, more } = problems;
    if shown.is_empty() {
        return Ok(());
    }
    let mut message = format!(
        "{} problem(s):\n  - {}",
        shown.len() + more,
        shown.join("\n  - ")
    );
    if more > 0 {
        message.push_str(&format!("\n  - ... and {more} more"));
    }
    message.push_str("\nfix the realm file (identity.realm_file, SEEDKEEPER_IDENTITY__REALM_FILE)");
    Err(realm_err(input, message))
}

pub struct RealmFileSource {
    input: RealmInput,
    /// The realm to read from a multi-realm export (`keycloak.realm`).
    realm: String,
    filter: RoleFilter,
    batch_size: usize,
    index: Mutex<Option<Arc<RealmIndex>>>,
}

impl RealmFileSource {
    pub fn new(input: RealmInput, filter: RoleFilter, batch_size: usize) -> Self {
        RealmFileSource {
            input,
            realm: DEFAULT_REALM.to_string(),
            filter,
            batch_size,
            index: Mutex::new(None),
        }
    }

    /// The realm to read when the export holds several (`keycloak.realm`); one realm is read
    /// whatever its name.
    pub(crate) fn with_realm(mut self, realm: &str) -> Self {
        self.realm = realm.to_string();
        self
    }

    /// Full validation pass: every problem of every user, reported together. One scan per part
    /// reads roles, groups and users; group references are checked once the whole index is
    /// known, against the first user naming each. In a file holding an array of realms, every
    /// realm is checked on its own and the one read is picked at the end.
    pub(crate) fn validate(&self) -> Result<Arc<RealmIndex>> {
        let parts = self.input.parts(&self.realm)?;
        let part_names: Vec<String> = parts.iter().map(Part::name).collect();
        // One check per realm: a folder or a plain file holds one, an array one per element.
        let mut checks: Vec<RealmCheck> = vec![RealmCheck::default()];
        // The input's fingerprint: the realm asked for and the roles kept (what the stream makes
        // of the same bytes depends on them), then every part read.
        let mut digest = Sha256::new();
        digest.update(self.realm.as_bytes());
        digest.update([0]);
        for role in &self.filter.relevant {
            digest.update(role.as_bytes());
            digest.update([0]);
        }
        let mut scans: Vec<Scanned> = Vec::new();
        for (pi, part) in parts.iter().enumerate() {
            // With a folder, each entry is named with its file.
            let prefix = if parts.len() > 1 {
                format!("{} ", part_names[pi])
            } else {
                String::new()
            };
            let mut on_user = |el: Option<usize>, i: usize, u: RealmUser| {
                if is_service_account(&u) {
                    return Ok(());
                }
                let slot = el.unwrap_or(0);
                if checks.len() <= slot {
                    checks.resize_with(slot + 1, RealmCheck::default);
                }
                let check = &mut checks[slot];
                let at = || format!("{prefix}{}", position(el, i, u.username.as_deref()));
                check.user(&u, &at);
                // A user without id is left out at sync time (its sub is unknown), so its
                // values are never stored and not checked.
                if let (Some(id), Some(name)) = (&u.id, &u.username) {
                    // Field checks only: effective roles do not change validity. The import
                    // settings are known once the whole input is read, so the fields are checked
                    // as the file spells them.
                    let ident = identity_fields(&ImportSettings::default(), id.clone(), name, &u);
                    if let Err(why) = check_identity(&ident) {
                        check.problems.push(format!("{}: {why}", at()));
                    }
                }
                Ok(())
            };
            // What the stream will read is what is digested: each part's name and bytes.
            digest.update(part_names[pi].as_bytes());
            digest.update([0]);
            let scanned = scan(part, None, &mut on_user, Some(&mut digest))?;
            if let (Some(want), Some(got)) = (
                &part.users_of,
                scanned.tops.first().and_then(|t| t.realm.as_ref()),
            ) {
                if got != want {
                    checks[0].problems.push(format!("{prefix}has \"realm\": {got:?} but its name makes it a users file of realm {want:?}; Keycloak refuses to import it (rename the file or fix its \"realm\")"));
                }
            }
            scans.push(scanned);
        }
        // Only a single file can hold an array, so it is the one scan.
        let array = scans.first().is_some_and(|s| s.array);
        let (element, tops): (Option<usize>, Vec<Top>) = if array {
            let tops: Vec<Top> = scans.into_iter().flat_map(|s| s.tops).collect();
            let e = self.pick(&tops)?;
            (Some(e), tops.into_iter().skip(e).take(1).collect())
        } else {
            (None, scans.into_iter().flat_map(|s| s.tops).collect())
        };
        let check = checks
            .into_iter()
            .nth(element.unwrap_or(0))
            .unwrap_or_default();
        let (mut index, mut problems) = index_from(tops);
        index.element = element;
        index.users = check.users;
        index.digest = hex(&digest.finalize());
        let mut check = check;
        for p in problems.drain(..) {
            check.problems.push(p);
        }
        check.into_result(&index, &self.input.describe())?;
        Ok(Arc::new(index))
    }

    /// The element of a top-level array of realms to read: the only one, else the one named
    /// `keycloak.realm` (the first such, as Keycloak skips a realm that already exists).
    fn pick(&self, tops: &[Top]) -> Result<usize> {
        if tops.len() == 1 {
            return Ok(0);
        }
        if let Some(e) = tops
            .iter()
            .position(|t| t.realm.as_deref() == Some(self.realm.as_str()))
        {
            return Ok(e);
        }
        let found: Vec<&str> = tops
            .iter()
            .map(|t| t.realm.as_deref().unwrap_or("(no realm name)"))
            .collect();
        let message = if found.is_empty() {
            "holds an empty array of realms: export a realm into it".to_string()
        } else {
            missing_realm(&found, &self.realm)
        };
        Err(realm_err(&self.input.describe(), message))
    }

    /// The refusal of a realm holding duplicates, worded as the preflight words its other
    /// problems: each later user by position (with the file when the input has several) and
    /// username, the earlier one by file and position, and the fix.
    fn duplicates_error(&self, found: Vec<Duplicate>, total: u64) -> Error {
        let parts = self.input.parts(&self.realm).unwrap_or_default();
        let names: Vec<String> = parts.iter().map(Part::name).collect();
        let element = self
            .index
            .lock()
            .ok()
            .and_then(|g| g.as_ref().and_then(|i| i.element));
        let file = |o: &Origin| names.get(o.part as usize).cloned().unwrap_or_default();
        let mut problems = Listed::default();
        for d in &found {
            let (at, prev) = (&d.at, &d.prev);
            let prefix = if names.len() > 1 {
                format!("{} ", file(at))
            } else {
                String::new()
            };
            let here = format!(
                "{prefix}{}",
                position(element, at.entry as usize, Some(&at.username))
            );
            let earlier = |name| {
                format!(
                    "{} {}",
                    file(prev),
                    position(element, prev.entry as usize, name)
                )
            };
            problems.push(match d.key {
                DuplicateKey::Id => format!("{here}: duplicate id {:?} (also {})", d.value, earlier(None)),
                DuplicateKey::Username => format!("{here}: duplicate username {:?} (also {}; Keycloak compares usernames case-insensitively)", at.username, earlier(None)),
                DuplicateKey::Email => format!("{here}: email {:?} is also the email of {}; Keycloak compares emails case-insensitively and refuses to import such a realm (409, nothing imported) unless it sets \"duplicateEmailsAllowed\": true: give each user its own email, or set \"duplicateEmailsAllowed\": true in the realm", d.value, earlier(Some(&prev.username))),
            });
        }
        problems.more += (total as usize).saturating_sub(found.len());
        match refusal(problems, &self.input.describe()) {
            Err(e) => e,
            Ok(()) => realm_err(&self.input.describe(), "holds duplicate users".to_string()),
        }
    }

    fn stream_blocking(
        &self,
        index: Arc<RealmIndex>,
        out: StageSender,
        progress: &Progress,
    ) -> Result<SourceStats> {
        progress.listing_started(Some(index.users));
        let mut stats = SourceStats::default();
        // Users listed since progress was last told (it is told once per batch).
        let mut unreported = 0u64;
        let mut batch: Vec<Identity> = Vec::with_capacity(self.batch_size);
        let mut closed = false;
        for (pi, part) in self.input.parts(&self.realm)?.iter().enumerate() {
            let file = part.name();
            let mut on_user = |el: Option<usize>, i: usize, u: RealmUser| {
                if is_service_account(&u) {
                    return Ok(());
                }
                let Some(name) = u.username.as_deref() else {
                    return Err("a user lost its username since the preflight check (file changed during the run)".to_string());
                };
                stats.listed += 1;
                unreported += 1;
                let origin = Origin {
                    part: pi as u32,
                    entry: i as u32,
                    username: name.to_string(),
                    name_key: None,
                };
                let ident = match u.id.clone() {
                    Some(id) => to_identity(&index, &self.filter, id, name, &u),
                    None => {
                        // Keycloak gives such a user a random id on import: no sub to key a row
                        // by. It is still sent, without a sub: Keycloak's import compares its
                        // username and email with the others', and so does the stage.
                        stats.reject(
                            format!("user:{}", printable(&name.to_lowercase())),
                            format!(
                                "realm user {name:?} ({} in {file}) has no \"id\": its sub is unknown until Keycloak imports it (each fresh import generates a new one), so it was not stored; export the realm from Keycloak (kc.sh export keeps the ids) or add an \"id\" (a UUID) to this user",
                                position(el, i, None)
                            ),
                        );
                        keyless(name, &u)
                    }
                };
                batch.push(with_origin(ident, origin));
                if batch.len() >= self.batch_size {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_size));
                    progress.listed(std::mem::take(&mut unreported));
                    if out.blocking_send(Staged::Identities(full)).is_err() {
                        closed = true;
                        return Err("the run stopped reading identities".to_string());
                    }
                }
                Ok(())
            };
            let r = scan(part, index.element, &mut on_user, None);
            if closed {
                return Err(Error::Cancelled);
            }
            r?;
        }
        if !batch.is_empty() && out.blocking_send(Staged::Identities(batch)).is_err() {
            return Err(Error::Cancelled);
        }
        progress.listed(unreported);
        progress.listing_done();
        Ok(stats)
    }
}

/// The role/group index and import settings from what the scans of the realm's parts saw at
/// their top level, and the problems found in them.
fn index_from(tops: Vec<Top>) -> (RealmIndex, Vec<String>) {
    let mut index = RealmIndex::default();
    let mut problems = Vec::new();
    let mut groups: Vec<GroupRep> = Vec::new();
    let (mut email_as_username, mut duplicates) = (false, false);
    for top in tops {
        if index.realm.is_none() {
            index.realm = top.realm;
        }
        email_as_username |= top.registration_email_as_username.unwrap_or(false);
        duplicates |= top.duplicate_emails_allowed.unwrap_or(false);
        if let Some(c) = &top.components {
            match profile_of(c) {
                Ok(p) => index.settings.profile = p,
                Err(e) => problems.push(e),
            }
        }
        if let Some(roles) = top.roles {
            let client = roles
                .client
                .into_iter()
                .flat_map(|(c, rs)| rs.into_iter().map(move |r| (Some(c.clone()), r)));
            for (client, r) in roles.realm.into_iter().map(|r| (None, r)).chain(client) {
                let Some(c) = r.composites else { continue };
                let children: Vec<RoleKey> = role_keys(&c.realm, &c.client).collect();
                if children.is_empty() {
                    continue;
                }
                let key = match client {
                    Some(client) => RoleKey::Client(client, r.name),
                    None => RoleKey::Realm(r.name),
                };
                index.graph.composites.insert(key, children);
            }
        }
        if let Some(g) = top.groups {
            groups.extend(g);
        }
    }
    // Observed on Keycloak 26.4: with duplicateEmailsAllowed, registrationEmailAsUsername
    // changes nothing on import (the file's usernames are kept).
    index.settings.email_as_username = email_as_username && !duplicates;
    index.settings.duplicate_emails_allowed = duplicates;
    index.add_groups(&groups, "", &[]);
    (index, problems)
}

/// A user without id as the stage's duplicate checks see it: no sub, its lower-cased username
/// and email.
fn keyless(username: &str, u: &RealmUser) -> Identity {
    Identity {
        sub: String::new(),
        username: username.to_lowercase(),
        email: u.email(),
        first_name: None,
        last_name: None,
        enabled: false,
        realm_roles: Vec::new(),
        origin: None,
    }
}

/// `ident` with its place in the file; the lower-cased file username kept apart when the
/// identity's username is another (the email, under `registrationEmailAsUsername`).
fn with_origin(mut ident: Identity, mut origin: Origin) -> Identity {
    let key = origin.username.to_lowercase();
    if key != ident.username {
        origin.name_key = Some(key);
    }
    ident.origin = Some(Box::new(origin));
    ident
}

/// The identity Keycloak's import makes of a realm-file user: usernames and emails
/// lower-cased (an empty email is none), the email as username under
/// `registrationEmailAsUsername` (a user without email keeps its username), and names the user
/// profile does not declare left out (Keycloak keeps them but never shows them).
fn to_identity(
    index: &RealmIndex,
    filter: &RoleFilter,
    id: String,
    username: &str,
    u: &RealmUser,
) -> Identity {
    let mut ident = identity_fields(&index.settings, id, username, u);
    ident.realm_roles = filter.keep(index.effective(u));
    ident
}

/// [`to_identity`] without the roles, which do not change whether a user can be stored.
fn identity_fields(settings: &ImportSettings, id: String, username: &str, u: &RealmUser) -> Identity {
    let email = u.email();
    let username = match &email {
        Some(e) if settings.email_as_username => e.clone(),
        _ => username.to_lowercase(),
    };
    Identity {
        sub: id,
        username,
        email,
        first_name: u.first_name.clone().filter(|_| settings.profile.first_name),
        last_name: u.last_name.clone().filter(|_| settings.profile.last_name),
        enabled: u.enabled.unwrap_or(false),
        realm_roles: Vec::new(),
        origin: None,
    }
}

impl IdentityProvider for RealmFileSource {
    fn name(&self) -> &'static str {
        "realm-file"
    }

    /// The file is read on a blocking thread, which a stopped run leaves to finish on its own:
    /// its result is dropped, nothing is written.
    fn preflight(self: Arc<Self>, _: CancellationToken) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let me = self.clone();
            let index = tokio::task::spawn_blocking(move || me.validate())
                .await
                .map_err(|e| Error::Io(format!("realm file check stopped: {e}")))??;
            if let Ok(mut slot) = self.index.lock() {
                *slot = Some(index);
            }
            Ok(())
        })
    }

    /// Ids and usernames always; emails unless the realm sets `duplicateEmailsAllowed`.
    fn unique_keys(&self) -> UniqueKeys {
        let emails_allowed = self
            .index
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|i| i.settings.duplicate_emails_allowed))
            .unwrap_or(false);
        UniqueKeys {
            ids: true,
            usernames: true,
            emails: !emails_allowed,
        }
    }

    fn refuse_duplicates(&self, found: Vec<Duplicate>, total: u64) -> Error {
        self.duplicates_error(found, total)
    }

    /// Known once the preflight has read the input.
    fn fingerprint(&self) -> Option<Fingerprint> {
        let index = self.index.lock().ok()?.clone()?;
        Some(Fingerprint {
            digest: index.digest.clone(),
            users: index.users,
        })
    }

    /// A stopped run closes `out`, which ends the reader at its next batch.
    fn stream(
        self: Arc<Self>,
        out: StageSender,
        _: CancellationToken,
        progress: Progress,
    ) -> BoxFuture<'static, Result<SourceStats>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let cached = self.index.lock().ok().and_then(|g| g.clone());
                let index = match cached {
                    Some(i) => i,
                    None => self.validate()?,
                };
                self.stream_blocking(index, out, &progress)
            })
            .await
            .map_err(|e| Error::Io(format!("realm file reader stopped: {e}")))?
        })
    }
}
