//! Identity source `realm-file`: a Keycloak realm export (`--import-realm` input), either one
//! file or a `kc.sh export --dir` folder (`*-realm.json` plus `*-users-*.json`).
//!
//! The file is streamed, never held whole: users are deserialized one at a time and sent on in
//! batches, so memory stays near the size of one batch plus the role and group definitions.
//! Keycloak's import rules apply: usernames are lower-cased, a user without `"enabled": true`
//! is disabled, service-account users are not identities. Effective roles are resolved the way
//! Keycloak puts them in `realm_access.roles`: direct roles, composites, and the roles of the
//! user's groups and their parent groups.
//!
//! Every problem (bad JSON, a user without id or username, duplicate ids or usernames, unknown
//! roles or groups) is found by `preflight`, before a run writes anything. Refused when
//! `environment = "production"` (checked in config). Reads `identity.realm_file`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::identity::{
    check_identity, BoxFuture, Identity, IdentityProvider, RoleFilter, RoleGraph, SourceStats,
};

pub const EMBEDDED_REALM: &str = include_str!("../../realms/dev-realm.json");
pub const EMBEDDED_NAME: &str = "embedded realms/dev-realm.json";

/// Problems listed in one error before the rest are only counted.
const MAX_LISTED_PROBLEMS: usize = 20;

#[derive(Debug, Clone)]
pub enum RealmInput {
    Embedded,
    File(PathBuf),
    /// `kc.sh export --dir` output: the realm file and its users files, in name order.
    Dir {
        realm: Option<PathBuf>,
        users: Vec<PathBuf>,
        dir: PathBuf,
    },
}

impl RealmInput {
    pub fn from_setting(path: Option<&Path>) -> Result<Self> {
        let Some(p) = path else {
            return Ok(RealmInput::Embedded);
        };
        if p.is_dir() {
            let mut realm = None;
            let mut users = Vec::new();
            let entries = std::fs::read_dir(p).map_err(|e| {
                realm_err(
                    &p.display().to_string(),
                    format!("cannot list the folder: {e}"),
                )
            })?;
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().to_string();
                if !name.ends_with(".json") {
                    continue;
                }
                if name.contains("-users-") {
                    users.push(path);
                } else if name.ends_with("-realm.json") {
                    if realm.is_some() {
                        return Err(realm_err(
                            &p.display().to_string(),
                            "holds more than one *-realm.json: export one realm per folder".into(),
                        ));
                    }
                    realm = Some(path);
                }
            }
            users.sort();
            if realm.is_none() && users.is_empty() {
                return Err(realm_err(&p.display().to_string(), "holds no *-realm.json or *-users-*.json files (a `kc.sh export --dir` folder expected)".into()));
            }
            Ok(RealmInput::Dir {
                realm,
                users,
                dir: p.to_path_buf(),
            })
        } else {
            Ok(RealmInput::File(p.to_path_buf()))
        }
    }

    pub fn describe(&self) -> String {
        match self {
            RealmInput::Embedded => EMBEDDED_NAME.to_string(),
            RealmInput::File(p) => p.display().to_string(),
            RealmInput::Dir { dir, .. } => dir.display().to_string(),
        }
    }

    /// The files to scan, in order: the realm file first (it defines roles and groups).
    fn parts(&self) -> Vec<Part> {
        match self {
            RealmInput::Embedded => vec![Part::Embedded],
            RealmInput::File(p) => vec![Part::File(p.clone())],
            RealmInput::Dir { realm, users, .. } => realm
                .iter()
                .cloned()
                .map(Part::File)
                .chain(users.iter().cloned().map(Part::File))
                .collect(),
        }
    }
}

enum Part {
    Embedded,
    File(PathBuf),
}

impl Part {
    fn name(&self) -> String {
        match self {
            Part::Embedded => EMBEDDED_NAME.to_string(),
            Part::File(p) => p.display().to_string(),
        }
    }

