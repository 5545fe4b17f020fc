//! Identity source `keycloak`: the live Admin REST API of Keycloak 26.
//!
//! Token: the discovery document of `{base_url}/realms/{realm}` and the client-credentials grant
//! (through `openidconnect`); the token is cached until shortly before it expires and renewed once
//! when the API answers 401.
//!
//! Every endpoint is reached through `keycloak.base_url`, whatever host the discovery document
//! names: a realm's `frontendUrl` (or Keycloak's `--hostname`) makes Keycloak announce its public
//! URL, which seedkeeper inside a cluster may not reach or resolve. So the document is fetched
//! here rather than by openidconnect's discovery (which refuses an issuer other than the URL it
//! was asked, and fetches the JWKS from the announced host), and the token endpoint is rebased
//! onto `base_url`. The announced issuer is accepted when it names the configured realm (its path
//! ends in `/realms/{realm}`), or when it equals `keycloak.issuer`, which pins it; anything else
//! is a configuration error, never retried as Keycloak being unavailable. Every request has a timeout; 429 (honouring `Retry-After`), 5xx,
//! timeouts, connection errors and malformed bodies are retried with bounded backoff. TLS is
//! rustls trusting the OS trust store plus `keycloak.ca_file` ([`crate::trust`]); a certificate
//! that does not verify fails the run at once (exit 78) naming it; redirects are never followed.
//!
//! Effective roles: `roles/{role}/users` lists direct members only (keycloak#37209), so for each
//! mapped role the source finds every role that grants it through composites, then the direct
//! members of those roles and the members of the groups (and subgroups) that carry them. Only
//! these privileged users are held in memory; the user list itself is streamed page by page
//! (`first`/`max`, `keycloak.concurrency` pages in flight) and never held whole.
//!
//! A page shorter than asked is not the end of a listing: Keycloak filters results after the
//! query (fine-grained admin permissions), federation providers cap what they return, and a
//! server may cap `max`. Every listing advances `first` by what was returned, deduplicates by id
//! and ends at an empty page. The user listing is then checked against `users/count`: fewer
//! distinct users than counted is a [`crate::identity::Shortfall`], which narrows the run to the
//! listed users (nothing is concluded from absence) instead of failing it.
//!
//! The client secret is exposed only in the token request; the token only in the
//! `Authorization` header. Error messages carry the API path and Keycloak's `error` field, never
//! a response body. Reads `keycloak.*`.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{stream, StreamExt};
use openidconnect::core::CoreClient;
use openidconnect::{
    AsyncHttpClient, ClientId, ClientSecret, HttpClientError, HttpRequest, HttpResponse, IssuerUrl,
    JsonWebKeySet, OAuth2TokenResponse, RequestTokenError, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::KeycloakSettings;
use crate::error::{Error, Refusal, Result};
use crate::identity::{
    granting_roles, BoxFuture, Identity, IdentityProvider, RoleFilter, RoleGraph, SourceStats,
};
use crate::metrics::{KeycloakMetrics, KeycloakOutcome};
use crate::progress::Progress;
use crate::retry::{self, Limit, Policy, Retry};
use crate::trust;

/// Renew this long before the token's `expires_in` runs out.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
/// The first wait between request attempts; each further one doubles, up to `MAX_BACKOFF`.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Page size for roles, groups and role members.
const AUX_PAGE: u32 = 500;

/// The Keycloak versions the conformance suite and the emulator comparison have passed against
/// (docs/testing.md, "Versions run"): the newest patch of each 26.x minor Maven Central serves
/// (26.6 was never published). A server from the oldest minor to the newest one here is in the
/// tested range; anything else is warned about once at start.
pub const TESTED_VERSIONS: &[&str] = &["26.4.7", "26.5.6", "26.7.3"];

/// `major.minor` of a version such as `26.7.3` (or `26.7.3-SNAPSHOT`); `None` when it does not
/// start with two numbers.
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether `version` lies within the minors of [`TESTED_VERSIONS`] (any patch of them, and any
/// minor between the oldest and the newest).
pub fn in_tested_range(version: &str) -> bool {
    let tested = TESTED_VERSIONS.iter().filter_map(|v| major_minor(v));
    let (Some(low), Some(high)) = (tested.clone().min(), tested.max()) else {
        return false;
    };
    major_minor(version).is_some_and(|v| low <= v && v <= high)
}

/// The part of `GET /admin/serverinfo` that holds the version. For a realm's service account,
/// `systemInfo` is served from 26.5 on to realm-management `manage-realm` (or `realm-admin`),
/// never to the view and query roles seedkeeper otherwise needs, and on 26.4 to no realm
/// service account at all (checked on 26.4.7, 26.5.6 and 26.7.3).
#[derive(Debug, Deserialize)]
struct ServerInfo {
    #[serde(default, rename = "systemInfo")]
    system_info: Option<SystemInfo>,
}

#[derive(Debug, Deserialize)]
struct SystemInfo {
    #[serde(default)]
    version: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UserRep {
    id: String,
    username: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default, rename = "firstName")]
    first_name: Option<String>,
    #[serde(default, rename = "lastName")]
    last_name: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default, rename = "serviceAccountClientId")]
    service_account_client_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IdRep {
    id: String,
}

