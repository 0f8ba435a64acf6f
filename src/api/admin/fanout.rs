//! Fan-out: one admin call forwarded to every pod in parallel, each with a timeout, and one
//! result per pod. A pod that is down, slow or failing is reported as such; the others'
//! results stand.

use super::kubernetes::Peer;
use crate::http_client::{send, HttpClient};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Uri};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// The largest answer read from one pod; admin answers are small status documents.
const MAX_POD_ANSWER_BYTES: usize = 8 << 20;

/// The query parameter that asks for a fan-out; forwarded calls carry it as `false`, so a pod
/// never fans out again what it received from a peer.
pub const FANOUT_PARAM: &str = "fanout";

/// The call every pod receives.
#[derive(Debug)]
pub struct Forward {
    pub method: Method,
    /// Path and query, with `fanout=false`.
    pub path_and_query: String,
    pub authorization: Option<HeaderValue>,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// The request's path and query with any `fanout` parameter replaced by `fanout=false`.
pub fn forwarded_path_and_query(uri: &Uri) -> String {
    let mut pairs: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some(FANOUT_PARAM))
        .collect();
    let no_fanout = format!("{FANOUT_PARAM}=false");
    pairs.push(&no_fanout);
    format!("{}?{}", uri.path(), pairs.join("&"))
}

/// What one pod answered.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PodResult {
    /// The pod's name when the Endpoints give it.
    pub pod: Option<String>,
    /// The address called.
    pub address: String,
    /// The pod answered with a 2xx status.
    pub ok: bool,
    /// The HTTP status the pod answered with; absent when it did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The pod's answer (JSON, or a string when it was not JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<serde_json::Value>,
    /// Why the call failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Calls every ready peer in parallel; a peer that is not ready is reported without a call.
/// Results come in the order of `peers`.
pub async fn call_all(
    client: &HttpClient,
    peers: Vec<Peer>,
    forward: Arc<Forward>,
    timeout: Duration,
) -> Vec<PodResult> {
    // Spawned first, awaited in order: the calls run concurrently and the order is kept.
    let calls: Vec<_> = peers
        .into_iter()
        .map(|peer| {
            let (client, forward) = (client.clone(), Arc::clone(&forward));
            let address = peer.address;
            let pod = peer.pod.clone();
            let call =
                tokio::spawn(async move { call_one(&client, peer, &forward, timeout).await });
            (pod, address, call)
        })
        .collect();
    let mut results = Vec::with_capacity(calls.len());
    for (pod, address, call) in calls {
        results.push(call.await.unwrap_or_else(|e| PodResult {
            pod,
            address: address.to_string(),
            ok: false,
            status: None,
            response: None,
            error: Some(format!("the call failed: {e}")),
        }));
    }
    results
}

async fn call_one(
    client: &HttpClient,
    peer: Peer,
    forward: &Forward,
    timeout: Duration,
) -> PodResult {
    let mut result = PodResult {
        pod: peer.pod,
        address: peer.address.to_string(),
        ok: false,
        status: None,
        response: None,
        error: None,
    };
    if !peer.ready {
        result.error = Some("not ready (listed under notReadyAddresses); not called".into());
        return result;
    }
    let uri = format!("http://{}{}", peer.address, forward.path_and_query);
    let mut request = Request::builder().method(forward.method.clone()).uri(uri);
    for (name, value) in [
        (AUTHORIZATION, &forward.authorization),
        (CONTENT_TYPE, &forward.content_type),
    ] {
        if let Some(value) = value {
            request = request.header(name, value);
        }
    }
    let request = match request.body(Full::new(forward.body.clone())) {
        Ok(request) => request,
        Err(e) => {
            result.error = Some(format!("cannot build the request: {e}"));
            return result;
        }
    };
    match send(client, request, timeout, MAX_POD_ANSWER_BYTES).await {
        Ok((status, body)) => {
            let response =
                serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
                });
            result.ok = (200..300).contains(&status);
            if !result.ok {
                let message = response
                    .get("error")
                    .and_then(|e| e.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("answered HTTP {status}"));
                result.error = Some(message);
            }
            result.status = Some(status);
            result.response = Some(response);
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_calls_never_fan_out_again() {
        let path = |uri: &str| forwarded_path_and_query(&uri.parse().unwrap());
        assert_eq!(path("/admin/reload"), "/admin/reload?fanout=false");
        assert_eq!(
            path("/admin/models?fanout=true"),
            "/admin/models?fanout=false"
        );
        assert_eq!(
            path("/admin/models?a=1&fanout=true&b=2&fanout"),
            "/admin/models?a=1&b=2&fanout=false"
        );
        // Only the exact parameter name is dropped.
        assert_eq!(path("/x?fanouts=1"), "/x?fanouts=1&fanout=false");
    }

    #[tokio::test]
    async fn peers_that_are_not_ready_are_reported_without_a_call() {
        let forward = Arc::new(Forward {
            method: Method::POST,
            path_and_query: "/admin/reload?fanout=false".into(),
            authorization: None,
            content_type: None,
            body: Bytes::new(),
        });
        let peers = vec![Peer {
            pod: Some("p".into()),
            // Never called (port 1 would refuse it anyway).
            address: "127.0.0.1:1".parse().unwrap(),
            ready: false,
        }];
        let results = call_all(
            &crate::http_client::client(),
            peers,
            forward,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(results.len(), 1);
        assert!(!results[0].ok);
        assert_eq!(results[0].status, None);
        assert!(results[0].error.as_deref().unwrap().contains("not ready"));
    }
}
