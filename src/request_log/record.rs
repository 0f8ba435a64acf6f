//! One logged request, and its two encodings: a JSON object (one per line) and TF Serving's
//! `PredictionLog`.

use crate::api::grpc::tensor_to_proto;
use crate::api::tasks::TaskResult;
use crate::proto::serving::{
    inference_result, model_spec, prediction_log, ClassificationRequest, ClassificationResponse,
    ClassifyLog, InferenceResult, InferenceTask, Input, LogMetadata, ModelSpec, MultiInferenceLog,
    MultiInferenceRequest, MultiInferenceResponse, PredictLog, PredictRequest, PredictResponse,
    PredictionLog, RegressLog, RegressionRequest, RegressionResponse, SamplingConfig,
};
use crate::signature::{CLASSIFY_METHOD_NAME, REGRESS_METHOD_NAME};
use crate::tensor::{DType, Tensor};
use prost::Message;
use serde_json::{json, Map, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a request carried and answered, as far as it got.
#[derive(Debug, Default)]
pub enum Payload {
    /// The request failed before its version and signature were known.
    #[default]
    None,
    /// Predict (TF Serving's, or V2's infer): named tensors in and out. Values are
    /// dropped (dtype and shape kept) when the record would exceed its size limit.
    Predict {
        inputs: Vec<(String, Tensor)>,
        outputs: Vec<(String, Tensor)>,
        values_omitted: bool,
    },
    /// Classify, Regress, MultiInference: the examples and one result per task. The
    /// examples are dropped (`None`) when they exceed the size limit.
    Tasks {
        input: Option<Input>,
        results: Vec<(String, TaskResult)>,
        values_omitted: bool,
    },
}

/// One request, answered or failed, as it is logged.
#[derive(Debug)]
pub struct Record {
    pub timestamp: SystemTime,
    pub model: String,
    /// The version that served, once resolved.
    pub version: Option<i64>,
    /// The signature that served, once resolved.
    pub signature: String,
    /// `predict`, `classify`, `regress` or `multi_inference`.
    pub method: &'static str,
    /// `grpc`, `rest`, `v2-grpc` or `v2-rest`.
    pub protocol: &'static str,
    pub latency: Duration,
    /// The gRPC code's label (`ok`, `invalid_argument`, ...); see `error::code_label`.
    pub code: &'static str,
    /// The error's message; empty when answered.
    pub message: String,
    /// The sampling rate that applied, for `PredictionLog.log_metadata`.
    pub sampling_rate: f64,
    pub payload: Payload,
}

impl Record {
    pub fn is_error(&self) -> bool {
        self.code != "ok"
    }

    /// The record as one JSON object (no trailing newline). The shape is documented in the
    /// README's "Request logging" section.
    pub fn to_json(&self) -> String {
        let mut object = Map::new();
        object.insert("timestamp".into(), Value::String(rfc3339(self.timestamp)));
        let kind = if self.is_error() { "error" } else { "ok" };
        object.insert("type".into(), kind.into());
        object.insert("model".into(), self.model.clone().into());
        object.insert("version".into(), self.version.into());
        object.insert("signature".into(), self.signature.clone().into());
        object.insert("method".into(), self.method.into());
        object.insert("protocol".into(), self.protocol.into());
        object.insert(
            "latency_ms".into(),
            json!((self.latency.as_secs_f64() * 1e6).round() / 1e3),
        );
        object.insert("code".into(), self.code.into());
        object.insert("message".into(), self.message.clone().into());
        let (request, response, omitted) = match &self.payload {
            Payload::None => (Value::Null, Value::Null, false),
            Payload::Predict {
                inputs,
                outputs,
                values_omitted,
            } => (
                json!({ "inputs": tensors_json(inputs, *values_omitted) }),
                if self.is_error() {
                    Value::Null
                } else {
                    json!({ "outputs": tensors_json(outputs, *values_omitted) })
                },
                *values_omitted,
            ),
            Payload::Tasks {
                input,
                results,
                values_omitted,
            } => (
                json!({ "input": input.as_ref().map(proto_json) }),
                if self.is_error() {
                    Value::Null
                } else {
                    Value::Array(results.iter().map(task_result_json).collect())
                },
                *values_omitted,
            ),
        };
        object.insert("request".into(), request);
        object.insert("response".into(), response);
        object.insert("values_omitted".into(), omitted.into());
        Value::Object(object).to_string()
    }

    /// The record as TF Serving's `PredictionLog`, for an answered request whose payload was
    /// captured; `None` otherwise (PredictionLog has no place for a failure).
    pub fn to_prediction_log(&self) -> Option<PredictionLog> {
        if self.is_error() {
            return None;
        }
        let spec = |signature: &str| {
            Some(ModelSpec {
                name: self.model.clone(),
                version_choice: self.version.map(model_spec::VersionChoice::Version),
                signature_name: signature.to_string(),
            })
        };
        let log_type = match &self.payload {
            Payload::None => return None,
            Payload::Predict {
                inputs, outputs, ..
            } => prediction_log::LogType::PredictLog(PredictLog {
                request: Some(PredictRequest {
                    model_spec: spec(&self.signature),
                    inputs: tensors_proto(inputs),
                    ..Default::default()
                }),
                response: Some(PredictResponse {
                    model_spec: spec(&self.signature),
                    outputs: tensors_proto(outputs),
                }),
            }),
            Payload::Tasks { input, results, .. } => match (self.method, results.as_slice()) {
                ("classify", [(signature, TaskResult::Classification(result))]) => {
                    prediction_log::LogType::ClassifyLog(ClassifyLog {
                        request: Some(ClassificationRequest {
                            model_spec: spec(signature),
                            input: input.clone(),
                        }),
                        response: Some(ClassificationResponse {
                            model_spec: spec(signature),
                            result: Some(result.clone()),
                        }),
                    })
                }
                ("regress", [(signature, TaskResult::Regression(result))]) => {
                    prediction_log::LogType::RegressLog(RegressLog {
                        request: Some(RegressionRequest {
                            model_spec: spec(signature),
                            input: input.clone(),
                        }),
                        response: Some(RegressionResponse {
                            model_spec: spec(signature),
                            result: Some(result.clone()),
                        }),
                    })
                }
                _ => prediction_log::LogType::MultiInferenceLog(MultiInferenceLog {
                    request: Some(MultiInferenceRequest {
                        tasks: results
                            .iter()
                            .map(|(signature, result)| InferenceTask {
                                model_spec: spec(signature),
                                method_name: match result {
                                    TaskResult::Classification(_) => CLASSIFY_METHOD_NAME,
                                    TaskResult::Regression(_) => REGRESS_METHOD_NAME,
                                }
                                .to_string(),
                            })
                            .collect(),
                        input: input.clone(),
                    }),
                    response: Some(MultiInferenceResponse {
                        results: results
                            .iter()
                            .map(|(signature, result)| InferenceResult {
                                model_spec: spec(signature),
                                result: Some(match result {
                                    TaskResult::Classification(c) => {
                                        inference_result::Result::ClassificationResult(c.clone())
                                    }
                                    TaskResult::Regression(r) => {
                                        inference_result::Result::RegressionResult(r.clone())
                                    }
                                }),
                            })
                            .collect(),
                    }),
                }),
            },
        };
        Some(PredictionLog {
            log_metadata: Some(LogMetadata {
                model_spec: spec(&self.signature),
                sampling_config: Some(SamplingConfig {
                    sampling_rate: self.sampling_rate,
                    ..Default::default()
                }),
                timestamp_secs: self
                    .timestamp
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64),
                ..Default::default()
            }),
            log_type: Some(log_type),
        })
    }
}

