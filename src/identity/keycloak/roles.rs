//! Who holds the mapped realm roles: `roles/{role}/users` lists direct members only
//! (keycloak#37209), so for each mapped role the roles that grant it through composites are
//! found, then the direct members of those and the members of the groups (and subgroups) that
//! carry them. The holders go to the identity stage a page at a time, as grants: none is held.
//!
//! A client role can be a composite that holds realm roles (directly or through other client
//! roles), and Keycloak puts those realm roles in its holders' `realm_access.roles` and
//! `role-mappings/realm/composite`. So the graph covers client roles too: every client's roles
//! are listed (`clients`, `clients/{id}/roles`, which need the realm-management role
//! `view-clients`), and the composites of every composite role, realm or client, are read
//! (`roles/{name}/composites`, `clients/{id}/roles/{name}/composites`: one request each).
//! The realm's default role (`default-roles-<realm>`) is an ordinary composite here: its
//! holders are listed like any other role's.

use std::collections::{BTreeMap, HashSet};

use futures_util::{stream, StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::client::{path_segment, FirstPage, Keyed, Pages};
use super::KeycloakSource;
use crate::error::{Error, Result};
use crate::identity::{granting_roles, Grant, RoleGraph, RoleKey, StageSender, Staged};

#[derive(Debug, Deserialize)]
pub(super) struct IdRep {
    pub(super) id: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct RoleRep {
    pub(super) name: String,
    #[serde(default)]
    pub(super) composite: bool,
    #[serde(default, rename = "clientRole")]
    pub(super) client_role: bool,
    /// The realm's id for a realm role, the client's internal id for a client role.
    #[serde(default, rename = "containerId")]
    pub(super) container_id: Option<String>,
}

impl RoleRep {
    /// The role in the graph: a client role by its client's internal id (the id the client's
    /// endpoints take), a realm role by name.
    fn key(&self) -> RoleKey {
        match (&self.container_id, self.client_role) {
            (Some(client), true) => RoleKey::Client(client.clone(), self.name.clone()),
            _ => RoleKey::Realm(self.name.clone()),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ClientRep {
    pub(super) id: String,
}

impl Keyed for IdRep {
    fn key(&self) -> &str {
        &self.id
    }
}

impl Keyed for ClientRep {
    fn key(&self) -> &str {
        &self.id
    }
}

impl Keyed for RoleRep {
    fn key(&self) -> &str {
        &self.name
    }
}

/// The admin path of a role: `roles/{name}` or `clients/{id}/roles/{name}`.
fn role_path(role: &RoleKey) -> String {
    match role {
        RoleKey::Realm(name) => format!("roles/{}", path_segment(name)),
        RoleKey::Client(client, name) => format!(
            "clients/{}/roles/{}",
            path_segment(client),
            path_segment(name)
        ),
    }
}

impl KeycloakSource {
    /// Sends every user who holds a mapped realm role (directly, via a composite realm or client
    /// role, or via a group or a parent group) to the stage with that role, as
    /// [`Staged::Grants`], a page of members at a time: nothing of the holders is kept, however
    /// many users hold a role.
    pub(super) async fn send_grants(
        &self,
        out: &StageSender,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let graph = self.role_graph(cancel).await?;
        // Each granting role, with the mapped roles holding it grants.
        let mut grants: BTreeMap<&RoleKey, Vec<&str>> = BTreeMap::new();
        let targets = granting_roles(&graph.graph, &self.filter);
        for (target, granting) in &targets {
            for role in granting.iter().filter(|r| graph.known.contains(*r)) {
                grants.entry(role).or_default().push(target);
            }
        }
        // Each granting role is resolved on its own (its direct users, then its groups and their
        // subgroups), all roles at once: the same requests, no longer one after the other.
        futures_util::future::try_join_all(
            grants
                .iter()
                .map(|(role, targets)| self.send_holders(role, targets, out, cancel)),
        )
        .await?;
        Ok(())
    }

    /// The realm's roles, realm and client, and the composites of each composite one.
    /// Requests: the realm roles and the clients (paged), each client's roles (paged, at most
    /// `keycloak.concurrency` clients at a time), one per composite role.
    async fn role_graph(&self, cancel: &CancellationToken) -> Result<KnownRoles> {
        let brief = [("briefRepresentation", "true".to_string())];
        let (realm_roles, clients): (Vec<RoleRep>, Vec<ClientRep>) =
            futures_util::future::try_join(self.client.get_all("roles", &brief, cancel), async {
                self.client
                    .get_all("clients", &[], cancel)
                    .await
                    .map_err(|e| self.client.view_clients_needed(e, "clients"))
            })
            .await?;
        let concurrency = self.client.settings.concurrency.max(1);
        let brief = &brief;
        let client_roles: Vec<Vec<RoleRep>> = stream::iter(clients)
            .map(|c| async move {
                let path = format!("clients/{}/roles", path_segment(&c.id));
                self.client
                    .get_all::<RoleRep>(&path, brief, cancel)
                    .await
                    .map_err(|e| self.client.view_clients_needed(e, &path))
                    .map(|roles| {
                        // Keycloak names the client in each role's containerId; the listing's
                        // client is the same, and is what the role's endpoints take.
                        roles
                            .into_iter()
                            .map(|mut r| {
                                r.client_role = true;
                                r.container_id = Some(c.id.clone());
                                r
                            })
                            .collect()
                    })
            })
            .buffered(concurrency)
            .try_collect()
            .await?;
        let all: Vec<RoleRep> = realm_roles
            .into_iter()
            .chain(client_roles.into_iter().flatten())
            .collect();
        let known: HashSet<RoleKey> = all.iter().map(RoleRep::key).collect();
        let wanted: Vec<RoleKey> = all
            .iter()
            .filter(|r| r.composite)
            .map(RoleRep::key)
            .collect();
        let composites: Vec<(RoleKey, Vec<RoleKey>)> = stream::iter(wanted)
            .map(|key| self.composites_of(key, cancel))
            .buffered(concurrency)
            .try_collect()
            .await?;
        let mut graph = RoleGraph::default();
        graph.composites.extend(composites);
        Ok(KnownRoles { graph, known })
    }

    /// The roles, realm and client, that the composite `role` holds directly.
    async fn composites_of(
        &self,
        role: RoleKey,
        cancel: &CancellationToken,
    ) -> Result<(RoleKey, Vec<RoleKey>)> {
        let path = format!("{}/composites", role_path(&role));
        let children: Vec<RoleRep> =
            self.client
                .get(&path, &[], cancel)
                .await
                .map_err(|e| match role {
                    RoleKey::Client(..) => self.client.view_clients_needed(e, &path),
                    RoleKey::Realm(_) => e,
                })?;
        Ok((role, children.iter().map(RoleRep::key).collect()))
    }

    /// Sends the users holding `role` (realm or client) directly or through a group or a parent
    /// group, each with the mapped roles `targets` that `role` grants, a page at a time.
    async fn send_holders(
        &self,
        role: &RoleKey,
        targets: &[&str],
        out: &StageSender,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let brief = [("briefRepresentation", "true".to_string())];
        let base = role_path(role);
        // Each listing ends with an empty page, so the two listings of a role, and of a group,
        // are made side by side: as many round trips one after the other as before that page.
        let (_, groups): ((), Vec<IdRep>) = futures_util::future::try_join(
            self.send_members(format!("{base}/users"), targets, out, cancel),
            self.client
                .get_all(&format!("{base}/groups"), &brief, cancel),
        )
        .await
        .map_err(|e| match role {
            RoleKey::Client(..) => self.client.view_clients_needed(e, &base),
            RoleKey::Realm(_) => e,
        })?;
        let mut stack: Vec<String> = groups.into_iter().map(|g| g.id).collect();
        let mut seen = HashSet::new();
        while let Some(gid) = stack.pop() {
            if !seen.insert(gid.clone()) {
                continue;
            }
            let group = format!("groups/{}", path_segment(&gid));
            let (_, children): ((), Vec<IdRep>) = futures_util::future::try_join(
                self.send_members(format!("{group}/members"), targets, out, cancel),
                self.client
                    .get_all(&format!("{group}/children"), &brief, cancel),
            )
            .await?;
            stack.extend(children.into_iter().map(|c| c.id));
        }
        Ok(())
    }

    /// Sends each page of the users listed at `path` (a role's or a group's members) as grants
    /// of `targets`.
    async fn send_members(
        &self,
        path: String,
        targets: &[&str],
        out: &StageSender,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let brief = [("briefRepresentation", "true".to_string())];
        let mut pages = Pages::new(path, &brief);
        // Kept nowhere, so a server that ignores `first` is told by its pages repeating the first.
        let mut first = FirstPage::default();
        while let Some(page) = pages.next::<IdRep>(&self.client, cancel).await? {
            if !first.advances(&page) {
                return Err(pages.repeating());
            }
            let grants = page
                .iter()
                .flat_map(|u| {
                    targets.iter().map(|t| Grant {
                        sub: u.id.clone(),
                        role: (*t).to_string(),
                    })
                })
                .collect();
            out.send(Staged::Grants(grants))
                .await
                .map_err(|_| Error::Cancelled)?;
        }
        Ok(())
    }
}

/// The role graph and every role the realm lists.
struct KnownRoles {
    graph: RoleGraph,
    known: HashSet<RoleKey>,
}
