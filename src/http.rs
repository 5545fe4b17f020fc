//! HTTP: `/healthz` (liveness: the process serves, its scheduler ticks and no run outlived its
//! deadline; never PostgreSQL or Keycloak), `/readyz` (readiness: the database answers on the
//! one connection kept for it, and the last run succeeded; 503 with a short JSON reason
//! otherwise), `/metrics` (Prometheus text). Reads `http.listen`, `http.max_connections` and
//! `http.header_read_timeout`.
//!
//! The accept loop is written here rather than left to `axum::serve`, so that hostile clients
//! cannot blind the probes:
//! - a client has `http.header_read_timeout` to send a request's headers, and a kept-alive
//!   connection as long to start its next request (hyper's header-read timer covers both), so a
//!   slowloris client trickling a header every few seconds, or one that connects and says
//!   nothing, is closed;
//! - at most `http.max_connections` connections are held. At the cap a new connection takes the
//!   place of the one that has waited longest without a request in progress (closed at once),
//!   and is refused only when every connection is busy with a request: a flood of idle or
//!   trickling connections cannot starve a probe that arrives after it, and never queues;
//! - running out of file descriptors while accepting is reported as such (naming `LimitNOFILE`
//!   and the cap), at most every few seconds, and the loop waits a moment instead of spinning.
//!
//! On shutdown (the token), every connection is asked to finish (an idle one closes at once),
//! and those still open after [`SHUTDOWN_MOMENT`] are dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::health::{Health, HEARTBEAT_STALE, PROBE_TIMEOUT};
use crate::reconcile::Outcome;

/// How long connections may take to finish once shutdown is asked, before they are dropped.
pub(crate) const SHUTDOWN_MOMENT: Duration = Duration::from_secs(1);

/// After an accept that failed for want of descriptors: how long to wait before the next, and
/// how often at most to say so.
const EMFILE_PAUSE: Duration = Duration::from_millis(100);
const EMFILE_WARN_EVERY: Duration = Duration::from_secs(10);

pub(crate) fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

pub async fn serve(health: Arc<Health>, listener: TcpListener, cancel: CancellationToken) {
    let http = health.gate().settings().http.clone();
    let slots = Slots::new(http.max_connections);
    let service = TowerToHyperService::new(router(health));
    let connections = TaskTracker::new();
    let mut last_emfile_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                if crate::error::is_too_many_open_files(&e) {
                    if last_emfile_warning.is_none_or(|t| t.elapsed() >= EMFILE_WARN_EVERY) {
                        last_emfile_warning = Some(Instant::now());
                        let e = Error::TooManyOpenFiles {
                            doing: "accepting an HTTP connection".into(),
                        };
                        tracing::warn!(kind = e.kind().as_str(), "{e}");
                    }
                    // The listener stays readable while the backlog holds connections: without a
                    // pause the loop would spin until a descriptor is free.
                    if crate::retry::sleep_or_cancel(EMFILE_PAUSE, &cancel)
                        .await
                        .is_err()
                    {
                        break;
                    }
                } else if !is_connection_error(&e) {
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    if crate::retry::sleep_or_cancel(EMFILE_PAUSE, &cancel)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                continue;
            }
        };
        let Some(slot) = slots.take() else {
            // Every connection is in the middle of a request: this one is closed at once
            // rather than queued.
            tracing::debug!(
                max_connections = http.max_connections,
                "HTTP connection refused: every connection is busy"
            );
            continue;
        };
        connections.spawn(connection(
            stream,
            service.clone(),
            slot,
            http.header_read_timeout,
            cancel.clone(),
        ));
    }
    connections.close();
    if tokio::time::timeout(SHUTDOWN_MOMENT, connections.wait())
        .await
        .is_err()
    {
        slots.close_all();
        connections.wait().await;
    }
}

