//! The admin API on the REST port: reload the model config now, report the models' status,
//! and, with `?fanout=true`, do either on every pod of the Deployment at once.
//!
//! Off unless an admin token is configured; every call then needs
//! `Authorization: Bearer <token>`, checked in constant time before anything else runs.
//! A fan-out lists the pods from the Kubernetes Endpoints of the Service
//! ([`kubernetes`]), forwards the same call with `fanout=false` to every ready pod in
//! parallel, itself included, and answers with one result per pod ([`fanout`]): 200 when
//! every pod succeeded, 502 when any failed, the others' results standing either way.
//!
//! | call | answer |
//! | --- | --- |
//! | `POST /admin/reload` | re-reads `--model_config_file`, applies it, then the status below |
//! | `GET /admin/models` | `{"ready", "draining", "models": [{"name", "model_version_status"}]}` |
//! | `GET /admin/peers` | the pods a fan-out would reach |

mod fanout;
mod kubernetes;

pub use fanout::PodResult;
pub use kubernetes::{EndpointsSource, Peer, PeersError};

use crate::api::model_status::model_status;
use crate::api::rest::model_json::status_value;
use crate::error::{http_status_for, Error};
use crate::http_client::{self, HttpClient};
use crate::registry::{Registry, VersionSelector};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tonic::Code;

/// The largest admin request body forwarded to the pods.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What a [`Reload`] returns.
pub type ReloadFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Re-reads the model config and applies it, resolving once applied. The composition root
/// builds it, since only it knows where the config comes from.
pub type Reload = Arc<dyn Fn() -> ReloadFuture + Send + Sync>;

/// The secret every admin call must present. Its `Debug` never shows it.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl AdminToken {
    /// A token from a flag or a file; surrounding whitespace (a file's final newline) is
    /// dropped. It must be non-empty and fit in an HTTP header.
    pub fn new(token: &str) -> Result<AdminToken, String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the admin token is empty".into());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the admin token must be printable ASCII without spaces".into());
        }
        Ok(AdminToken(token.into()))
    }

    fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }

    /// Whether an `Authorization` header's value (`Bearer <token>`) carries this token.
    pub fn authorizes(&self, authorization: Option<&[u8]>) -> bool {
        authorization
            .and_then(bearer_token)
            .is_some_and(|token| self.matches(token))
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// How the admin API runs.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub token: AdminToken,
    /// Where the pods of a fan-out are listed.
    pub peers: EndpointsSource,
    /// How long a fan-out waits for the pod list and for each pod.
    pub fanout_timeout: Duration,
    /// The REST ports serve TLS (`--ssl_config_file`). The fan-out's client speaks plain
    /// HTTP only, and pods' certificates rarely name their IPs, so a fan-out is refused
    /// rather than sent: over plain HTTP it would fail, after the token had crossed the
    /// network in the clear.
    pub peers_speak_tls: bool,
}

#[derive(Clone)]
struct AdminState {
    config: AdminConfig,
    client: HttpClient,
    registry: Arc<Registry>,
    reload: Reload,
}

/// The admin routes, to merge into the REST router.
pub fn router(config: AdminConfig, registry: Arc<Registry>, reload: Reload) -> Router {
    let state = AdminState {
        config,
        client: http_client::client(),
        registry,
        reload,
    };
    Router::new()
        .route("/admin/reload", post(reload_now))
        .route("/admin/models", get(models))
        .route("/admin/peers", get(peers))
        // Layers run last-added first:
        // 1. the token, before anything else, so that no call reaches a peer without it;
        // 2. the fan-out, which answers for every pod instead of calling the handler here.
        .layer(middleware::from_fn_with_state(state.clone(), fan_out))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("admin calls need the header 'Authorization: Bearer <admin token>'")]
    MissingToken,
    #[error("wrong admin token")]
    WrongToken,
    #[error(transparent)]
    Serving(#[from] Error),
    #[error(transparent)]
    Peers(#[from] PeersError),
    #[error("no pods to fan out to: {0} lists none")]
    NoPeers(String),
    #[error("cannot read the request body: {0}")]
    Body(String),
    #[error("{0}")]
    Query(#[from] QueryRejection),
    #[error(
        "fan-out is not available with --ssl_config_file: it calls pods over plain HTTP, \
         which would send the admin token in the clear; call each pod's /admin endpoint"
    )]
    FanoutOverTls,
}

