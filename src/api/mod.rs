//! The protocols: TF Serving's gRPC and REST APIs, what they share (tf.Example inputs and
//! the Classify / Regress / MultiInference tasks), and the admin API on the REST port.

pub mod admin;
pub mod examples;
#[cfg(test)]
mod fuzz;
pub mod grpc;
pub mod http_client;
pub mod model_status;
pub mod rest;
pub mod serve;
pub mod tasks;
pub mod v2;
pub mod warmup;

use crate::error::Error;

/// Requests (and answers) larger than this are decoded (encoded) on a blocking thread, so
/// that a large tensor or JSON document does not hold up the async executor.
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
