//! A Keycloak 26 emulator for tests and the benchmark: an in-process HTTP server on port 0 that
//! loads a realm export and answers what seedkeeper calls, in Keycloak's wire formats
//! (`shared/keycloak/SUMMARY.md`): discovery (naming the realm's `frontendUrl` host when it has
//! one, as Keycloak does), JWKS, the client-credentials token endpoint and its error bodies, and
//! the admin API for users, counts, roles, role members, role groups, group members and children,
//! clients, client roles (their composites, members and groups) and role mappings (effective
//! realm roles through client-role composites included), with Keycloak's paging, ordering, permission checks and 401/403/404 bodies. Tokens are RS256 JWTs signed with a committed test key; they expire.
//!
//! Faults can be injected (5xx or 429 bursts, malformed or HTML bodies, latency, tokens that
//! become invalid mid-listing; short pages, a capped `max`, users filtered out of the listing
//! after the query), and every request is journaled so tests can assert what was called. Self-contained: it is also compiled into the benchmark by path.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use openidconnect::core::{CoreJwsSigningAlgorithm, CoreRsaPrivateSigningKey};
use openidconnect::{JsonWebKeyId, PrivateSigningKey};
use serde_json::{json, Value};

const KEY_PEM: &str = include_str!("emulator-key.pem");
const KID: &str = "emulator-rs256";
/// The 403 body of Keycloak 26.4's admin API (21 to 26.3 answered `unknown_error`).
const FORBIDDEN: &str = "HTTP 403 Forbidden";

/// Every client role of `realm-management` in a new Keycloak 26 realm: the 19 a real realm
/// export of Keycloak 26.0.5 lists (keycloak-config-cli's baseline realm), and the composites
/// Keycloak defines.
const REALM_MANAGEMENT: &[&str] = &[
    "create-client",
    "impersonation",
    "manage-authorization",
    "manage-clients",
    "manage-events",
    "manage-identity-providers",
    "manage-realm",
    "manage-users",
    "query-clients",
    "query-groups",
    "query-realms",
    "query-users",
    "realm-admin",
    "view-authorization",
    "view-clients",
    "view-events",
    "view-identity-providers",
    "view-realm",
    "view-users",
];

#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
}

#[derive(Clone)]
struct User {
    id: String,
    username: String,
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    enabled: bool,
    email_verified: bool,
    /// Kept only when the import gave one: Keycloak 26.4 leaves it unset (absent from answers)
    /// for imported users without `createdTimestamp`.
    created: Option<i64>,
    realm_roles: Vec<String>,
    groups: Vec<String>,
    client_roles: HashMap<String, Vec<String>>,
    service_account_client: Option<String>,
}

#[derive(Clone)]
struct Role {
    id: String,
    name: String,
    description: Option<String>,
    composites: Vec<String>,
    /// Client roles the composite holds: (clientId, role).
    client_composites: Vec<(String, String)>,
}

