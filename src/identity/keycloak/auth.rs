//! Discovery and the access token of the [`AdminClient`]: the realm's discovery document,
//! fetched through `keycloak.base_url` whatever host it announces, its issuer judged against
//! the realm (or `keycloak.issuer`), and the client-credentials grant through `openidconnect`.
//! The token is cached until shortly before it expires; a renewal is single-flight.

use std::time::{Duration, Instant};

use base64::Engine as _;
use openidconnect::core::CoreClient;
use openidconnect::{
    ClientId, ClientSecret, IssuerUrl, JsonWebKeySet, OAuth2TokenResponse, RequestTokenError,
    TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::client::{path_segment, AdminClient, CachedToken, Discovered};
use crate::error::{chain, Error, Refusal, Result};
use crate::metrics::KeycloakOutcome;
use crate::retry::{Limit, Policy, Retry};
use crate::trust;

/// Renew this long before the token's `expires_in` runs out.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

/// The two fields of the discovery document seedkeeper reads; Keycloak serves some fifty more.
#[derive(Debug, Deserialize)]
pub(super) struct DiscoveryDoc {
    pub(super) issuer: String,
    #[serde(default)]
    pub(super) token_endpoint: Option<String>,
}

impl AdminClient {
    /// Discovery, retried with backoff up to the startup wait. The document is fetched from
    /// `keycloak.base_url`; its issuer is judged by [`accept_issuer`] and its token endpoint
    /// rebased onto `keycloak.base_url` by [`rebased_token_url`].
    pub(super) async fn discover(&self, cancel: &CancellationToken) -> Result<Discovered> {
        let mut guard = self.metadata.lock().await;
        if let Some(m) = guard.as_ref() {
            return Ok(m.clone());
        }
        let issuer = format!("{}/realms/{}", self.base, self.realm());
        let doc_url = format!("{issuer}/.well-known/openid-configuration");
        let policy = Policy {
            limit: Limit::Deadline(self.wait),
            ..self.request_policy()
        };
        // Everything is worth waiting out but a realm that does not exist and an issuer that is
        // not the realm's: waiting changes neither.
        let attempt = |_| async {
            let doc = self.fetch_discovery(&doc_url).await?;
            self.accept_discovery(doc, &doc_url).map_err(Retry::Fail)
        };
        let discovered = policy
            .run(cancel, attempt, |reason, attempt, d| {
                tracing::warn!(keycloak.issuer = %issuer, attempt, error = %reason, retry_in_ms = d.as_millis() as u64, "waiting for Keycloak");
                self.metrics.retry();
            })
            .await
            .map_err(|stop| {
                stop.into_error(|reason, spent| Error::KeycloakUnavailable {
                    target: self.base.clone(),
                    waited_secs: spent.waited.as_secs(),
                    reason: format!("OIDC discovery of {issuer} failed: {reason}"),
                })
            })?;
        self.log_issuer(&discovered);
        *guard = Some(discovered.clone());
        Ok(discovered)
    }

    /// One GET of the discovery document through the shared client, counted and timed like
    /// every other request: the document, or what the answer asks for.
    pub(super) async fn fetch_discovery(&self, url: &str) -> Result<DiscoveryDoc, Retry<String>> {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let unanswered = |e: reqwest::Error| {
            self.metrics
                .request(KeycloakOutcome::of_reqwest(&e), started.elapsed());
            // A certificate that does not verify is not healed by waiting.
            if let Some(why) = trust::explain_keycloak(&e, &self.base) {
                return Retry::Fail(Error::config(format!(
                    "OIDC discovery at {url} failed: {why}"
                )));
            }
            Retry::Backoff(if e.is_timeout() {
                "timed out".to_string()
            } else {
                chain(&e)
            })
        };
        let resp = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(unanswered)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(unanswered)?;
        let took = started.elapsed();
        if !status.is_success() {
            self.metrics
                .request(KeycloakOutcome::of_status(status.as_u16()), took);
            return Err(if status.as_u16() == 404 {
                Retry::Fail(Error::KeycloakAuth(Refusal::http(404, format!(
                    "realm {:?} does not exist at {} (discovery answered 404): fix keycloak.realm (SEEDKEEPER_KEYCLOAK__REALM)",
                    self.realm(),
                    self.base
                ))))
            } else {
                Retry::Backoff(format!("HTTP {status}"))
            });
        }
        match serde_json::from_slice::<DiscoveryDoc>(&body) {
            Ok(doc) => {
                self.metrics.request(KeycloakOutcome::Ok, took);
                Ok(doc)
            }
            // A proxy's or a booting server's page: worth waiting out, as any unreadable answer.
            Err(_) => {
                self.metrics.request(KeycloakOutcome::Malformed, took);
                Err(Retry::Backoff(
                    "the discovery document is not valid JSON".to_string(),
                ))
            }
        }
    }

    /// The announced issuer accepted (or the configuration error that says why not) and the
    /// token endpoint rebased onto `keycloak.base_url`.
    pub(super) fn accept_discovery(&self, doc: DiscoveryDoc, doc_url: &str) -> Result<Discovered> {
        let pinned = self.settings.issuer.as_deref();
        accept_issuer(&doc.issuer, self.realm(), pinned, doc_url)?;
        let issuer = IssuerUrl::new(doc.issuer.clone()).map_err(|e| {
            Error::keycloak(
                doc_url,
                format!(
                    "{doc_url} announces issuer {:?}, which is not a URL: {e}",
                    doc.issuer
                ),
            )
        })?;
        let announced = doc.token_endpoint.ok_or_else(|| {
            Error::keycloak(
                doc_url,
                format!("the discovery document {doc_url} has no token_endpoint"),
            )
        })?;
        let token = rebased_token_url(&self.base, self.realm(), &doc.issuer, &announced);
        let token_url = TokenUrl::new(token.clone()).map_err(|e| {
            Error::config(format!(
                "keycloak.base_url gives an invalid token endpoint {token}: {e}: fix SEEDKEEPER_KEYCLOAK__BASE_URL"
            ))
        })?;
        Ok(Discovered { issuer, token_url })
    }

    /// Logs the accepted issuer at start, and again only when it changes: every run discovers
    /// afresh, and one line per run would say nothing new.
    pub(super) fn log_issuer(&self, d: &Discovered) {
        let Ok(mut last) = self.issuer_logged.lock() else {
            return;
        };
        if last.as_deref() == Some(d.issuer.as_str()) {
            return;
        }
        tracing::info!(
            keycloak.issuer = %d.issuer.as_str(),
            keycloak.base_url = %self.base,
            keycloak.token_endpoint = %d.token_url.as_str(),
            "Keycloak announces this issuer; every endpoint is reached through keycloak.base_url"
        );
        *last = Some(d.issuer.to_string());
    }

    /// The cached token while it is fresh.
    fn cached_token(&self) -> Option<SecretString> {
        let g = self.token.lock().ok()?;
        g.as_ref()
            .filter(|t| Instant::now() < t.renew_at)
            .map(|t| t.token.clone())
    }

    /// Drops `refused` from the cache, unless another request has renewed it already.
    pub(super) fn forget_token(&self, refused: &SecretString) {
        if let Ok(mut g) = self.token.lock() {
            if g.as_ref()
                .is_some_and(|t| t.token.expose_secret() == refused.expose_secret())
            {
                *g = None;
            }
        }
    }

    /// Drops the cached token, whichever it is.
    pub(super) fn forget_tokens(&self) {
        if let Ok(mut g) = self.token.lock() {
            *g = None;
        }
    }

    pub(super) async fn token(&self, cancel: &CancellationToken) -> Result<SecretString> {
        if let Some(t) = self.cached_token() {
            return Ok(t);
        }
        // One token request at a time: whoever waited here finds the token just had.
        let _renewing = self.renewing.lock().await;
        if let Some(t) = self.cached_token() {
            return Ok(t);
        }
        let fresh = self.grant(cancel).await?;
        let token = fresh.token.clone();
        if let Ok(mut g) = self.token.lock() {
            *g = Some(fresh);
        }
        Ok(token)
    }

    /// A new token: the client-credentials grant at the discovered token endpoint, retried
    /// under the request policy, its roles checked.
    async fn grant(&self, cancel: &CancellationToken) -> Result<CachedToken> {
        let discovered = self.discover(cancel).await?;
        let secret = self.settings.client_secret.as_ref().ok_or_else(|| {
            Error::config(
                "keycloak.client_secret is not set (SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE)",
            )
        })?;
        // No JWKS: the access token is read (for its roles), never verified here; Keycloak
        // verifies it on every admin call.
        let client = CoreClient::new(
            ClientId::new(self.client_id().to_string()),
            discovered.issuer,
            JsonWebKeySet::default(),
        )
        .set_client_secret(ClientSecret::new(secret.expose_secret().to_string()))
        .set_token_uri(discovered.token_url);
        // A refused client is final; no answer, or an unreadable one, is worth repeating.
        let attempt = |_| async {
            self.requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            client
                .exchange_client_credentials()
                .request_async(&self.oidc_http())
                .await
                .map_err(|e| match e {
                    RequestTokenError::ServerResponse(r) => {
                        Retry::Fail(Error::KeycloakAuth(format!(
                            "the token endpoint refused client {:?} of realm {:?}: {}: {}: check keycloak.client_id and keycloak.client_secret (SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE), and that the client is confidential with service accounts enabled",
                            self.client_id(),
                            self.realm(),
                            r.error(),
                            r.error_description().cloned().unwrap_or_default(),
                        ).into()))
                    }
                    RequestTokenError::Request(inner) => {
                        Retry::Backoff(format!("request failed: {}", chain(&inner)))
                    }
                    RequestTokenError::Parse(_, _) => {
                        Retry::Backoff("the token response is not valid JSON".to_string())
                    }
                    RequestTokenError::Other(s) => Retry::Backoff(s),
                })
        };
        let resp = self
            .request_policy()
            .run(cancel, attempt, |reason, attempt, _| {
                tracing::warn!(attempt, error = %reason, "token request failed; retrying");
                self.metrics.retry();
            })
            .await
            .map_err(|stop| {
                stop.into_error(|reason, _| Error::KeycloakUnavailable {
                    target: self.base.clone(),
                    waited_secs: 0,
                    reason: format!("token request: {reason}"),
                })
            })?;
        let lifetime = resp.expires_in().unwrap_or(Duration::from_secs(60));
        let renew_at = Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN.min(lifetime / 2));
        let token = SecretString::from(resp.access_token().secret().to_string());
        check_token_roles(&token, self.client_id())?;
        Ok(CachedToken { token, renew_at })
    }
}

