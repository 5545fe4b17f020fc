//! The admin API client of one Keycloak realm, shared by the identity source and the event
//! follower: the HTTP transport (rustls, timeouts, no redirects), the retry policy, paging, and
//! the token and discovery of [`super::auth`], each exchange counted in the [`KeycloakMetrics`]
//! it is handed. Error messages carry the API path and Keycloak's `error` field, never a body.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openidconnect::{
    AsyncHttpClient, HttpClientError, HttpRequest, HttpResponse, IssuerUrl, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::KeycloakSettings;
use crate::error::{chain, Error, Refusal, Result};
use crate::metrics::{KeycloakMetrics, KeycloakOutcome};
use crate::retry::{self, Limit, Policy, Retry};
use crate::trust;

/// The first wait between request attempts; each further one doubles, up to `MAX_BACKOFF`.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Page size for roles, groups and role members.
const AUX_PAGE: u32 = 500;

/// What paged items are deduplicated by.
pub(super) trait Keyed {
    fn key(&self) -> &str;
}

/// How many pages in a row may repeat the first page's items before the listing is taken for
/// one that does not advance: a server that ignores `first` answers every request with the
/// first page, and would never reach an empty one.
pub(super) const REPEATS_ALLOWED: u32 = 16;

/// The first page's keys (one page, bounded by its size), to tell a server that ignores
/// `first` in a listing that keeps no set of all the keys it saw (that would grow with the
/// realm): every later page of such a server holds only these items.
#[derive(Default)]
pub(super) struct FirstPage {
    keys: Option<HashSet<String>>,
    /// Later pages in a row that held only items of the first.
    repeats: u32,
}

impl FirstPage {
    /// Looks at a non-empty page; `true` while the paging looks like it advances.
    pub(super) fn advances<T: Keyed>(&mut self, items: &[T]) -> bool {
        match &self.keys {
            None => {
                self.keys = Some(items.iter().map(|i| i.key().to_string()).collect());
                true
            }
            Some(first) if items.iter().all(|i| first.contains(i.key())) => {
                self.repeats += 1;
                self.repeats <= REPEATS_ALLOWED
            }
            Some(_) => {
                self.repeats = 0;
                true
            }
        }
    }
}

/// A paged admin endpoint read a page at a time (`first` advanced by what each page returned,
/// `max` of [`AUX_PAGE`]) until a page comes back empty: [`AdminClient::get_all`] keeps its
/// pages, the listings that can be as long as the realm (a role's or a group's members) pass
/// each on and keep none. A page shorter than asked is not the end: servers cap `max` and
/// filter after the query. Repeats are passed on; each reader tells a server that ignores
/// `first` its own way.
pub(super) struct Pages<'a> {
    path: String,
    extra: &'a [(&'a str, String)],
    first: u64,
    ended: bool,
}

impl<'a> Pages<'a> {
    pub(super) fn new(path: String, extra: &'a [(&'a str, String)]) -> Self {
        Pages {
            path,
            extra,
            first: 0,
            ended: false,
        }
    }

    /// The next non-empty page, or `None` once a page came back empty.
    pub(super) async fn next<T: DeserializeOwned>(
        &mut self,
        client: &AdminClient,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<T>>> {
        if self.ended {
            return Ok(None);
        }
        let mut q: Vec<(&str, String)> = vec![
            ("first", self.first.to_string()),
            ("max", AUX_PAGE.to_string()),
        ];
        q.extend(self.extra.iter().cloned());
        let page: Vec<T> = client.get(&self.path, &q, cancel).await?;
        if page.is_empty() {
            self.ended = true;
            return Ok(None);
        }
        self.first += page.len() as u64;
        Ok(Some(page))
    }

    /// The error of a listing whose pages repeat its first one ([`FirstPage`]).
    pub(super) fn repeating(&self) -> Error {
        let path = &self.path;
        Error::keycloak(path, format!(
            "GET {path}: paging does not advance ({} items returned, the last {REPEATS_ALLOWED} pages holding only the first page's items again); Keycloak or a proxy in front of it ignores the first parameter",
            self.first
        ))
    }
}