    fn reader(&self) -> Result<Box<dyn Read>> {
        match self {
            Part::Embedded => Ok(Box::new(EMBEDDED_REALM.as_bytes())),
            Part::File(p) => {
                let f = File::open(p).map_err(|e| realm_err(&p.display().to_string(), format!("cannot open: {e}; fix identity.realm_file (SEEDKEEPER_IDENTITY__REALM_FILE)")))?;
                Ok(Box::new(BufReader::with_capacity(256 * 1024, f)))
            }
        }
    }
}

/// A 128-bit fingerprint of a string from two independently keyed SipHash runs: a collision
/// between two of a realm's ids is far less likely than a hardware fault.
fn fingerprint(s: &str) -> u128 {
    use std::hash::{Hash, Hasher};
    let mut a = std::collections::hash_map::DefaultHasher::new();
    (0u8, s).hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (1u8, s).hash(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
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
    #[serde(default, rename = "serviceAccountClientId")]
    service_account_client_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RolesRep {
    #[serde(default)]
    realm: Vec<RoleRep>,
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
}

#[derive(Debug, Deserialize)]
struct GroupRep {
    name: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default, rename = "realmRoles")]
    realm_roles: Vec<String>,
    #[serde(default, rename = "subGroups")]
    sub_groups: Vec<GroupRep>,
}

/// Roles and groups of the realm, enough to resolve effective roles.
#[derive(Debug, Default)]
pub struct RealmIndex {
    pub realm: Option<String>,
    graph: RoleGraph,
    roles: HashSet<String>,
    roles_defined: bool,
    /// Group path -> realm roles of the group and all its parents.
    group_roles: HashMap<String, Vec<String>>,
}

impl RealmIndex {
    fn add_groups(&mut self, groups: &[GroupRep], parent_path: &str, inherited: &[String]) {
        for g in groups {
            let path = g
                .path
                .clone()
                .unwrap_or_else(|| format!("{parent_path}/{}", g.name));
            let mut roles: Vec<String> = inherited.to_vec();
            roles.extend(g.realm_roles.iter().cloned());
            self.add_groups(&g.sub_groups, &path, &roles);
            self.group_roles.insert(path, roles);
        }
    }

    fn effective(&self, u: &RealmUser) -> HashSet<String> {
        let mut start: Vec<&str> = u.realm_roles.iter().map(String::as_str).collect();
        for g in &u.groups {
            if let Some(r) = self.group_roles.get(g) {
                start.extend(r.iter().map(String::as_str));
            }
        }
        self.graph.closure(start)
    }
}

/// What one scan saw at the top level of a file.
#[derive(Default)]
struct Top {
    realm: Option<String>,
    roles: Option<RolesRep>,
    groups: Option<Vec<GroupRep>>,
}

type OnUser<'a> = dyn FnMut(usize, RealmUser) -> std::result::Result<(), String> + 'a;

struct TopSeed<'a, 'b> {
    top: &'a mut Top,
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
                "users" => map.next_value_seed(UsersSeed {
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
            let next = seq
                .next_element::<RealmUser>()
                .map_err(|e| de::Error::custom(format!("users[{i}]: {e}")))?;
            let Some(u) = next else { break };
            (self.on_user)(i, u).map_err(de::Error::custom)?;
            i += 1;
        }
        Ok(())
    }
}

fn scan(part: &Part, on_user: &mut OnUser<'_>) -> Result<Top> {
    let mut top = Top::default();
    let reader = part.reader()?;
    let mut de = serde_json::Deserializer::from_reader(reader);
    let seed = TopSeed {
        top: &mut top,
        on_user,
    };
    seed.deserialize(&mut de).and_then(|_| de.end()).map_err(|e| {
        let msg = e.to_string();
        realm_err(&part.name(), if msg.starts_with("users[") { msg } else { format!("not a realm export (a JSON object with realm, roles, groups and users): {msg}") })
    })?;
    Ok(top)
}

