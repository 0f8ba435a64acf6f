//! The Open Inference Protocol under `/v2` on the REST port: health, server and model
//! metadata, readiness, config, and infer with JSON tensors and the binary tensor
//! extension (`Inference-Header-Content-Length`), which `tritonclient.http` uses.

use super::error::{error_response, json_response};
use super::json;
use super::routes::{read_body, within_timeout};
use super::RestState;
use crate::api::timer::RequestTimer;
use crate::api::v2::{
    self, model_config, model_metadata, resolve, resolve_for_run, DeclaredInput, PLATFORM,
};
use crate::error::Error;
use crate::telemetry::{Api, Protocol};
use crate::tensor::limits::DecodeBudget;
use crate::tensor::{DType, ElementWriter, Tensor};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use prost::Message;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// The header that splits a binary-extension body: the JSON's length in bytes.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// A `/v2` call, from its method and path.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum V2Call {
    ServerMetadata,
    Live,
    Ready,
    ModelMetadata {
        model: String,
        version: String,
    },
    ModelReady {
        model: String,
        version: String,
    },
    ModelConfig {
        model: String,
        version: String,
    },
    Infer {
        model: String,
        version: String,
    },
    /// `model` empty: every model.
    Statistics {
        model: String,
        version: String,
    },
    RepositoryIndex,
    RepositoryLoad {
        model: String,
    },
    RepositoryUnload {
        model: String,
    },
}

impl V2Call {
    pub fn model(&self) -> &str {
        match self {
            V2Call::ModelMetadata { model, .. }
            | V2Call::ModelReady { model, .. }
            | V2Call::ModelConfig { model, .. }
            | V2Call::Infer { model, .. }
            | V2Call::Statistics { model, .. } => model,
            _ => "",
        }
    }
}

fn decode_segment(segment: &str) -> Result<String, Error> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Error::InvalidArgument(format!("path segment '{segment}' is not UTF-8")))
}

/// Parses `/v2...`; `None` for a path that is not under `/v2`.
pub(super) fn parse(method: &Method, path: &str) -> Option<Result<V2Call, Error>> {
    let rest = path.strip_prefix("/v2")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let get = *method == Method::GET;
    let post = *method == Method::POST;
    let not_found = || Err(Error::NotFound(format!("no such V2 path: {method} {path}")));
    Some((|| {
        let call = match segments.as_slice() {
            [] if get => V2Call::ServerMetadata,
            ["health", "live"] if get => V2Call::Live,
            ["health", "ready"] if get => V2Call::Ready,
            ["repository", "index"] if post => V2Call::RepositoryIndex,
            ["repository", "models", model, "load"] if post => V2Call::RepositoryLoad {
                model: decode_segment(model)?,
            },
            ["repository", "models", model, "unload"] if post => V2Call::RepositoryUnload {
                model: decode_segment(model)?,
            },
            ["models", "stats"] if get => V2Call::Statistics {
                model: String::new(),
                version: String::new(),
            },
            ["models", model, tail @ ..] => {
                let model = decode_segment(model)?;
                let (version, tail) = match tail {
                    ["versions", version, tail @ ..] => (decode_segment(version)?, tail),
                    tail => (String::new(), tail),
                };
                match tail {
                    [] if get => V2Call::ModelMetadata { model, version },
                    ["stats"] if get => V2Call::Statistics { model, version },
                    ["ready"] if get => V2Call::ModelReady { model, version },
                    ["config"] if get => V2Call::ModelConfig { model, version },
                    ["infer"] if post => V2Call::Infer { model, version },
                    _ => return not_found(),
                }
            }
            _ => return not_found(),
        };
        Ok(call)
    })())
}

