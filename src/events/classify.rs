//! What events mean: which users a batch re-syncs, which changes ask for a full run
//! ([`Resync`]), and the [`StreamPosition`] that says which events at one millisecond were
//! applied.

use std::collections::BTreeSet;

use crate::identity::keycloak::{AdminEvent, UserEvent};

/// User event types that change what seedkeeper stores about the user.
const USER_EVENT_TYPES: &[&str] = &[
    "REGISTER",
    "UPDATE_PROFILE",
    "UPDATE_EMAIL",
    "VERIFY_EMAIL",
    "DELETE_ACCOUNT",
    "IDENTITY_PROVIDER_FIRST_LOGIN",
    "USER_DISABLED_BY_PERMANENT_LOCKOUT",
];

/// The re-sync a batch of events asks for: some users, or a full run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Resync {
    /// Users to re-sync, by id.
    pub users: BTreeSet<String>,
    /// A change whose effect on users is unknown: a full run.
    pub full_run: Option<String>,
}

/// What one admin event means for seedkeeper.
pub(crate) fn classify_admin(e: &AdminEvent, wanted: &mut Resync) {
    let path = e.resource_path.as_deref().unwrap_or("");
    let kind = e.resource_type.as_deref().unwrap_or("");
    let mut segs = path.split('/');
    if segs.next() == Some("users") {
        if let Some(id) = segs.next().filter(|s| !s.is_empty()) {
            if matches!(
                kind,
                "USER" | "REALM_ROLE_MAPPING" | "GROUP_MEMBERSHIP" | "CLIENT_ROLE_MAPPING"
            ) {
                wanted.users.insert(id.to_string());
                return;
            }
        }
    }
    // Roles, groups, their mappings and realm imports reach users seedkeeper cannot name.
    if matches!(
        kind,
        "GROUP"
            | "GROUP_MEMBERSHIP"
            | "REALM_ROLE"
            | "REALM_ROLE_MAPPING"
            | "CLIENT_ROLE_MAPPING"
            | "REALM"
            | "USER"
    ) && wanted.full_run.is_none()
    {
        wanted.full_run = Some(format!(
            "admin event {} {kind} {path}",
            e.operation.as_deref().unwrap_or("?")
        ));
    }
}

/// What one user event means for seedkeeper.
pub(crate) fn classify_user(e: &UserEvent, wanted: &mut Resync) {
    let kind = e.kind.as_deref().unwrap_or("");
    if USER_EVENT_TYPES.contains(&kind) {
        if let Some(id) = e.user_id.as_deref().filter(|s| !s.is_empty()) {
            wanted.users.insert(id.to_string());
        }
    }
}

/// Where one stream stands: the last time applied and the ids applied at that millisecond.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPosition {
    pub time: i64,
    pub ids: Vec<String>,
}

impl StreamPosition {
    /// Whether an event (time, key) was applied already.
    pub(crate) fn covers(&self, time: i64, key: &str) -> bool {
        time < self.time || (time == self.time && self.ids.iter().any(|i| i == key))
    }

    /// The position after applying events with these (time, key) pairs.
    pub(crate) fn advance(&self, seen: &[(i64, String)]) -> StreamPosition {
        let Some(last) = seen.iter().map(|(t, _)| *t).max() else {
            return self.clone();
        };
        if last < self.time {
            return self.clone();
        }
        let mut ids: Vec<String> = if last == self.time {
            self.ids.clone()
        } else {
            Vec::new()
        };
        for (t, k) in seen {
            if *t == last && !ids.contains(k) {
                ids.push(k.clone());
            }
        }
        StreamPosition { time: last, ids }
    }
}

/// An event's identity: Keycloak's id, or its content when it has none.
pub(crate) trait EventKey {
    fn time(&self) -> i64;
    fn key(&self) -> String;
}

/// Keycloak's id, else the event's time and two identifying fields.
fn key_of(id: &Option<String>, time: i64, a: &Option<String>, b: &Option<String>) -> String {
    id.clone().unwrap_or_else(|| {
        format!(
            "{time}:{}:{}",
            a.as_deref().unwrap_or(""),
            b.as_deref().unwrap_or("")
        )
    })
}

impl EventKey for UserEvent {
    fn time(&self) -> i64 {
        self.time
    }
    fn key(&self) -> String {
        key_of(&self.id, self.time, &self.kind, &self.user_id)
    }
}

impl EventKey for AdminEvent {
    fn time(&self) -> i64 {
        self.time
    }
    fn key(&self) -> String {
        key_of(&self.id, self.time, &self.operation, &self.resource_path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn admin(kind: &str, path: &str) -> AdminEvent {
        AdminEvent {
            id: None,
            time: 1,
            operation: Some("UPDATE".into()),
            resource_type: Some(kind.into()),
            resource_path: Some(path.into()),
        }
    }

    #[test]
    fn user_changes_name_the_user_and_structural_changes_ask_for_a_full_run() {
        let mut w = Resync::default();
        classify_admin(&admin("USER", "users/u1"), &mut w);
        classify_admin(
            &admin("REALM_ROLE_MAPPING", "users/u2/role-mappings/realm"),
            &mut w,
        );
        classify_admin(&admin("GROUP_MEMBERSHIP", "users/u3/groups/g1"), &mut w);
        classify_admin(&admin("CLIENT", "clients/c1"), &mut w);
        assert_eq!(w.users.iter().collect::<Vec<_>>(), ["u1", "u2", "u3"]);
        assert_eq!(w.full_run, None);
        classify_admin(
            &admin("REALM_ROLE_MAPPING", "groups/g1/role-mappings/realm"),
            &mut w,
        );
        assert!(w.full_run.as_deref().unwrap().contains("groups/g1"));
        let mut w = Resync::default();
        classify_admin(&admin("REALM_ROLE", "roles-by-id/r1/composites"), &mut w);
        assert!(w.full_run.is_some());
    }

    #[test]
    fn a_stream_position_covers_what_it_applied_and_advances_past_the_same_millisecond() {
        let m = StreamPosition {
            time: 10,
            ids: vec!["a".into()],
        };
        assert!(m.covers(9, "z") && m.covers(10, "a"));
        assert!(!m.covers(10, "b") && !m.covers(11, "a"));
        let same = m.advance(&[(10, "b".into())]);
        assert_eq!(same.time, 10);
        assert_eq!(same.ids, ["a", "b"]);
        let later = same.advance(&[(12, "c".into()), (11, "d".into()), (12, "e".into())]);
        assert_eq!(
            (later.time, later.ids.clone()),
            (12, vec!["c".to_string(), "e".to_string()])
        );
        assert_eq!(later.advance(&[]), later);
    }
}