impl Role {
    fn from_export(r: &Value, default_id: String) -> Role {
        Role {
            id: s(r, "id").unwrap_or(default_id),
            name: s(r, "name").unwrap_or_default(),
            description: s(r, "description"),
            composites: r
                .pointer("/composites/realm")
                .map(|c| {
                    c.as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            client_composites: client_role_pairs(r.pointer("/composites/client")),
        }
    }

    fn is_composite(&self) -> bool {
        !self.composites.is_empty() || !self.client_composites.is_empty()
    }
}

/// `{"<clientId>": ["role", ...]}` (a user's, a group's or a composite's client roles) as pairs.
fn client_role_pairs(v: Option<&Value>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (client, roles) in v.and_then(Value::as_object).into_iter().flatten() {
        for r in roles.as_array().into_iter().flatten() {
            if let Some(r) = r.as_str() {
                out.push((client.clone(), r.to_string()));
            }
        }
    }
    out
}

/// The roles of the clients Keycloak creates in every realm that seedkeeper's graph walks:
/// `realm-management` (its composites as Keycloak defines them) and `account`.
fn builtin_client_roles(client_id: &str) -> Vec<(&'static str, Vec<&'static str>)> {
    match client_id {
        "realm-management" => REALM_MANAGEMENT
            .iter()
            .map(|r| {
                let composites = match *r {
                    "realm-admin" => REALM_MANAGEMENT
                        .iter()
                        .copied()
                        .filter(|x| *x != "realm-admin")
                        .collect(),
                    "view-users" => vec!["query-users", "query-groups"],
                    "view-clients" => vec!["query-clients"],
                    _ => vec![],
                };
                (*r, composites)
            })
            .collect(),
        "account" => vec![
            ("delete-account", vec![]),
            ("manage-account", vec!["manage-account-links"]),
            ("manage-account-links", vec![]),
            ("manage-consent", vec!["view-consent"]),
            ("view-applications", vec![]),
            ("view-consent", vec![]),
            ("view-groups", vec![]),
            ("view-profile", vec![]),
        ],
        _ => vec![],
    }
}

#[derive(Clone)]
struct Group {
    id: String,
    name: String,
    path: String,
    parent: Option<String>,
    realm_roles: Vec<String>,
    /// (clientId, role)
    client_roles: Vec<(String, String)>,
    children: Vec<String>,
}

#[derive(Clone)]
struct Client {
    /// The internal id, which the client endpoints take.
    id: String,
    client_id: String,
    secret: Option<String>,
    enabled: bool,
    public: bool,
    service_accounts: bool,
}

/// The realm, indexed for fast paging at benchmark sizes.
struct Realm {
    name: String,
    /// Sorted by lower-cased username.
    users: Vec<User>,
    by_id: HashMap<String, usize>,
    /// Indexes of the users a listing shows, in order (service accounts are not listed).
    humans: Vec<usize>,
    roles: Vec<Role>,
    role_members: HashMap<String, Vec<usize>>,
    groups: HashMap<String, Group>,
    top_groups: Vec<String>,
    group_by_path: HashMap<String, String>,
    group_members: HashMap<String, Vec<usize>>,
    clients: Vec<Client>,
    /// clientId -> the client's roles, sorted by name.
    client_roles: HashMap<String, Vec<Role>>,
    /// (clientId, role) -> the users holding it directly.
    client_role_members: HashMap<(String, String), Vec<usize>>,
    /// When the realm was imported: Keycloak 26.7 stamps it as `createdTimestamp` on imported
    /// users that carry none.
    loaded_at: i64,
    /// The realm attribute `frontendUrl`: as in Keycloak, discovery then names this host for the
    /// issuer and every endpoint, and tokens carry it in `iss`, while the server still answers
    /// on its own address.
    frontend_url: Option<String>,
}

/// A group path as Keycloak's import looks a user's `groups` entry up: one optional leading and
/// one optional trailing `/` stripped (`"Admin"`, `"Admin/"` and `"/Admin"` name `/Admin`).
fn group_path(raw: &str) -> String {
    let p = raw.strip_prefix('/').unwrap_or(raw);
    let p = p.strip_suffix('/').unwrap_or(p);
    format!("/{p}")
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

fn strings(v: &Value, k: &str) -> Vec<String> {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Realm {
    fn load(export: &Value) -> Realm {
        let name = s(export, "realm").unwrap_or_else(|| "dev".into());
        let mut roles: Vec<Role> = export
            .pointer("/roles/realm")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .enumerate()
                    .map(|(i, r)| Role::from_export(r, format!("00000000-0000-4000-9000-{i:012}")))
                    .collect()
            })
            .unwrap_or_default();
        roles.sort_by(|a, b| a.name.cmp(&b.name));
        let mut groups = HashMap::new();
        let mut top_groups = Vec::new();
        let mut group_by_path = HashMap::new();
        let mut counter = 0usize;
        fn add(
            g: &Value,
            parent: Option<(&str, &str)>,
            counter: &mut usize,
            groups: &mut HashMap<String, Group>,
            by_path: &mut HashMap<String, String>,
        ) -> String {
            *counter += 1;
            let name = s(g, "name").unwrap_or_default();
            // Keycloak's import builds the path from the names and ignores the `path` field.
            let path = format!("{}/{name}", parent.map(|p| p.1).unwrap_or(""));
            let id =
                s(g, "id").unwrap_or_else(|| format!("00000000-0000-4000-a000-{:012}", *counter));
            let mut children = Vec::new();
            for sub in g
                .get("subGroups")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                children.push(add(&sub, Some((&id, &path)), counter, groups, by_path));
            }
            by_path.insert(path.clone(), id.clone());
            groups.insert(
                id.clone(),
                Group {
                    id: id.clone(),
                    name,
                    path,
                    parent: parent.map(|p| p.0.to_string()),
                    realm_roles: strings(g, "realmRoles"),
                    client_roles: client_role_pairs(g.get("clientRoles")),
                    children,
                },
            );
            id
        }
        for g in export
            .get("groups")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            top_groups.push(add(&g, None, &mut counter, &mut groups, &mut group_by_path));
        }
        let mut users: Vec<User> = export
            .get("users")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .enumerate()
                    .map(|(i, u)| User {
                        id: s(u, "id")
                            .unwrap_or_else(|| format!("00000000-0000-4000-b000-{i:012}")),
                        // Import rules: usernames and emails lower-cased; no "enabled": true means disabled.
                        username: s(u, "username").unwrap_or_default().to_lowercase(),
                        email: s(u, "email").map(|e| e.to_lowercase()),
                        first_name: s(u, "firstName"),
                        last_name: s(u, "lastName"),
                        enabled: u.get("enabled").and_then(Value::as_bool).unwrap_or(false),
                        email_verified: u
                            .get("emailVerified")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                        created: u.get("createdTimestamp").and_then(Value::as_i64),
                        realm_roles: strings(u, "realmRoles"),
                        groups: strings(u, "groups"),
                        client_roles: u
                            .get("clientRoles")
                            .and_then(Value::as_object)
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| {
                                        (
                                            k.clone(),
                                            v.as_array()
                                                .map(|a| {
                                                    a.iter()
                                                        .filter_map(|x| {
                                                            x.as_str().map(str::to_string)
                                                        })
                                                        .collect()
                                                })
                                                .unwrap_or_default(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                        service_account_client: s(u, "serviceAccountClientId"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        users.sort_by(|a, b| a.username.cmp(&b.username));
        let mut by_id = HashMap::new();
        let mut role_members: HashMap<String, Vec<usize>> = HashMap::new();
        let mut group_members: HashMap<String, Vec<usize>> = HashMap::new();
        let mut client_role_members: HashMap<(String, String), Vec<usize>> = HashMap::new();
        for (i, u) in users.iter().enumerate() {
            by_id.insert(u.id.clone(), i);
            for r in &u.realm_roles {
                role_members.entry(r.clone()).or_default().push(i);
            }
            for (c, roles) in &u.client_roles {
                for r in roles {
                    client_role_members
                        .entry((c.clone(), r.clone()))
                        .or_default()
                        .push(i);
                }
            }
            for g in &u.groups {
                if let Some(gid) = group_by_path.get(&group_path(g)) {
                    group_members.entry(gid.clone()).or_default().push(i);
                }
            }
        }
        let mut clients: Vec<Client> = export
            .get("clients")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .enumerate()
                    .map(|(i, c)| Client {
                        id: s(c, "id")
                            .unwrap_or_else(|| format!("00000000-0000-4000-c000-{i:012}")),
                        client_id: s(c, "clientId").unwrap_or_default(),
                        secret: s(c, "secret"),
                        enabled: c.get("enabled").and_then(Value::as_bool).unwrap_or(true),
                        public: c
                            .get("publicClient")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                        service_accounts: c
                            .get("serviceAccountsEnabled")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Keycloak creates these in every realm; an export lists them.
        for (n, builtin) in ["account", "realm-management"].into_iter().enumerate() {
            if !clients.iter().any(|c| c.client_id == builtin) {
                clients.push(Client {
                    id: format!("00000000-0000-4000-c100-{n:012}"),
                    client_id: builtin.into(),
                    secret: None,
                    enabled: true,
                    public: builtin == "account",
                    service_accounts: false,
                });
            }
        }
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        let mut client_roles: HashMap<String, Vec<Role>> = HashMap::new();
        let exported = export.pointer("/roles/client").and_then(Value::as_object);
        for (ci, c) in clients.iter().enumerate() {
            let mut roles: Vec<Role> = match exported.and_then(|m| m.get(&c.client_id)) {
                Some(list) => list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                    .map(|(i, r)| {
                        Role::from_export(r, format!("00000000-0000-4000-d{ci:03}-{i:012}"))
                    })
                    .collect(),
                None => builtin_client_roles(&c.client_id)
                    .into_iter()
                    .enumerate()
                    .map(|(i, (name, composites))| Role {
                        id: format!("00000000-0000-4000-d{ci:03}-{i:012}"),
                        name: name.into(),
                        description: Some(format!("${{role_{name}}}")),
                        composites: vec![],
                        client_composites: composites
                            .into_iter()
                            .map(|x| (c.client_id.clone(), x.to_string()))
                            .collect(),
                    })
                    .collect(),
            };
            roles.sort_by(|a, b| a.name.cmp(&b.name));
            client_roles.insert(c.client_id.clone(), roles);
        }
        let humans = users
            .iter()
            .enumerate()
            .filter(|(_, u)| u.service_account_client.is_none())
            .map(|(i, _)| i)
            .collect();
        Realm {
            name,
            users,
            by_id,
            humans,
            roles,
            role_members,
            groups,
            top_groups,
            group_by_path,
            group_members,
            clients,
            client_roles,
            client_role_members,
            loaded_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            frontend_url: export
                .pointer("/attributes/frontendUrl")
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty())
                .map(|u| u.trim_end_matches('/').to_string()),
        }
    }

    fn role(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name == name)
    }

    fn client_by_id(&self, id: &str) -> Option<&Client> {
        self.clients.iter().find(|c| c.id == id)
    }

    fn client_role(&self, client_id: &str, name: &str) -> Option<&Role> {
        self.client_roles
            .get(client_id)?
            .iter()
            .find(|r| r.name == name)
    }

    /// A role's direct composites as Keycloak answers `.../composites`: realm roles, then
    /// client roles.
    fn composites_json(&self, r: &Role) -> Vec<Value> {
        let realm = r
            .composites
            .iter()
            .filter_map(|c| self.role(c))
            .map(|c| role_json(self, c));
        let client = r.client_composites.iter().filter_map(|(c, n)| {
            let client = self.clients.iter().find(|x| &x.client_id == c)?;
            Some(client_role_json(client, self.client_role(c, n)?))
        });
        realm.chain(client).collect()
    }

    fn is_service_account(&self, u: &User) -> bool {
        u.service_account_client.is_some()
    }

    /// Effective realm roles: direct realm and client roles, groups with their parents, and
    /// everything their composites (realm or client) hold.
    fn effective_roles(&self, u: &User) -> BTreeSet<String> {
        // (None, realm role) or (Some(clientId), client role).
        let mut start: Vec<(Option<String>, String)> =
            u.realm_roles.iter().map(|r| (None, r.clone())).collect();
        for (c, roles) in &u.client_roles {
            start.extend(roles.iter().map(|r| (Some(c.clone()), r.clone())));
        }
        for path in &u.groups {
            let mut gid = self.group_by_path.get(&group_path(path)).cloned();
            while let Some(id) = gid {
                let g = &self.groups[&id];
                start.extend(g.realm_roles.iter().map(|r| (None, r.clone())));
                start.extend(
                    g.client_roles
                        .iter()
                        .map(|(c, r)| (Some(c.clone()), r.clone())),
                );
                gid = g.parent.clone();
            }
        }
        let mut seen = BTreeSet::new();
        while let Some(key) = start.pop() {
            if seen.insert(key.clone()) {
                let role = match &key {
                    (None, r) => self.role(r),
                    (Some(c), r) => self.client_role(c, r),
                };
                if let Some(role) = role {
                    start.extend(role.composites.iter().map(|r| (None, r.clone())));
                    start.extend(
                        role.client_composites
                            .iter()
                            .map(|(c, r)| (Some(c.clone()), r.clone())),
                    );
                }
            }
        }
        seen.into_iter()
            .filter_map(|(c, r)| c.is_none().then_some(r))
            .collect()
    }

    fn service_account(&self, client_id: &str) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.service_account_client.as_deref() == Some(client_id))
    }
}

fn management_closure(roles: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for r in roles {
        out.insert(r.clone());
        match r.as_str() {
            "realm-admin" => out.extend(REALM_MANAGEMENT.iter().map(|s| s.to_string())),
            "view-users" => {
                out.insert("query-users".into());
                out.insert("query-groups".into());
            }
            "view-clients" => {
                out.insert("query-clients".into());
            }
            _ => {}
        }
    }
    out
}

struct Issued {
    expires: Instant,
    generation: u64,
    management: BTreeSet<String>,
}

#[derive(Default)]
struct Faults {
    admin_fail: Vec<u16>,
    token_fail: Vec<u16>,
    malformed: usize,
    html: Vec<u16>,
    latency: Duration,
    invalidate_after: Option<usize>,
    /// Authenticated admin calls answered normally before queued faults apply.
    faults_after: usize,
    /// Paged listings never return more than this, whatever `max` asks (a server limit).
    cap: Option<usize>,
    /// Every n-th paged answer of two or more items loses the back half of its items: a short
    /// page before the end, the listing continuing behind it.
    short_every: usize,
    /// Paged answers served so far (for `short_every`).
    paged: usize,
    /// `/users` drops every n-th listed user (by position in the realm) after the query, as
    /// fine-grained admin permissions do; `/users/count` still counts them.
    hide_every: usize,
    /// `/users/count` answers this many fewer than the realm's users, as a count taken before
    /// that many users were created.
    count_short: usize,
    /// Paged listings answer from the start whatever `first` asks (a broken proxy).
    ignore_first: Option<IgnoreFirst>,
    /// The `/users` page at this `first` is held this long before it is answered.
    slow_users_page: Option<(u64, Duration)>,
}

/// Where the `ignore_first` fault applies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IgnoreFirst {
    /// `/users` only.
    Users,
    /// Every paged listing.
    Everywhere,
}

struct Shared {
    realm: RwLock<Arc<Realm>>,
    faults: Mutex<Faults>,
    journal: Mutex<Vec<JournalEntry>>,
    /// Requests received, counted on arrival (before any injected latency): the journal has
    /// only those answered.
    received: AtomicU64,
    /// Requests received and not yet answered (held by the latency, or being routed); one whose
    /// client went away counts until the server drops it.
    in_flight: AtomicU64,
    tokens: Mutex<HashMap<String, Issued>>,
    generation: AtomicU64,
    lifespan: AtomicU64,
    key: CoreRsaPrivateSigningKey,
    base: String,
    jti: AtomicU64,
    /// The discovery document points the token endpoint at `/moved/...` and the old one is gone.
    moved: std::sync::atomic::AtomicBool,
    /// Stored user and admin events and the realm's event settings.
    events: Mutex<EventStore>,
    release: Mutex<Release>,
    /// `GET /admin/serverinfo`: another version than the release's, or a status instead of an
    /// answer (as behind a proxy that refuses or fails it).
    serverinfo: Mutex<(Option<String>, Option<u16>)>,
}

/// The Keycloak release whose answers the emulator gives, where releases differ on the wire
/// (found by `emulator_vs_real` against the newest patch of each minor Maven Central serves; 26.6
/// was never published): 26.4 by default, the version `make test` pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Release {
    /// 26.4 (checked on 26.4.0 and 26.4.7, which answer alike): `GET users` answers in full
    /// whatever `briefRepresentation` says, each user with its `userProfileMetadata`; imported
    /// users without `createdTimestamp` have none; role members carry no `access`.
    #[default]
    V26_4,
    /// 26.5 (checked on 26.5.6): `GET users` honours `briefRepresentation`, but in full it still
    /// lists `userProfileMetadata`; the import stamps `createdTimestamp`; role members carry no
    /// `access`.
    V26_5,
    /// 26.7 (checked on 26.7.3): `GET users` honours `briefRepresentation` and lists no
    /// `userProfileMetadata` even in full (`GET users/{id}` still has it); the import stamps
    /// `createdTimestamp`; role members carry `access`.
    V26_7,
}

impl Release {
    /// Every profile, oldest first.
    pub const ALL: [Release; 3] = [Release::V26_4, Release::V26_5, Release::V26_7];

    /// The release a Keycloak version (`26.7.3`, as `GET /admin/serverinfo` gives it) answers as:
    /// 26.4 and older as 26.4, 26.5 as 26.5, later ones (26.6 was never published) as 26.7.
    pub fn of(version: &str) -> Release {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        match (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) {
            (major, _) if major > 26 => Release::V26_7,
            (26, minor) if minor >= 6 => Release::V26_7,
            (26, 5) => Release::V26_5,
            _ => Release::V26_4,
        }
    }

    /// The version `GET /admin/serverinfo` reports: the patch of the minor the profile was
    /// checked against.
    pub fn version(self) -> &'static str {
        match self {
            Release::V26_4 => "26.4.7",
            Release::V26_5 => "26.5.6",
            Release::V26_7 => "26.7.3",
        }
    }

    /// `GET users` drops the full fields under `briefRepresentation=true` (26.4 ignores it).
    fn honours_brief_listing(self) -> bool {
        self != Release::V26_4
    }

    /// `GET users` in full carries each user's `userProfileMetadata` (26.7 leaves it out).
    fn lists_profile_metadata(self) -> bool {
        self != Release::V26_7
    }

    /// The import gives users without `createdTimestamp` the time of the import.
    fn stamps_created(self) -> bool {
        self != Release::V26_4
    }

    /// `GET /admin/serverinfo` shows a realm's `manage-realm` holder the version (26.4 shows it
    /// to no realm service account).
    fn shows_version_to_manage_realm(self) -> bool {
        self != Release::V26_4
    }

    /// `GET roles/{role}/users` gives each member the caller's `access`.
    fn role_members_carry_access(self) -> bool {
        self == Release::V26_7
    }
}

/// Where a user is served: which fields it has depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    /// `GET users`
    Listing,
    /// `GET users/{id}`
    ById,
    /// `GET roles/{role}/users`
    RoleMembers,
    /// `GET groups/{id}/members`
    GroupMembers,
}