/// A `/v2` call: infer and model metadata are timed like the TF Serving API's
/// calls, with the `v2-rest` protocol label; health and the rest answer at once.
pub(super) async fn handle(
    state: &Arc<RestState>,
    call: Result<V2Call, Error>,
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Response {
    let call = match call {
        Ok(call) => call,
        Err(error) => return error_response(&error),
    };
    let model = call.model().to_string();
    let result = match &call {
        V2Call::Infer { model, version } => {
            let timer = RequestTimer::start(Api::Predict, Protocol::V2Rest);
            let result = within_timeout(state, |deadline| async move {
                let (body, _held) =
                    read_body(body, headers, state.max_body_bytes, &state.bytes_in_flight).await?;
                infer(state, model, version, headers, body, deadline).await
            })
            .await;
            timer.finish(
                &state.inference,
                model,
                result.as_ref().map(|(_, version)| Some(*version)),
            );
            result.map(|(response, _)| response)
        }
        V2Call::RepositoryLoad { model } | V2Call::RepositoryUnload { model } => {
            let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
            let load = matches!(call, V2Call::RepositoryLoad { .. });
            match read_body(body, headers, state.max_body_bytes, &state.bytes_in_flight).await {
                Ok((body, _held)) => {
                    repository_change(state, load, model, authorization, &body).await
                }
                Err(e) => Err(e),
            }
        }
        V2Call::RepositoryIndex => {
            read_body(body, headers, state.max_body_bytes, &state.bytes_in_flight)
                .await
                .and_then(|(body, _held)| repository_index(state, &body))
        }
        V2Call::ModelMetadata { .. } => {
            let timer = RequestTimer::start(Api::GetModelMetadata, Protocol::V2Rest);
            let result = answer_without_body(state, &call);
            timer.finish(&state.inference, &model, result.as_ref().map(|_| None));
            result
        }
        _ => answer_without_body(state, &call),
    };
    result.unwrap_or_else(|error| error_response(&error))
}

/// A small JSON answer.
fn json(status: StatusCode, value: serde_json::Value) -> Response {
    json_response(status, value.to_string())
}

/// Answers the calls that read no body.
pub(super) fn answer_without_body(state: &RestState, call: &V2Call) -> Result<Response, Error> {
    let inference = &state.inference;
    Ok(match call {
        V2Call::ServerMetadata => json(
            StatusCode::OK,
            serde_json::json!({
                "name": "modelgate",
                "version": env!("CARGO_PKG_VERSION"),
                "extensions": v2::EXTENSIONS,
            }),
        ),
        V2Call::Live => {
            let live = inference.lost_workers().is_empty();
            json(health_status(live), serde_json::json!({ "live": live }))
        }
        V2Call::Ready => {
            let ready = inference.readiness().is_ready();
            json(health_status(ready), serde_json::json!({ "ready": ready }))
        }
        V2Call::ModelReady { model, version } => {
            // As gRPC's ModelReady: a model this server does not have is not ready (400),
            // as Triton answers, rather than an error.
            let ready = resolve(inference, model, version).is_ok();
            json(
                health_status(ready),
                serde_json::json!({ "name": model, "ready": ready }),
            )
        }
        V2Call::ModelMetadata { model, version } => {
            let servable = resolve(inference, model, version)?;
            let metadata = model_metadata(&state.registry, &servable)?;
            let tensors = |list: &[v2::TensorMetadata]| -> Vec<serde_json::Value> {
                list.iter()
                    .map(|t| serde_json::json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
                    .collect()
            };
            json(
                StatusCode::OK,
                serde_json::json!({
                    "name": metadata.name,
                    "versions": metadata.versions,
                    "platform": PLATFORM,
                    "inputs": tensors(&metadata.inputs),
                    "outputs": tensors(&metadata.outputs),
                }),
            )
        }
        V2Call::ModelConfig { model, version } => {
            let servable = resolve(inference, model, version)?;
            json(
                StatusCode::OK,
                config_json(&model_config(inference, &servable)?)?,
            )
        }
        V2Call::Statistics { model, version } => {
            let stats = v2::statistics(inference, model, version)?;
            let duration =
                |t: crate::telemetry::Timed| serde_json::json!({"count": t.count, "ns": t.ns});
            let model_stats: Vec<serde_json::Value> = stats
                .into_iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.model,
                        "version": s.version.to_string(),
                        "last_inference": s.answered.last_ms,
                        "inference_count": s.inference_count,
                        "execution_count": s.execution_count,
                        "inference_stats": {
                            "success": duration(s.answered.success),
                            "fail": duration(s.answered.fail),
                            "queue": duration(s.queue),
                            "compute_input": duration(s.compute.input),
                            "compute_infer": duration(s.compute.infer),
                            "compute_output": duration(s.compute.output),
                        },
                        "batch_stats": s.batches.iter().map(|b| serde_json::json!({
                            "batch_size": b.batch_size,
                            "compute_input": duration(b.compute.input),
                            "compute_infer": duration(b.compute.infer),
                            "compute_output": duration(b.compute.output),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json(
                StatusCode::OK,
                serde_json::json!({ "model_stats": model_stats }),
            )
        }
        V2Call::Infer { .. }
        | V2Call::RepositoryIndex
        | V2Call::RepositoryLoad { .. }
        | V2Call::RepositoryUnload { .. } => {
            return Err(Error::Internal(
                "this call reads a body (server bug)".into(),
            ))
        }
    })
}

/// POST /v2/repository/index: `{"ready": bool}` (optional) in, the index out.
pub(super) fn repository_index(state: &RestState, body: &[u8]) -> Result<Response, Error> {
    #[derive(Deserialize, Default)]
    struct IndexRequest {
        #[serde(default)]
        ready: bool,
    }
    let request: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            Error::InvalidArgument(format!("the index request is not valid JSON: {e}"))
        })?
    };
    let entries: Vec<serde_json::Value> = state
        .repository
        .index(request.ready)
        .into_iter()
        .map(|e| {
            let mut entry = serde_json::json!({"name": e.name, "state": e.state});
            if !e.version.is_empty() {
                entry["version"] = e.version.into();
            }
            if !e.reason.is_empty() {
                entry["reason"] = e.reason.into();
            }
            entry
        })
        .collect();
    Ok(json(StatusCode::OK, serde_json::Value::Array(entries)))
}

/// POST /v2/repository/models/{m}/load or /unload. A load takes none of Triton's
/// parameters (a config override, files), as over gRPC: the model's entry comes from the
/// model config file.
pub(super) async fn repository_change(
    state: &RestState,
    load: bool,
    model: &str,
    authorization: Option<&[u8]>,
    body: &[u8],
) -> Result<Response, Error> {
    #[derive(Deserialize, Default)]
    struct ChangeRequest {
        #[serde(default)]
        parameters: serde_json::Map<String, serde_json::Value>,
    }
    let request: ChangeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ChangeRequest::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| Error::InvalidArgument(format!("the request is not valid JSON: {e}")))?
    };
    if load {
        if !request.parameters.is_empty() {
            return Err(Error::InvalidArgument(
                "a load takes no parameters here: the model's entry comes from the model config file"
                    .into(),
            ));
        }
        state.repository.load(authorization, model).await?;
    } else {
        state.repository.unload(authorization, model).await?;
    }
    Ok(json_response(StatusCode::OK, "{}".to_string()))
}