/// RFC 3339 in UTC with microseconds, which BigQuery and every log shipper parse.
fn rfc3339(at: SystemTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::from(at)
        .format(&format)
        .unwrap_or_default()
}

/// `{"name": {"dtype": "DT_FLOAT", "shape": [..], "values": [..]}}`; values flat, in
/// row-major order, left out when `omit_values`.
fn tensors_json(tensors: &[(String, Tensor)], omit_values: bool) -> Value {
    let mut object = Map::new();
    for (name, tensor) in tensors {
        let mut entry = Map::new();
        entry.insert("dtype".into(), tensor.dtype.tf_name().into());
        entry.insert("shape".into(), tensor.shape.clone().into());
        if !omit_values {
            entry.insert("values".into(), values_json(tensor));
        }
        object.insert(name.clone(), Value::Object(entry));
    }
    Value::Object(object)
}

/// A tensor's values as JSON numbers (booleans for DT_BOOL); a non-finite float, which JSON
/// cannot hold, is `null`.
fn values_json(tensor: &Tensor) -> Value {
    fn floats(values: impl Iterator<Item = f64>) -> Value {
        Value::Array(
            values
                .map(|v| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
                .collect(),
        )
    }
    fn ints<T: Into<Value>>(values: Option<Vec<T>>) -> Value {
        Value::Array(
            values
                .unwrap_or_default()
                .into_iter()
                .map(Into::into)
                .collect(),
        )
    }
    let data = &tensor.data;
    match tensor.dtype {
        DType::F32 => floats(
            tensor
                .to_values::<f32>()
                .unwrap_or_default()
                .into_iter()
                .map(f64::from),
        ),
        DType::F64 => floats(tensor.to_values::<f64>().unwrap_or_default().into_iter()),
        DType::F16 => floats(
            data.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()),
        ),
        DType::BF16 => floats(
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()),
        ),
        DType::I64 => ints(tensor.to_values::<i64>()),
        DType::I32 => ints(tensor.to_values::<i32>()),
        DType::I16 => ints(tensor.to_values::<i16>()),
        DType::I8 => Value::Array(data.iter().map(|&b| (b as i8).into()).collect()),
        DType::U8 => Value::Array(data.iter().map(|&b| b.into()).collect()),
        DType::Bool => Value::Array(data.iter().map(|&b| (b != 0).into()).collect()),
    }
}

fn tensors_proto(
    tensors: &[(String, Tensor)],
) -> std::collections::HashMap<String, crate::proto::tensorflow::TensorProto> {
    tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), tensor_to_proto(tensor, true)))
        .collect()
}

fn task_result_json(entry: &(String, TaskResult)) -> Value {
    let (signature, result) = entry;
    match result {
        TaskResult::Classification(c) => {
            json!({ "signature": signature, "classification_result": proto_json(c) })
        }
        TaskResult::Regression(r) => {
            json!({ "signature": signature, "regression_result": proto_json(r) })
        }
    }
}

/// A message in protobuf's JSON mapping, through its descriptor.
fn proto_json<M: ProtoName>(message: &M) -> Value {
    crate::proto::to_json(M::FULL_NAME, &message.encode_to_vec()).unwrap_or(Value::Null)
}

/// The full proto names of the messages logged as JSON.
trait ProtoName: Message {
    const FULL_NAME: &'static str;
}
impl ProtoName for Input {
    const FULL_NAME: &'static str = "tensorflow.serving.Input";
}
impl ProtoName for crate::proto::serving::ClassificationResult {
    const FULL_NAME: &'static str = "tensorflow.serving.ClassificationResult";
}
impl ProtoName for crate::proto::serving::RegressionResult {
    const FULL_NAME: &'static str = "tensorflow.serving.RegressionResult";
}
