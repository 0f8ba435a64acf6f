//! `tensorflow.serving.PredictionService`.

use super::metadata::signature_def_map;
use super::GrpcOptions;
use crate::api::offload;
use crate::api::timer::RequestTimer;
use crate::error::Error;
use crate::inference::tasks::{self, Task, TaskKind};
use crate::inference::{self, find_signature, Inference};
use crate::proto::answers::{served_spec, TaskResult};
use crate::proto::serving::prediction_service_server::PredictionService;
use crate::proto::serving::{
    model_spec, ClassificationRequest, ClassificationResponse, GetModelMetadataRequest,
    GetModelMetadataResponse, ModelSpec, MultiInferenceRequest, MultiInferenceResponse,
    PredictRequest, PredictResponse, RegressionRequest, RegressionResponse,
};
use crate::proto::tensor::{declared_type, tensor_to_proto, tensor_values};
use crate::registry::VersionSelector;
use crate::signature::canonical_name;
use crate::telemetry::{Api, Protocol};
use crate::tensor::byte_size;
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
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

/// What a Classify or Regress request asks: its spec, its examples, and its size as
/// received (what its tensors may decode to depends on it).
#[derive(Clone, Copy)]
struct TaskRequest<'a> {
    spec: Option<&'a ModelSpec>,
    input: Option<&'a crate::proto::serving::Input>,
    bytes: usize,
}