/// 200 when true; 400 when not, as Triton answers V2 health (Kubernetes probes fail on it).
fn health_status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

/// Triton's ModelConfig JSON: every field under its proto name, enums by name, 64-bit
/// integers as numbers (as Triton prints it).
fn config_json(config: &crate::proto::inference::ModelConfig) -> Result<serde_json::Value, Error> {
    crate::proto::to_printed_json("inference.ModelConfig", &config.encode_to_vec(), false)
        .ok_or_else(|| {
            Error::Internal("the model configuration does not print (server bug)".into())
        })
}

/// An infer request's JSON (the inputs' `data` stays raw until its shape is checked).
#[derive(Deserialize)]
struct InferJson<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Parameters,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    #[serde(default)]
    outputs: Vec<RequestedOutput>,
}

#[derive(Deserialize, Default)]
struct Parameters {
    #[serde(default)]
    signature_name: Option<String>,
    #[serde(default)]
    binary_data_output: Option<bool>,
    #[serde(default)]
    binary_data_size: Option<usize>,
    #[serde(default)]
    binary_data: Option<bool>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Parameters,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Parameters,
}

/// An infer call: the response, and the version that served it.
pub(super) async fn infer(
    state: &RestState,
    model: &str,
    version: &str,
    headers: &HeaderMap,
    body: Bytes,
    deadline: Option<Instant>,
) -> Result<(Response, i64), Error> {
    let servable = resolve_for_run(&state.inference, model, version, deadline).await?;
    let header_length = headers
        .get(HEADER_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n <= body.len())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{HEADER_LENGTH} must be a number of bytes no larger than the body ({})",
                        body.len()
                    ))
                })
        })
        .transpose()?;
    let json_end = header_length.unwrap_or(body.len());
    let budget = state.inference.decode_budget(body.len());
    let inference = state.inference.clone();
    let decoding = std::sync::Arc::clone(&servable);
    let (request, inputs) = crate::api::offload(body.len(), move || {
        decode_request(&inference, &decoding, &body, json_end, budget)
    })
    .await?;
    let answer = v2::infer(
        &state.inference,
        servable,
        &request.signature,
        inputs,
        request
            .outputs
            .iter()
            .map(|(name, _)| name.clone())
            .collect(),
        deadline,
    )
    .await?;
    let version = answer.version;
    let size = answer.outputs.iter().map(|(_, t)| t.data.len()).sum();
    let response = crate::api::offload(size, move || encode_response(&request, answer)).await?;
    Ok((response, version))
}

