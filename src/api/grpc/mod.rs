//! The gRPC port: TF Serving's PredictionService and ModelService, the Open Inference
//! Protocol's `inference.GRPCInferenceService` ([`v2`]), grpc.health.v1 and reflection.

mod body;
mod metadata;
mod model_service;
mod prediction;
pub(crate) mod v2;

pub use metadata::signature_def_map;
pub(crate) use prediction::deadline;

use crate::api::v2::RepositoryControl;
use crate::inference::Inference;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::serving::model_service_server::ModelServiceServer;
use crate::proto::serving::prediction_service_server::PredictionServiceServer;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::registry::{ManagerHandle, Registry};
use model_service::ModelServiceApi;
use prediction::PredictionApi;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;
use v2::V2GrpcApi;

/// The service names gRPC health answers for: overall (""), then TF Serving's full and
/// short service names.
pub const HEALTH_SERVICE_NAMES: [&str; 5] = [
    "",
    "tensorflow.serving.PredictionService",
    "tensorflow.serving.ModelService",
    "PredictionService",
    "ModelService",
];

/// What the gRPC layer needs to know from the flags.
#[derive(Clone, Copy, Debug)]
pub struct GrpcOptions {
    /// Answer with tensor_content instead of typed fields.
    pub tensor_content: bool,
    /// Largest message received or sent; also bounds one decoded tensor.
    pub max_message_bytes: usize,
    /// Request bytes all calls together may hold while they arrive (at least
    /// `max_message_bytes`); beyond, RESOURCE_EXHAUSTED.
    pub max_bytes_in_flight: usize,
}

/// The gRPC services as one router, to be served by `api::serve`.
///
/// The services are served through axum and hyper rather than tonic's own transport:
/// tonic's transport enforces `grpc-timeout` itself and answers CANCELLED, while TF Serving
/// answers DEADLINE_EXCEEDED and drops the request before it reaches the model, which the
/// handlers do from the same header.
///
/// `draining` turns true when shutdown begins, so that health turns NOT_SERVING at once
/// rather than at the next readiness poll; `stop` turns true when the server stops
/// accepting, and ends the health watch streams, which would otherwise hold their
/// connections open to the end of the drain.
pub async fn router(
    inference: Inference,
    registry: Arc<Registry>,
    manager: ManagerHandle,
    repository: RepositoryControl,
    options: GrpcOptions,
    draining: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> Result<axum::Router, BuildError> {
    let health_reporter = HealthReporter::new();
    // tonic starts the overall service "" as SERVING; nothing is ready until the first look
    // at readiness says so.
    health_reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let health_service = HealthServer::new(StoppingHealth {
        inner: HealthService::from_health_reporter(health_reporter.clone()),
        stop,
    });
    tokio::spawn(mirror_readiness(
        health_reporter,
        Arc::clone(&registry),
        draining,
    ));

    // Both reflection versions: grpcurl and most tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let limit = options.max_message_bytes;
    let budget = Arc::new(tokio::sync::Semaphore::new(
        options
            .max_bytes_in_flight
            .min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let v2_inference = inference.clone();
    let prediction = PredictionServiceServer::new(PredictionApi::new(inference, options))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
        .accept_compressed(CompressionEncoding::Gzip);
    let model_service = ModelServiceServer::new(ModelServiceApi::new(
        v2_inference.clone(),
        Arc::clone(&registry),
        manager,
        repository.admin_token(),
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit)
    .accept_compressed(CompressionEncoding::Gzip);
    let v2 = GrpcInferenceServiceServer::new(V2GrpcApi::new(
        v2_inference,
        Arc::clone(&registry),
        repository,
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit)
    .accept_compressed(CompressionEncoding::Gzip);

    Ok(tonic::service::Routes::new(prediction)
        .add_service(model_service)
        .add_service(v2)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router()
        .layer(tower::util::MapRequestLayer::new(
            move |request: axum::extract::Request| {
                let budget = Arc::clone(&budget);
                request.map(|body| {
                    // PrefixApart saves large messages a second copy inside tonic.
                    let budgeted = body::Budgeted::new(body, budget);
                    axum::body::Body::new(body::PrefixApart::new(budgeted))
                })
            },
        )))
}

/// Why the gRPC services could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// grpc.health.v1 whose watch streams end with UNAVAILABLE once the server stops accepting,
/// so that a watching client learns the server is going and the drain does not wait for it.
struct StoppingHealth {
    inner: HealthService,
    stop: watch::Receiver<bool>,
}

type HealthStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for StoppingHealth {
    type WatchStream = HealthStream;

    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthStream>, Status> {
        let updates = Box::pin(self.inner.watch(request).await?.into_inner());
        let stream =
            futures_util::stream::unfold(Some((updates, self.stop.clone())), |state| async move {
                let (mut updates, mut stop) = state?;
                let update = tokio::select! {
                    update = updates.next() => Some(update),
                    _ = stop.wait_for(|&stop| stop) => None,
                };
                match update {
                    Some(update) => update.map(|u| (u, Some((updates, stop)))),
                    None => Some((
                        Err(Status::unavailable("the server is shutting down")),
                        None,
                    )),
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Keeps grpc.health.v1 in step with readiness (`/readyz`): the overall and TF Serving
/// service names are SERVING once every configured model has an available version and the
/// server is not draining; each model's name is SERVING while that model has an available
/// version and the server is not draining. A model removed from the config is forgotten
/// (its checks answer NOT_FOUND again).
async fn mirror_readiness(
    mut reporter: tonic_health::server::HealthReporter,
    registry: Arc<Registry>,
    mut draining: watch::Receiver<bool>,
) {
    let mut last: HashMap<String, ServingStatus> = HashMap::new();
    let mut watching = true;
    loop {
        let readiness = registry.readiness();
        let serving = |ready: bool| {
            if ready && !readiness.draining {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        let mut wanted: HashMap<String, ServingStatus> = HEALTH_SERVICE_NAMES
            .iter()
            .map(|name| (name.to_string(), serving(readiness.is_ready())))
            .collect();
        for model in registry.model_names() {
            let ready = !readiness.models_not_ready.contains(&model);
            wanted.entry(model).or_insert(serving(ready));
        }
        for (name, status) in &wanted {
            if last.get(name) != Some(status) {
                reporter.set_service_status(name, *status).await;
            }
        }
        for name in last.keys().filter(|name| !wanted.contains_key(*name)) {
            reporter.clear_service_status(name).await;
        }
        last = wanted;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            changed = draining.changed(), if watching => {
                // The sender gone means nothing more to wait for: keep polling only.
                watching = changed.is_ok();
            }
        }
    }
}

/// The answer to a connection without a client certificate, when `client_verify` requires
/// one: every call is UNAUTHENTICATED.
pub fn unauthenticated() -> axum::response::Response {
    Status::unauthenticated(
        "this server requires a client certificate signed by its custom_ca (client_verify)",
    )
    .into_http()
}