/// What `GET events`, `GET admin-events` and `GET events/config` serve.
struct EventStore {
    user: Vec<Value>,
    admin: Vec<Value>,
    enabled: bool,
    admin_enabled: bool,
    expiration: Option<i64>,
}

pub struct KeycloakEmulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KeycloakEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// TCP with a TLS handshake on accept; a failed handshake (a client that does not trust the
/// certificate) is dropped and the next connection awaited.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, peer)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl KeycloakEmulator {
    pub async fn start(realm_export: Value) -> KeycloakEmulator {
        Self::start_with(realm_export, None).await
    }

    /// The emulator over HTTPS only, at `https://127.0.0.1:port` (the certificate of `tls` must
    /// name IP 127.0.0.1): for the trust of Keycloak's certificate.
    pub async fn start_tls(
        realm_export: Value,
        tls: Arc<rustls::ServerConfig>,
    ) -> KeycloakEmulator {
        Self::start_with(realm_export, Some(tls)).await
    }

    async fn start_with(
        realm_export: Value,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> KeycloakEmulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind emulator");
        let addr = listener.local_addr().expect("emulator address");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shared = Arc::new(Shared {
            realm: RwLock::new(Arc::new(Realm::load(&realm_export))),
            faults: Mutex::new(Faults::default()),
            journal: Mutex::new(Vec::new()),
            received: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            tokens: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            lifespan: AtomicU64::new(300),
            key: CoreRsaPrivateSigningKey::from_pem(KEY_PEM, Some(JsonWebKeyId::new(KID.into())))
                .expect("emulator key"),
            base: format!("{scheme}://{addr}"),
            jti: AtomicU64::new(1),
            moved: std::sync::atomic::AtomicBool::new(false),
            events: Mutex::new(EventStore {
                user: Vec::new(),
                admin: Vec::new(),
                enabled: true,
                admin_enabled: true,
                expiration: None,
            }),
            release: Mutex::new(Release::default()),
            serverinfo: Mutex::new((None, None)),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let task = match tls {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
            Some(tls) => {
                let listener = TlsListener {
                    tcp: listener,
                    acceptor: tokio_rustls::TlsAcceptor::from(tls),
                };
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                })
            }
        };
        KeycloakEmulator { shared, addr, task }
    }

    pub fn base_url(&self) -> String {
        self.shared.base.clone()
    }

    pub fn realm_name(&self) -> String {
        self.shared.realm.read().unwrap().name.clone()
    }

    pub fn set_realm(&self, realm_export: Value) {
        *self.shared.realm.write().unwrap() = Arc::new(Realm::load(&realm_export));
    }

    pub fn fail_next_admin(&self, n: usize, status: u16) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .admin_fail
            .extend(std::iter::repeat_n(status, n));
    }

    pub fn fail_next_token(&self, n: usize, status: u16) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .token_fail
            .extend(std::iter::repeat_n(status, n));
    }

    pub fn malformed_next_admin(&self, n: usize) {
        self.shared.faults.lock().unwrap().malformed += n;
    }

    pub fn html_next_admin(&self, n: usize, status: u16) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .html
            .extend(std::iter::repeat_n(status, n));
    }

    /// Queued admin faults start only after `n` more authenticated admin calls.
    pub fn faults_after_admin_calls(&self, n: usize) {
        self.shared.faults.lock().unwrap().faults_after = n;
    }

    /// Paged listings (users, roles, role members and groups, group members and children)
    /// return at most `n` items, as behind a server limit on `max`.
    pub fn cap_page_size(&self, n: usize) {
        self.shared.faults.lock().unwrap().cap = Some(n);
    }

    /// Every `n`-th paged answer of two or more items returns only its first half (0: off).
    pub fn short_page_every(&self, n: usize) {
        let mut f = self.shared.faults.lock().unwrap();
        f.short_every = n;
        f.paged = 0;
    }

    /// `/users` filters out every `n`-th listed user after the query (0: off); `/users/count`
    /// still counts them. The hidden users are `hidden_users(n)`.
    pub fn hide_from_listing_every(&self, n: usize) {
        self.shared.faults.lock().unwrap().hide_every = n;
    }

    /// `/users/count` answers `n` fewer than the realm holds (0: off), as a count taken just
    /// before `n` users were created.
    pub fn count_short_by(&self, n: usize) {
        self.shared.faults.lock().unwrap().count_short = n;
    }

    /// Usernames `/users` hides under `hide_from_listing_every(n)`.
    pub fn hidden_users(&self, n: usize) -> Vec<String> {
        let realm = self.shared.realm.read().unwrap().clone();
        realm
            .humans
            .iter()
            .enumerate()
            .filter(|(pos, _)| n > 0 && pos % n == n - 1)
            .map(|(_, &i)| realm.users[i].username.clone())
            .collect()
    }

    /// Paged listings ignore `first` (at `where_`), as behind a proxy that drops it.
    pub fn ignore_first(&self, where_: IgnoreFirst) {
        self.shared.faults.lock().unwrap().ignore_first = Some(where_);
    }

    /// Drops the admin faults not yet served (an outage ends).
    pub fn clear_admin_faults(&self) {
        let mut f = self.shared.faults.lock().unwrap();
        f.admin_fail.clear();
        f.faults_after = 0;
    }

    /// Turns the paging faults off.
    pub fn clear_paging_faults(&self) {
        let mut f = self.shared.faults.lock().unwrap();
        f.ignore_first = None;
        f.cap = None;
        f.short_every = 0;
        f.paged = 0;
        f.hide_every = 0;
        f.count_short = 0;
        f.slow_users_page = None;
    }

    /// Holds the answer to the user listing's page at `first` for `hold` (a slow page).
    pub fn slow_users_page(&self, first: u64, hold: Duration) {
        self.shared.faults.lock().unwrap().slow_users_page = Some((first, hold));
    }

    /// Stores a user event (`{"id","time","type","userId",...}`), as Keycloak would on a login,
    /// registration or profile change.
    pub fn push_user_event(&self, event: Value) {
        self.shared.events.lock().unwrap().user.push(event);
    }

    /// Stores an admin event (`{"id","time","operationType","resourceType","resourcePath"}`).
    pub fn push_admin_event(&self, event: Value) {
        self.shared.events.lock().unwrap().admin.push(event);
    }

    /// Drops stored events, as their expiration does.
    pub fn expire_events_before(&self, time: i64) {
        let mut e = self.shared.events.lock().unwrap();
        e.user.retain(|v| v["time"].as_i64().unwrap_or(0) >= time);
        e.admin.retain(|v| v["time"].as_i64().unwrap_or(0) >= time);
    }

    /// The realm's event settings: user events saved, admin events saved, expiration (s).
    pub fn set_events_config(&self, enabled: bool, admin_enabled: bool, expiration: Option<i64>) {
        let mut e = self.shared.events.lock().unwrap();
        e.enabled = enabled;
        e.admin_enabled = admin_enabled;
        e.expiration = expiration;
    }

    /// `GET /admin/serverinfo` reports `version` instead of the release's (`None`: the release's).
    pub fn set_server_version(&self, version: Option<&str>) {
        self.shared.serverinfo.lock().unwrap().0 = version.map(str::to_string);
    }

    /// `GET /admin/serverinfo` answers `status` with Keycloak's error body (`None`: normally).
    pub fn serverinfo_status(&self, status: Option<u16>) {
        self.shared.serverinfo.lock().unwrap().1 = status;
    }

    /// Answer as `release` from now on.
    pub fn set_release(&self, release: Release) {
        *self.shared.release.lock().unwrap() = release;
    }

    pub fn set_latency(&self, d: Duration) {
        self.shared.faults.lock().unwrap().latency = d;
    }

    pub fn set_token_lifespan(&self, secs: u64) {
        self.shared.lifespan.store(secs, Ordering::SeqCst);
    }

    pub fn invalidate_tokens_after(&self, n: usize) {
        self.shared.faults.lock().unwrap().invalidate_after = Some(n);
    }

    /// Changes the discovery document: the token endpoint moves to `/moved/realms/{realm}/...`
    /// and the old URL answers 404, as after a hostname or proxy change.
    pub fn move_token_endpoint(&self) {
        self.shared.moved.store(true, Ordering::SeqCst);
    }

    pub fn journal(&self) -> Vec<JournalEntry> {
        self.shared.journal.lock().unwrap().clone()
    }

    pub fn clear_journal(&self) {
        self.shared.journal.lock().unwrap().clear();
    }

    /// How many requests arrived so far, answered or not: a request held by the latency is
    /// counted before it is journaled.
    pub fn received(&self) -> u64 {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// How many requests arrived and are not answered yet.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

/// Counts a request in flight until it is answered or dropped (its client went away).
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn json_response(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: u16, msg: &str) -> Response {
    json_response(status, json!({ "error": msg }))
}

async fn handle(
    State(sh): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sh.received.fetch_add(1, Ordering::SeqCst);
    sh.in_flight.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight(&sh.in_flight);
    let latency = sh.faults.lock().unwrap().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let slow = sh.faults.lock().unwrap().slow_users_page;
    if let Some((first, hold)) = slow {
        let asked = params(&query)
            .get("first")
            .and_then(|f| f.parse::<u64>().ok());
        if path.ends_with("/users") && asked == Some(first) {
            tokio::time::sleep(hold).await;
        }
    }
    let resp = route(&sh, &method, &path, &query, &headers, &body);
    sh.journal.lock().unwrap().push(JournalEntry {
        method: method.to_string(),
        path,
        query,
        status: resp.status().as_u16(),
    });
    resp
}

fn params(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let mut it = p.splitn(2, '=');
            Some((decode(it.next()?), decode(it.next().unwrap_or(""))))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(b);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(
    sh: &Shared,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let realm = sh.realm.read().unwrap().clone();
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match segs.as_slice() {
        ["realms", r, ".well-known", "openid-configuration"] if method == Method::GET => {
            if *r != realm.name {
                return error(404, "Realm does not exist");
            }
            discovery(
                &sh.base,
                realm.frontend_url.as_deref(),
                r,
                sh.moved.load(Ordering::SeqCst),
            )
        }
        ["realms", r, "protocol", "openid-connect", "certs"] if method == Method::GET => {
            if *r != realm.name {
                return error(404, "Realm does not exist");
            }
            json_response(
                200,
                json!({ "keys": [serde_json::to_value(sh.key.as_verification_key()).unwrap()] }),
            )
        }
        ["realms", r, "protocol", "openid-connect", "token"]
        | ["moved", "realms", r, "protocol", "openid-connect", "token"]
            if method == Method::POST =>
        {
            if path.starts_with("/moved/") != sh.moved.load(Ordering::SeqCst) {
                return error(404, "Unable to find matching target resource method");
            }
            if *r != realm.name {
                return error(404, "Realm does not exist");
            }
            let fault = {
                let mut f = sh.faults.lock().unwrap();
                if f.token_fail.is_empty() {
                    None
                } else {
                    Some(f.token_fail.remove(0))
                }
            };
            if let Some(status) = fault {
                return json_response(
                    status,
                    json!({"error": "unknown_error", "error_description": "For more on this error consult the server log."}),
                );
            }
            token(sh, &realm, headers, body)
        }
        ["admin", "realms", r, rest @ ..] => admin(sh, &realm, r, rest, query, headers),
        ["admin", "serverinfo"] if method == Method::GET => serverinfo(sh, headers),
        _ => error(404, "Unable to find matching target resource method"),
    }
}

/// The discovery document; with a frontend URL every URL in it names that host instead of the
/// server's own, as Keycloak 26.4 serves it.
fn discovery(base: &str, frontend: Option<&str>, realm: &str, moved: bool) -> Response {
    let base = frontend.unwrap_or(base);
    let iss = format!("{base}/realms/{realm}");
    let token_endpoint = if moved {
        format!("{base}/moved/realms/{realm}/protocol/openid-connect/token")
    } else {
        format!("{iss}/protocol/openid-connect/token")
    };
    json_response(
        200,
        json!({
            "issuer": iss,
            "authorization_endpoint": format!("{iss}/protocol/openid-connect/auth"),
            "token_endpoint": token_endpoint,
            "introspection_endpoint": format!("{iss}/protocol/openid-connect/token/introspect"),
            "userinfo_endpoint": format!("{iss}/protocol/openid-connect/userinfo"),
            "end_session_endpoint": format!("{iss}/protocol/openid-connect/logout"),
            "jwks_uri": format!("{iss}/protocol/openid-connect/certs"),
            "grant_types_supported": ["authorization_code", "implicit", "refresh_token", "password", "client_credentials"],
            "response_types_supported": ["code", "none", "id_token", "token", "id_token token", "code id_token", "code token", "code id_token token"],
            "subject_types_supported": ["public", "pairwise"],
            "id_token_signing_alg_values_supported": ["PS384", "RS384", "EdDSA", "ES384", "HS256", "HS512", "ES256", "RS256", "HS384", "ES512", "PS256", "PS512", "RS512"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post", "tls_client_auth", "client_secret_jwt"],
            "scopes_supported": ["openid", "profile", "email", "roles", "web-origins", "offline_access"],
            "claims_supported": ["aud", "sub", "iss", "auth_time", "name", "given_name", "family_name", "preferred_username", "email", "acr"]
        }),
    )
}

fn token_error(status: u16, code: &str, desc: &str) -> Response {
    json_response(status, json!({"error": code, "error_description": desc}))
}

fn token(sh: &Shared, realm: &Realm, headers: &HeaderMap, body: &[u8]) -> Response {
    let form = params(&String::from_utf8_lossy(body));
    let mut client_id = form.get("client_id").cloned();
    let mut secret = form.get("client_secret").cloned();
    if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        if let Some(b64) = auth.strip_prefix("Basic ") {
            if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                let raw = String::from_utf8_lossy(&raw).to_string();
                if let Some((id, sec)) = raw.split_once(':') {
                    client_id = Some(decode(id));
                    secret = Some(decode(sec));
                }
            }
        }
    }
    let Some(client_id) = client_id else {
        // Keycloak 26.4 answers a missing client_id as an unknown client.
        return token_error(
            401,
            "invalid_client",
            "Invalid client or Invalid client credentials",
        );
    };
    match form.get("grant_type").map(String::as_str) {
        None => return token_error(400, "invalid_request", "Missing form parameter: grant_type"),
        Some("client_credentials") => {}
        Some(_) => return token_error(400, "unsupported_grant_type", "Unsupported grant_type"),
    }
    let Some(client) = realm.clients.iter().find(|c| c.client_id == client_id) else {
        return token_error(
            401,
            "invalid_client",
            "Invalid client or Invalid client credentials",
        );
    };
    if !client.enabled {
        return token_error(
            401,
            "invalid_client",
            "Invalid client or Invalid client credentials",
        );
    }
    if client.public {
        return token_error(
            401,
            "unauthorized_client",
            "Public client not allowed to retrieve service account",
        );
    }
    if secret.is_none() || secret != client.secret {
        return token_error(
            401,
            "unauthorized_client",
            "Invalid client or Invalid client credentials",
        );
    }
    if !client.service_accounts {
        return token_error(
            401,
            "unauthorized_client",
            "Client not enabled to retrieve service account",
        );
    }
    let sa = realm.service_account(&client_id).cloned();
    let (sub, realm_roles, management) = match &sa {
        Some(u) => (
            u.id.clone(),
            realm.effective_roles(u).into_iter().collect::<Vec<_>>(),
            management_closure(
                u.client_roles
                    .get("realm-management")
                    .map(Vec::as_slice)
                    .unwrap_or(&[]),
            ),
        ),
        None => (
            format!("sa-{client_id}"),
            vec![format!("default-roles-{}", realm.name)],
            BTreeSet::new(),
        ),
    };
    let lifespan = sh.lifespan.load(Ordering::SeqCst);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let iss = format!(
        "{}/realms/{}",
        realm.frontend_url.as_deref().unwrap_or(&sh.base),
        realm.name
    );
    let mut resource_access = serde_json::Map::new();
    if !management.is_empty() {
        resource_access.insert(
            "realm-management".into(),
            json!({"roles": management.iter().collect::<Vec<_>>()}),
        );
    }
    resource_access.insert(
        "account".into(),
        json!({"roles": ["manage-account", "manage-account-links", "view-profile"]}),
    );
    let jti = sh.jti.fetch_add(1, Ordering::SeqCst);
    let claims = json!({
        "exp": now + lifespan, "iat": now, "jti": format!("trrtcc:{jti:08x}-emulator"), "iss": iss,
        "aud": ["realm-management", "account"], "sub": sub, "typ": "Bearer", "azp": client_id,
        "acr": "1", "allowed-origins": ["/*"], "realm_access": {"roles": realm_roles},
        "resource_access": resource_access, "scope": "profile email", "email_verified": false,
        "clientHost": "127.0.0.1", "preferred_username": format!("service-account-{client_id}"),
        "clientAddress": "127.0.0.1", "client_id": client_id
    });
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = format!("{{\"alg\":\"RS256\",\"typ\" : \"JWT\",\"kid\" : \"{KID}\"}}");
    let signing_input = format!("{}.{}", b64.encode(header), b64.encode(claims.to_string()));
    let sig = sh
        .key
        .sign(
            &CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
            signing_input.as_bytes(),
        )
        .expect("sign");
    let jwt = format!("{signing_input}.{}", b64.encode(sig));
    sh.tokens.lock().unwrap().insert(
        jwt.clone(),
        Issued {
            expires: Instant::now() + Duration::from_secs(lifespan),
            generation: sh.generation.load(Ordering::SeqCst),
            management,
        },
    );
    json_response(
        200,
        json!({"access_token": jwt, "expires_in": lifespan, "refresh_expires_in": 0, "token_type": "Bearer", "not-before-policy": 0, "scope": "profile email"}),
    )
}

/// `first` and `max` of a paged request (of `/users` when `users`), after the
/// `cap_page_size` and `ignore_first` faults.
fn bounds(
    sh: &Shared,
    q: &HashMap<String, String>,
    default_first: usize,
    default_max: usize,
    users: bool,
) -> (usize, usize) {
    let first = q
        .get("first")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(default_first);
    let max = q
        .get("max")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(default_max);
    let f = sh.faults.lock().unwrap();
    let first = match f.ignore_first {
        Some(IgnoreFirst::Everywhere) => 0,
        Some(IgnoreFirst::Users) if users => 0,
        _ => first,
    };
    (first, f.cap.map_or(max, |c| max.min(c)))
}

/// The `short_page_every` fault: every n-th answer of two or more items keeps its first half.
fn shorten<T>(sh: &Shared, mut items: Vec<T>) -> Vec<T> {
    let mut f = sh.faults.lock().unwrap();
    if f.short_every > 0 && items.len() >= 2 {
        f.paged += 1;
        if f.paged.is_multiple_of(f.short_every) {
            items.truncate(items.len().div_ceil(2));
        }
    }
    items
}

fn page<T: Clone>(
    sh: &Shared,
    items: &[T],
    q: &HashMap<String, String>,
    default_first: usize,
    default_max: usize,
) -> Vec<T> {
    let (first, max) = bounds(sh, q, default_first, default_max, false);
    shorten(sh, items.iter().skip(first).take(max).cloned().collect())
}

fn user_json(realm: &Realm, u: &User, brief: bool, served: Served, release: Release) -> Value {
    let mut v = user_json_without_metadata(realm, u, brief, served, release);
    if lists_metadata(brief, served, release) {
        v["userProfileMetadata"] = user_profile_metadata();
    }
    v
}

/// [`user_json`] as the text of the answer, with the profile's metadata (the same for every
/// user, and most of a 26.4 listing's bytes) serialized once: built as a value for each user,
/// it cost the emulator more CPU than seedkeeper spent reading the whole listing (3 s against
/// 0.4 s at 100,000 users, on the 2 cores the run shares). The same bytes: keys in order, the
/// metadata's before `username`, the last.
fn user_json_text(
    realm: &Realm,
    u: &User,
    brief: bool,
    served: Served,
    release: Release,
) -> String {
    static METADATA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = user_json_without_metadata(realm, u, brief, served, release).to_string();
    if !lists_metadata(brief, served, release) {
        return text;
    }
    let metadata = METADATA.get_or_init(|| user_profile_metadata().to_string());
    // `"username"` is the last key and always there; inside a string a quote is escaped, so
    // this is the key.
    let at = text.rfind(",\"username\":").expect("a user has a username");
    format!(
        "{},\"userProfileMetadata\":{metadata}{}",
        &text[..at],
        &text[at..]
    )
}

/// Whether a user answered so carries its profile's metadata: always by id; on the listing,
/// whenever it is answered in full, up to 26.5.
fn lists_metadata(brief: bool, served: Served, release: Release) -> bool {
    match served {
        Served::ById => true,
        Served::Listing => {
            let listed_in_full = !release.honours_brief_listing();
            (!brief || listed_in_full) && release.lists_profile_metadata()
        }
        Served::RoleMembers | Served::GroupMembers => false,
    }
}

fn user_json_without_metadata(
    realm: &Realm,
    u: &User,
    brief: bool,
    served: Served,
    release: Release,
) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("id".into(), json!(u.id));
    m.insert("username".into(), json!(u.username));
    if let Some(v) = &u.first_name {
        m.insert("firstName".into(), json!(v));
    }
    if let Some(v) = &u.last_name {
        m.insert("lastName".into(), json!(v));
    }
    if let Some(v) = &u.email {
        m.insert("email".into(), json!(v));
    }
    m.insert("emailVerified".into(), json!(u.email_verified));
    if let Some(c) = u
        .created
        .or(release.stamps_created().then_some(realm.loaded_at))
    {
        m.insert("createdTimestamp".into(), json!(c));
    }
    m.insert("enabled".into(), json!(u.enabled));
    // 26.4 answers the users listing in full whatever briefRepresentation says; members, and
    // every listing from 26.5 on, honour it.
    let listed_in_full = served == Served::Listing && !release.honours_brief_listing();
    let full = !brief || served == Served::ById || listed_in_full;
    if full {
        m.insert("totp".into(), json!(false));
        m.insert("disableableCredentialTypes".into(), json!([]));
        m.insert("requiredActions".into(), json!([]));
        m.insert("notBefore".into(), json!(0));
    }
    if let Some(c) = &u.service_account_client {
        m.insert("serviceAccountClientId".into(), json!(c));
    }
    let access = match served {
        Served::Listing | Served::ById => true,
        Served::RoleMembers => release.role_members_carry_access(),
        Served::GroupMembers => false,
    };
    if access {
        m.insert("access".into(), json!({"manage": false}));
    }
    Value::Object(m)
}