/// The deadline a client set with the `grpc-timeout` header (gRPC over HTTP/2: up to eight
/// digits and a unit, H M S m u n), counted from now.
pub(crate) fn deadline<T>(request: &Request<T>) -> Option<Instant> {
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

/// Records a finished call (metrics and logs) and turns it into what tonic sends. The
/// version label comes from the spec of the answer.
pub(super) fn respond<T>(
    inference: &Inference,
    timer: RequestTimer,
    requested: Option<&ModelSpec>,
    result: Result<T, Error>,
    served: impl Fn(&T) -> Option<&ModelSpec>,
) -> Result<Response<T>, Status> {
    let requested = requested.map_or("", |s| s.name.as_str());
    let version = |answer: &T| {
        served(answer).and_then(|s| match s.version_choice {
            Some(model_spec::VersionChoice::Version(v)) => Some(v),
            _ => None,
        })
    };
    timer.finish(inference, requested, result.as_ref().map(version));
    result.map(Response::new).map_err(Status::from)
}

impl PredictionApi {
    async fn predict(
        &self,
        request: &Arc<PredictRequest>,
        deadline: Option<Instant>,
    ) -> Result<PredictResponse, Error> {
        let (model, version) = model_and_version(request.model_spec.as_ref())?;
        let signature = request
            .model_spec
            .as_ref()
            .map(|s| s.signature_name.clone())
            .unwrap_or_default();
        // Names, dtypes and shapes are checked against the signature, and sizes (padding
        // included) against the request's budget, before any value is decoded or broadcast.
        let servable = self
            .inference
            .resolve_for_run(&model, &version, deadline)
            .await?;
        // An unknown signature is FAILED_PRECONDITION before any input is looked at.
        find_signature(&servable, &signature)?;
        // In name order, so that a request with several bad inputs always hears of the
        // same one (the map's own order changes from process to process).
        let mut inputs: Vec<_> = request.inputs.iter().collect();
        inputs.sort_unstable_by_key(|(name, _)| name.as_str());
        let mut declared = Vec::with_capacity(inputs.len());
        for (name, proto) in inputs {
            let (dtype, shape) = declared_type(name, proto)?;
            declared.push((name.clone(), dtype, shape));
        }
        let checked = declared
            .iter()
            .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()));
        self.inference
            .check_declared(&servable, &signature, checked)?;
        // What decoding costs: `tensor_content` is taken as it is (a slice of the frame),
        // so only typed values, which are converted or broadcast, count towards offloading
        // the work to a blocking thread.
        let size = declared
            .iter()
            .filter(|(name, _, _)| request.inputs[name].tensor_content.is_empty())
            .fold(0usize, |sum, (_, dtype, shape)| {
                sum.saturating_add(byte_size(*dtype, shape).unwrap_or(usize::MAX))
            });
        let mut budget = self.inference.decode_budget(request.encoded_len());
        let decoding = Arc::clone(request);
        let inputs = offload(size, move || {
            let mut inputs = HashMap::with_capacity(declared.len());
            for (name, dtype, shape) in declared {
                let proto = &decoding.inputs[&name];
                let tensor = tensor_values(&name, proto, dtype, shape, &mut budget)?;
                inputs.insert(name, tensor);
            }
            Ok(inputs)
        })
        .await?;
        let answer = self
            .inference
            .predict_on(
                servable,
                inference::PredictRequest {
                    signature,
                    inputs,
                    output_filter: request.output_filter.clone(),
                    deadline,
                },
            )
            .await?;
        let as_content = self.options.tensor_content;
        Ok(PredictResponse {
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
        })
    }

    fn get_model_metadata(
        &self,
        request: &GetModelMetadataRequest,
    ) -> Result<GetModelMetadataResponse, Error> {
        let (model, version) = model_and_version(request.model_spec.as_ref())?;
        if request.metadata_field.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "metadata_field is empty; ask for '{SIGNATURE_DEF_FIELD}'"
            )));
        }
        if let Some(field) = request
            .metadata_field
            .iter()
            .find(|f| *f != SIGNATURE_DEF_FIELD)
        {
            return Err(Error::InvalidArgument(format!(
                "metadata field '{field}' is not supported; the supported field is '{SIGNATURE_DEF_FIELD}'"
            )));
        }
        let servable = self.inference.resolve(&model, &version)?;
        let signatures = signature_def_map(&servable.signatures);
        let metadata = prost_types::Any {
            type_url: SIGNATURE_DEF_MAP_TYPE_URL.to_string(),
            value: signatures.encode_to_vec(),
        };
        Ok(GetModelMetadataResponse {
            model_spec: Some(served_spec(&servable.model, servable.version, "")),
            metadata: [(SIGNATURE_DEF_FIELD.to_string(), metadata)].into(),
        })
    }

    /// Classify or Regress: one task on the request's signature.
    async fn one_task(
        &self,
        request: TaskRequest<'_>,
        kind: TaskKind,
    ) -> Result<(ModelSpec, TaskResult), Error> {
        let TaskRequest { spec, input, bytes } = request;
        let (model, version) = model_and_version(spec)?;
        let signature = spec.map_or("", |s| s.signature_name.as_str());
        let mut answer = tasks::run(
            &self.inference,
            &model,
            &version,
            &[Task { signature, kind }],
            input,
            bytes,
        )
        .await?;
        let (signature, result) = answer
            .results
            .pop()
            .ok_or_else(|| Error::Internal("a task returned no result (server bug)".into()))?;
        Ok((
            served_spec(&answer.model, answer.version, &signature),
            result,
        ))
    }

    /// Classify or Regress: one task, its result wrapped by `wrap` (None: the task
    /// answered with the other kind, a server bug), recorded and answered.
    async fn single_task<T>(
        &self,
        api: Api,
        request: TaskRequest<'_>,
        kind: TaskKind,
        wrap: impl FnOnce(ModelSpec, TaskResult) -> Option<T>,
        served: impl Fn(&T) -> Option<&ModelSpec>,
    ) -> Result<Response<T>, Status> {
        let timer = RequestTimer::start(api, Protocol::Grpc);
        let result = self
            .one_task(request, kind)
            .await
            .and_then(|(spec, result)| {
                wrap(spec, result).ok_or_else(|| {
                    Error::Internal(format!(
                        "a {} task returned another kind of result (server bug)",
                        api.as_str()
                    ))
                })
            });
        respond(&self.inference, timer, request.spec, result, served)
    }

    async fn multi_inference(
        &self,
        request: &MultiInferenceRequest,
    ) -> Result<MultiInferenceResponse, Error> {
        let first = request
            .tasks
            .first()
            .ok_or_else(|| Error::InvalidArgument("MultiInferenceRequest has no tasks".into()))?;
        let first_spec = first.model_spec.as_ref();
        let (model, version) = model_and_version(first_spec)?;
        let mut tasks = Vec::with_capacity(request.tasks.len());
        let mut signatures = std::collections::HashSet::with_capacity(request.tasks.len());
        for task in &request.tasks {
            let spec = task.model_spec.as_ref();
            if spec.map(|s| &s.name) != first_spec.map(|s| &s.name) {
                return Err(Error::InvalidArgument(
                    "all tasks of a MultiInferenceRequest must name the same model".into(),
                ));
            }
            if spec.map(|s| &s.version_choice) != first_spec.map(|s| &s.version_choice) {
                return Err(Error::InvalidArgument(
                    "all tasks of a MultiInferenceRequest must ask for the same version".into(),
                ));
            }
            let signature = spec.map_or("", |s| s.signature_name.as_str());
            if !signatures.insert(canonical_name(signature)) {
                return Err(Error::InvalidArgument(format!(
                    "signature '{}' is evaluated twice in one MultiInferenceRequest",
                    canonical_name(signature)
                )));
            }
            tasks.push(Task {
                signature,
                kind: TaskKind::from_method_name(&task.method_name)?,
            });
        }
        let answer = tasks::run(
            &self.inference,
            &model,
            &version,
            &tasks,
            request.input.as_ref(),
            request.encoded_len(),
        )
        .await?;
        Ok(MultiInferenceResponse {
            results: answer
                .results
                .into_iter()
                .map(|(signature, result)| {
                    result.into_inference_result(&answer.model, answer.version, &signature)
                })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl PredictionService for PredictionApi {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let timer = RequestTimer::start(Api::Predict, Protocol::Grpc);
        let deadline = deadline(&request);
        let request = Arc::new(request.into_inner());
        let result = PredictionApi::predict(self, &request, deadline).await;
        respond(
            &self.inference,
            timer,
            request.model_spec.as_ref(),
            result,
            |r| r.model_spec.as_ref(),
        )
    }

    async fn get_model_metadata(
        &self,
        request: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        let timer = RequestTimer::start(Api::GetModelMetadata, Protocol::Grpc);
        let request = request.into_inner();
        let result = PredictionApi::get_model_metadata(self, &request);
        respond(
            &self.inference,
            timer,
            request.model_spec.as_ref(),
            result,
            |r| r.model_spec.as_ref(),
        )
    }

    async fn classify(
        &self,
        request: Request<ClassificationRequest>,
    ) -> Result<Response<ClassificationResponse>, Status> {
        let request = request.into_inner();
        self.single_task(
            Api::Classify,
            TaskRequest {
                spec: request.model_spec.as_ref(),
                input: request.input.as_ref(),
                bytes: request.encoded_len(),
            },
            TaskKind::Classify,
            |spec, result| match result {
                TaskResult::Classification(result) => Some(ClassificationResponse {
                    model_spec: Some(spec),
                    result: Some(result),
                }),
                TaskResult::Regression(_) => None,
            },
            |r| r.model_spec.as_ref(),
        )
        .await
    }

    async fn regress(
        &self,
        request: Request<RegressionRequest>,
    ) -> Result<Response<RegressionResponse>, Status> {
        let request = request.into_inner();
        self.single_task(
            Api::Regress,
            TaskRequest {
                spec: request.model_spec.as_ref(),
                input: request.input.as_ref(),
                bytes: request.encoded_len(),
            },
            TaskKind::Regress,
            |spec, result| match result {
                TaskResult::Regression(result) => Some(RegressionResponse {
                    model_spec: Some(spec),
                    result: Some(result),
                }),
                TaskResult::Classification(_) => None,
            },
            |r| r.model_spec.as_ref(),
        )
        .await
    }

    async fn multi_inference(
        &self,
        request: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        let timer = RequestTimer::start(Api::MultiInference, Protocol::Grpc);
        let request = request.into_inner();
        let result = PredictionApi::multi_inference(self, &request).await;
        let requested = request.tasks.first().and_then(|t| t.model_spec.as_ref());
        respond(&self.inference, timer, requested, result, |r| {
            r.results.first().and_then(|r| r.model_spec.as_ref())
        })
    }
}
