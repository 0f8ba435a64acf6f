//! One logged request, and its two encodings: a JSON object (one per line) and TF Serving's
//! `PredictionLog`.

use crate::proto::answers::{served_spec, TaskResult};
use crate::proto::serving::{
    prediction_log, ClassificationRequest, ClassificationResponse, ClassifyLog, InferenceTask,
    Input, LogMetadata, MultiInferenceLog, MultiInferenceRequest, MultiInferenceResponse,
    PredictLog, PredictRequest, PredictResponse, PredictionLog, RegressLog, RegressionRequest,
    RegressionResponse, SamplingConfig,
};
use crate::proto::tensor::tensor_to_proto;
use crate::tensor::{JsonValues, Tensor};
use prost::Message;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Value};
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
    /// Classify, Regress, MultiInference: the examples and one result per task. When they
    /// would exceed the size limit, the examples are dropped (`None`) and each result is
    /// an empty one of its kind.
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

    /// Whether the values (tensors, tf.Examples, results) were left out for size.
    pub fn values_omitted(&self) -> bool {
        match self.payload {
            Payload::None => false,
            Payload::Predict { values_omitted, .. } | Payload::Tasks { values_omitted, .. } => {
                values_omitted
            }
        }
    }

    /// The record as one JSON object (no trailing newline), its keys in the order
    /// docs/request-logging.md documents them.
    pub fn to_json(&self) -> String {
        let (request, response, values_omitted) = match &self.payload {
            Payload::None => (Json::Null, Json::Null, false),
            Payload::Predict {
                inputs,
                outputs,
                values_omitted,
            } => (
                Json::Inputs {
                    inputs: Tensors(inputs, *values_omitted),
                },
                if self.is_error() {
                    Json::Null
                } else {
                    Json::Outputs {
                        outputs: Tensors(outputs, *values_omitted),
                    }
                },
                *values_omitted,
            ),
            Payload::Tasks {
                input,
                results,
                values_omitted,
            } => (
                Json::Value(json!({ "input": input.as_ref().map(proto_json) })),
                if self.is_error() {
                    Json::Null
                } else {
                    Json::Value(Value::Array(
                        results
                            .iter()
                            .map(|result| task_result_json(result, *values_omitted))
                            .collect(),
                    ))
                },
                *values_omitted,
            ),
        };
        let line = JsonRecord {
            timestamp: rfc3339(self.timestamp),
            r#type: if self.is_error() { "error" } else { "ok" },
            model: &self.model,
            version: self.version,
            signature: &self.signature,
            method: self.method,
            protocol: self.protocol,
            latency_ms: (self.latency.as_secs_f64() * 1e6).round() / 1e3,
            code: self.code,
            message: &self.message,
            request,
            response,
            values_omitted,
        };
        // Serializing borrowed strings and numbers cannot fail.
        serde_json::to_string(&line).unwrap_or_default()
    }

    /// The record as TF Serving's `PredictionLog`, for an answered request whose payload was
    /// captured whole; `None` otherwise (PredictionLog has no place for a failure, and a
    /// tensor whose shape disagrees with its content cannot be replayed).
    pub fn to_prediction_log(&self) -> Option<PredictionLog> {
        if self.is_error() || self.values_omitted() {
            return None;
        }
        // A captured payload comes with the version it resolved.
        let version = self.version?;
        let spec = |signature: &str| Some(served_spec(&self.model, version, signature));
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
                                method_name: result.method_name().to_string(),
                            })
                            .collect(),
                        input: input.clone(),
                    }),
                    response: Some(MultiInferenceResponse {
                        results: results
                            .iter()
                            .map(|(signature, result)| {
                                result.clone().into_inference_result(
                                    &self.model,
                                    version,
                                    signature,
                                )
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

/// The JSON line, field by field in the documented order.
#[derive(Serialize)]
struct JsonRecord<'a> {
    timestamp: String,
    r#type: &'static str,
    model: &'a str,
    version: Option<i64>,
    signature: &'a str,
    method: &'static str,
    protocol: &'static str,
    latency_ms: f64,
    code: &'static str,
    message: &'a str,
    request: Json<'a>,
    response: Json<'a>,
    values_omitted: bool,
}

/// A record's request or response: `null`, Predict's tensors, or the tasks' protos.
#[derive(Serialize)]
#[serde(untagged)]
enum Json<'a> {
    Null,
    Inputs { inputs: Tensors<'a> },
    Outputs { outputs: Tensors<'a> },
    Value(Value),
}

/// `{"name": {"dtype": "DT_FLOAT", "shape": [..], "values": [..]}}`, values flat in
/// row-major order, left out when the `bool` says so. Serialized straight from the tensors'
/// bytes, with no value built per element.
struct Tensors<'a>(&'a [(String, Tensor)], bool);

impl Serialize for Tensors<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, tensor) in self.0 {
            map.serialize_entry(name, &TensorJson(tensor, self.1))?;
        }
        map.end()
    }
}