#[derive(Debug, Deserialize)]
struct RoleRep {
    name: String,
    #[serde(default)]
    composite: bool,
}

/// What paged items are deduplicated by.
trait Keyed {
    fn key(&self) -> &str;
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

/// One window of a paged listing.
struct Window<T> {
    items: Vec<T>,
    /// The window's first request returned `[]`: the listing is over.
    ended: bool,
    /// Pages shorter than asked before the window was covered.
    short: u64,
}

/// The user ids seen in one listing, as 64-bit hashes keyed at random per listing: 8 bytes per
/// user rather than a string (about 1.2 MiB at 100,000 users against 7.6 MiB for a set of the
/// ids). Two ids collide with a chance of about 3 in 10^10 per listing of 100,000; the second is
/// then taken for a duplicate, and the count check narrows the run (unless as many users were
/// created during the listing, when that user is offboarded for one run and reactivated by the
/// next).
struct IdSet {
    seen: HashSet<u64>,
    keys: RandomState,
}

impl IdSet {
    /// `expected` sizes the set once (bounded, since it comes from the server).
    fn with_expected(expected: u64) -> Self {
        IdSet {
            seen: HashSet::with_capacity(expected.min(1 << 20) as usize),
            keys: RandomState::new(),
        }
    }

    /// `true` when `id` was not seen before.
    fn insert(&mut self, id: &str) -> bool {
        self.seen.insert(self.keys.hash_one(id))
    }
}

/// What discovery established: the issuer Keycloak announces, accepted for the configured realm,
/// and the token endpoint as reached through `keycloak.base_url`.
#[derive(Debug, Clone)]
struct Discovered {
    issuer: IssuerUrl,
    token_url: TokenUrl,
}

/// The two fields of the discovery document seedkeeper reads; Keycloak serves some fifty more.
#[derive(Debug, Deserialize)]
struct DiscoveryDoc {
    issuer: String,
    #[serde(default)]
    token_endpoint: Option<String>,
}

struct CachedToken {
    token: SecretString,
    renew_at: Instant,
}

pub struct KeycloakSource {
    settings: KeycloakSettings,
    base: String,
    http: reqwest::Client,
    filter: RoleFilter,
    batch_size: usize,
    /// Startup wait for discovery (the daemon's `startup.wait_timeout`).
    wait: Duration,
    metadata: tokio::sync::Mutex<Option<Discovered>>,
    /// The issuer last logged, so that it is logged at start and when it changes, not per run.
    issuer_logged: Mutex<Option<String>>,
    token: Mutex<Option<CachedToken>>,
    /// The server's version was asked for and answered (read, or refused for good): it is asked
    /// once per process, at the first preflight that gets an answer.
    version_asked: AtomicBool,
    requests: std::sync::atomic::AtomicU64,
    /// Every HTTP exchange (counted by outcome and timed) and every retry.
    metrics: KeycloakMetrics,
}

impl KeycloakSource {
    pub fn new(
        settings: &KeycloakSettings,
        filter: RoleFilter,
        batch_size: usize,
        wait: Duration,
    ) -> Result<Self> {
        let base = settings
            .base_url
            .clone()
            .ok_or_else(|| {
                Error::config("keycloak.base_url is not set (SEEDKEEPER_KEYCLOAK__BASE_URL)")
            })?
            .trim_end_matches('/')
            .to_string();
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout)
            .user_agent(concat!("seedkeeper/", env!("CARGO_PKG_VERSION")));
        if !settings.tls_verify {
            tracing::warn!("keycloak.tls_verify = false: TLS certificates of Keycloak are not verified (development only)");
        }
        // Our own rustls config: reqwest is built without roots of its own (see Cargo.toml).
        let tls = trust::https_client_config(settings.ca_file.as_deref(), settings.tls_verify)?;
        builder = builder.use_preconfigured_tls(tls);
        let http = builder
            .build()
            .map_err(|e| Error::config(format!("cannot build the HTTP client: {e}")))?;
        Ok(KeycloakSource {
            settings: settings.clone(),
            base,
            http,
            filter,
            batch_size,
            wait,
            metadata: tokio::sync::Mutex::new(None),
            issuer_logged: Mutex::new(None),
            token: Mutex::new(None),
            version_asked: AtomicBool::new(false),
            requests: std::sync::atomic::AtomicU64::new(0),
            metrics: KeycloakMetrics::new(),
        })
    }

    /// The source's request and retry counters.
    pub fn metrics(&self) -> &KeycloakMetrics {
        &self.metrics
    }

    /// Counts into `metrics` (shared with another source, such as the daemon's registered
    /// one) instead of counters of its own.
    pub fn with_metrics(mut self, metrics: KeycloakMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The HTTP client for openidconnect (discovery, JWKS, token): each exchange counted by its
    /// outcome and timed like the admin API requests.
    fn oidc_http(&self) -> Instrumented<'_> {
        Instrumented {
            http: &self.http,
            metrics: &self.metrics,
        }
    }

