//! `inference.GRPCInferenceService` (Triton's `grpc_service.proto`) on the gRPC port.

use super::deadline;
use crate::api::offload;
use crate::api::timer::RequestTimer;
use crate::api::v2::{
    self, infer, model_config, model_metadata, resolve, resolve_for_run, DeclaredInput,
    RepositoryControl, PLATFORM,
};
use crate::error::Error;
use crate::inference::Inference;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::inference::model_infer_request::InferInputTensor;
use crate::proto::inference::model_infer_response::InferOutputTensor;
use crate::proto::inference::model_metadata_response::TensorMetadata;
use crate::proto::inference::{self as pb, InferTensorContents};
use crate::registry::Registry;
use crate::telemetry::{Api, Protocol, Timed};
use crate::tensor::limits::DecodeBudget;
use crate::tensor::{DType, ElementError, ElementWriter, Tensor};
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct V2GrpcApi {
    inference: Inference,
    /// Read for the repository index and metadata's version list.
    registry: Arc<Registry>,
    repository: RepositoryControl,
}

impl V2GrpcApi {
    pub fn new(
        inference: Inference,
        registry: Arc<Registry>,
        repository: RepositoryControl,
    ) -> V2GrpcApi {
        V2GrpcApi {
            inference,
            registry,
            repository,
        }
    }
}

/// The `authorization` metadata of a call, if any.
fn authorization<T>(request: &Request<T>) -> Option<Vec<u8>> {
    request
        .metadata()
        .get("authorization")
        .map(|value| value.as_bytes().to_vec())
}

/// The RPCs modelgate does not serve, with why.
fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not implemented by modelgate"))
}

