//! The JSON of model status and metadata, as TF Serving prints those protos
//! (`model_servers/http_rest_api_util.cc`: protobuf's JSON printer with every field
//! printed, int64 as strings, enums by name; metadata keeps the proto field names and
//! nests `signature_def` twice: the metadata map's key, then the SignatureDefMap's field).

use crate::proto::serving::model_version_status::State;
use crate::proto::serving::{GetModelStatusResponse, SignatureDefMap};
use crate::proto::tensorflow::error::Code;
use crate::proto::tensorflow::{tensor_info, DataType, TensorInfo, TensorShapeProto};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// `GET /v1/models/{m}[/versions/{v}|/labels/{l}]`.
pub fn status_json(response: &GetModelStatusResponse) -> String {
    pretty(&status_value(response))
}

/// The status answer as a JSON value (also one model's entry in the admin status).
pub fn status_value(response: &GetModelStatusResponse) -> Value {
    let versions: Vec<Value> = response
        .model_version_status
        .iter()
        .map(|v| {
            let state = State::try_from(v.state).unwrap_or(State::Unknown);
            let status = v.status.clone().unwrap_or_default();
            let code = Code::try_from(status.error_code).unwrap_or(Code::Unknown);
            json!({
                "version": v.version.to_string(),
                "state": state.as_str_name(),
                "status": {
                    "error_code": code.as_str_name(),
                    "error_message": status.error_message,
                },
            })
        })
        .collect();
    json!({ "model_version_status": versions })
}

/// `GET /v1/models/{m}[/versions/{v}|/labels/{l}]/metadata`.
pub fn metadata_json(model: &str, version: i64, signatures: &SignatureDefMap) -> String {
    let defs: Map<String, Value> = signatures
        .signature_def
        .iter()
        .map(|(name, def)| {
            (
                name.clone(),
                json!({
                    "inputs": tensor_infos(&def.inputs),
                    "outputs": tensor_infos(&def.outputs),
                    "method_name": def.method_name,
                    "defaults": {},
                }),
            )
        })
        .collect();
    pretty(&json!({
        "model_spec": {
            "name": model,
            "signature_name": "",
            "version": version.to_string(),
        },
        "metadata": {
            "signature_def": {
                "signature_def": defs,
            },
        },
    }))
}

fn tensor_infos(infos: &HashMap<String, TensorInfo>) -> Value {
    infos
        .iter()
        .map(|(alias, info)| {
            let mut value = json!({
                "dtype": DataType::try_from(info.dtype)
                    .unwrap_or(DataType::DtInvalid)
                    .as_str_name(),
                "tensor_shape": shape_json(info.tensor_shape.as_ref()),
            });
            if let Some(tensor_info::Encoding::Name(name)) = &info.encoding {
                value["name"] = Value::String(name.clone());
            }
            (alias.clone(), value)
        })
        .collect::<Map<_, _>>()
        .into()
}

fn shape_json(shape: Option<&TensorShapeProto>) -> Value {
    let shape = shape.cloned().unwrap_or_default();
    json!({
        "dim": shape
            .dim
            .iter()
            .map(|d| json!({ "size": d.size.to_string(), "name": d.name }))
            .collect::<Vec<_>>(),
        "unknown_rank": shape.unknown_rank,
    })
}

fn pretty(value: &Value) -> String {
    // Serializing a Value cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_default()
}
