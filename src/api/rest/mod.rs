//! The REST port: liveness and readiness probes.

use crate::registry::Registry;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::future::Future;
use std::sync::Arc;

/// The REST router.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(registry)
}

/// Serves REST on `listener` until `shutdown` resolves; `admin` adds the admin routes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    admin: Option<Router>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(registry).merge(admin.unwrap_or_default()))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Liveness: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: every configured model has an AVAILABLE version and the server is not
/// draining; otherwise 503 with what is missing.
async fn readyz(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let readiness = registry.readiness();
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "ready": readiness.is_ready(),
        "draining": readiness.draining,
        "models_not_ready": readiness.models_not_ready,
    });
    (status, Json(body))
}
