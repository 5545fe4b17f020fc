//! HTTP: `/healthz` (liveness: the process serves, its scheduler ticks and no run outlived its
//! deadline; never PostgreSQL or Keycloak), `/readyz` (readiness: the database answers on the
//! one connection kept for it, and the last run succeeded; 503 with a short JSON reason
//! otherwise), `/metrics` (Prometheus text). Reads `http.listen`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::state::{App, HEARTBEAT_STALE, PROBE_TIMEOUT};
use crate::reconcile::Outcome;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(app)
}

pub async fn serve(app: Arc<App>, listener: TcpListener, cancel: CancellationToken) {
    let r = axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let l = app.liveness();
    let body = json!({
        "status": if l.problem.is_none() { "ok" } else { "wedged" },
        "scheduler": {
            "heartbeat_age_ms": l.heartbeat_age.as_millis() as u64,
            "stale_after_ms": HEARTBEAT_STALE.as_millis() as u64,
        },
        "run": {
            "in_flight_ms": l.run_age.map(|a| a.as_millis() as u64),
            "timeout_ms": app.settings().run.timeout.as_millis() as u64,
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

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let not_ready = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": reason})),
        )
            .into_response()
    };
    if let Err(reason) = app.probe_database(PROBE_TIMEOUT).await {
        return not_ready(reason);
    }
    match app.last_outcome() {
        Some(Outcome::Succeeded) => {
            (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
        }
        Some(_) => not_ready("the last run failed; see `seedkeeper status` or the logs".into()),
        // Every run so far was skipped: another replica holds the lock and does the work.
        None if app.first_run_done() => (
            StatusCode::OK,
            Json(json!({"status": "ready", "note": "another replica reconciles"})),
        )
            .into_response(),
        None => not_ready("the first run has not finished yet".into()),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}
