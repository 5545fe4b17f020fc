//! What the event follower asks of Keycloak: the realm's event settings, pages of user and
//! admin events, and one user at a time as an identity.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::client::path_segment;
use super::listing::UserRep;
use super::roles::RoleRep;
use super::KeycloakSource;
use crate::error::Result;
use crate::identity::Identity;

/// What `GET users/{id}` says of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    Found(Identity),
    /// 404: deleted in Keycloak (offboarded).
    Gone,
    /// A service account: not an identity.
    NotAnIdentity,
}

/// A user event (`GET events`), as much of it as the event follower reads.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct UserEvent {
    #[serde(default)]
    pub id: Option<String>,
    pub time: i64,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default, rename = "userId")]
    pub user_id: Option<String>,
}

/// An admin event (`GET admin-events`), as much of it as the event follower reads.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AdminEvent {
    #[serde(default)]
    pub id: Option<String>,
    pub time: i64,
    #[serde(default, rename = "operationType")]
    pub operation: Option<String>,
    #[serde(default, rename = "resourceType")]
    pub resource_type: Option<String>,
    #[serde(default, rename = "resourcePath")]
    pub resource_path: Option<String>,
}

/// The realm's event settings (`GET events/config`).
#[derive(Debug, Clone, Deserialize)]
pub struct EventsConfig {
    #[serde(default, rename = "eventsEnabled")]
    pub events_enabled: bool,
    #[serde(default, rename = "adminEventsEnabled")]
    pub admin_events_enabled: bool,
    /// Seconds user events are kept; none = kept forever.
    #[serde(default, rename = "eventsExpiration")]
    pub events_expiration: Option<i64>,
}

/// Which event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    User,
    Admin,
}

impl Stream {
    fn path(self) -> &'static str {
        match self {
            Stream::User => "events",
            Stream::Admin => "admin-events",
        }
    }
}

impl KeycloakSource {
    /// The realm's event settings. A 403 means the service account lacks `view-events`.
    pub async fn events_config(&self, cancel: &CancellationToken) -> Result<EventsConfig> {
        self.client
            .get("events/config", &[], cancel)
            .await
            .map_err(|e| self.client.view_events_needed(e, "events/config"))
    }

    /// One page of a stream's events at or after `from_ms`, oldest first.
    pub(crate) async fn events_page<T: DeserializeOwned>(
        &self,
        stream: Stream,
        from_ms: i64,
        first: u32,
        max: u32,
        cancel: &CancellationToken,
    ) -> Result<Vec<T>> {
        let q = [
            ("dateFrom", from_ms.to_string()),
            ("direction", "asc".to_string()),
            ("first", first.to_string()),
            ("max", max.to_string()),
        ];
        self.client
            .get(stream.path(), &q, cancel)
            .await
            .map_err(|e| self.client.view_events_needed(e, stream.path()))
    }

    /// One user as an identity (`GET users/{id}` and its effective realm roles, composites and
    /// groups expanded by Keycloak in `role-mappings/realm/composite`), or why not: the user is
    /// gone (404), or is a service account.
    pub(crate) async fn user_identity(&self, id: &str, cancel: &CancellationToken) -> Result<Lookup> {
        let path = format!("users/{}", path_segment(id));
        let u: UserRep = match self.client.get(&path, &[], cancel).await {
            Ok(u) => u,
            Err(e) if e.keycloak_status() == Some(404) => return Ok(Lookup::Gone),
            Err(e) => return Err(e),
        };
        if u.is_service_account() {
            return Ok(Lookup::NotAnIdentity);
        }
        let roles: Vec<RoleRep> = match self
            .client
            .get(
                &format!("{path}/role-mappings/realm/composite"),
                &[],
                cancel,
            )
            .await
        {
            Ok(r) => r,
            // Deleted between the two requests.
            Err(e) if e.keycloak_status() == Some(404) => return Ok(Lookup::Gone),
            Err(e) => return Err(e),
        };
        let roles = self.filter.keep(roles.into_iter().map(|r| r.name));
        Ok(Lookup::Found(u.into_identity(roles)))
    }
}
