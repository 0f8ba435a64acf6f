//! `tensorflow.serving.PredictionService`.

use super::codec::{signature_def_map, tensor_from_proto, tensor_to_proto};
use super::GrpcOptions;
use crate::error::Error;
use crate::inference::{self, Inference};
use crate::proto::serving::prediction_service_server::PredictionService;
use crate::proto::serving::{
    model_spec, ClassificationRequest, ClassificationResponse, GetModelMetadataRequest,
    GetModelMetadataResponse, ModelSpec, MultiInferenceRequest, MultiInferenceResponse,
    PredictRequest, PredictResponse, RegressionRequest, RegressionResponse,
};
use crate::registry::VersionSelector;
use prost::Message;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// The one metadata field TF Serving serves.
const SIGNATURE_DEF_FIELD: &str = "signature_def";
const SIGNATURE_DEF_MAP_TYPE_URL: &str = "type.googleapis.com/tensorflow.serving.SignatureDefMap";

pub struct PredictionApi {
    inference: Inference,
    options: GrpcOptions,
}

impl PredictionApi {
    pub fn new(inference: Inference, options: GrpcOptions) -> PredictionApi {
        PredictionApi { inference, options }
    }
}

/// The model name and version a request's ModelSpec asks for.
pub(super) fn model_and_version(
    spec: Option<&ModelSpec>,
) -> Result<(String, VersionSelector), Error> {
    let spec =
        spec.ok_or_else(|| Error::InvalidArgument("the request has no model_spec".into()))?;
    if spec.name.is_empty() {
        return Err(Error::InvalidArgument("model_spec.name is empty".into()));
    }
    let version = match &spec.version_choice {
        None => VersionSelector::Latest,
        Some(model_spec::VersionChoice::Version(v)) => VersionSelector::Number(*v),
        Some(model_spec::VersionChoice::VersionLabel(label)) => {
            VersionSelector::Label(label.clone())
        }
    };
    Ok((spec.name.clone(), version))
}

/// The ModelSpec of a response: the version that actually served.
pub(super) fn served_spec(model: &str, version: i64, signature: &str) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        version_choice: Some(model_spec::VersionChoice::Version(version)),
        signature_name: signature.to_string(),
    }
}

/// The deadline a client set with the `grpc-timeout` header (gRPC over HTTP/2: up to eight
/// digits and a unit, H M S m u n), counted from now.
pub(super) fn deadline<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

fn unimplemented(call: &str) -> Status {
    Error::Unimplemented(format!(
        "{call} is not implemented by this modelgate release"
    ))
    .into()
}

#[tonic::async_trait]
impl PredictionService for PredictionApi {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let deadline = deadline(&request);
        let request = request.into_inner();
        let (model, version) = model_and_version(request.model_spec.as_ref())?;
        let inputs = request
            .inputs
            .iter()
            .map(|(name, proto)| {
                tensor_from_proto(name, proto, self.options.max_message_bytes)
                    .map(|t| (name.clone(), t))
            })
            .collect::<Result<_, _>>()?;
        let signature = request
            .model_spec
            .as_ref()
            .map(|s| s.signature_name.clone())
            .unwrap_or_default();
        let answer = self
            .inference
            .predict(inference::PredictRequest {
                model,
                version,
                signature,
                inputs,
                output_filter: request.output_filter,
                deadline,
            })
            .await?;
        let as_content = self.options.tensor_content;
        Ok(Response::new(PredictResponse {
            model_spec: Some(served_spec(
                &answer.model,
                answer.version,
                &answer.signature,
            )),
            outputs: answer
                .outputs
                .iter()
                .map(|(name, tensor)| (name.clone(), tensor_to_proto(tensor, as_content)))
                .collect(),
        }))
    }

    async fn get_model_metadata(
        &self,
        request: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let (model, version) = model_and_version(request.model_spec.as_ref())?;
        if request.metadata_field.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "metadata_field is empty; ask for '{SIGNATURE_DEF_FIELD}'"
            ))
            .into());
        }
        if let Some(field) = request
            .metadata_field
            .iter()
            .find(|f| *f != SIGNATURE_DEF_FIELD)
        {
            return Err(Error::InvalidArgument(format!(
                "metadata field '{field}' is not supported; the supported field is '{SIGNATURE_DEF_FIELD}'"
            ))
            .into());
        }
        let servable = self.inference.registry().resolve(&model, &version)?;
        let signatures = signature_def_map(&servable.signatures);
        let metadata = prost_types::Any {
            type_url: SIGNATURE_DEF_MAP_TYPE_URL.to_string(),
            value: signatures.encode_to_vec(),
        };
        Ok(Response::new(GetModelMetadataResponse {
            model_spec: Some(served_spec(&servable.model, servable.version, "")),
            metadata: [(SIGNATURE_DEF_FIELD.to_string(), metadata)].into(),
        }))
    }

    async fn classify(
        &self,
        _request: Request<ClassificationRequest>,
    ) -> Result<Response<ClassificationResponse>, Status> {
        Err(unimplemented("Classify"))
    }

    async fn regress(
        &self,
        _request: Request<RegressionRequest>,
    ) -> Result<Response<RegressionResponse>, Status> {
        Err(unimplemented("Regress"))
    }

    async fn multi_inference(
        &self,
        _request: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(unimplemented("MultiInference"))
    }
}