fn role_json(realm: &Realm, r: &Role) -> Value {
    let mut v = json!({"id": r.id, "name": r.name, "composite": r.is_composite(), "clientRole": false, "containerId": realm.name});
    if let Some(d) = &r.description {
        v["description"] = json!(d);
    }
    v
}

/// A client role as Keycloak answers it: its client's internal id as `containerId`.
fn client_role_json(client: &Client, r: &Role) -> Value {
    let mut v = json!({"id": r.id, "name": r.name, "composite": r.is_composite(), "clientRole": true, "containerId": client.id});
    if let Some(d) = &r.description {
        v["description"] = json!(d);
    }
    v
}

/// A client as `GET clients` lists it: the fields seedkeeper reads and a few more, as Keycloak
/// types them.
fn client_json(c: &Client) -> Value {
    json!({"id": c.id, "clientId": c.client_id, "enabled": c.enabled, "publicClient": c.public,
           "serviceAccountsEnabled": c.service_accounts, "bearerOnly": false})
}

/// The default user profile's metadata, as Keycloak 26.4 attaches it to every listed user.
fn user_profile_metadata() -> Value {
    let attr = |name: &str, required: bool, read_only: bool, validators: Value| {
        json!({"name": name, "displayName": format!("${{{name}}}"), "required": required,
               "readOnly": read_only, "validators": validators, "multivalued": false})
    };
    let one = json!({"max": "1"});
    let len = |min: Option<u32>| match min {
        Some(min) => json!({"max": 255, "ignore.empty.value": true, "min": min}),
        None => json!({"max": 255, "ignore.empty.value": true}),
    };
    let ignore = json!({"ignore.empty.value": true});
    json!({
        "attributes": [
            attr("username", true, true, json!({"username-prohibited-characters": ignore, "multivalued": one, "length": len(Some(3)), "up-username-not-idn-homograph": ignore})),
            attr("email", false, false, json!({"multivalued": one, "length": len(None), "email": ignore})),
            attr("firstName", false, false, json!({"person-name-prohibited-characters": ignore, "multivalued": one, "length": len(None)})),
            attr("lastName", false, false, json!({"person-name-prohibited-characters": ignore, "multivalued": one, "length": len(None)})),
        ],
        "groups": [{"name": "user-metadata", "displayHeader": "User metadata", "displayDescription": "Attributes, which refer to user metadata"}]
    })
}

