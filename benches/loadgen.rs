//! A load generator that speaks TF Serving's gRPC Predict: closed loop (N clients, each
//! sending its next request when the last one answered) or open loop (requests started at
//! a fixed rate whatever the answers do, latency counted from the scheduled start so a
//! stalled server cannot hide its queueing).

use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::PredictRequest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
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

    fn from(mut latencies_us: Vec<u64>, errors: usize, seconds: f64) -> Report {
        latencies_us.sort_unstable();
        Report {
            requests: latencies_us.len(),
            errors,
            seconds,
            latencies_us,
        }
    }
}

/// Connections shared round-robin by the clients (one HTTP/2 connection serialises on
/// one server task; a few spread the load like a client pool would).
pub async fn connect(
    addr: SocketAddr,
    connections: usize,
) -> Vec<PredictionServiceClient<Channel>> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to modelgate");
        clients.push(
            PredictionServiceClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        );
    }
    clients
}

/// `concurrency` clients send `request` back to back for `duration` (after `warmup`).
pub async fn closed_loop(
    clients: &[PredictionServiceClient<Channel>],
    request: &PredictRequest,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Report {
    let start = Instant::now() + warmup;
    let end = start + duration;
    let request = Arc::new(request.clone());
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let mut client = clients[i % clients.len()].clone();
        let request = Arc::clone(&request);
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let ok = client.predict((*request).clone()).await.is_ok();
                if sent >= start {
                    if ok {
                        latencies.push(sent.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (l, e) = task.await.expect("client task");
        latencies.extend(l);
        errors += e;
    }
    Report::from(latencies, errors, duration.as_secs_f64())
}

/// Requests started at `rate` per second for `duration`.
pub async fn open_loop(
    clients: &[PredictionServiceClient<Channel>],
    request: &PredictRequest,
    rate: f64,
    duration: Duration,
) -> Report {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let total = (rate * duration.as_secs_f64()) as usize;
    let request = Arc::new(request.clone());
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let mut client = clients[i % clients.len()].clone();
        let request = Arc::clone(&request);
        tasks.push(tokio::spawn(async move {
            let ok = client.predict((*request).clone()).await.is_ok();
            (ok, scheduled.elapsed().as_micros() as u64)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        match task.await.expect("request task") {
            (true, latency) => latencies.push(latency),
            (false, _) => errors += 1,
        }
    }
    Report::from(latencies, errors, start.elapsed().as_secs_f64())
}