/// One window of a paged listing.
pub(super) struct Window<T> {
    pub(super) items: Vec<T>,
    /// The window's first request returned `[]`: the listing is over.
    pub(super) ended: bool,
    /// Pages shorter than asked before the window was covered.
    pub(super) short: u64,
}

// The client's discovery and token state is declared here, beside the client that holds it;
// `auth` fills it. Declared there, the two files would import each other.

/// What discovery established: the issuer Keycloak announces, accepted for the configured realm,
/// and the token endpoint as reached through `keycloak.base_url`.
#[derive(Debug, Clone)]
pub(super) struct Discovered {
    pub(super) issuer: IssuerUrl,
    pub(super) token_url: TokenUrl,
}

/// The access token and when to renew it (shortly before `expires_in` runs out).
pub(super) struct CachedToken {
    pub(super) token: SecretString,
    pub(super) renew_at: Instant,
}

/// The admin API client (see the module documentation). Built once per process and shared.
pub(crate) struct AdminClient {
    pub(super) settings: KeycloakSettings,
    pub(super) base: String,
    pub(super) http: reqwest::Client,
    /// Startup wait for discovery (the daemon's `startup.wait_timeout`).
    pub(super) wait: Duration,
    pub(super) metadata: tokio::sync::Mutex<Option<Discovered>>,
    /// The issuer last logged, so that it is logged at start and when it changes, not per run.
    pub(super) issuer_logged: Mutex<Option<String>>,
    pub(super) token: Mutex<Option<CachedToken>>,
    /// Held while a token is asked for, so that however many requests find the token expired
    /// or refused at once, one asks for a new one and the others use it.
    pub(super) renewing: tokio::sync::Mutex<()>,
    /// The server's version was asked for and answered (read, or refused for good): it is asked
    /// once per process, at the first preflight that gets an answer.
    pub(super) version_asked: AtomicBool,
    pub(super) requests: AtomicU64,
    /// Every HTTP exchange (counted by outcome and timed) and every retry.
    pub(super) metrics: KeycloakMetrics,
}

impl AdminClient {
    /// A client of `settings`' realm, counting into `metrics`; `wait` bounds the wait for
    /// discovery at start.
    pub fn new(
        settings: &KeycloakSettings,
        wait: Duration,
        metrics: KeycloakMetrics,
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
        Ok(AdminClient {
            settings: settings.clone(),
            base,
            http,
            wait,
            metadata: tokio::sync::Mutex::new(None),
            issuer_logged: Mutex::new(None),
            token: Mutex::new(None),
            renewing: tokio::sync::Mutex::new(()),
            version_asked: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            metrics,
        })
    }

    /// The client's request and retry counters.
    #[cfg(feature = "testing")]
    pub fn metrics(&self) -> &KeycloakMetrics {
        &self.metrics
    }

