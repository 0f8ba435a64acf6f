//! The JSON of model status and metadata, as TF Serving prints those protos
//! (`model_servers/http_rest_api_util.cc`: protobuf's JSON printer with every field
//! printed, int64 as strings, enums by name), through the protos' descriptors
//! ([`proto::to_printed_json`](crate::proto::to_printed_json)). Metadata keeps the proto
//! field names and nests `signature_def` twice: the metadata map's key, then the
//! SignatureDefMap's field.

use crate::proto::answers::served_spec;
use crate::proto::serving::{GetModelStatusResponse, SignatureDefMap};
use crate::proto::to_printed_json;
use prost::Message;
use serde_json::{json, Value};

/// `GET /v1/models/{m}[/versions/{v}|/labels/{l}]`.
pub fn status_json(response: &GetModelStatusResponse) -> String {
    pretty(&status_value(response))
}

/// The status answer as a JSON value (also one model's entry in the admin status).
pub fn status_value(response: &GetModelStatusResponse) -> Value {
    printed("tensorflow.serving.GetModelStatusResponse", response)
}

/// `GET /v1/models/{m}[/versions/{v}|/labels/{l}]/metadata`.
pub fn metadata_json(model: &str, version: i64, signatures: &SignatureDefMap) -> String {
    pretty(&json!({
        "model_spec": printed("tensorflow.serving.ModelSpec", &served_spec(model, version, "")),
        "metadata": {
            "signature_def": printed("tensorflow.serving.SignatureDefMap", signatures),
        },
    }))
}

/// `message` printed; every type named here is in the embedded descriptors, so `Null`
/// would only mean a broken build.
fn printed(full_name: &str, message: &impl Message) -> Value {
    to_printed_json(full_name, &message.encode_to_vec(), true).unwrap_or(Value::Null)
}

fn pretty(value: &Value) -> String {
    // Serializing a Value cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_printed_here_is_known() {
        let status = status_value(&GetModelStatusResponse::default());
        assert_eq!(status, json!({ "model_version_status": [] }));
        let metadata: Value =
            serde_json::from_str(&metadata_json("m", 3, &SignatureDefMap::default())).unwrap();
        assert_eq!(metadata["model_spec"]["version"], "3");
        assert_eq!(
            metadata["metadata"]["signature_def"]["signature_def"],
            json!({})
        );
    }
}