/// What the response needs to know of the request.
struct Requested {
    /// The signature it runs (`parameters.signature_name`, else `serving_default`).
    signature: String,
    id: Option<String>,
    /// `binary_data_output`: outputs not listed with their own choice come as binary.
    binary_by_default: bool,
    /// The requested outputs (all when empty), and whether each asked for binary data.
    outputs: Vec<(String, Option<bool>)>,
}

/// Parses the JSON header, checks every input against the signature before reading its
/// values, and reads them from JSON `data` or the binary part.
fn decode_request(
    inference: &crate::inference::Inference,
    servable: &crate::registry::Servable,
    body: &Bytes,
    json_end: usize,
    mut budget: DecodeBudget,
) -> Result<(Requested, HashMap<String, Tensor>), Error> {
    // `NaN`, `Infinity` and `-Infinity` are numbers here, as Triton reads them.
    let header = json::mark_nonfinite(&body[..json_end]);
    let parsed: InferJson = serde_json::from_slice(&header)
        .map_err(|e| Error::InvalidArgument(format!("the infer request is not valid JSON: {e}")))?;
    let declared = parsed
        .inputs
        .iter()
        .map(|input| DeclaredInput::new(&input.name, &input.datatype, &input.shape))
        .collect::<Result<Vec<_>, _>>()?;
    let signature =
        v2::signature_or_default(parsed.parameters.signature_name.as_deref()).to_string();
    inference.check_declared(
        servable,
        &signature,
        declared.iter().map(DeclaredInput::checked),
    )?;
    let mut binary = body.slice(json_end..);
    let mut inputs = HashMap::with_capacity(declared.len());
    for (input, declared) in parsed.inputs.iter().zip(&declared) {
        let expected = declared.byte_size()?;
        let tensor = match (input.parameters.binary_data_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "input '{}' has both data and binary_data_size",
                    input.name
                )))
            }
            (Some(size), None) => {
                if size != expected || size > binary.len() {
                    return Err(Error::InvalidArgument(format!(
                        "input '{}': binary_data_size {size} but a {} tensor of shape {:?} needs {expected} bytes ({} binary bytes left in the body)",
                        input.name,
                        v2::datatype(declared.dtype),
                        declared.shape,
                        binary.len()
                    )));
                }
                let data = binary.split_to(size);
                Tensor::new(declared.dtype, declared.shape.clone(), data)
                    .map_err(|e| Error::InvalidArgument(format!("input '{}': {e}", input.name)))?
            }
            (None, Some(data)) => {
                budget.charge(&input.name, expected)?;
                json_tensor(declared, data)?
            }
            (None, None) => {
                return Err(Error::InvalidArgument(format!(
                    "input '{}' has neither data nor binary_data_size",
                    input.name
                )))
            }
        };
        inputs.insert(declared.name.clone(), tensor);
    }
    if !binary.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} bytes of the body follow the inputs' binary data",
            binary.len()
        )));
    }
    let requested = Requested {
        signature,
        id: parsed.id,
        binary_by_default: parsed.parameters.binary_data_output.unwrap_or(false),
        outputs: parsed
            .outputs
            .into_iter()
            .map(|o| (o.name, o.parameters.binary_data))
            .collect(),
    };
    Ok((requested, inputs))
}