    fn realm(&self) -> &str {
        &self.settings.realm
    }

    fn client_id(&self) -> &str {
        &self.settings.client_id
    }

    /// Token and Admin API requests: `keycloak.max_retries` retries, 200 ms doubling up to 5 s
    /// between them, or what a 429's `Retry-After` asks, up to 30 s.
    fn request_policy(&self) -> Policy {
        let retries = Limit::Retries(self.settings.max_retries);
        Policy {
            max_after: MAX_RETRY_AFTER,
            ..Policy::new(BACKOFF_BASE, MAX_BACKOFF, retries)
        }
    }

    /// Discovery, retried with backoff up to the startup wait. The document is fetched from
    /// `keycloak.base_url`; its issuer is judged by [`accept_issuer`] and its token endpoint
    /// rebased onto `keycloak.base_url` by [`rebased_token_url`].
    async fn discover(&self, cancel: &CancellationToken) -> Result<Discovered> {
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
            self.judge_discovery(doc, &doc_url).map_err(Retry::Fail)
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
    async fn fetch_discovery(&self, url: &str) -> Result<DiscoveryDoc, Retry<String>> {
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
                inner_chain(&e)
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
    fn judge_discovery(&self, doc: DiscoveryDoc, doc_url: &str) -> Result<Discovered> {
        let pinned = self.settings.issuer.as_deref();
        accept_issuer(&doc.issuer, self.realm(), pinned, doc_url)?;
        let issuer = IssuerUrl::new(doc.issuer.clone()).map_err(|e| {
            Error::Keycloak(format!(
                "{doc_url} announces issuer {:?}, which is not a URL: {e}",
                doc.issuer
            ))
        })?;
        let announced = doc.token_endpoint.ok_or_else(|| {
            Error::Keycloak(format!(
                "the discovery document {doc_url} has no token_endpoint"
            ))
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
    fn log_issuer(&self, d: &Discovered) {
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

    fn forget_token(&self) {
        if let Ok(mut g) = self.token.lock() {
            *g = None;
        }
    }

    async fn token(&self, cancel: &CancellationToken) -> Result<SecretString> {
        if let Ok(g) = self.token.lock() {
            if let Some(t) = g.as_ref() {
                if Instant::now() < t.renew_at {
                    return Ok(t.token.clone());
                }
            }
        }
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
                        Retry::Backoff(format!("request failed: {}", inner_chain(&inner)))
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
        if let Ok(mut g) = self.token.lock() {
            *g = Some(CachedToken {
                token: token.clone(),
                renew_at,
            });
        }
        Ok(token)
    }

    /// GET an admin API path: the token renewed once on a 401, what is worth repeating retried
    /// under [`Self::request_policy`], every other answer an error that says the fix.
    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        cancel: &CancellationToken,
    ) -> Result<T> {
        let url = format!("{}/admin/realms/{}/{}", self.base, self.realm(), path);
        let renewed = AtomicBool::new(false);
        self.request_policy()
            .run(
                cancel,
                |_| self.get_once(&url, path, query, &renewed, cancel),
                |why, attempt, wait| {
                    why.warn(path, attempt, wait);
                    self.metrics.retry();
                },
            )
            .await
            .map_err(|stop| {
                stop.into_error(|why, spent| why.give_up(path, spent.attempts, &self.base))
            })
    }

    /// One GET of [`Self::get`]: the value, or what the answer asks for.
    async fn get_once<T: DeserializeOwned>(
        &self,
        url: &str,
        path: &str,
        query: &[(&str, String)],
        renewed: &AtomicBool,
        cancel: &CancellationToken,
    ) -> Result<T, Retry<Transient>> {
        let token = self.token(cancel).await.map_err(Retry::Fail)?;
        let answer = self.fetch(url, query, &token).await?;
        self.judge(path, answer, renewed)
    }

    /// Sends one GET and reads its answer whole; counted, unless it is a 200 (counted once its
    /// body is parsed). No answer, or a body cut short, is worth repeating.
    async fn fetch(
        &self,
        url: &str,
        query: &[(&str, String)],
        token: &SecretString,
    ) -> Result<Answer, Retry<Transient>> {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let sent = self
            .http
            .get(url)
            .query(query)
            .bearer_auth(token.expose_secret())
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                self.metrics
                    .request(KeycloakOutcome::of_reqwest(&e), started.elapsed());
                let reason = if e.is_timeout() {
                    "timed out".to_string()
                } else {
                    inner_chain(&e)
                };
                return Err(Retry::Backoff(Transient::Unanswered(reason)));
            }
        };
        let status = resp.status().as_u16();
        let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok());
        let asked = header(reqwest::header::RETRY_AFTER).and_then(retry::retry_after);
        let is_json = header(reqwest::header::CONTENT_TYPE).is_some_and(|v| v.contains("json"));
        let body = resp.bytes().await;
        let took = started.elapsed();
        match body {
            Ok(body) => {
                if status != 200 {
                    self.metrics
                        .request(KeycloakOutcome::of_status(status), took);
                }
                Ok(Answer {
                    status,
                    asked,
                    is_json,
                    body: body.into(),
                    took,
                })
            }
            Err(e) => {
                self.metrics.request(KeycloakOutcome::of_reqwest(&e), took);
                let reason = if e.is_timeout() {
                    format!(
                        "the body did not arrive within keycloak.request_timeout ({}s)",
                        self.settings.request_timeout.as_secs()
                    )
                } else {
                    format!("body cut off: {}", inner_chain(&e))
                };
                Err(Retry::Backoff(Transient::CutShort(reason)))
            }
        }
    }

    /// What an answer to `GET path` means: the value, a retry (a first 401 renews the token), or
    /// an error that says the fix.
    fn judge<T: DeserializeOwned>(
        &self,
        path: &str,
        answer: Answer,
        renewed: &AtomicBool,
    ) -> Result<T, Retry<Transient>> {
        let Answer {
            status,
            asked,
            is_json,
            body,
            took,
        } = answer;
        Err(match status {
            200 => match serde_json::from_slice::<T>(&body) {
                Ok(v) => {
                    self.metrics.request(KeycloakOutcome::Ok, took);
                    return Ok(v);
                }
                Err(e) => {
                    self.metrics.request(KeycloakOutcome::Malformed, took);
                    Retry::Backoff(Transient::Unreadable(if is_json {
                        format!("malformed JSON ({e})")
                    } else {
                        "a non-JSON body".to_string()
                    }))
                }
            },
            // Expired or revoked mid-listing: renew once, then try again at once.
            401 if !renewed.load(Ordering::Relaxed) => {
                tracing::debug!(path, "token refused; renewing");
                renewed.store(true, Ordering::Relaxed);
                self.forget_token();
                self.metrics.retry();
                Retry::Now
            }
            401 => Retry::Fail(Error::KeycloakAuth(Refusal::http(401, format!(
                "GET {path}: 401 even with a fresh token; the token's issuer must match keycloak.base_url (use the URL Keycloak calls itself by)"
            )))),
            403 => Retry::Fail(Error::KeycloakAuth(Refusal::http(403, format!(
                "GET {path}: 403: service account of client {:?} lacks realm-management role view-users or view-realm: assign both in Keycloak (Clients > {} > Service accounts roles)",
                self.client_id(),
                self.client_id()
            )))),
            404 => {
                let err = error_field(&body);
                Retry::Fail(if err.contains("Realm not found") {
                    Error::KeycloakAuth(Refusal::http(404, format!(
                        "realm {:?} not found at {}: fix keycloak.realm (SEEDKEEPER_KEYCLOAK__REALM)",
                        self.realm(),
                        self.base
                    )))
                } else {
                    Error::Keycloak(format!("GET {path}: 404 {err}"))
                })
            }
            429 => match asked {
                Some(d) => Retry::After(d, Transient::RateLimited),
                None => Retry::Backoff(Transient::RateLimited),
            },
            s if s >= 500 => Retry::Backoff(Transient::Server(s, error_field(&body))),
            s => Retry::Fail(Error::Keycloak(format!(
                "GET {path}: unexpected status {s} {}",
                error_field(&body)
            ))),
        })
    }

    /// Every item of a paged admin endpoint (roles, role members, role groups, group members,
    /// group children). A page shorter than asked is not the end: servers cap `max` and filter
    /// after the query. `first` advances by what was returned, items are deduplicated by key, and
    /// the listing ends at the first empty page.
    async fn get_all<T: DeserializeOwned + Keyed>(
        &self,
        path: &str,
        extra: &[(&str, String)],
        cancel: &CancellationToken,
    ) -> Result<Vec<T>> {
        let mut out: Vec<T> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut first = 0u64;
        loop {
            let mut q: Vec<(&str, String)> =
                vec![("first", first.to_string()), ("max", AUX_PAGE.to_string())];
            q.extend(extra.iter().cloned());
            let page: Vec<T> = self.get(path, &q, cancel).await?;
            if page.is_empty() {
                return Ok(out);
            }
            first += page.len() as u64;
            for item in page {
                if seen.insert(item.key().to_string()) {
                    out.push(item);
                }
            }
            // With a server that honours `first`, an item is returned by at most AUX_PAGE
            // requests, so `first` never passes that many times the distinct items. Past it the
            // server (or a proxy) ignores `first`, and the loop would never see an empty page.
            if first > (out.len() as u64 + 1) * u64::from(AUX_PAGE) {
                return Err(Error::Keycloak(format!(
                    "GET {path}: paging does not advance ({} distinct items after {first} returned); Keycloak or a proxy in front of it ignores the first parameter",
                    out.len()
                )));
            }
        }
    }

    /// One window `[start, end)` of a paged listing: requests `first=offset, max=end-offset`,
    /// advancing `offset` by what each returned, until the window is covered or a request
    /// returns `[]`. `ended` is set when the window's first request returned `[]`.
    async fn window<T: DeserializeOwned>(
        &self,
        path: &str,
        extra: &[(&str, String)],
        start: u64,
        end: u64,
        cancel: &CancellationToken,
    ) -> Result<Window<T>> {
        let mut w = Window {
            items: Vec::new(),
            ended: false,
            short: 0,
        };
        let mut offset = start;
        while offset < end {
            let mut q: Vec<(&str, String)> = vec![
                ("first", offset.to_string()),
                ("max", (end - offset).to_string()),
            ];
            q.extend(extra.iter().cloned());
            let page: Vec<T> = self.get(path, &q, cancel).await?;
            if page.is_empty() {
                w.ended = offset == start;
                break;
            }
            offset += page.len() as u64;
            if offset < end {
                w.short += 1;
            }
            w.items.extend(page);
        }
        Ok(w)
    }

    /// sub -> relevant roles, for every user who holds one (directly, via a composite, or via a
    /// group or a parent group).
    async fn privileged(
        &self,
        cancel: &CancellationToken,
    ) -> Result<HashMap<String, BTreeSet<String>>> {
        let roles: Vec<RoleRep> = self
            .get_all("roles", &[("briefRepresentation", "true".into())], cancel)
            .await?;
        let mut graph = RoleGraph::default();
        for r in roles.iter().filter(|r| r.composite) {
            let children: Vec<RoleRep> = self
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
    async fn holders_of(&self, role: &str, cancel: &CancellationToken) -> Result<Vec<String>> {
        let brief = [("briefRepresentation", "true".to_string())];
        // Each listing ends with an empty page, so the two listings of a role, and of a group,
        // are made side by side: as many round trips one after the other as before that page.
        let (users, groups): (Vec<IdRep>, Vec<IdRep>) = futures_util::future::try_join(
            self.get_all(&format!("roles/{}/users", enc(role)), &brief, cancel),
            self.get_all(&format!("roles/{}/groups", enc(role)), &brief, cancel),
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
                self.get_all(&format!("groups/{gid}/members"), &brief, cancel),
                self.get_all(&format!("groups/{gid}/children"), &brief, cancel),
            )
            .await?;
            out.extend(members.into_iter().map(|m| m.id));
            stack.extend(children.into_iter().map(|c| c.id));
        }
        Ok(out)
    }

    async fn stream_users(
        &self,
        out: mpsc::Sender<Vec<Identity>>,
        cancel: &CancellationToken,
        progress: &Progress,
    ) -> Result<SourceStats> {
        // The count is taken as the listing starts, beside the role resolution: users deleted
        // before the listing ends show up as a shortfall (the next run retries), users created
        // only as extra.
        let (privileged, expected) = futures_util::future::try_join(
            self.privileged(cancel),
            self.get::<u64>("users/count", &[], cancel),
        )
        .await?;
        // The count includes service accounts, as `distinct` below does.
        progress.listing_started(Some(expected));
        let page = u64::from(self.settings.page_size);
        let brief = [("briefRepresentation", "true".to_string())];
        // The listing is cut into windows of `page_size`, fetched `concurrency` at a time and
        // taken in order. No new window is started once one has found nothing at its start.
        let ended = AtomicBool::new(false);
        let ended = &ended;
        let brief = &brief;
        let mut windows = stream::iter((0u64..).take_while(|_| !ended.load(Ordering::Acquire)))
            .map(|k| async move {
                let w = self
                    .window::<UserRep>("users", brief, k * page, (k + 1) * page, cancel)
                    .await;
                if matches!(&w, Ok(w) if w.ended) {
                    ended.store(true, Ordering::Release);
                }
                w
            })
            .buffered(self.settings.concurrency);
        let mut stats = SourceStats::default();
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut seen = IdSet::with_expected(expected);
        let (mut distinct, mut filled, mut short) = (0u64, 0u64, 0u64);
        while let Some(w) = windows.next().await {
            let w = w?;
            short += w.short;
            if !w.items.is_empty() {
                filled += 1;
            }
            let distinct_before = distinct;
            for u in w.items {
                if !seen.insert(&u.id) {
                    continue;
                }
                distinct += 1;
                if u.service_account_client_id.is_some()
                    || u.username.starts_with("service-account-")
                {
                    continue;
                }
                let roles = privileged
                    .get(&u.id)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                batch.push(Identity {
                    sub: u.id,
                    username: u.username,
                    email: u.email,
                    first_name: u.first_name,
                    last_name: u.last_name,
                    enabled: u.enabled.unwrap_or(false),
                    realm_roles: roles,
                });
                stats.listed += 1;
                if batch.len() >= self.batch_size {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_size));
                    out.send(full).await.map_err(|_| Error::Cancelled)?;
                }
            }
            // Once per page: the whole cost of progress reporting to the listing.
            progress.listed(distinct - distinct_before);
            // Each window holds at least one user at a position of its own, so an honest server
            // never fills many more windows than there are distinct users. Past that it ignores
            // `first`, and the listing would never reach an empty window.
            if filled > 2 * distinct + 16 {
                return Err(Error::Keycloak(format!(
                    "GET users: paging does not advance ({distinct} distinct users in {filled} windows); Keycloak or a proxy in front of it ignores the first parameter"
                )));
            }
        }
        // Short of the count: the run goes on narrowed to the listed users (the identities unit
        // concludes nothing from absence and says so), instead of one unlistable user stopping
        // every full run.
        if distinct < expected {
            stats.shortfall = Some(crate::identity::Shortfall {
                listed: distinct,
                counted: expected,
            });
        }
        if !batch.is_empty() {
            out.send(batch).await.map_err(|_| Error::Cancelled)?;
        }
        progress.listing_done();
        stats.requests = self.requests.load(Ordering::Relaxed);
        tracing::debug!(
            users.distinct = distinct,
            users.count = expected,
            short_pages = short,
            requests = stats.requests,
            "user listing complete"
        );
        Ok(stats)
    }
}

/// What `GET users/{id}` says of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Identity),
    /// 404: deleted in Keycloak (offboarded).
    Gone,
    /// A service account: not an identity.
    NotAnIdentity,
}

