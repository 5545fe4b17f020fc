//! An HTTP proxy in front of the real Keycloak, for the faults that must come from the real
//! server's own answers: it forwards every request unchanged (Host included, so Keycloak's
//! discovery and tokens name the proxy), counts them, can hold one request back for a while
//! (a token then expires in flight), and can stop listening mid-listing (Keycloak stopped:
//! connections are refused).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode, Uri};
use axum::response::Response;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Faults {
    /// Hold the nth admin users-page request (1-based) back this long before forwarding.
    delay_users_page: Mutex<Option<(usize, Duration)>>,
    /// Stop listening once this many users pages were forwarded.
    stop_after_users_pages: Mutex<Option<usize>>,
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    admin: AtomicUsize,
    users_pages: AtomicUsize,
    token: AtomicUsize,
    stopped: AtomicBool,
    faults: Faults,
    stop: CancellationToken,
}

pub struct KeycloakProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl KeycloakProxy {
    pub async fn start(upstream: &str) -> KeycloakProxy {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("proxy client"),
            admin: AtomicUsize::new(0),
            users_pages: AtomicUsize::new(0),
            token: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            faults: Faults::default(),
            stop: CancellationToken::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(shared.clone());
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        KeycloakProxy { shared, addr }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_requests(&self) -> usize {
        self.shared.admin.load(Ordering::SeqCst)
    }

    pub fn token_requests(&self) -> usize {
        self.shared.token.load(Ordering::SeqCst)
    }

    pub fn delay_users_page(&self, nth: usize, d: Duration) {
        *self.shared.faults.delay_users_page.lock().unwrap() = Some((nth, d));
    }

    pub fn stop_after_users_pages(&self, n: usize) {
        *self.shared.faults.stop_after_users_pages.lock().unwrap() = Some(n);
    }

    pub fn users_pages(&self) -> usize {
        self.shared.users_pages.load(Ordering::SeqCst)
    }

    pub fn stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }
}

impl Drop for KeycloakProxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn forward(State(s): State<Arc<Shared>>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if s.stopped.load(Ordering::SeqCst) {
        return reset();
    }
    if path.starts_with("/admin/") {
        s.admin.fetch_add(1, Ordering::SeqCst);
        if path.ends_with("/users") {
            let page = s.users_pages.fetch_add(1, Ordering::SeqCst) + 1;
            let limit = *s.faults.stop_after_users_pages.lock().unwrap();
            if limit.is_some_and(|limit| page > limit) {
                // Keycloak "stopped": stop listening; this and later connections fail.
                s.stopped.store(true, Ordering::SeqCst);
                s.stop.cancel();
                return reset();
            }
            let delay = *s.faults.delay_users_page.lock().unwrap();
            if let Some((nth, d)) = delay {
                if nth == page {
                    tokio::time::sleep(d).await;
                }
            }
        }
    } else if path.ends_with("/protocol/openid-connect/token") {
        s.token.fetch_add(1, Ordering::SeqCst);
    }
    let body = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    relay(&s, parts.method, &parts.uri, &parts.headers, body).await
}

fn reset() -> Response {
    // An answer that cannot be taken for Keycloak's: a connection-level failure is what a
    // stopped server gives, and the listener is closed for every later connection.
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .header("connection", "close")
        .body(Body::from("proxy: upstream stopped"))
        .expect("response")
}

async fn relay(
    s: &Shared,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = s.http.request(method, format!("{}{pq}", s.upstream));
    for (k, v) in headers {
        if k != "content-length" && k != "connection" {
            req = req.header(k, v);
        }
    }
    let res = match req.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::from(format!("proxy: {e}")))
                .expect("response")
        }
    };
    let mut out = Response::builder().status(res.status().as_u16());
    for (k, v) in res.headers() {
        if k != "content-length" && k != "transfer-encoding" && k != "connection" {
            out = out.header(k, v);
        }
    }
    let bytes = res.bytes().await.unwrap_or_default();
    out.body(Body::from(bytes)).expect("response")
}
