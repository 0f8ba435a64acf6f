//! A load generator that speaks TF Serving's gRPC Predict: closed loop (N clients, each
//! sending its next request when the last one answered) or open loop (requests started at
//! a fixed rate whatever the answers do, latency counted from the scheduled start so a
//! stalled server cannot hide its queueing).
//!
//! It drives HTTP/2 directly (as h2load does) rather than through a generated client: the
//! request is encoded once, and a call's HEADERS and DATA frames leave in one write. The
//! load generator shares the machine with the server, so every microsecond it spends is
//! taken from the server; the server still receives, decodes and answers each call in
//! full, and every answer's gRPC status and message are checked.

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use http::{HeaderMap, Method, Request};
use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::{
    GetModelMetadataRequest, ModelSpec, PredictRequest, SignatureDefMap,
};
use modelgate::proto::tensor::{declared_type, tensor_to_proto};
use modelgate::proto::tensorflow::TensorProto;
use modelgate::tensor::{DType, Tensor};
use prost::Message;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    /// Why the first failed call failed.
    pub first_error: Option<String>,
    /// Sorted successful latencies, in microseconds.
    latencies_us: Vec<u64>,
}

impl Report {
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// The latency at quantile `q` (0..=1), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[index] as f64 / 1000.0
    }

    fn from(
        mut latencies_us: Vec<u64>,
        errors: usize,
        first_error: Option<String>,
        seconds: f64,
    ) -> Report {
        latencies_us.sort_unstable();
        Report {
            requests: latencies_us.len(),
            errors,
            seconds,
            first_error,
            latencies_us,
        }
    }
}

/// One unary call, encoded once and sent many times.
#[derive(Clone)]
pub struct Call {
    uri: http::Uri,
    /// The gRPC frame: compression flag, big-endian length, the encoded message.
    body: Bytes,
}

impl Call {
    pub fn new(addr: SocketAddr, path: &str, message: &impl Message) -> Call {
        let encoded = message.encode_to_vec();
        let mut body = Vec::with_capacity(5 + encoded.len());
        body.push(0);
        body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        body.extend_from_slice(&encoded);
        Call {
            uri: format!("http://{addr}{path}").parse().expect("uri"),
            body: body.into(),
        }
    }

    fn request(&self) -> Request<()> {
        Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request")
    }
}

/// HTTP/2 connections shared round-robin by the clients, like a client's channel pool.
pub async fn connect(addr: SocketAddr, connections: usize) -> Vec<SendRequest<Bytes>> {
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to modelgate");
        tcp.set_nodelay(true).expect("nodelay");
        let (sender, connection) = h2::client::Builder::new()
            // Large windows: answers never wait for WINDOW_UPDATE round trips.
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .handshake(tcp)
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        senders.push(sender);
    }
    senders
}

/// Why a call failed; a closed connection ends its clients rather than failing in a spin.
enum Failure {
    Call(String),
    ConnectionClosed(String),
}

/// Sends one call and waits for its answer: Ok when the status is OK and a message came back.
async fn call(sender: &mut SendRequest<Bytes>, call: &Call) -> Result<(), Failure> {
    *sender = sender
        .clone()
        .ready()
        .await
        .map_err(|e| Failure::ConnectionClosed(e.to_string()))?;
    answer(sender, call).await.map_err(Failure::Call)
}

async fn answer(sender: &mut SendRequest<Bytes>, call: &Call) -> Result<(), String> {
    let (response, mut stream) = sender
        .send_request(call.request(), false)
        .map_err(|e| e.to_string())?;
    stream
        .send_data(call.body.clone(), true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", response.status()));
    }
    // A trailers-only answer carries its status in the headers.
    if let Some(status) = grpc_status(response.headers()) {
        return Err(format!("grpc-status {status}"));
    }
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        received += chunk.remaining();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no trailers")?;
    match grpc_status(&trailers) {
        Some(status) => Err(format!("grpc-status {status}")),
        None if received <= 5 => Err("empty answer".into()),
        None => Ok(()),
    }
}

/// The gRPC status if it is present and not OK.
fn grpc_status(headers: &HeaderMap) -> Option<String> {
    let status = headers.get("grpc-status")?.to_str().unwrap_or("?");
    (status != "0").then(|| status.to_string())
}