impl IdentityProvider for KeycloakSource {
    fn name(&self) -> &'static str {
        "keycloak"
    }

    fn keycloak_metrics(&self) -> Option<KeycloakMetrics> {
        Some(self.metrics.clone())
    }

    fn preflight(self: Arc<Self>, cancel: CancellationToken) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            // Every run starts from a fresh discovery document and token, so a Keycloak that moved
            // its endpoints or rotated its keys between runs is followed without a restart.
            *self.metadata.lock().await = None;
            self.forget_token();
            // Discovery, token, and one cheap call that needs view-users: a wrong secret, a missing
            // role or an unknown realm fails here, before anything is written.
            let _: serde_json::Value = self.get("users/count", &[], &cancel).await?;
            if !self.version_asked.load(Ordering::Relaxed) {
                self.read_server_version(&cancel).await;
            }
            Ok(())
        })
    }

    fn stream(
        self: Arc<Self>,
        out: mpsc::Sender<Vec<Identity>>,
        cancel: CancellationToken,
        progress: Progress,
    ) -> BoxFuture<'static, Result<SourceStats>> {
        Box::pin(async move { self.stream_users(out, &cancel, &progress).await })
    }
}

/// An Admin API answer read whole.
struct Answer {
    status: u16,
    /// The server's `Retry-After`, in seconds.
    asked: Option<Duration>,
    is_json: bool,
    body: Vec<u8>,
    took: Duration,
}