/// A group as `roles/{role}/groups` lists it: no counts, a parent only for a subgroup.
fn group_json(g: &Group) -> Value {
    let mut v = json!({"id": g.id, "name": g.name, "path": g.path, "subGroups": []});
    if let Some(p) = &g.parent {
        v["parentId"] = json!(p);
    }
    v
}

/// A group as the group listings (`groups`, `groups/{id}/children`) give it, with the caller's
/// access (a service account with view-users may view and view members, nothing more).
fn listed_group_json(g: &Group) -> Value {
    let mut v = group_json(g);
    v["subGroupCount"] = json!(g.children.len());
    v["access"] = json!({"view": true, "viewMembers": true, "manageMembers": false, "manage": false, "manageMembership": false});
    v
}

/// `GET /admin/serverinfo` as Keycloak 26.4 to 26.7 answer a realm's service account: 401
/// without a valid token, 403 without any realm-management role, else 200. From 26.5 the
/// server's version (`systemInfo`, nothing else of it) is in it with `manage-realm` (or
/// `realm-admin`); never for the view and query roles seedkeeper holds, and never on 26.4, not
/// even for `realm-admin` (checked on 26.4.7, 26.5.6 and 26.7.3).
fn serverinfo(sh: &Shared, headers: &HeaderMap) -> Response {
    let management = {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let tokens = sh.tokens.lock().unwrap();
        match token.and_then(|t| tokens.get(t)) {
            Some(t)
                if t.expires > Instant::now()
                    && t.generation == sh.generation.load(Ordering::SeqCst) =>
            {
                t.management.clone()
            }
            _ => return error(401, "HTTP 401 Unauthorized"),
        }
    };
    if management.is_empty() {
        return error(403, FORBIDDEN);
    }
    let (version, status) = sh.serverinfo.lock().unwrap().clone();
    if let Some(status) = status {
        return error(status, &format!("HTTP {status}"));
    }
    let release = *sh.release.lock().unwrap();
    let mut v = json!({"profileInfo": {"name": "default", "disabledFeatures": [], "previewFeatures": [], "experimentalFeatures": []}});
    if release.shows_version_to_manage_realm() && management.contains("manage-realm") {
        let version = version.unwrap_or_else(|| release.version().to_string());
        v["systemInfo"] = json!({ "version": version });
    }
    json_response(200, v)
}