/// Whether the issuer Keycloak announces may be used. With `keycloak.issuer` set it
/// must be exactly that (a trailing `/` aside): the operator named it. Otherwise its path must end
/// in `/realms/{realm}`, whatever its host: a frontend URL moves the host (and may add a path
/// prefix), never the realm. Anything else means seedkeeper and Keycloak disagree about which
/// realm or server this is, which waiting does not change: a configuration error naming both URLs
/// and the key.
fn accept_issuer(announced: &str, realm: &str, pinned: Option<&str>, doc_url: &str) -> Result<()> {
    let trim = |s: &str| s.trim_end_matches('/').to_string();
    if let Some(pinned) = pinned {
        if trim(announced) == trim(pinned) {
            return Ok(());
        }
        return Err(Error::config(format!(
            "Keycloak announces issuer {announced} ({doc_url}) but keycloak.issuer pins {pinned}: set keycloak.issuer (SEEDKEEPER_KEYCLOAK__ISSUER) to {announced} if that is the realm's public URL, or fix the realm's frontendUrl (Keycloak's --hostname) if it is not"
        )));
    }
    let names_realm = reqwest::Url::parse(announced).is_ok_and(|u| {
        let path = u.path().trim_end_matches('/');
        matches!(u.scheme(), "http" | "https")
            && (path.ends_with(&format!("/realms/{realm}"))
                || path.ends_with(&format!("/realms/{}", path_segment(realm))))
    });
    if names_realm {
        Ok(())
    } else {
        Err(Error::config(format!(
            "Keycloak announces issuer {announced:?} ({doc_url}), which does not name realm {realm:?} (its path must end in /realms/{realm}): check keycloak.realm (SEEDKEEPER_KEYCLOAK__REALM) and keycloak.base_url (SEEDKEEPER_KEYCLOAK__BASE_URL), or pin the issuer with keycloak.issuer (SEEDKEEPER_KEYCLOAK__ISSUER)"
        )))
    }
}