/// A tensor from JSON `data`: nested or flat arrays, exactly one value per element, each
/// checked against the datatype (FP16 and BF16 travel as binary data only).
fn json_tensor(declared: &DeclaredInput, data: &RawValue) -> Result<Tensor, Error> {
    let name = &declared.name;
    if matches!(declared.dtype, DType::F16 | DType::BF16) {
        return Err(Error::InvalidArgument(format!(
            "input '{name}' is {}: send it as binary data (binary_data_size)",
            v2::datatype(declared.dtype)
        )));
    }
    let count = declared.num_elements()?;
    declared.byte_size()?;
    // Room for what the text can hold (every JSON value takes two bytes or more, with its
    // separator), not what the shape claims: a tiny body declaring a huge shape reserves
    // nothing it does not send.
    let mut out = ElementWriter::new(declared.dtype, count.min(data.get().len() / 2 + 1));
    let mut seed = Flatten {
        remaining: count,
        out: &mut out,
    };
    let mut deserializer = serde_json::Deserializer::from_str(data.get());
    (&mut seed)
        .deserialize(&mut deserializer)
        .map_err(|e| Error::InvalidArgument(format!("input '{name}' data: {e}")))?;
    if seed.remaining != 0 {
        return Err(Error::InvalidArgument(format!(
            "input '{name}' has shape {:?} ({count} values) but data holds {}",
            declared.shape,
            count - seed.remaining
        )));
    }
    out.into_tensor(declared.shape.clone())
        .map_err(|e| Error::InvalidArgument(format!("input '{name}': {e}")))
}

/// Walks nested JSON arrays and writes each scalar through the checked element writer,
/// refusing more than `remaining` values.
struct Flatten<'a> {
    remaining: usize,
    out: &'a mut ElementWriter,
}

impl Flatten<'_> {
    fn push<E: de::Error>(&mut self, value: Scalar) -> Result<(), E> {
        if self.remaining == 0 {
            return Err(E::custom("more values than the shape holds"));
        }
        self.remaining -= 1;
        match value {
            Scalar::Bool(b) => self.out.push_bool(b),
            Scalar::Int(i) => self.out.push_int(i),
            Scalar::Float(f) => self.out.push_float(f),
        }
        .map_err(|e| E::custom(format!("{value}: {e}")))
    }
}

#[derive(Clone, Copy, Debug)]
enum Scalar {
    Bool(bool),
    Int(i128),
    Float(f64),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
        }
    }
}

impl<'de> DeserializeSeed<'de> for &mut Flatten<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for &mut Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value or a (nested) array of values")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(Scalar::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(Scalar::Int(i128::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(Scalar::Int(i128::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(Scalar::Float(v))
    }

    /// A string in `data` is a value only as the marker of a non-finite number.
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match json::nonfinite_value(v) {
            Some(number) => self.push(Scalar::Float(number)),
            None => Err(E::invalid_type(de::Unexpected::Str(v), &self)),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(&mut *self)?.is_some() {}
        Ok(())
    }
}

/// The response: JSON alone, or JSON then the binary outputs with
/// `Inference-Header-Content-Length`. An output goes binary where the request asked for it
/// (`binary_data`, or `binary_data_output` for the outputs it does not name).
fn encode_response(
    requested: &Requested,
    answer: crate::inference::PredictResponse,
) -> Result<Response, Error> {
    let mut binary: Vec<Bytes> = Vec::new();
    let mut outputs = Vec::with_capacity(answer.outputs.len());
    for (name, tensor) in &answer.outputs {
        let asked = requested
            .outputs
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, b)| *b);
        let in_binary = asked.unwrap_or(requested.binary_by_default);
        if in_binary {
            binary.push(tensor.data.clone());
        }
        outputs.push((name.as_str(), tensor, in_binary));
    }
    let header = response_header(
        &answer.model,
        answer.version,
        requested.id.as_deref(),
        &outputs,
    )
    .map_err(|e| Error::Internal(format!("cannot encode the response: {e}")))?
    .into_bytes();
    if binary.is_empty() {
        return Ok(json_response(
            StatusCode::OK,
            String::from_utf8(header).unwrap_or_default(),
        ));
    }
    let header_length = header.len();
    let total = binary.iter().map(Bytes::len).sum::<usize>() + header_length;
    let mut body = Vec::with_capacity(total);
    body.extend_from_slice(&header);
    for part in &binary {
        body.extend_from_slice(part);
    }
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(header_length),
            ),
        ],
        body,
    )
        .into_response())
}