fn no_shared_memory() -> Status {
    Status::unimplemented(
        "shared-memory tensors are not supported by modelgate: send tensors in the request \
         (raw_input_contents or contents)",
    )
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl GrpcInferenceService for V2GrpcApi {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Answer<pb::ServerLiveResponse> {
        let live = self.inference.lost_workers().is_empty();
        Ok(Response::new(pb::ServerLiveResponse { live }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Answer<pb::ServerReadyResponse> {
        let ready = self.inference.readiness().is_ready();
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Answer<pb::ModelReadyResponse> {
        let request = request.into_inner();
        // Triton answers `ready: false` for a model it does not have as for one that is not
        // loaded yet (InferenceServer::ModelIsReady), so that clients' is_model_ready()
        // returns False rather than raising.
        let ready = resolve(&self.inference, &request.name, &request.version).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Answer<pb::ServerMetadataResponse> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "modelgate".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: v2::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Answer<pb::ModelMetadataResponse> {
        let timer = RequestTimer::start(Api::GetModelMetadata, Protocol::V2Grpc);
        let request = request.into_inner();
        let result =
            resolve(&self.inference, &request.name, &request.version).and_then(|servable| {
                Ok((servable.version, model_metadata(&self.registry, &servable)?))
            });
        let result = result.map(|(version, metadata)| {
            let tensors = |list: Vec<v2::TensorMetadata>| {
                list.into_iter()
                    .map(|t| TensorMetadata {
                        name: t.name,
                        datatype: t.datatype.to_string(),
                        shape: t.shape,
                    })
                    .collect()
            };
            (
                version,
                pb::ModelMetadataResponse {
                    name: metadata.name,
                    versions: metadata.versions,
                    platform: PLATFORM.into(),
                    inputs: tensors(metadata.inputs),
                    outputs: tensors(metadata.outputs),
                },
            )
        });
        respond(&self.inference, timer, &request.name, result)
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Answer<pb::ModelInferResponse> {
        let timer = RequestTimer::start(Api::Predict, Protocol::V2Grpc);
        let deadline = deadline(&request);
        let request = request.into_inner();
        let model = request.model_name.clone();
        let result = self.infer(request, deadline).await;
        respond(&self.inference, timer, &model, result)
    }

    type ModelStreamInferStream =
        futures_util::stream::Empty<Result<pb::ModelStreamInferResponse, Status>>;

    async fn model_stream_infer(
        &self,
        _: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Answer<Self::ModelStreamInferStream> {
        Err(unimplemented(
            "ModelStreamInfer (decoupled and streaming models)",
        ))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Answer<pb::ModelConfigResponse> {
        let request = request.into_inner();
        let servable = resolve(&self.inference, &request.name, &request.version)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(model_config(&self.inference, &servable)?),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Answer<pb::ModelStatisticsResponse> {
        let request = request.into_inner();
        let stats = v2::statistics(&self.inference, &request.name, &request.version)?;
        let duration = |timed: Timed| pb::StatisticDuration {
            count: timed.count,
            ns: timed.ns,
        };
        let model_stats = stats
            .into_iter()
            .map(|s| pb::ModelStatistics {
                name: s.model,
                version: s.version.to_string(),
                last_inference: s.answered.last_ms,
                inference_count: s.inference_count,
                execution_count: s.execution_count,
                inference_stats: Some(pb::InferStatistics {
                    success: Some(duration(s.answered.success)),
                    fail: Some(duration(s.answered.fail)),
                    queue: Some(duration(s.queue)),
                    compute_input: Some(duration(s.compute.input)),
                    compute_infer: Some(duration(s.compute.infer)),
                    compute_output: Some(duration(s.compute.output)),
                    ..Default::default()
                }),
                batch_stats: s
                    .batches
                    .iter()
                    .map(|b| pb::InferBatchStatistics {
                        batch_size: b.batch_size,
                        compute_input: Some(duration(b.compute.input)),
                        compute_infer: Some(duration(b.compute.infer)),
                        compute_output: Some(duration(b.compute.output)),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Answer<pb::RepositoryIndexResponse> {
        let ready = request.into_inner().ready;
        let models = self
            .repository
            .index(ready)
            .into_iter()
            .map(|entry| pb::repository_index_response::ModelIndex {
                name: entry.name,
                version: entry.version,
                state: entry.state.into(),
                reason: entry.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Answer<pb::RepositoryModelLoadResponse> {
        let authorization = authorization(&request);
        let request = request.get_ref();
        if !request.parameters.is_empty() {
            return Err(Status::invalid_argument(
                "a load takes no parameters here: the model's entry comes from the model config file",
            ));
        }
        self.repository
            .load(authorization.as_deref(), &request.model_name)
            .await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Answer<pb::RepositoryModelUnloadResponse> {
        let authorization = authorization(&request);
        self.repository
            .unload(authorization.as_deref(), &request.get_ref().model_name)
            .await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Answer<pb::SystemSharedMemoryStatusResponse> {
        Err(no_shared_memory())
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Answer<pb::SystemSharedMemoryRegisterResponse> {
        Err(no_shared_memory())
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Answer<pb::SystemSharedMemoryUnregisterResponse> {
        Err(no_shared_memory())
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Answer<pb::CudaSharedMemoryStatusResponse> {
        Err(no_shared_memory())
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Answer<pb::CudaSharedMemoryRegisterResponse> {
        Err(no_shared_memory())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Answer<pb::CudaSharedMemoryUnregisterResponse> {
        Err(no_shared_memory())
    }

    async fn trace_setting(
        &self,
        _: Request<pb::TraceSettingRequest>,
    ) -> Answer<pb::TraceSettingResponse> {
        Err(unimplemented("TraceSetting"))
    }

    async fn log_settings(
        &self,
        _: Request<pb::LogSettingsRequest>,
    ) -> Answer<pb::LogSettingsResponse> {
        Err(unimplemented(
            "LogSettings (set the log level with MODELGATE_LOG at start-up)",
        ))
    }
}

/// Records a finished call and turns it into what tonic sends.
fn respond<T>(
    inference: &Inference,
    timer: RequestTimer,
    requested: &str,
    result: Result<(i64, T), Error>,
) -> Answer<T> {
    timer.finish(inference, requested, result.as_ref().map(|(v, _)| Some(*v)));
    result
        .map(|(_, response)| Response::new(response))
        .map_err(Status::from)
}

impl V2GrpcApi {
    /// A ModelInfer call: the served version and the response.
    async fn infer(
        &self,
        request: pb::ModelInferRequest,
        deadline: Option<std::time::Instant>,
    ) -> Result<(i64, pb::ModelInferResponse), Error> {
        let servable = resolve_for_run(
            &self.inference,
            &request.model_name,
            &request.model_version,
            deadline,
        )
        .await?;
        let declared = request
            .inputs
            .iter()
            .map(|input| DeclaredInput::new(&input.name, &input.datatype, &input.shape))
            .collect::<Result<Vec<_>, _>>()?;
        let signature =
            v2::signature_or_default(request.parameters.get(v2::SIGNATURE_PARAMETER).and_then(
                |p| match &p.parameter_choice {
                    Some(pb::infer_parameter::ParameterChoice::StringParam(s)) => Some(s.as_str()),
                    _ => None,
                },
            ))
            .to_string();
        let checked = declared.iter().map(DeclaredInput::checked);
        self.inference
            .check_declared(&servable, &signature, checked)?;
        // Decoded on a blocking thread when large, as on the other transports.
        let request_bytes = request.encoded_len();
        let mut budget = self.inference.decode_budget(request_bytes);
        let request = Arc::new(request);
        let decoding = Arc::clone(&request);
        // Raw contents are taken as they are (slices of the frame): only typed contents,
        // converted value by value, count towards moving the decode off the executor.
        let raw: usize = request.raw_input_contents.iter().map(|b| b.len()).sum();
        let size = request_bytes.saturating_sub(raw);
        let inputs = offload(size, move || {
            decode_inputs(&decoding, &declared, &mut budget)
        })
        .await?;
        let requested = request.outputs.iter().map(|o| o.name.clone()).collect();
        let answer = infer(
            &self.inference,
            Arc::clone(&servable),
            &signature,
            inputs,
            requested,
            deadline,
        )
        .await?;
        let mut outputs = Vec::with_capacity(answer.outputs.len());
        let mut raw = Vec::with_capacity(answer.outputs.len());
        for (name, tensor) in answer.outputs {
            outputs.push(InferOutputTensor {
                name,
                datatype: v2::datatype(tensor.dtype).to_string(),
                shape: tensor.shape.clone(),
                ..Default::default()
            });
            raw.push(tensor.data);
        }
        Ok((
            answer.version,
            pb::ModelInferResponse {
                model_name: answer.model,
                model_version: answer.version.to_string(),
                id: request.id.clone(),
                outputs,
                raw_output_contents: raw,
                ..Default::default()
            },
        ))
    }
}

/// The request's tensors: in `raw_input_contents` (one per input, in order; then no input
/// may carry `contents`) or each in its typed `contents`.
fn decode_inputs(
    request: &pb::ModelInferRequest,
    declared: &[DeclaredInput],
    budget: &mut DecodeBudget,
) -> Result<HashMap<String, Tensor>, Error> {
    let raw = &request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(Error::InvalidArgument(format!(
            "raw_input_contents has {} entries for {} inputs: send one per input, in order",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut inputs = HashMap::with_capacity(declared.len());
    for (i, (input, declared)) in request.inputs.iter().zip(declared).enumerate() {
        let tensor = match raw.get(i) {
            Some(bytes) => {
                if input.contents.is_some() {
                    return Err(Error::InvalidArgument(format!(
                        "input '{}' has contents while the request uses raw_input_contents",
                        input.name
                    )));
                }
                let expected = declared.byte_size()?;
                if bytes.len() != expected {
                    return Err(Error::InvalidArgument(format!(
                        "input '{}': raw_input_contents has {} bytes but a {} tensor of shape {:?} needs {expected}",
                        input.name,
                        bytes.len(),
                        v2::datatype(declared.dtype),
                        declared.shape
                    )));
                }
                Tensor::new(declared.dtype, declared.shape.clone(), bytes.clone())
                    .map_err(|e| Error::InvalidArgument(format!("input '{}': {e}", input.name)))?
            }
            None => typed_tensor(input, declared, budget)?,
        };
        inputs.insert(declared.name.clone(), tensor);
    }
    Ok(inputs)
}

/// A tensor from the typed `contents` of its datatype: exactly one value per element.
/// FP16 and BF16 have no typed field; they come as raw bytes only.
fn typed_tensor(
    input: &InferInputTensor,
    declared: &DeclaredInput,
    budget: &mut DecodeBudget,
) -> Result<Tensor, Error> {
    let empty = InferTensorContents::default();
    let contents = input.contents.as_ref().unwrap_or(&empty);
    let name = &input.name;
    let count = declared.num_elements()?;
    budget.charge(name, declared.byte_size()?)?;
    let field = |dtype: DType| match dtype {
        DType::Bool => "bool_contents",
        DType::I8 | DType::I16 | DType::I32 => "int_contents",
        DType::I64 => "int64_contents",
        DType::U8 => "uint_contents",
        DType::F32 => "fp32_contents",
        DType::F64 => "fp64_contents",
        DType::F16 | DType::BF16 => "raw_input_contents",
    };
    let dtype = declared.dtype;
    let given = match dtype {
        DType::Bool => contents.bool_contents.len(),
        DType::I8 | DType::I16 | DType::I32 => contents.int_contents.len(),
        DType::I64 => contents.int64_contents.len(),
        DType::U8 => contents.uint_contents.len(),
        DType::F32 => contents.fp32_contents.len(),
        DType::F64 => contents.fp64_contents.len(),
        DType::F16 | DType::BF16 => count,
    };
    // Counted before anything is written: the output is the size charged, never more.
    if given != count {
        return Err(Error::InvalidArgument(format!(
            "input '{name}' has shape {:?} ({count} values) but {} holds {given}",
            declared.shape,
            field(dtype)
        )));
    }
    // Exactly one value per element, each through the one checked element writer.
    fn write<T: Copy>(
        out: &mut ElementWriter,
        values: &[T],
        push: impl Fn(&mut ElementWriter, T) -> Result<(), ElementError>,
    ) -> Result<(), ElementError> {
        values.iter().try_for_each(|&v| push(out, v))
    }
    let mut out = ElementWriter::new(dtype, count);
    match dtype {
        DType::Bool => write(&mut out, &contents.bool_contents, ElementWriter::push_bool),
        DType::I8 | DType::I16 | DType::I32 => write(&mut out, &contents.int_contents, |w, v| {
            w.push_int(v.into())
        }),
        DType::I64 => write(&mut out, &contents.int64_contents, |w, v| {
            w.push_int(v.into())
        }),
        DType::U8 => write(&mut out, &contents.uint_contents, |w, v| {
            w.push_int(v.into())
        }),
        DType::F32 => write(&mut out, &contents.fp32_contents, |w, v| {
            w.push_raw(&v.to_le_bytes());
            Ok(())
        }),
        DType::F64 => write(&mut out, &contents.fp64_contents, ElementWriter::push_float),
        DType::F16 | DType::BF16 => {
            return Err(Error::InvalidArgument(format!(
            "input '{name}' is {}: send it in raw_input_contents (V2 has no typed field for it)",
            v2::datatype(dtype)
        )))
        }
    }
    .map_err(|e| Error::InvalidArgument(format!("input '{name}': {}: {e}", field(dtype))))?;
    out.into_tensor(declared.shape.clone())
        .map_err(|e| Error::InvalidArgument(format!("input '{name}': {e}")))
}
