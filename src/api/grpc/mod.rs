//! The gRPC server: PredictionService, ModelService, grpc.health.v1 and reflection.

mod codec;
mod model_service;
mod prediction;

pub use codec::{tensor_from_proto, tensor_to_proto};

use crate::inference::Inference;
use crate::proto::serving::model_service_server::ModelServiceServer;
use crate::proto::serving::prediction_service_server::PredictionServiceServer;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::registry::{ManagerHandle, Registry};
use axum::serve::ListenerExt;
use model_service::ModelServiceApi;
use prediction::PredictionApi;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic_health::ServingStatus;

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
}

/// Serves gRPC on `listener` until `shutdown` resolves, then lets calls in flight finish.
///
/// The services are served through axum rather than tonic's own transport: tonic's
/// transport enforces `grpc-timeout` itself and answers CANCELLED, while TF Serving (and
/// DESIGN.md) answer DEADLINE_EXCEEDED and drop the request before it reaches the model,
/// which the handlers do from the same header.
pub async fn serve(
    listener: TcpListener,
    inference: Inference,
    manager: ManagerHandle,
    options: GrpcOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let registry = Arc::clone(inference.registry());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(mirror_readiness(health_reporter, Arc::clone(&registry)));

    // Both reflection versions: grpcurl and most tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let limit = options.max_message_bytes;
    let prediction = PredictionServiceServer::new(PredictionApi::new(inference, options))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
        .accept_compressed(CompressionEncoding::Gzip);
    let model_service = ModelServiceServer::new(ModelServiceApi::new(registry, manager))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
        .accept_compressed(CompressionEncoding::Gzip);

    let router = tonic::service::Routes::new(prediction)
        .add_service(model_service)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router();
    let listener = listener.tap_io(|tcp| {
        // Small unary calls: do not let Nagle hold back the response.
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Io)
}

/// Why the gRPC server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Io(std::io::Error),
}

/// Keeps grpc.health.v1 in step with readiness: SERVING once every configured model has
/// an available version and the server is not draining.
async fn mirror_readiness(reporter: tonic_health::server::HealthReporter, registry: Arc<Registry>) {
    let mut last: Option<ServingStatus> = None;
    loop {
        let status = if registry.readiness().is_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            for name in HEALTH_SERVICE_NAMES {
                reporter.set_service_status(name, status).await;
            }
            last = Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