fn admin(
    sh: &Shared,
    realm: &Realm,
    path_realm: &str,
    rest: &[&str],
    query: &str,
    headers: &HeaderMap,
) -> Response {
    // 1. bearer token
    let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return error(401, "HTTP 401 Unauthorized");
    };
    let management = {
        let tokens = sh.tokens.lock().unwrap();
        match tokens.get(token) {
            Some(t)
                if t.expires > Instant::now()
                    && t.generation == sh.generation.load(Ordering::SeqCst) =>
            {
                t.management.clone()
            }
            _ => return error(401, "HTTP 401 Unauthorized"),
        }
    };
    if path_realm != realm.name {
        return error(404, "Realm not found.");
    }
    // Faults apply to authenticated admin calls, in the order they were queued.
    {
        let mut f = sh.faults.lock().unwrap();
        if let Some(n) = f.invalidate_after {
            if n == 0 {
                f.invalidate_after = None;
                sh.generation.fetch_add(1, Ordering::SeqCst);
            } else {
                f.invalidate_after = Some(n - 1);
            }
        }
        let deferred = f.faults_after > 0;
        if deferred {
            f.faults_after -= 1;
        }
        if !deferred && !f.admin_fail.is_empty() {
            let status = f.admin_fail.remove(0);
            let mut r = json_response(
                status,
                json!({"error": "unknown_error", "error_description": "For more on this error consult the server log."}),
            );
            if status == 429 {
                r = (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("content-type", "application/json"), ("retry-after", "1")],
                    json!({"error": "Too Many Requests"}).to_string(),
                )
                    .into_response();
            }
            return r;
        }
        if !deferred && !f.html.is_empty() {
            let status = f.html.remove(0);
            return (
                StatusCode::from_u16(status).unwrap(),
                [("content-type", "text/html")],
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            )
                .into_response();
        }
        if !deferred && f.malformed > 0 {
            f.malformed -= 1;
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                "[{\"id\":\"trunc",
            )
                .into_response();
        }
    }
    let q = params(query);
    let brief = q
        .get("briefRepresentation")
        .map(|v| v == "true")
        .unwrap_or(false);
    let can = |r: &str| management.contains(r);
    let release = *sh.release.lock().unwrap();
    match rest {
        ["users"] => {
            if !can("query-users") {
                return error(403, FORBIDDEN);
            }
            if !can("view-users") {
                return json_response(200, json!([]));
            }
            let (first, max) = bounds(sh, &q, 0, 100, true);
            let hide = sh.faults.lock().unwrap().hide_every;
            // The query takes its page first; the permission filter then drops users from it.
            let page: Vec<String> = realm
                .humans
                .iter()
                .enumerate()
                .skip(first)
                .take(max)
                .filter(|(pos, _)| hide == 0 || pos % hide != hide - 1)
                .map(|(_, &i)| {
                    user_json_text(realm, &realm.users[i], brief, Served::Listing, release)
                })
                .collect();
            let body = format!("[{}]", shorten(sh, page).join(","));
            (StatusCode::OK, [("content-type", "application/json")], body).into_response()
        }
        ["events"] | ["admin-events"] => {
            if !can("view-events") {
                return error(403, FORBIDDEN);
            }
            let store = sh.events.lock().unwrap();
            let (list, on) = if rest == ["events"] {
                (&store.user, store.enabled)
            } else {
                (&store.admin, store.admin_enabled)
            };
            let from = q
                .get("dateFrom")
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(i64::MIN);
            let mut matching: Vec<Value> = if on {
                list.iter()
                    .filter(|e| e["time"].as_i64().unwrap_or(0) >= from)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            // Oldest first with direction=asc, newest first otherwise; stable within a time.
            matching.sort_by_key(|e| e["time"].as_i64().unwrap_or(0));
            if q.get("direction").map(String::as_str) != Some("asc") {
                matching.reverse();
            }
            let first = q
                .get("first")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0usize);
            let max = q
                .get("max")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100usize);
            let page: Vec<Value> = matching.into_iter().skip(first).take(max).collect();
            json_response(200, Value::Array(page))
        }
        ["events", "config"] => {
            if !can("view-events") {
                return error(403, FORBIDDEN);
            }
            let store = sh.events.lock().unwrap();
            let mut v = json!({"eventsEnabled": store.enabled, "eventsListeners": ["jboss-logging"],
                "enabledEventTypes": [], "adminEventsEnabled": store.admin_enabled, "adminEventsDetailsEnabled": true});
            if let Some(x) = store.expiration {
                v["eventsExpiration"] = json!(x);
            }
            json_response(200, v)
        }
        ["users", "count"] => {
            if !can("query-users") {
                return error(403, FORBIDDEN);
            }
            let short = sh.faults.lock().unwrap().count_short;
            json_response(200, json!(realm.humans.len().saturating_sub(short)))
        }
        ["users", id] => match realm.by_id.get(*id) {
            Some(i) if can("view-users") => json_response(
                200,
                user_json(realm, &realm.users[*i], false, Served::ById, release),
            ),
            Some(_) => error(403, FORBIDDEN),
            None => error(404, "User not found"),
        },
        ["users", id, "role-mappings", "realm", rest @ ..] => {
            if !can("view-users") {
                return error(403, FORBIDDEN);
            }
            let Some(i) = realm.by_id.get(*id) else {
                return error(404, "User not found");
            };
            let u = &realm.users[*i];
            let names: Vec<String> = if rest == ["composite"] {
                realm.effective_roles(u).into_iter().collect()
            } else {
                u.realm_roles.clone()
            };
            json_response(
                200,
                Value::Array(
                    names
                        .iter()
                        .filter_map(|n| realm.role(n))
                        .map(|r| role_json(realm, r))
                        .collect(),
                ),
            )
        }
        ["roles"] => {
            if !can("view-realm") {
                return error(403, FORBIDDEN);
            }
            let all: Vec<Value> = realm.roles.iter().map(|r| role_json(realm, r)).collect();
            json_response(200, Value::Array(page(sh, &all, &q, 0, usize::MAX)))
        }
        ["roles", name] => match realm.role(name) {
            Some(r) if can("view-realm") => json_response(200, role_json(realm, r)),
            Some(_) => error(403, FORBIDDEN),
            None => error(404, "Could not find role"),
        },
        ["roles", name, "composites", rest @ ..] if rest.is_empty() || rest == ["realm"] => {
            match realm.role(name) {
                Some(r) if can("view-realm") => {
                    let mut all = realm.composites_json(r);
                    if rest == ["realm"] {
                        all.retain(|c| c["clientRole"] == json!(false));
                    }
                    json_response(200, Value::Array(all))
                }
                Some(_) => error(403, FORBIDDEN),
                None => error(404, "Could not find role"),
            }
        }
        ["clients"] => {
            // Observed on Keycloak 26.4: query-clients alone lists no client; neither is 403.
            if !can("query-clients") {
                return error(403, FORBIDDEN);
            }
            if !can("view-clients") {
                return json_response(200, json!([]));
            }
            let all: Vec<Value> = realm.clients.iter().map(client_json).collect();
            json_response(200, Value::Array(page(sh, &all, &q, 0, usize::MAX)))
        }
        ["clients", id, "roles", rest @ ..] => {
            // The role listing needs query-clients; a role's composites, users and groups
            // view-clients (observed on Keycloak 26.4).
            let allowed = can("view-clients") || (rest.is_empty() && can("query-clients"));
            if !allowed {
                return error(403, FORBIDDEN);
            }
            let Some(client) = realm.client_by_id(id) else {
                return error(404, "Could not find client");
            };
            let roles = realm
                .client_roles
                .get(&client.client_id)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if rest.is_empty() {
                let all: Vec<Value> = roles.iter().map(|r| client_role_json(client, r)).collect();
                return json_response(200, Value::Array(page(sh, &all, &q, 0, usize::MAX)));
            }
            let Some(role) = roles.iter().find(|r| r.name == rest[0]) else {
                return error(404, "Could not find role");
            };
            match &rest[1..] {
                [] => json_response(200, client_role_json(client, role)),
                ["composites"] => json_response(200, Value::Array(realm.composites_json(role))),
                ["users"] => {
                    if !can("query-users") {
                        return error(403, FORBIDDEN);
                    }
                    let key = (client.client_id.clone(), role.name.clone());
                    let members: Vec<Value> = realm
                        .client_role_members
                        .get(&key)
                        .map(|m| {
                            m.iter()
                                .map(|i| {
                                    let u = &realm.users[*i];
                                    user_json(realm, u, brief, Served::RoleMembers, release)
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    json_response(200, Value::Array(page(sh, &members, &q, 0, 100)))
                }
                ["groups"] => {
                    let mut gs: Vec<&Group> = realm
                        .groups
                        .values()
                        .filter(|g| {
                            g.client_roles
                                .iter()
                                .any(|(c, r)| *c == client.client_id && *r == role.name)
                        })
                        .collect();
                    gs.sort_by(|a, b| a.path.cmp(&b.path));
                    let all: Vec<Value> = gs.into_iter().map(group_json).collect();
                    json_response(200, Value::Array(page(sh, &all, &q, 0, 100)))
                }
                _ => error(404, "Unable to find matching target resource method"),
            }
        }
        ["roles", name, "users"] => {
            if !(can("view-realm") && can("query-users")) {
                return error(403, FORBIDDEN);
            }
            if realm.role(name).is_none() {
                return error(404, "Could not find role");
            }
            let members: Vec<Value> = realm
                .role_members
                .get(*name)
                .map(|m| {
                    m.iter()
                        .map(|i| {
                            user_json(realm, &realm.users[*i], brief, Served::RoleMembers, release)
                        })
                        .collect()
                })
                .unwrap_or_default();
            json_response(200, Value::Array(page(sh, &members, &q, 0, 100)))
        }
        ["roles", name, "groups"] => {
            if !(can("view-realm") && can("query-groups")) {
                return error(403, FORBIDDEN);
            }
            if realm.role(name).is_none() {
                return error(404, "Could not find role");
            }
            let mut gs: Vec<&Group> = realm
                .groups
                .values()
                .filter(|g| g.realm_roles.iter().any(|r| r == name))
                .collect();
            gs.sort_by(|a, b| a.path.cmp(&b.path));
            let all: Vec<Value> = gs.into_iter().map(group_json).collect();
            json_response(200, Value::Array(page(sh, &all, &q, 0, 100)))
        }
        ["groups"] => {
            if !can("query-groups") {
                return error(403, FORBIDDEN);
            }
            let all: Vec<Value> = realm
                .top_groups
                .iter()
                .map(|id| listed_group_json(&realm.groups[id]))
                .collect();
            json_response(200, Value::Array(page(sh, &all, &q, 0, 100)))
        }
        ["groups", id, rest @ ..] => {
            if !can("query-groups") {
                return error(403, FORBIDDEN);
            }
            let Some(g) = realm.groups.get(*id) else {
                return error(404, "Could not find group by id");
            };
            match rest {
                [] => json_response(200, group_json(g)),
                ["children"] => {
                    let all: Vec<Value> = g
                        .children
                        .iter()
                        .map(|c| listed_group_json(&realm.groups[c]))
                        .collect();
                    json_response(200, Value::Array(page(sh, &all, &q, 0, 10)))
                }
                ["members"] => {
                    if !can("view-users") {
                        return error(403, FORBIDDEN);
                    }
                    let all: Vec<Value> = realm
                        .group_members
                        .get(*id)
                        .map(|m| {
                            m.iter()
                                .map(|i| {
                                    let u = &realm.users[*i];
                                    user_json(realm, u, brief, Served::GroupMembers, release)
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    json_response(200, Value::Array(page(sh, &all, &q, 0, 100)))
                }
                _ => error(404, "Unable to find matching target resource method"),
            }
        }
        _ => {
            let _ = HashSet::<u8>::new();
            error(404, "Unable to find matching target resource method")
        }
    }
}

/// The listing's text is the bytes of the value every other answer serializes, for every
/// release, representation and way a user is served, usernames and names that hold the
/// metadata's splice point as text included.
#[test]
fn a_user_as_text_is_the_user_as_a_value_serialized() {
    let users = vec![
        json!({"id": "a1", "username": "plain", "email": "p@x.test", "enabled": true}),
        json!({"id": "a2", "username": "x,\"username\":y", "firstName": ",\"username\":\"z\"",
               "lastName": "L", "enabled": false, "createdTimestamp": 5}),
        json!({"id": "a3", "username": "service-account-c", "serviceAccountClientId": "c", "enabled": true}),
    ];
    let realm = Realm::load(&json!({"realm": "t", "users": users}));
    let served = [
        Served::Listing,
        Served::ById,
        Served::RoleMembers,
        Served::GroupMembers,
    ];
    let mut compared = 0;
    for release in Release::ALL {
        for brief in [false, true] {
            for &how in &served {
                for u in &realm.users {
                    let value = user_json(&realm, u, brief, how, release).to_string();
                    assert_eq!(user_json_text(&realm, u, brief, how, release), value);
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, 3 * 2 * 4 * 3);
}
