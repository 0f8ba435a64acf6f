//! The plain-HTTP/1 client of the server's own outgoing calls: the admin fan-out to peers
//! and the Kubernetes API, and request logs' `http` collectors.

use crate::error::error_chain;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// A client over plain TCP (no TLS), with Nagle off.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Why an exchange failed, without the request (which may carry a token).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection, or the request could not be sent (the whole error chain).
    #[error("{0}")]
    Request(String),
    /// The answer's body failed or passed its size limit.
    #[error("reading the answer: {0}")]
    Answer(String),
    #[error("no answer within {} s", .0.as_secs_f64())]
    Timeout(Duration),
}

/// Sends `request` and reads at most `max_bytes` of the answer, all within `timeout`.
pub async fn send(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    timeout: Duration,
    max_bytes: usize,
) -> Result<(u16, Bytes), SendError> {
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| SendError::Request(error_chain(&e)))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| SendError::Answer(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| SendError::Timeout(timeout))?
}