pub struct RealmFileSource {
    input: RealmInput,
    filter: RoleFilter,
    batch_size: usize,
    index: Mutex<Option<Arc<RealmIndex>>>,
}

impl RealmFileSource {
    pub fn new(input: RealmInput, filter: RoleFilter, batch_size: usize) -> Self {
        RealmFileSource {
            input,
            filter,
            batch_size,
            index: Mutex::new(None),
        }
    }

    /// Full validation pass: every problem of every user, reported together. One scan per part
    /// reads roles, groups and users; role and group references are checked once the whole
    /// index is known, against the first user naming each.
    pub fn validate(&self) -> Result<Arc<RealmIndex>> {
        let mut tops: Vec<Top> = Vec::new();
        let mut role_refs: HashMap<String, String> = HashMap::new();
        let mut group_refs: HashMap<String, String> = HashMap::new();
        let no_roles = RealmIndex::default();
        // Seen ids and lower-cased usernames, as 128-bit fingerprints pointing at (file, entry):
        // a few MB at 100,000 users where the strings themselves would take tens.
        let mut ids: HashMap<u128, (u32, u32)> = HashMap::new();
        let mut names: HashMap<u128, (u32, u32)> = HashMap::new();
        let mut problems = Listed::default();
        let parts = self.input.parts();
        let part_names: Vec<String> = parts.iter().map(Part::name).collect();
        for (pi, part) in parts.iter().enumerate() {
            // With a folder, each entry is named with its file.
            let prefix = if parts.len() > 1 {
                format!("{} ", part_names[pi])
            } else {
                String::new()
            };
            let mut on_user = |i: usize, u: RealmUser| {
                let mut push = |p: String| problems.push(p);
                let at = || {
                    format!(
                        "{prefix}users[{i}]{}",
                        u.username
                            .as_deref()
                            .map(|n| format!(" ({n:?})"))
                            .unwrap_or_default()
                    )
                };
                let here = (pi as u32, i as u32);
                let prev_at = |(p, j): (u32, u32)| format!("{} users[{j}]", part_names[p as usize]);
                match &u.id {
                    None => push(format!("{}: has no \"id\": without a fixed id Keycloak gives it a random sub on every import; add one (a UUID)", at())),
                    Some(id) => {
                        if let Some(prev) = ids.insert(fingerprint(id), here) {
                            push(format!("{}: duplicate id {id:?} (also {})", at(), prev_at(prev)));
                        }
                    }
                }
                match &u.username {
                    None => push(format!("{}: has no \"username\"", at())),
                    Some(name) => {
                        if let Some(prev) = names.insert(fingerprint(&name.to_lowercase()), here) {
                            push(format!("{}: duplicate username {name:?} (also {}; Keycloak compares usernames case-insensitively)", at(), prev_at(prev)));
                        }
                    }
                }
                for r in &u.realm_roles {
                    if !role_refs.contains_key(r) {
                        role_refs.insert(r.clone(), at());
                    }
                }
                for g in &u.groups {
                    if !group_refs.contains_key(g) {
                        group_refs.insert(g.clone(), at());
                    }
                }
                if u.service_account_client_id.is_none() {
                    if let (Some(id), Some(name)) = (&u.id, &u.username) {
                        // Field checks only: effective roles do not change validity.
                        let ident = to_identity(&no_roles, &self.filter, id.clone(), name, &u);
                        if let Err(why) = check_identity(&ident) {
                            push(format!("{}: {why}", at()));
                        }
                    }
                }
                Ok(())
            };
            tops.push(scan(part, &mut on_user)?);
        }
        let index = Arc::new(index_from(tops));
        let mut refs: Vec<String> = Vec::new();
        if index.roles_defined {
            for (r, at) in &role_refs {
                if !index.roles.contains(r) {
                    refs.push(format!(
                        "{at}: realm role {r:?} is not defined in roles.realm"
                    ));
                }
            }
        }
        for (g, at) in &group_refs {
            if !index.group_roles.contains_key(g) {
                refs.push(format!("{at}: group {g:?} is not defined in groups"));
            }
        }
        refs.sort();
        for p in refs {
            problems.push(p);
        }
        let Listed { shown, more } = problems;
        if !shown.is_empty() {
            let mut message = format!(
                "{} problem(s):\n  - {}",
                shown.len() + more,
                shown.join("\n  - ")
            );
            if more > 0 {
                message.push_str(&format!("\n  - ... and {more} more"));
            }
            message.push_str(
                "\nfix the realm file (identity.realm_file, SEEDKEEPER_IDENTITY__REALM_FILE)",
            );
            return Err(realm_err(&self.input.describe(), message));
        }
        Ok(index)
    }