struct TensorJson<'a>(&'a Tensor, bool);

impl Serialize for TensorJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let TensorJson(tensor, omit_values) = *self;
        let mut map = serializer.serialize_map(Some(if omit_values { 2 } else { 3 }))?;
        map.serialize_entry("dtype", tensor.dtype.tf_name())?;
        map.serialize_entry("shape", &tensor.shape)?;
        if !omit_values {
            map.serialize_entry("values", &JsonValues(tensor))?;
        }
        map.end()
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

/// One task's result; `null` in place of the result when values were omitted (the record
/// keeps an empty one, which is not what the model answered).
fn task_result_json(entry: &(String, TaskResult), omitted: bool) -> Value {
    let (signature, result) = entry;
    match result {
        TaskResult::Classification(c) => {
            let c = if omitted { Value::Null } else { proto_json(c) };
            json!({ "signature": signature, "classification_result": c })
        }
        TaskResult::Regression(r) => {
            let r = if omitted { Value::Null } else { proto_json(r) };
            json!({ "signature": signature, "regression_result": r })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn record(payload: Payload, code: &'static str) -> Record {
        Record {
            timestamp: UNIX_EPOCH + Duration::from_micros(1_500_000),
            model: "m".into(),
            version: Some(3),
            signature: "serving_default".into(),
            method: "predict",
            protocol: "grpc",
            latency: Duration::from_micros(1234),
            code,
            message: String::new(),
            sampling_rate: 1.0,
            payload,
        }
    }

    #[test]
    fn json_keeps_the_documented_order_and_every_dtype() {
        let floats = Tensor::from_values(vec![3], &[1.5f32, f32::NAN, f32::INFINITY]).unwrap();
        let flags = Tensor::new(DType::Bool, vec![2], bytes::Bytes::from_static(&[1, 0])).unwrap();
        let halves = Tensor::new(
            DType::BF16,
            vec![1],
            bytes::Bytes::copy_from_slice(&half::bf16::from_f32(2.0).to_le_bytes()),
        )
        .unwrap();
        let line = record(
            Payload::Predict {
                inputs: vec![("x".into(), floats), ("b".into(), flags)],
                outputs: vec![("y".into(), halves)],
                values_omitted: false,
            },
            "ok",
        )
        .to_json();
        assert_eq!(
            line,
            r#"{"timestamp":"1970-01-01T00:00:01.500000Z","type":"ok","model":"m","version":3,"signature":"serving_default","method":"predict","protocol":"grpc","latency_ms":1.234,"code":"ok","message":"","request":{"inputs":{"x":{"dtype":"DT_FLOAT","shape":[3],"values":[1.5,null,null]},"b":{"dtype":"DT_BOOL","shape":[2],"values":[true,false]}}},"response":{"outputs":{"y":{"dtype":"DT_BFLOAT16","shape":[1],"values":[2.0]}}},"values_omitted":false}"#
        );
    }

    #[test]
    fn an_error_has_no_response_and_omitted_values_no_values() {
        let x = Tensor::from_values(vec![1], &[1i64]).unwrap();
        let failed = record(
            Payload::Predict {
                inputs: vec![("x".into(), x)],
                outputs: Vec::new(),
                values_omitted: true,
            },
            "invalid_argument",
        );
        let json: Value = serde_json::from_str(&failed.to_json()).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["response"], Value::Null);
        assert_eq!(
            json["request"]["inputs"]["x"],
            json!({"dtype": "DT_INT64", "shape": [1]})
        );
        assert!(failed.to_prediction_log().is_none());
        // Answered, but too large to keep its values: no PredictionLog of hollow tensors.
        let x = Tensor::from_values(vec![1], &[1i64]).unwrap();
        let omitted = record(
            Payload::Predict {
                inputs: vec![("x".into(), x)],
                outputs: Vec::new(),
                values_omitted: true,
            },
            "ok",
        );
        assert!(omitted.values_omitted());
        assert!(omitted.to_prediction_log().is_none());
        let nothing = record(Payload::None, "not_found");
        let json: Value = serde_json::from_str(&nothing.to_json()).unwrap();
        assert_eq!(json["request"], Value::Null);
    }
}
