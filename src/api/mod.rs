//! The protocols, and nothing else: TF Serving's gRPC and REST APIs, the Open Inference
//! Protocol (KServe V2) on both ports (`v2` holds what its two transports share), the admin
//! API on the REST port, the servers' accept loops (`serve`) and the request timer every
//! call is measured with. Each transport decodes bytes into tensors, calls the
//! [`Inference`](crate::inference::Inference) core, and encodes its answer.

pub mod admin;
pub mod grpc;
pub mod model_status;
pub mod rest;
pub mod serve;
pub mod timer;
pub mod v2;

use crate::error::Error;

/// Requests (and answers) larger than this are decoded (encoded) on a blocking thread, so
/// that a large tensor or JSON document does not hold up the async executor; all four
/// transports decode through [`offload`].
const OFFLOAD_BYTES: usize = 64 << 10;

/// Runs `work` here when `size` is small, else on a blocking thread.
pub(crate) async fn offload<T, F>(size: usize, work: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Error> + Send + 'static,
{
    if size <= OFFLOAD_BYTES {
        return work();
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal(format!("decoding task failed: {e}")))?
}