/// Errors of one connection that the listener survives (the client went away before accept).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// One connection, served until it ends, its slot is taken by a newer connection, or shutdown.
async fn connection(
    stream: TcpStream,
    service: TowerToHyperService<Router>,
    slot: Slot,
    header_read_timeout: Duration,
    cancel: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let busy = slot.busy.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = Busy::enter(busy.clone());
        let answer = service.call(req);
        async move {
            let r = answer.await;
            drop(guard);
            r
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
            return;
        }
        // Dropped: the socket closes at once.
        _ = slot.close.cancelled() => return,
        _ = cancel.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = slot.close.cancelled() => {}
    }
}

/// Marks a connection busy while a request is being answered (a request dropped half-way
/// included).
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn enter(flag: Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Relaxed);
        Busy(flag)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The connections held, oldest first (ids grow), for the cap.
struct Slots {
    max: usize,
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Open>>,
}

struct Open {
    busy: Arc<AtomicBool>,
    close: CancellationToken,
}

/// A connection's place among [`Slots`]; given back when dropped.
struct Slot {
    id: u64,
    busy: Arc<AtomicBool>,
    close: CancellationToken,
    slots: Arc<Slots>,
}

impl Slots {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Slots {
            max: max.max(1),
            next: AtomicU64::new(0),
            open: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Open>> {
        // Nothing panics while holding it; were it poisoned, the map is still whole.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection: free, or taken from the oldest connection without a
    /// request in progress (closed at once); `None` when every connection is busy.
    fn take(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.lock();
        if open.len() >= self.max {
            let idle = open
                .iter()
                .find(|(_, o)| !o.busy.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            if let Some(o) = open.remove(&idle) {
                o.close.cancel();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let busy = Arc::new(AtomicBool::new(false));
        let close = CancellationToken::new();
        open.insert(
            id,
            Open {
                busy: busy.clone(),
                close: close.clone(),
            },
        );
        Some(Slot {
            id,
            busy,
            close,
            slots: self.clone(),
        })
    }

    /// Closes every connection (the end of shutdown).
    fn close_all(&self) {
        for (_, o) in std::mem::take(&mut *self.lock()) {
            o.close.cancel();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().remove(&self.id);
    }
}

async fn healthz(State(health): State<Arc<Health>>) -> Response {
    let l = health.liveness();
    let body = json!({
        "status": if l.problem.is_none() { "ok" } else { "wedged" },
        "scheduler": {
            "heartbeat_age_ms": l.heartbeat_age.as_millis() as u64,
            "stale_after_ms": HEARTBEAT_STALE.as_millis() as u64,
        },
        "run": {
            "in_flight_ms": l.run_age.map(|a| a.as_millis() as u64),
            "timeout_ms": health.gate().settings().run.timeout.as_millis() as u64,
        },
        "reason": l.problem,
    });
    let status = if l.problem.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn readyz(State(health): State<Arc<Health>>) -> Response {
    let not_ready = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": reason})),
        )
            .into_response()
    };
    if let Err(reason) = health.probe_database(PROBE_TIMEOUT).await {
        return not_ready(reason);
    }
    match health.gate().last_outcome() {
        Some(Outcome::Succeeded) => {
            (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
        }
        Some(_) => not_ready("the last run failed; see `seedkeeper status` or the logs".into()),
        // Every run so far was skipped: another replica holds the lock and does the work.
        None if health.gate().first_run_done() => (
            StatusCode::OK,
            Json(json!({"status": "ready", "note": "another replica reconciles"})),
        )
            .into_response(),
        None => not_ready("the first run has not finished yet".into()),
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        health.gate().metrics().render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room_and_busy_ones_are_kept() {
        let slots = Slots::new(2);
        let a = slots.take();
        let b = slots.take();
        let (Some(a), Some(b)) = (a, b) else {
            panic!("two free slots")
        };
        a.busy.store(true, Ordering::Relaxed);
        // Full: b is the oldest idle one, so it goes.
        let c = slots.take();
        assert!(!a.close.is_cancelled());
        assert!(b.close.is_cancelled());
        let Some(c) = c else { panic!("b's slot") };
        drop(b);
        assert_eq!(slots.lock().len(), 2, "b's drop does not free c's slot");
        c.busy.store(true, Ordering::Relaxed);
        // Every connection busy: refused.
        assert!(slots.take().is_none());
        drop(c);
        assert!(slots.take().is_some());
    }
}