/// Why an Admin API request is worth repeating: it says the warning before each retry, and the
/// error once `keycloak.max_retries` are spent.
enum Transient {
    /// No answer: a connection error or a timeout.
    Unanswered(String),
    /// A 200 whose body is not what was asked for.
    Unreadable(String),
    /// The body did not arrive whole.
    CutShort(String),
    /// 429.
    RateLimited,
    /// A 5xx, and Keycloak's `error` field.
    Server(u16, String),
}

impl Transient {
    fn warn(&self, path: &str, attempt: u32, wait: Duration) {
        match self {
            Transient::Unanswered(reason) => {
                tracing::warn!(path, attempt, error = %reason, "Keycloak request failed; retrying")
            }
            Transient::Unreadable(reason) => {
                tracing::warn!(path, attempt, error = %reason, "Keycloak response unreadable; retrying")
            }
            Transient::CutShort(reason) => {
                tracing::warn!(path, attempt, error = %reason, "Keycloak response cut short; retrying")
            }
            Transient::RateLimited => {
                tracing::warn!(
                    path,
                    attempt,
                    retry_in_ms = wait.as_millis() as u64,
                    "Keycloak rate limited the request (429)"
                )
            }
            Transient::Server(status, _) => {
                tracing::warn!(
                    path,
                    attempt,
                    status = *status,
                    "Keycloak server error; retrying"
                )
            }
        }
    }

