//! HTTP: `/healthz` (the process serves), `/readyz` (the database answers and the last run
//! succeeded; 503 with a short JSON reason otherwise), `/metrics` (Prometheus text).
//! Reads `http.listen`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::reconcile::Outcome;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
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

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let not_ready = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": reason})),
        )
            .into_response()
    };
    let db = tokio::time::timeout(Duration::from_secs(3), async {
        let db = crate::store::connect(&app.settings().database).await?;
        db.client
            .query_one("SELECT 1", &[])
            .await
            .map_err(crate::store::ctx("probing the database"))?;
        Ok::<_, crate::error::Error>(())
    })
    .await;
    match db {
        Err(_) => return not_ready("database did not answer within 3s".into()),
        Ok(Err(e)) => return not_ready(format!("database unreachable: {}", e.metric_label())),
        Ok(Ok(())) => {}
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