/// `concurrency` clients send `request` back to back until `start + duration`; calls sent
/// before `start` warm up and are not counted.
pub async fn closed_loop(
    senders: &[SendRequest<Bytes>],
    request: &Call,
    concurrency: usize,
    start: Instant,
    duration: Duration,
) -> Report {
    let end = start + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let mut sender = senders[i % senders.len()].clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0usize, None);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let outcome = call(&mut sender, &request).await;
                match outcome {
                    Ok(()) if sent >= start => latencies.push(sent.elapsed().as_micros() as u64),
                    Ok(()) => {}
                    Err(Failure::Call(e)) => {
                        errors += usize::from(sent >= start);
                        first_error.get_or_insert(e);
                    }
                    Err(Failure::ConnectionClosed(e)) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                        break;
                    }
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0, None);
    for task in tasks {
        let (l, e, first) = task.await.expect("client task");
        latencies.extend(l);
        errors += e;
        first_error = first_error.or(first);
    }
    Report::from(latencies, errors, first_error, duration.as_secs_f64())
}

/// Requests started at `rate` per second for `duration`.
pub async fn open_loop(
    senders: &[SendRequest<Bytes>],
    request: &Call,
    rate: f64,
    duration: Duration,
) -> Report {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let total = (rate * duration.as_secs_f64()) as usize;
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let mut sender = senders[i % senders.len()].clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let outcome = call(&mut sender, &request).await.map_err(|e| match e {
                Failure::Call(e) | Failure::ConnectionClosed(e) => e,
            });
            (outcome, scheduled.elapsed().as_micros() as u64)
        }));
    }
    let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0, None);
    for task in tasks {
        match task.await.expect("request task") {
            (Ok(()), latency) => latencies.push(latency),
            (Err(e), _) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    Report::from(
        latencies,
        errors,
        first_error,
        start.elapsed().as_secs_f64(),
    )
}

/// The float values every generated request carries: a fixed pattern in [0, 1).
pub fn pattern(count: usize) -> Vec<f32> {
    (0..count).map(|i| (i % 7) as f32 / 7.0).collect()
}

/// A Predict request for any served model, built from its GetModelMetadata: every input
/// of `signature` with `rows` rows, free dimensions set to 1, floats in a fixed pattern
/// (other dtypes zeros), in `tensor_content` as `tf.make_tensor_proto` sends a numpy array.
pub async fn request_from_metadata(
    addr: SocketAddr,
    model: &str,
    signature: &str,
    rows: usize,
) -> Result<PredictRequest, String> {
    let spec = ModelSpec {
        name: model.to_string(),
        signature_name: signature.to_string(),
        ..Default::default()
    };
    let mut client = PredictionServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| e.to_string())?;
    let metadata = client
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: Some(spec.clone()),
            metadata_field: vec!["signature_def".into()],
        })
        .await
        .map_err(|status| status.message().to_string())?
        .into_inner();
    let any = metadata
        .metadata
        .get("signature_def")
        .ok_or("GetModelMetadata answered no signature_def")?;
    let map = SignatureDefMap::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
    let def = map
        .signature_def
        .get(signature)
        .ok_or_else(|| format!("model '{model}' has no signature '{signature}'"))?;
    let mut inputs = std::collections::HashMap::new();
    for (name, info) in &def.inputs {
        let declared = TensorProto {
            dtype: info.dtype,
            tensor_shape: info.tensor_shape.clone(),
            ..Default::default()
        };
        let (dtype, shape) = declared_type(name, &declared).map_err(|e| e.to_string())?;
        let shape: Vec<i64> = shape
            .iter()
            .enumerate()
            .map(|(i, &d)| match (i, d) {
                (0, -1) => rows as i64,
                (_, -1) => 1,
                (_, d) => d,
            })
            .collect();
        let tensor = match dtype {
            DType::F32 => {
                let count = modelgate::tensor::num_elements(&shape).map_err(|e| e.to_string())?;
                Tensor::from_values(shape, &pattern(count))
            }
            _ => Tensor::zeros(dtype, shape),
        }
        .map_err(|e| e.to_string())?;
        inputs.insert(name.clone(), tensor_to_proto(&tensor, true));
    }
    Ok(PredictRequest {
        model_spec: Some(spec),
        inputs,
        ..Default::default()
    })
}