    fn give_up(self, path: &str, attempts: u32, target: &str) -> Error {
        let unavailable = |reason: String| Error::KeycloakUnavailable {
            target: target.to_string(),
            waited_secs: 0,
            reason,
        };
        match self {
            Transient::Unanswered(reason) => {
                unavailable(format!("GET {path}: {reason} ({attempts} attempts)"))
            }
            Transient::Unreadable(reason) => Error::Keycloak(format!(
                "GET {path}: Keycloak answered 200 with {reason} after {attempts} attempts"
            )),
            Transient::CutShort(reason) => unavailable(format!(
                "GET {path}: {reason} ({attempts} attempts; a smaller keycloak.page_size or a longer keycloak.request_timeout helps a slow Keycloak)"
            )),
            Transient::RateLimited => unavailable(format!(
                "GET {path}: still rate limited (429) after {attempts} attempts"
            )),
            Transient::Server(status, error) => unavailable(format!(
                "GET {path}: {status} {error} after {attempts} attempts"
            )),
        }
    }
}

/// The shared reqwest client, counting and timing each exchange openidconnect makes.
struct Instrumented<'a> {
    http: &'a reqwest::Client,
    metrics: &'a KeycloakMetrics,
}

type OidcAnswer = std::result::Result<HttpResponse, HttpClientError<reqwest::Error>>;