/// The response's JSON: `model_name`, `model_version`, `id` and each output's `name`,
/// `datatype`, `shape` and either its `data` or its `binary_data_size`. Written here rather
/// than by serde_json, which writes a non-finite float as `null`: V2 data carries `NaN`,
/// `Infinity` and `-Infinity` as Triton writes them (and reads them back), so that an
/// infinity does not come back as NaN. Floats are the shortest text that reads back as
/// the same value of their own width; halves widen to f32 exactly.
fn response_header(
    model: &str,
    version: i64,
    id: Option<&str>,
    outputs: &[(&str, &Tensor, bool)],
) -> Result<String, fmt::Error> {
    use crate::tensor::Elements;
    use fmt::Write;
    fn write_all<T>(
        out: &mut String,
        values: impl Iterator<Item = T>,
        mut write: impl FnMut(&mut String, T) -> fmt::Result,
    ) -> fmt::Result {
        out.push('[');
        for (i, value) in values.enumerate() {
            if i > 0 {
                out.push(',');
            }
            write(out, value)?;
        }
        out.push(']');
        Ok(())
    }
    fn display<T: fmt::Display>(out: &mut String, value: T) -> fmt::Result {
        write!(out, "{value}")
    }
    let text = |s: &str| serde_json::Value::from(s).to_string();
    let mut out = String::new();
    write!(
        out,
        r#"{{"model_name":{},"model_version":"{version}""#,
        text(model)
    )?;
    if let Some(id) = id {
        write!(out, r#","id":{}"#, text(id))?;
    }
    out.push_str(r#","outputs":["#);
    for (i, (name, tensor, in_binary)) in outputs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write!(
            out,
            r#"{{"name":{},"datatype":"{}","shape":"#,
            text(name),
            v2::datatype(tensor.dtype)
        )?;
        write_all(&mut out, tensor.shape.iter(), display)?;
        if *in_binary {
            write!(
                out,
                r#","parameters":{{"binary_data_size":{}}}}}"#,
                tensor.data.len()
            )?;
            continue;
        }
        out.push_str(r#","data":"#);
        let f32s = json::write_f32;
        match tensor.elements() {
            Elements::Bool(values) => write_all(&mut out, values, display)?,
            Elements::U8(values) => write_all(&mut out, values, display)?,
            Elements::I8(values) => write_all(&mut out, values, display)?,
            Elements::I16(values) => write_all(&mut out, values, display)?,
            Elements::I32(values) => write_all(&mut out, values, display)?,
            Elements::I64(values) => write_all(&mut out, values, display)?,
            Elements::F16(values) => write_all(&mut out, values.map(half::f16::to_f32), f32s)?,
            Elements::BF16(values) => write_all(&mut out, values.map(half::bf16::to_f32), f32s)?,
            Elements::F32(values) => write_all(&mut out, values, f32s)?,
            Elements::F64(values) => write_all(&mut out, values, json::write_f64)?,
        }
        out.push('}');
    }
    out.push_str("]}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_json_keeps_every_value_and_writes_non_finite_floats_as_triton_does() {
        let floats = Tensor::from_values(vec![4], &[f32::NAN, f32::INFINITY, -0.0, 0.1]).unwrap();
        let halves =
            Tensor::from_values(vec![1, 2], &[half::f16::from_f32(0.1), half::f16::MAX]).unwrap();
        let flags = Tensor::from_values(vec![2], &[true, false]).unwrap();
        let wide = Tensor::from_values(vec![1], &[f64::NEG_INFINITY]).unwrap();
        let outputs = [
            ("y", &floats, false),
            ("h", &halves, false),
            ("b", &flags, true),
            ("d", &wide, false),
        ];
        let text = response_header("m\"x", 3, Some("r\u{0}1"), &outputs).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"model_name":"m\"x","model_version":"3","id":"r\u00001","outputs":["#,
                r#"{"name":"y","datatype":"FP32","shape":[4],"data":[NaN,Infinity,-0.0,0.1]},"#,
                r#"{"name":"h","datatype":"FP16","shape":[1,2],"data":[0.099975586,65504.0]},"#,
                r#"{"name":"b","datatype":"BOOL","shape":[2],"parameters":{"binary_data_size":2}},"#,
                r#"{"name":"d","datatype":"FP64","shape":[1],"data":[-Infinity]}]}"#
            )
        );
        // It is JSON, once the non-finite tokens are read as the REST APIs read them.
        let marked = json::mark_nonfinite(text.as_bytes());
        assert!(serde_json::from_slice::<serde_json::Value>(&marked).is_ok());
    }

    fn get(path: &str) -> Option<Result<V2Call, Error>> {
        parse(&Method::GET, path)
    }

    #[test]
    fn paths_parse_as_v2_defines_them() {
        assert_eq!(get("/v1/models/m"), None);
        assert_eq!(get("/v2x"), None);
        assert_eq!(get("/v2"), Some(Ok(V2Call::ServerMetadata)));
        assert_eq!(get("/v2/health/live"), Some(Ok(V2Call::Live)));
        assert_eq!(
            get("/v2/models/my%20model/versions/2/ready"),
            Some(Ok(V2Call::ModelReady {
                model: "my model".into(),
                version: "2".into()
            }))
        );
        assert_eq!(
            parse(&Method::POST, "/v2/models/m/infer"),
            Some(Ok(V2Call::Infer {
                model: "m".into(),
                version: String::new()
            }))
        );
        assert!(matches!(
            get("/v2/models/m/infer"),
            Some(Err(Error::NotFound(_)))
        ));
        assert_eq!(
            get("/v2/models/m/versions/3/stats"),
            Some(Ok(V2Call::Statistics {
                model: "m".into(),
                version: "3".into()
            }))
        );
        assert_eq!(
            parse(&Method::POST, "/v2/repository/index"),
            Some(Ok(V2Call::RepositoryIndex))
        );
        assert_eq!(
            parse(&Method::POST, "/v2/repository/models/m%2F1/unload"),
            Some(Ok(V2Call::RepositoryUnload {
                model: "m/1".into()
            }))
        );
    }

    fn declared(datatype: &str, shape: &[i64]) -> DeclaredInput {
        DeclaredInput::new("x", datatype, shape).unwrap()
    }

    fn data(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_string()).unwrap()
    }

    #[test]
    fn json_data_is_nested_or_flat_and_checked_per_value() {
        let nested = json_tensor(&declared("FP32", &[2, 2]), &data("[[1, 2.5], [3, 4]]")).unwrap();
        assert_eq!(nested.to_values::<f32>().unwrap(), vec![1.0, 2.5, 3.0, 4.0]);
        let flat = json_tensor(&declared("INT64", &[2, 2]), &data("[1, 2, 3, 4]")).unwrap();
        assert_eq!(flat.to_values::<i64>().unwrap(), vec![1, 2, 3, 4]);
        let bools = json_tensor(&declared("BOOL", &[2]), &data("[true, false]")).unwrap();
        assert_eq!(bools.to_values::<bool>().unwrap(), vec![true, false]);

        for (datatype, shape, json, expected) in [
            (
                "FP32",
                &[2][..],
                "[1, 2, 3]",
                "more values than the shape holds",
            ),
            ("FP32", &[3][..], "[1, 2]", "holds 2"),
            // The messages of the one checked element writer (tensor::ElementWriter).
            (
                "UINT8",
                &[1][..],
                "[256]",
                "256: a number out of range for DT_UINT8",
            ),
            (
                "INT32",
                &[1][..],
                "[1.5]",
                "a fractional number, which DT_INT32",
            ),
            (
                "BOOL",
                &[1][..],
                "[1]",
                "a number, which a DT_BOOL input cannot take",
            ),
            (
                "FP32",
                &[1][..],
                "[16777217]",
                "DT_FLOAT cannot hold exactly",
            ),
            ("FP32", &[1][..], "[1e39]", "out of range for DT_FLOAT"),
            ("FP32", &[1][..], "[\"1\"]", "invalid type"),
            ("FP16", &[1][..], "[1]", "binary data"),
        ] {
            let error = json_tensor(&declared(datatype, shape), &data(json))
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{datatype} {json}: {error}");
        }
    }
}