    /// The HTTP client for openidconnect (discovery, JWKS, token): each exchange counted by its
    /// outcome and timed like the admin API requests.
    pub(super) fn oidc_http(&self) -> Instrumented<'_> {
        Instrumented {
            http: &self.http,
            metrics: &self.metrics,
        }
    }

    pub(super) fn realm(&self) -> &str {
        &self.settings.realm
    }

    pub(super) fn client_id(&self) -> &str {
        &self.settings.client_id
    }

    /// Token and Admin API requests: `keycloak.max_retries` retries, 200 ms doubling up to 5 s
    /// between them (each wait jittered down to half), or at least what a 429's `Retry-After`
    /// asks, up to 30 s (see [`crate::retry`]).
    pub(super) fn request_policy(&self) -> Policy {
        let retries = Limit::Retries(self.settings.max_retries);
        Policy {
            max_after: MAX_RETRY_AFTER,
            ..Policy::new(BACKOFF_BASE, MAX_BACKOFF, retries)
        }
    }

    /// GET an admin API path: the token renewed once on a 401, what is worth repeating retried
    /// under [`Self::request_policy`], every other answer an error that says the fix.
    pub(super) async fn get<T: DeserializeOwned>(
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
    pub(super) async fn get_once<T: DeserializeOwned>(
        &self,
        url: &str,
        path: &str,
        query: &[(&str, String)],
        renewed: &AtomicBool,
        cancel: &CancellationToken,
    ) -> Result<T, Retry<Transient>> {
        let token = self.token(cancel).await.map_err(Retry::Fail)?;
        let answer = self.fetch(url, query, &token).await?;
        self.read_answer(path, answer, renewed, &token)
    }

    /// Sends one GET and reads its answer whole; counted, unless it is a 200 (counted once its
    /// body is parsed). No answer, or a body cut short, is worth repeating.
    pub(super) async fn fetch(
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
                // Out of descriptors is this process's problem, not Keycloak's: not retried.
                if crate::error::is_too_many_open_files(&e) {
                    return Err(Retry::Fail(Error::TooManyOpenFiles {
                        doing: format!("connecting to Keycloak ({url})"),
                    }));
                }
                let reason = if e.is_timeout() {
                    "timed out".to_string()
                } else {
                    chain(&e)
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
                    format!("body cut off: {}", chain(&e))
                };
                Err(Retry::Backoff(Transient::CutShort(reason)))
            }
        }
    }

    /// What an answer to `GET path` means: the value, a retry (a first 401 renews the token), or
    /// an error that says the fix.
    pub(super) fn read_answer<T: DeserializeOwned>(
        &self,
        path: &str,
        answer: Answer,
        renewed: &AtomicBool,
        token: &SecretString,
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
                self.forget_token(token);
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
                // Keycloak's own answer for an unknown realm: {"error":"Realm not found."}.
                Retry::Fail(if err.trim_end_matches('.') == "Realm not found" {
                    Error::KeycloakAuth(Refusal::http(404, format!(
                        "realm {:?} not found at {}: fix keycloak.realm (SEEDKEEPER_KEYCLOAK__REALM)",
                        self.realm(),
                        self.base
                    )))
                } else {
                    Error::Keycloak {
                        path: path.to_string(),
                        status: Some(404),
                        message: format!("GET {path}: 404 {err}"),
                    }
                })
            }
            429 => match asked {
                Some(d) => Retry::After(d, Transient::RateLimited),
                None => Retry::Backoff(Transient::RateLimited),
            },
            s if s >= 500 => Retry::Backoff(Transient::Server(s, error_field(&body))),
            s => Retry::Fail(Error::Keycloak {
                path: path.to_string(),
                status: Some(s),
                message: format!("GET {path}: unexpected status {s} {}", error_field(&body)),
            }),
        })
    }

    /// Every item of a paged admin endpoint (roles, clients, a role's groups, a group's
    /// children), read with [`Pages`] and deduplicated by key.
    pub(super) async fn get_all<T: DeserializeOwned + Keyed>(
        &self,
        path: &str,
        extra: &[(&str, String)],
        cancel: &CancellationToken,
    ) -> Result<Vec<T>> {
        let mut out: Vec<T> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut pages = Pages::new(path.to_string(), extra);
        while let Some(page) = pages.next::<T>(self, cancel).await? {
            for item in page {
                if seen.insert(item.key().to_string()) {
                    out.push(item);
                }
            }
            // With a server that honours `first`, an item is returned by at most AUX_PAGE
            // requests, so `first` never passes that many times the distinct items. Past it the
            // server (or a proxy) ignores `first`, and the loop would never see an empty page.
            let first = pages.first;
            if first > (out.len() as u64 + 1) * u64::from(AUX_PAGE) {
                return Err(Error::keycloak(path, format!(
                    "GET {path}: paging does not advance ({} distinct items after {first} returned); Keycloak or a proxy in front of it ignores the first parameter",
                    out.len()
                )));
            }
        }
        Ok(out)
    }

    /// One window `[start, end)` of a paged listing: requests `first=offset, max=end-offset`,
    /// advancing `offset` by what each returned, until the window is covered or a request
    /// returns `[]`. `ended` is set when the window's first request returned `[]`.
    pub(super) async fn window<T: DeserializeOwned>(
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

    /// A fresh discovery and token, as a run's preflight does (the event follower's start).
    pub(crate) async fn reconnect(&self) {
        *self.metadata.lock().await = None;
        self.forget_tokens();
    }

    /// A 403 on an events endpoint names `view-events`, not the listing's roles.
    pub(super) fn view_events_needed(&self, e: Error, path: &str) -> Error {
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

    /// A 403 on a client endpoint names `view-clients`, which the client-role part of the
    /// effective roles needs (with only `query-clients`, Keycloak lists no client at all).
    pub(super) fn view_clients_needed(&self, e: Error, path: &str) -> Error {
        match e {
            Error::KeycloakAuth(Refusal {
                status: Some(403),
                ..
            }) => Error::KeycloakAuth(Refusal::http(403, format!(
                "GET {path}: 403: the service account of client {:?} lacks realm-management role view-clients (needed to find the client roles that grant mapped realm roles): assign it in Keycloak (Clients > {} > Service accounts roles > realm-management > view-clients)",
                self.client_id(),
                self.client_id()
            ))),
            other => other,
        }
    }

    /// Requests made so far (every attempt counts).
    pub(crate) fn request_count(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// An Admin API answer read whole.
pub(super) struct Answer {
    pub(super) status: u16,
    /// The server's `Retry-After`, in seconds.
    pub(super) asked: Option<Duration>,
    pub(super) is_json: bool,
    pub(super) body: Vec<u8>,
    pub(super) took: Duration,
}

/// Why an Admin API request is worth repeating: it says the warning before each retry, and the
/// error once `keycloak.max_retries` are spent.
pub(super) enum Transient {
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
    pub(super) fn warn(&self, path: &str, attempt: u32, wait: Duration) {
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

    pub(super) fn give_up(self, path: &str, attempts: u32, target: &str) -> Error {
        let unavailable = |reason: String| Error::KeycloakUnavailable {
            target: target.to_string(),
            waited_secs: 0,
            reason,
        };
        match self {
            Transient::Unanswered(reason) => {
                unavailable(format!("GET {path}: {reason} ({attempts} attempts)"))
            }
            Transient::Unreadable(reason) => Error::keycloak(path, format!(
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
pub(super) struct Instrumented<'a> {
    pub(super) http: &'a reqwest::Client,
    pub(super) metrics: &'a KeycloakMetrics,
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

/// One path segment of an admin API URL (a role name, which may hold spaces or slashes, a
/// client or user id), percent-encoded: every byte but
/// RFC 3986's unreserved characters (ASCII letters and digits, `-._~`), as `%XX` in upper case.
pub(super) fn path_segment(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// Keycloak's `error` field of a JSON error body; never the body itself.
pub(super) fn error_field(bytes: &[u8]) -> String {
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
    fn path_segment_gives_what_the_hand_written_encoder_gave() {
        for s in [
            "a b/c?d#e%f+g@h:i",
            "platform-admin",
            "A.b_c~d",
            "",
            "rôle é/ü 日本 🙂",
            "\u{0}\t\n\r\u{7f}",
            "!$&'()*,;=[]{}|^`\"<>\\",
        ] {
            assert_eq!(super::path_segment(s), hand_written(s), "{s:?}");
        }
        assert_eq!(
            super::path_segment("a b/c?d#e%f+g@h:i"),
            "a%20b%2Fc%3Fd%23e%25f%2Bg%40h%3Ai"
        );
    }

    proptest::proptest! {
        #[test]
        fn path_segment_gives_what_the_hand_written_encoder_gave_for_any_string(s in ".*") {
            proptest::prop_assert_eq!(super::path_segment(&s), hand_written(&s));
        }
    }
}