impl<'c> AsyncHttpClient<'c> for Instrumented<'_> {
    type Error = HttpClientError<reqwest::Error>;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = OidcAnswer> + Send + Sync + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let started = Instant::now();
            let answer = self.http.call(request).await;
            let outcome = match &answer {
                Ok(r) => KeycloakOutcome::of_status(r.status().as_u16()),
                Err(HttpClientError::Reqwest(e)) => KeycloakOutcome::of_reqwest(e),
                Err(_) => KeycloakOutcome::Transport,
            };
            self.metrics.request(outcome, started.elapsed());
            answer
        })
    }
}

/// Path segment encoding for role names (which may hold spaces or slashes): every byte but
/// RFC 3986's unreserved characters (ASCII letters and digits, `-._~`), as `%XX` in upper case.
fn enc(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

#[cfg(test)]
mod enc_tests {
    /// The hand-written encoder `enc` replaced, kept to show the output did not change.
    fn hand_written(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    #[test]
    fn enc_gives_what_the_hand_written_encoder_gave() {
        for s in [
            "a b/c?d#e%f+g@h:i",
            "platform-admin",
            "A.b_c~d",
            "",
            "rôle é/ü 日本 🙂",
            "\u{0}\t\n\r\u{7f}",
            "!$&'()*,;=[]{}|^`\"<>\\",
        ] {
            assert_eq!(super::enc(s), hand_written(s), "{s:?}");
        }
        assert_eq!(
            super::enc("a b/c?d#e%f+g@h:i"),
            "a%20b%2Fc%3Fd%23e%25f%2Bg%40h%3Ai"
        );
    }

    proptest::proptest! {
        #[test]
        fn enc_gives_what_the_hand_written_encoder_gave_for_any_string(s in ".*") {
            proptest::prop_assert_eq!(super::enc(&s), hand_written(&s));
        }
    }
}

/// Keycloak's `error` field of a JSON error body; never the body itself.
fn error_field(bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct E {
        error: Option<String>,
        #[serde(rename = "errorMessage")]
        error_message: Option<String>,
    }
    match serde_json::from_slice::<E>(bytes) {
        Ok(E { error: Some(e), .. })
        | Ok(E {
            error_message: Some(e),
            ..
        }) => e.chars().take(200).collect(),
        _ => "(non-JSON body)".to_string(),
    }
}

fn inner_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Whether the issuer Keycloak announces may be used (issue 17). With `keycloak.issuer` set it
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
                || path.ends_with(&format!("/realms/{}", enc(realm))))
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
        .or_else(|| issuer.strip_suffix(&format!("/realms/{}", enc(realm))));
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
    let missing: Vec<&str> = ["view-users", "view-realm"]
        .into_iter()
        .filter(|r| !roles.contains(r))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::KeycloakAuth(format!(
            "service account of client {client_id:?} lacks realm-management role{} {}: assign them in Keycloak (Clients > {client_id} > Service accounts roles > realm-management)",
            if missing.len() > 1 { "s" } else { "" },
            missing.join(" and ")
        ).into()))
    }
}

/// A user event (`GET events`), as much of it as the event follower reads.
#[derive(Debug, Clone, Deserialize)]
pub struct UserEvent {
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
pub struct AdminEvent {
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
pub enum Stream {
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
    /// A fresh discovery and token, as a run's preflight does (the event follower's start).
    pub async fn reconnect(&self) {
        *self.metadata.lock().await = None;
        self.forget_token();
    }

    /// The realm's event settings. A 403 means the service account lacks `view-events`.
    pub async fn events_config(&self, cancel: &CancellationToken) -> Result<EventsConfig> {
        self.get("events/config", &[], cancel)
            .await
            .map_err(|e| self.view_events_needed(e, "events/config"))
    }

    /// One page of a stream's events at or after `from_ms`, oldest first.
    pub async fn events_page<T: DeserializeOwned>(
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
        self.get(stream.path(), &q, cancel)
            .await
            .map_err(|e| self.view_events_needed(e, stream.path()))
    }

