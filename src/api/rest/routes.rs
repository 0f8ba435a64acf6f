//! The REST handlers: probes, metrics, and the TF Serving API calls.

use super::encoding::{self, BodyEncoding};
use super::error::{error_response, json_response};
use super::json::{encode_predict, mark_nonfinite, PredictBody};
use super::model_json::{metadata_json, status_json};
use super::path::{self, Call, Method, Route};
use super::tasks_json::{classification_json, parse_request, regression_json};
use super::v2;
use super::RestState;
use crate::api::grpc::signature_def_map;
use crate::api::model_status::model_status;
use crate::api::offload;
use crate::api::timer::RequestTimer;
use crate::error::Error;
use crate::inference::tasks::{self, Task, TaskKind};
use crate::inference::{self, find_signature};
use crate::proto::answers::TaskResult;
use crate::telemetry::{Api, Protocol};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How much of a body over the limit is still read (and dropped) before answering 413.
/// Closing a connection with unread bytes makes the kernel reset it, and the client would
/// then often lose the 413 itself; beyond this, the reset is the lesser evil.
const DRAIN_BYTES: usize = 16 << 20;

/// Liveness: 200 while the process can answer, 503 once a serving version has lost every
/// worker of a device (only a restart brings them back).
pub(super) async fn healthz(State(state): State<Arc<RestState>>) -> Response {
    let lost = state.inference.lost_workers();
    if lost.is_empty() {
        return "ok\n".into_response();
    }
    let body = serde_json::json!({ "live": false, "lost_workers": lost });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// Readiness: every configured model has an AVAILABLE version and the server is not
/// draining; otherwise 503 with what is missing.
pub(super) async fn readyz(State(state): State<Arc<RestState>>) -> impl IntoResponse {
    let readiness = state.inference.readiness();
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

/// Prometheus text format.
pub(super) async fn metrics(State(state): State<Arc<RestState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            {
                let mut text = handle.render();
                crate::telemetry::render_versions(&mut text);
                text
            },
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Everything that is not a probe or metrics: the TF Serving API under `/v1/`, else 404.
pub(super) async fn api(
    State(state): State<Arc<RestState>>,
    method: axum::http::Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path();
    if let Some(call) = v2::parse(&method, path) {
        return v2::handle(&state, call, &headers, body).await;
    }
    if !path::is_api_path(path) {
        return json_response(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("no such path: {path}") }).to_string(),
        );
    }
    let route = match method {
        axum::http::Method::GET => path::parse(Method::Get, path),
        axum::http::Method::POST => path::parse(Method::Post, path),
        other => Err(Error::InvalidArgument(format!(
            "Malformed request: {other} {path}"
        ))),
    };
    let route = match route {
        Ok(route) => route,
        Err(error) => {
            tracing::warn!(protocol = "rest", %error, "request failed");
            return error_response(&error);
        }
    };
    let api = match route.call {
        Call::Status => Api::GetModelStatus,
        Call::Metadata => Api::GetModelMetadata,
        Call::Predict => Api::Predict,
        Call::Classify => Api::Classify,
        Call::Regress => Api::Regress,
    };
    let timer = RequestTimer::start(api, Protocol::Rest);
    let (shared, asked, head) = (&*state, &route, &headers);
    let result = within_timeout(shared, |deadline| async move {
        let (body, _held) =
            read_body(body, head, shared.max_body_bytes, &shared.bytes_in_flight).await?;
        call(shared, asked, body, deadline).await
    })
    .await;
    timer.finish(
        &state.inference,
        &route.model,
        result.as_ref().map(|(_, version)| *version),
    );
    match result {
        Ok((text, _)) => json_response(StatusCode::OK, text),
        Err(error) => error_response(&error),
    }
}

/// Runs an API call, its body's upload included, within `--rest_api_timeout_in_ms` (as TF
/// Serving's; the upload counts too, so that a slow client cannot hold its share of the
/// body budget for long). `work` gets the deadline, past which a queued request is dropped.
pub(super) async fn within_timeout<T, F, Fut>(state: &RestState, work: F) -> Result<T, Error>
where
    F: FnOnce(Option<Instant>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let deadline = state.timeout.map(|timeout| Instant::now() + timeout);
    let work = work(deadline);
    match state.timeout {
        Some(timeout) => tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(Error::DeadlineExceeded(format!(
                    "the request took longer than {} ms (--rest_api_timeout_in_ms)",
                    timeout.as_millis()
                )))
            }),
        None => work.await,
    }
}