impl AdminError {
    fn code(&self) -> Code {
        match self {
            AdminError::MissingToken | AdminError::WrongToken => Code::Unauthenticated,
            AdminError::Serving(e) => e.code(),
            AdminError::Peers(_) | AdminError::NoPeers(_) => Code::Unavailable,
            AdminError::Body(_) | AdminError::Query(_) => Code::InvalidArgument,
            AdminError::FanoutOverTls => Code::Unimplemented,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let code = self.code();
        let status = StatusCode::from_u16(http_status_for(code))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = Json(json!({ "error": self.to_string() }));
        if code == Code::Unauthenticated {
            let challenge = HeaderValue::from_static("Bearer realm=\"modelgate-admin\"");
            return (status, [(WWW_AUTHENTICATE, challenge)], body).into_response();
        }
        (status, body).into_response()
    }
}

async fn require_token(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Result<Response, AdminError> {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| bearer_token(value.as_bytes()));
    match presented {
        Some(token) if state.config.token.matches(token) => Ok(next.run(request).await),
        presented => {
            // The path only: the token, right or wrong, never reaches a log.
            tracing::warn!(path = %request.uri().path(), "admin call refused: missing or wrong token");
            Err(if presented.is_some() {
                AdminError::WrongToken
            } else {
                AdminError::MissingToken
            })
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
        .filter(|token| !token.is_empty())
}

#[derive(Deserialize)]
struct FanoutQuery {
    #[serde(default)]
    fanout: bool,
}

/// With `?fanout=true`, answers for every pod instead of this one.
async fn fan_out(
    State(state): State<AdminState>,
    query: Result<Query<FanoutQuery>, QueryRejection>,
    request: Request,
    next: Next,
) -> Result<Response, AdminError> {
    if !query?.fanout {
        return Ok(next.run(request).await);
    }
    if state.config.peers_speak_tls {
        return Err(AdminError::FanoutOverTls);
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| AdminError::Body(e.to_string()))?;
    let timeout = state.config.fanout_timeout;
    let peers = state.config.peers.peers(&state.client, timeout).await?;
    if peers.is_empty() {
        return Err(AdminError::NoPeers(state.config.peers.url().to_string()));
    }
    let forward = Arc::new(fanout::Forward {
        method: parts.method.clone(),
        path_and_query: fanout::forwarded_path_and_query(&parts.uri),
        authorization: parts.headers.get(AUTHORIZATION).cloned(),
        content_type: parts.headers.get(CONTENT_TYPE).cloned(),
        body,
    });
    tracing::info!(
        path = %parts.uri.path(),
        pods = peers.len(),
        "admin call fanned out"
    );
    let results = fanout::call_all(&state.client, peers, forward, timeout).await;
    let failed = results.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        tracing::warn!(path = %parts.uri.path(), failed, "admin fan-out: some pods failed");
    }
    let status = if failed == 0 {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    let body = json!({
        "ok": failed == 0,
        "succeeded": results.len() - failed,
        "failed": failed,
        "pods": results,
    });
    Ok((status, Json(body)).into_response())
}

/// `POST /admin/reload`: re-read the model config, apply it, report what serves now.
async fn reload_now(State(state): State<AdminState>) -> Result<Json<Value>, AdminError> {
    tracing::info!("model config reload requested over the admin API");
    (state.reload)().await.inspect_err(|e| {
        tracing::warn!("admin reload failed: {e}");
    })?;
    Ok(Json(status_document(&state.registry)))
}

/// `GET /admin/models`: this pod's models and their versions' states.
async fn models(State(state): State<AdminState>) -> Json<Value> {
    Json(status_document(&state.registry))
}

/// `GET /admin/peers`: the pods a fan-out would reach now.
async fn peers(State(state): State<AdminState>) -> Result<Json<Value>, AdminError> {
    let peers = state
        .config
        .peers
        .peers(&state.client, state.config.fanout_timeout)
        .await?;
    let pods: Vec<Value> = peers
        .iter()
        .map(|p| json!({ "pod": p.pod, "address": p.address.to_string(), "ready": p.ready }))
        .collect();
    Ok(Json(
        json!({ "endpoints": state.config.peers.url(), "pods": pods }),
    ))
}

/// Readiness plus every configured model's versions, each in the shape of TF Serving's
/// `GET /v1/models/{m}` answer.
fn status_document(registry: &Registry) -> Value {
    let readiness = registry.readiness();
    let models: Vec<Value> = registry
        .model_names()
        .into_iter()
        .map(|name| {
            // A model with no version yet has an empty list, not an error.
            let status =
                model_status(registry, &name, &VersionSelector::Latest).unwrap_or_default();
            let mut entry = status_value(&status);
            entry["name"] = Value::String(name);
            entry
        })
        .collect();
    json!({
        "ready": readiness.is_ready(),
        "draining": readiness.draining,
        "models": models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole_and_never_print() {
        let token = AdminToken::new("  s3cr3t\n").unwrap();
        assert!(token.matches(b"s3cr3t"));
        assert!(!token.matches(b"s3cr3"));
        assert!(!token.matches(b"s3cr3tt"));
        assert!(!token.matches(b""));
        assert!(!format!("{token:?}").contains("s3cr3t"));
        assert!(AdminToken::new(" \n").is_err());
        assert!(AdminToken::new("a b").is_err());
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
    }
}