    /// One user as an identity (`GET users/{id}` and its effective realm roles, composites and
    /// groups expanded by Keycloak in `role-mappings/realm/composite`), or why not: the user is
    /// gone (404), or is a service account.
    pub async fn user_identity(&self, id: &str, cancel: &CancellationToken) -> Result<Lookup> {
        let path = format!("users/{}", enc(id));
        let u: UserRep = match self.get(&path, &[], cancel).await {
            Ok(u) => u,
            Err(Error::Keycloak(m)) if m.contains(": 404 ") => return Ok(Lookup::Gone),
            Err(e) => return Err(e),
        };
        if u.service_account_client_id.is_some() || u.username.starts_with("service-account-") {
            return Ok(Lookup::NotAnIdentity);
        }
        let roles: Vec<RoleRep> = match self
            .get(
                &format!("{path}/role-mappings/realm/composite"),
                &[],
                cancel,
            )
            .await
        {
            Ok(r) => r,
            // Deleted between the two requests.
            Err(Error::Keycloak(m)) if m.contains(": 404 ") => return Ok(Lookup::Gone),
            Err(e) => return Err(e),
        };
        Ok(Lookup::Found(Identity {
            sub: u.id,
            username: u.username,
            email: u.email,
            first_name: u.first_name,
            last_name: u.last_name,
            enabled: u.enabled.unwrap_or(false),
            realm_roles: self.filter.keep(roles.into_iter().map(|r| r.name)),
        }))
    }

    /// Reads the server's version (`GET /admin/serverinfo`), logs it, exports it as
    /// `seedkeeper_keycloak_info` and warns when it is outside [`TESTED_VERSIONS`]. Never fails
    /// the run: the version is information, and the service account may lawfully lack the role
    /// that shows it (a 403, or a 200 without `systemInfo`), which is logged at debug only. One
    /// attempt, no retries: an unanswered request is asked again at the next preflight.
    async fn read_server_version(&self, cancel: &CancellationToken) {
        let url = format!("{}/admin/serverinfo", self.base);
        // A token that cannot be had fails the preflight's own request before this one.
        let Ok(token) = self.token(cancel).await else {
            return;
        };
        let answer = match self.fetch(&url, &[], &token).await {
            Ok(a) => a,
            Err(_) => {
                tracing::debug!(
                    url,
                    "Keycloak version not read: no answer; asked again at the next run"
                );
                return;
            }
        };
        if answer.status >= 500 {
            // Keycloak failing now says nothing of the version: asked again at the next run.
            tracing::debug!(
                url,
                status = answer.status,
                "Keycloak version not read: server error; asked again at the next run"
            );
            return;
        }
        self.version_asked.store(true, Ordering::Relaxed);
        if answer.status != 200 {
            // fetch counted it; 403 is a service account without any realm-management role
            // serverinfo accepts.
            tracing::debug!(
                url,
                status = answer.status,
                "Keycloak version not read: serverinfo refused"
            );
            return;
        }
        let version = match serde_json::from_slice::<ServerInfo>(&answer.body) {
            Ok(info) => {
                self.metrics.request(KeycloakOutcome::Ok, answer.took);
                info.system_info.and_then(|s| s.version)
            }
            Err(_) => {
                self.metrics
                    .request(KeycloakOutcome::Malformed, answer.took);
                None
            }
        };
        let Some(version) = version else {
            tracing::debug!(
                url,
                "Keycloak version not read: serverinfo shows it only to realm-management manage-realm (Keycloak 26.5 and later; 26.4 to no realm service account), which the service account need not have"
            );
            return;
        };
        let tested = in_tested_range(&version);
        self.metrics.set_server_version(&version, tested);
        tracing::info!(keycloak.version = %version, "Keycloak server version");
        if !tested {
            tracing::warn!(
                keycloak.version = %version,
                tested = %TESTED_VERSIONS.join(", "),
                "Keycloak version outside the tested range: seedkeeper was tested against Keycloak {} to {}; run the conformance suite against this version (docs/testing.md)",
                TESTED_VERSIONS.first().copied().unwrap_or("?"),
                TESTED_VERSIONS.last().copied().unwrap_or("?"),
            );
        }
    }

    /// A 403 on an events endpoint names `view-events`, not the listing's roles.
    fn view_events_needed(&self, e: Error, path: &str) -> Error {
        match e {
            Error::KeycloakAuth(Refusal {
                status: Some(403),
                ..
            }) => Error::KeycloakAuth(Refusal::http(403, format!(
                "GET {path}: 403: the service account of client {:?} lacks realm-management role view-events: assign it in Keycloak (Clients > {} > Service accounts roles > realm-management > view-events)",
                self.client_id(),
                self.client_id()
            ))),
            other => other,
        }
    }

    /// Requests made so far (every attempt counts).
    pub fn request_count(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    const DOC: &str = "http://keycloak:8080/realms/x/.well-known/openid-configuration";

    #[test]
    fn the_tested_range_spans_the_tested_minors_and_their_patches() {
        for v in [
            "26.4.0", "26.4.7", "26.4.9", "26.5.6", "26.6.0", "26.7.3", "26.7.12",
        ] {
            assert!(in_tested_range(v), "{v}");
        }
        for v in ["26.3.5", "25.0.6", "26.8.0", "27.0.0", "nightly", "", "26"] {
            assert!(!in_tested_range(v), "{v}");
        }
        assert!(in_tested_range("26.5.0-SNAPSHOT"));
        for v in TESTED_VERSIONS {
            assert!(in_tested_range(v), "{v}");
        }
    }

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