/// Reads the request body, refusing one over `limit` with PAYLOAD_TOO_LARGE (413), and one
/// that the bodies in flight leave no room for with UNAVAILABLE (503). The permit keeps the
/// body's bytes counted in `in_flight` until it is dropped.
pub(super) async fn read_body(
    body: Body,
    headers: &axum::http::HeaderMap,
    limit: usize,
    in_flight: &Arc<Semaphore>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Error> {
    use tokio_stream::StreamExt;
    let too_large = || {
        Error::PayloadTooLarge(format!(
            "the request body is larger than {limit} bytes (--rest_api_max_body_bytes)"
        ))
    };
    let encoding = BodyEncoding::of(headers)?;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit.saturating_add(DRAIN_BYTES)) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    // A declared length is a hint, not a promise: pre-size only modestly, and count what
    // is set aside as held.
    let presize = declared.unwrap_or(0).min(limit).min(4 << 20);
    let mut held = None;
    let mut no_room = !hold(in_flight, &mut held, presize);
    let mut data = Vec::with_capacity(if no_room { 0 } else { presize });
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| Error::InvalidArgument(format!("cannot read the request body: {e}")))?;
        total = total.saturating_add(chunk.len());
        if total > limit.saturating_add(DRAIN_BYTES) {
            break;
        }
        if total <= limit && !no_room {
            no_room = !hold(in_flight, &mut held, total);
        }
        if total > limit || no_room {
            // Refused: what still comes is read (see DRAIN_BYTES) but not kept.
            (data, held) = (Vec::new(), None);
            continue;
        }
        data.extend_from_slice(&chunk);
    }
    if total > limit {
        return Err(too_large());
    }
    if no_room {
        return Err(no_room_error());
    }
    if encoding == BodyEncoding::Identity {
        return Ok((Bytes::from(data), held));
    }
    let in_flight = Arc::clone(in_flight);
    tokio::task::spawn_blocking(move || {
        let decoded = encoding::decode(&data, encoding, limit, &in_flight, &mut held)?;
        Ok((Bytes::from(decoded), held))
    })
    .await
    .map_err(|e| Error::Internal(format!("decompressing the request body failed: {e}")))?
}

/// The answer when request bodies already hold `--rest_api_max_bytes_in_flight`.
pub(super) fn no_room_error() -> Error {
    Error::Unavailable(
        "the server holds as many request bodies as it may \
         (--rest_api_max_bytes_in_flight); retry later"
            .into(),
    )
}

/// Grows what `held` counts in `in_flight` to `bytes`; false when there is no room.
pub(super) fn hold(
    in_flight: &Arc<Semaphore>,
    held: &mut Option<OwnedSemaphorePermit>,
    bytes: usize,
) -> bool {
    let counted = held.as_ref().map_or(0, |permit| permit.num_permits());
    let Some(more) = bytes.checked_sub(counted).filter(|&more| more > 0) else {
        return true;
    };
    let Some(permit) = u32::try_from(more)
        .ok()
        .and_then(|more| Arc::clone(in_flight).try_acquire_many_owned(more).ok())
    else {
        return false;
    };
    if let Some(held) = held.as_mut() {
        held.merge(permit);
    } else {
        *held = Some(permit);
    }
    true
}

/// Runs one API call; the answer's JSON and the version that served it.
async fn call(
    state: &RestState,
    route: &Route,
    body: Bytes,
    deadline: Option<Instant>,
) -> Result<(String, Option<i64>), Error> {
    match route.call {
        Call::Status => {
            let response = model_status(&state.registry, &route.model, &route.version)?;
            Ok((status_json(&response), None))
        }
        Call::Metadata => {
            let servable = state.inference.resolve(&route.model, &route.version)?;
            let defs = signature_def_map(&servable.signatures);
            Ok((
                metadata_json(&servable.model, servable.version, &defs),
                Some(servable.version),
            ))
        }
        Call::Predict => predict(state, route, body, deadline).await,
        Call::Classify => run_task(state, route, body, TaskKind::Classify).await,
        Call::Regress => run_task(state, route, body, TaskKind::Regress).await,
    }
}

async fn predict(
    state: &RestState,
    route: &Route,
    body: Bytes,
    deadline: Option<Instant>,
) -> Result<(String, Option<i64>), Error> {
    let servable = state
        .inference
        .resolve_for_run(&route.model, &route.version, deadline)
        .await?;
    let decoding = Arc::clone(&servable);
    let (format, signature, inputs) = offload(body.len(), move || {
        let body = mark_nonfinite(&body);
        let parsed = PredictBody::parse(&body)?;
        let (name, signature) = find_signature(&decoding, &parsed.signature_name)?;
        let inputs = parsed.tensors(name, signature)?;
        Ok((parsed.format, name.to_string(), inputs))
    })
    .await?;
    let answer = state
        .inference
        .predict_on(
            servable,
            inference::PredictRequest {
                signature,
                inputs,
                output_filter: Vec::new(),
                // Dropped before the forward once the REST timeout has passed.
                deadline,
            },
        )
        .await?;
    let version = answer.version;
    let size = answer.outputs.iter().map(|(_, t)| t.data.len()).sum();
    let text = offload(size, move || encode_predict(format, &answer.outputs)).await?;
    Ok((text, Some(version)))
}

async fn run_task(
    state: &RestState,
    route: &Route,
    body: Bytes,
    kind: TaskKind,
) -> Result<(String, Option<i64>), Error> {
    let call = match kind {
        TaskKind::Classify => "classify",
        TaskKind::Regress => "regress",
    };
    let body_bytes = body.len();
    let request = offload(body_bytes, move || parse_request(&body, call)).await?;
    let mut answer = tasks::run(
        &state.inference,
        &route.model,
        &route.version,
        &[Task {
            signature: &request.signature_name,
            kind,
        }],
        Some(&request.input),
        body_bytes,
    )
    .await?;
    let text = match answer.results.pop().map(|(_, result)| result) {
        Some(TaskResult::Classification(result)) => classification_json(&result),
        Some(TaskResult::Regression(result)) => regression_json(&result),
        None => {
            return Err(Error::Internal(
                "a task returned no result (server bug)".into(),
            ))
        }
    };
    Ok((text, Some(answer.version)))
}