    fn stream_blocking(
        &self,
        index: Arc<RealmIndex>,
        out: mpsc::Sender<Vec<Identity>>,
    ) -> Result<SourceStats> {
        let mut stats = SourceStats::default();
        let mut batch: Vec<Identity> = Vec::with_capacity(self.batch_size);
        let mut closed = false;
        for part in self.input.parts() {
            let mut on_user = |_: usize, u: RealmUser| {
                if u.service_account_client_id.is_some() {
                    return Ok(());
                }
                let (Some(id), Some(name)) = (u.id.clone(), u.username.clone()) else {
                    return Err("a user lost its id or username since the preflight check (file changed during the run)".to_string());
                };
                batch.push(to_identity(&index, &self.filter, id, &name, &u));
                stats.listed += 1;
                if batch.len() >= self.batch_size {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_size));
                    if out.blocking_send(full).is_err() {
                        closed = true;
                        return Err("the run stopped reading identities".to_string());
                    }
                }
                Ok(())
            };
            let r = scan(&part, &mut on_user);
            if closed {
                return Err(Error::Cancelled);
            }
            r?;
        }
        if !batch.is_empty() && out.blocking_send(batch).is_err() {
            return Err(Error::Cancelled);
        }
        Ok(stats)
    }
}

/// The role/group index from what the scans of every part saw at their top level.
fn index_from(tops: Vec<Top>) -> RealmIndex {
    let mut index = RealmIndex::default();
    let mut groups: Vec<GroupRep> = Vec::new();
    for top in tops {
        if index.realm.is_none() {
            index.realm = top.realm;
        }
        if let Some(roles) = top.roles {
            index.roles_defined = true;
            for r in roles.realm {
                index.roles.insert(r.name.clone());
                let children = r.composites.map(|c| c.realm).unwrap_or_default();
                if !children.is_empty() {
                    index.graph.composites.insert(r.name, children);
                }
            }
        }
        if let Some(g) = top.groups {
            groups.extend(g);
        }
    }
    index.add_groups(&groups, "", &[]);
    index
}

fn to_identity(
    index: &RealmIndex,
    filter: &RoleFilter,
    id: String,
    username: &str,
    u: &RealmUser,
) -> Identity {
    Identity {
        sub: id,
        // Keycloak lower-cases usernames and emails on import.
        username: username.to_lowercase(),
        email: u.email.as_ref().map(|e| e.to_lowercase()),
        first_name: u.first_name.clone(),
        last_name: u.last_name.clone(),
        enabled: u.enabled.unwrap_or(false),
        realm_roles: filter.keep(index.effective(u)),
    }
}

impl IdentityProvider for RealmFileSource {
    fn name(&self) -> &'static str {
        "realm-file"
    }

    fn preflight(self: Arc<Self>) -> BoxFuture<'static, Result<()>> {
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

    fn stream(
        self: Arc<Self>,
        out: mpsc::Sender<Vec<Identity>>,
    ) -> BoxFuture<'static, Result<SourceStats>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let cached = self.index.lock().ok().and_then(|g| g.clone());
                let index = match cached {
                    Some(i) => i,
                    None => self.validate()?,
                };
                self.stream_blocking(index, out)
            })
            .await
            .map_err(|e| Error::Io(format!("realm file reader stopped: {e}")))?
        })
    }
}