/// The token endpoint through `base`: the announced endpoint's path below the announced server
/// root (the issuer less `/realms/{realm}`: a frontend URL's host and any path prefix), put
/// under `base`. So a document that moves the endpoint on the same server is followed, and one
/// naming a public host is reached internally. An endpoint outside the announced root (or an
/// issuer pinned without the realm in its path) falls back to Keycloak's own path.
fn rebased_token_url(base: &str, realm: &str, issuer: &str, announced: &str) -> String {
    let issuer = issuer.trim_end_matches('/');
    let root = issuer
        .strip_suffix(&format!("/realms/{realm}"))
        .or_else(|| issuer.strip_suffix(&format!("/realms/{}", path_segment(realm))));
    match root
        .and_then(|r| announced.strip_prefix(r))
        .filter(|rest| rest.starts_with('/'))
    {
        Some(rest) => format!("{base}{rest}"),
        None => format!("{base}/realms/{realm}/protocol/openid-connect/token"),
    }
}

/// The token's `resource_access.realm-management.roles` must include what the listing needs.
/// Keycloak expands composites in the token, so `realm-admin` holders show both roles too.
fn check_token_roles(token: &SecretString, client_id: &str) -> Result<()> {
    let Some(payload) = token.expose_secret().split('.').nth(1) else {
        return Ok(());
    };
    let Ok(bytes) =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))
    else {
        return Ok(());
    };
    let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Ok(());
    };
    let roles: Vec<&str> = claims
        .pointer("/resource_access/realm-management/roles")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|r| r.as_str()).collect())
        .unwrap_or_default();
    // view-clients: client roles can grant realm roles (see `roles`), and with query-clients
    // alone Keycloak lists no client, which would hide them without an error.
    let missing: Vec<&str> = ["view-users", "view-realm", "view-clients"]
        .into_iter()
        .filter(|r| !roles.contains(r))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::KeycloakAuth(format!(
            "service account of client {client_id:?} lacks realm-management role{} {}: assign {} in Keycloak (Clients > {client_id} > Service accounts roles > realm-management)",
            if missing.len() > 1 { "s" } else { "" },
            match missing.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
                _ => missing.join(""),
            },
            if missing.len() > 1 { "them" } else { "it" },
        ).into()))
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    const DOC: &str = "http://keycloak:8080/realms/x/.well-known/openid-configuration";

    #[test]
    fn an_issuer_on_another_host_is_accepted_when_it_names_the_realm() {
        for iss in [
            "https://auth.example.com/realms/x",
            "https://auth.example.com/auth/realms/x/",
            "http://keycloak:8080/realms/x",
        ] {
            assert!(accept_issuer(iss, "x", None, DOC).is_ok(), "{iss}");
        }
        for iss in [
            "https://auth.example.com/realms/y",
            "https://auth.example.com/realms/x/extra",
            "not a url",
            "ftp://auth.example.com/realms/x",
        ] {
            let e = accept_issuer(iss, "x", None, DOC).expect_err(iss);
            assert_eq!(e.exit_code(), crate::error::exit::CONFIG);
            let t = e.to_string();
            assert!(
                t.contains(iss) && t.contains(DOC) && t.contains("keycloak.issuer"),
                "{t}"
            );
        }
    }

    #[test]
    fn a_pinned_issuer_must_match_exactly_and_names_both_urls_and_the_key() {
        let pinned = Some("https://auth.example.com/realms/x");
        assert!(accept_issuer("https://auth.example.com/realms/x/", "x", pinned, DOC).is_ok());
        let e = accept_issuer("https://other.example.com/realms/x", "x", pinned, DOC)
            .expect_err("mismatch");
        assert_eq!(e.exit_code(), crate::error::exit::CONFIG);
        let t = e.to_string();
        for needle in [
            "https://other.example.com/realms/x",
            "https://auth.example.com/realms/x",
            "keycloak.issuer",
            "SEEDKEEPER_KEYCLOAK__ISSUER",
        ] {
            assert!(t.contains(needle), "{needle} not in {t}");
        }
    }

    #[test]
    fn the_token_endpoint_is_rebased_onto_base_url() {
        let base = "http://keycloak:8080";
        let cases = [
            // A frontend URL: the announced host is replaced.
            (
                "https://auth.invalid/realms/x",
                "https://auth.invalid/realms/x/protocol/openid-connect/token",
                "http://keycloak:8080/realms/x/protocol/openid-connect/token",
            ),
            // A frontend URL with a path prefix: the prefix is the public server's, not ours.
            (
                "https://auth.invalid/auth/realms/x",
                "https://auth.invalid/auth/realms/x/protocol/openid-connect/token",
                "http://keycloak:8080/realms/x/protocol/openid-connect/token",
            ),
            // An endpoint moved on the same server is followed.
            (
                "http://keycloak:8080/realms/x",
                "http://keycloak:8080/moved/realms/x/protocol/openid-connect/token",
                "http://keycloak:8080/moved/realms/x/protocol/openid-connect/token",
            ),
            // Elsewhere entirely: Keycloak's own path.
            (
                "https://auth.invalid/realms/x",
                "https://tokens.invalid/t",
                "http://keycloak:8080/realms/x/protocol/openid-connect/token",
            ),
        ];
        for (iss, announced, want) in cases {
            assert_eq!(
                rebased_token_url(base, "x", iss, announced),
                want,
                "{announced}"
            );
        }
    }
}
