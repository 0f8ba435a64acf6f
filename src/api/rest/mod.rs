//! The REST port: TF Serving's REST API under `/v1/`, the Open Inference Protocol under
//! `/v2/` ([`v2`]), the probes (`/healthz`, `/readyz`), the Prometheus metrics (`/metrics`
//! and the monitoring config's path) and, when configured, the admin API.

mod encoding;
mod error;
pub mod json;
pub mod model_json;
mod path;
mod routes;
pub mod tasks_json;
mod v2;

use crate::api::v2::RepositoryControl;
use crate::inference::Inference;
use crate::registry::Registry;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// What the REST port serves beyond the API.
#[derive(Clone, Debug)]
pub struct RestOptions {
    /// Largest request body; larger ones are answered 413.
    pub max_body_bytes: usize,
    /// The bytes of request bodies all requests together may hold; past it, 503.
    pub max_bytes_in_flight: usize,
    /// How long an API call may take, its body included, before it is answered 504.
    pub timeout: Option<Duration>,
    /// The monitoring config's Prometheus path, served besides `/metrics`.
    pub metrics_path: Option<String>,
}

/// Shared by every handler.
struct RestState {
    inference: Inference,
    /// Read for status, the V2 repository index and metadata's version list.
    registry: Arc<Registry>,
    /// V2's repository load and unload.
    repository: RepositoryControl,
    metrics: Option<PrometheusHandle>,
    max_body_bytes: usize,
    /// One permit per byte of request body held.
    bytes_in_flight: Arc<Semaphore>,
    timeout: Option<Duration>,
}

/// The REST router. `metrics` renders the Prometheus payload; without it the metrics
/// paths answer 404.
pub fn router(
    inference: Inference,
    registry: Arc<Registry>,
    repository: RepositoryControl,
    metrics: Option<PrometheusHandle>,
    options: &RestOptions,
) -> Router {
    let state = Arc::new(RestState {
        inference,
        registry,
        repository,
        metrics,
        max_body_bytes: options.max_body_bytes,
        bytes_in_flight: Arc::new(Semaphore::new(
            options.max_bytes_in_flight.min(Semaphore::MAX_PERMITS),
        )),
        timeout: options.timeout,
    });
    let mut router = Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics));
    if let Some(path) = options.metrics_path.as_deref().filter(|p| *p != "/metrics") {
        router = router.route(path, get(routes::metrics));
    }
    // The API's paths (`/v1/models/m:predict`) do not split into axum's path segments, so
    // everything else goes to one handler that parses them as TF Serving does.
    // The API handler reads bodies itself, against `max_body_bytes`.
    router.fallback(routes::api).with_state(state)
}

/// The answer to a connection without a client certificate, when `client_verify` requires
/// one, for anything but the probes.
pub fn unauthenticated() -> axum::response::Response {
    error::error_response(&crate::error::Error::Unauthenticated(
        "this server requires a client certificate signed by its custom_ca \
         (client_verify); only /healthz and /readyz answer without one"
            .into(),
    ))
}
