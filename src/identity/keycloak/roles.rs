//! Who holds the mapped realm roles: `roles/{role}/users` lists direct members only
//! (keycloak#37209), so for each mapped role the roles that grant it through composites are
//! found, then the direct members of those and the members of the groups (and subgroups) that
//! carry them. Only these privileged users are held in memory.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::client::{enc, Keyed};
use super::KeycloakSource;
use crate::error::Result;
use crate::identity::{granting_roles, RoleGraph};

#[derive(Debug, Deserialize)]
pub(super) struct IdRep {
    pub(super) id: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct RoleRep {
    pub(super) name: String,
    #[serde(default)]
    pub(super) composite: bool,
}

impl Keyed for IdRep {
    fn key(&self) -> &str {
        &self.id
    }
}

impl Keyed for RoleRep {
    fn key(&self) -> &str {
        &self.name
    }
}

impl KeycloakSource {
    /// sub -> relevant roles, for every user who holds one (directly, via a composite, or via a
    /// group or a parent group).
    pub(super) async fn privileged(
        &self,
        cancel: &CancellationToken,
    ) -> Result<HashMap<String, BTreeSet<String>>> {
        let roles: Vec<RoleRep> = self
            .client
            .get_all("roles", &[("briefRepresentation", "true".into())], cancel)
            .await?;
        let mut graph = RoleGraph::default();
        for r in roles.iter().filter(|r| r.composite) {
            let children: Vec<RoleRep> = self
                .client
                .get(
                    &format!("roles/{}/composites/realm", enc(&r.name)),
                    &[],
                    cancel,
                )
                .await?;
            graph.composites.insert(
                r.name.clone(),
                children.into_iter().map(|c| c.name).collect(),
            );
        }
        let known: HashSet<&str> = roles.iter().map(|r| r.name.as_str()).collect();
        // Each granting role is resolved on its own (its direct users, then its groups and their
        // subgroups), all roles at once: the same requests, no longer one after the other.
        let targets = granting_roles(&graph, &self.filter);
        let unique: BTreeSet<&String> = targets
            .values()
            .flatten()
            .filter(|r| known.contains(r.as_str()))
            .collect();
        let holders = futures_util::future::try_join_all(
            unique.iter().map(|role| self.holders_of(role, cancel)),
        )
        .await?;
        let by_role: HashMap<&String, Vec<String>> = unique.into_iter().zip(holders).collect();
        let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (target, granting) in &targets {
            for ids in granting.iter().filter_map(|r| by_role.get(r)) {
                for id in ids {
                    out.entry(id.clone()).or_default().insert(target.clone());
                }
            }
        }
        Ok(out)
    }

    /// Ids of the users holding `role` directly or through a group or a parent group.
    pub(super) async fn holders_of(
        &self,
        role: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>> {
        let brief = [("briefRepresentation", "true".to_string())];
        // Each listing ends with an empty page, so the two listings of a role, and of a group,
        // are made side by side: as many round trips one after the other as before that page.
        let (users, groups): (Vec<IdRep>, Vec<IdRep>) = futures_util::future::try_join(
            self.client
                .get_all(&format!("roles/{}/users", enc(role)), &brief, cancel),
            self.client
                .get_all(&format!("roles/{}/groups", enc(role)), &brief, cancel),
        )
        .await?;
        let mut out: Vec<String> = users.into_iter().map(|u| u.id).collect();
        let mut stack: Vec<String> = groups.into_iter().map(|g| g.id).collect();
        let mut seen = HashSet::new();
        while let Some(gid) = stack.pop() {
            if !seen.insert(gid.clone()) {
                continue;
            }
            let (members, children): (Vec<IdRep>, Vec<IdRep>) = futures_util::future::try_join(
                self.client
                    .get_all(&format!("groups/{gid}/members"), &brief, cancel),
                self.client
                    .get_all(&format!("groups/{gid}/children"), &brief, cancel),
            )
            .await?;
            out.extend(members.into_iter().map(|m| m.id));
            stack.extend(children.into_iter().map(|c| c.id));
        }
        Ok(out)
    }
}
