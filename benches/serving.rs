//! The serving benchmark: `make bench` (or `cargo bench --bench serving`).
//!
//! Starts the release binary on 127.0.0.1 and prints three tables, all measured in this one
//! run on this machine (load generator and server share its cores):
//! 1. batching gain: `mlp`, 1-row requests, closed loop at concurrency 1, 8, 64, batching
//!    off and on (plus an open-loop run at a fixed rate). Batching uses max_batch_size 64 and
//!    TF Serving's default batch_timeout_micros 0: a batch takes whatever queued while the
//!    workers were busy, so it grows with load and adds no wait at low load;
//! 2. serving efficiency: served rows/s over raw libtorch forward rows/s at the same batch;
//! 3. overhead: `tiny` p50 over gRPC at concurrency 1 minus its bare forward time;
//! 4. and 5. image requests on this machine's device (a GPU when libtorch sees one):
//!    ResNet-50 served vs its raw forward, and the host's CPU per image (`images.rs`);
//! 6. formats: TorchScript, frozen TorchScript and AOTInductor packages of the same
//!    models, served and raw (`formats.rs`);
//! 7. residency: twelve models in a budget that holds three, on demand, next to a server
//!    holding all twelve, and an unload-first swap (`residency.rs`; only with
//!    `-- residency`: it runs for over three minutes).
//!
//! `cargo bench --bench serving -- images` prints tables 4 and 5 alone, `-- formats`
//! table 6, `-- residency` table 7, `-- soak [MINUTES [ROW]]` the server's memory over a long run
//! of on-demand loads, evictions and version swaps under load (`residency.rs`).
//! `cargo bench --bench serving -- loadgen ADDR MODEL CONCURRENCY SECONDS [CONNECTIONS [ROWS]]`
//! runs the load generator alone against a running server: any model, its request built
//! from GetModelMetadata (ROWS rows, default 1).

#[path = "../tests/common/mod.rs"]
pub mod common;
mod formats;
mod images;
mod loadgen;
mod residency;

use bytes::Bytes;
use common::{demo_models, spec, write_config, Server, TempDir};
use h2::client::SendRequest;
use loadgen::{closed_loop, connect, open_loop, request_from_metadata, Call, Report};
use modelgate::proto::inference::model_infer_request::InferInputTensor;
use modelgate::proto::inference::ModelInferRequest;
use modelgate::proto::serving::PredictRequest;
use modelgate::proto::tensor::tensor_to_proto;
use modelgate::tensor::Tensor;
use std::time::{Duration, Instant};

const WARMUP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);
const BATCH: usize = 64;
/// HTTP/2 connections the clients share (a client's channel pool).
const CONNECTIONS: usize = 2;

const PREDICT: &str = "/tensorflow.serving.PredictionService/Predict";
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// One row of `cols` floats in the load generator's pattern.
fn pattern_row(cols: usize) -> Tensor {
    Tensor::from_values(vec![1, cols as i64], &loadgen::pattern(cols)).expect("one row")
}

fn one_row(model: &str, input: &str, cols: usize) -> PredictRequest {
    let row = pattern_row(cols);
    PredictRequest {
        model_spec: Some(spec(model)),
        // As tf.make_tensor_proto encodes a numpy array: raw bytes in tensor_content.
        inputs: [(input.to_string(), tensor_to_proto(&row, true))].into(),
        ..Default::default()
    }
}

/// The same one-row request in the V2 protocol, as tritonclient sends it (raw bytes).
fn one_row_v2(model: &str, input: &str, cols: usize) -> ModelInferRequest {
    let row = pattern_row(cols);
    ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![InferInputTensor {
            name: input.to_string(),
            datatype: "FP32".into(),
            shape: row.shape.clone(),
            ..Default::default()
        }],
        raw_input_contents: vec![row.data],
        ..Default::default()
    }
}

fn start(batching: bool, dir: &TempDir) -> Server {
    let models = demo_models();
    let config = write_config(
        &dir.0,
        &[
            ("mlp", models.join("mlp"), ""),
            ("tiny", models.join("tiny"), ""),
        ],
    );
    let mut args = vec![format!("--model_config_file={}", config.display())];
    if batching {
        let params = dir.0.join("batching.config");
        std::fs::write(
            &params,
            format!("max_batch_size {{ value: {BATCH} }}\nbatch_timeout_micros {{ value: 0 }}\nmax_enqueued_batches {{ value: 100 }}\n"),
        )
        .expect("write batching config");
        args.push("--enable_batching".into());
        args.push(format!("--batching_parameters_file={}", params.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Quiet, but for the line that says where it listens.
    Server::start_with_env(&args, &[("MODELGATE_LOG", "warn,modelgate::app=info")])
}

/// From /proc/PID/stat (Linux): CPU seconds (user + system) process `pid` has used so far,
/// counted in USER_HZ = 100 ticks per second, and its minor page faults so far.
fn cpu_seconds_and_faults(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which may hold spaces: minflt is the 10th of the
    // line, utime and stime the 14th and 15th (the 8th, 12th and 13th after the name).
    let Some((_, fields)) = stat.rsplit_once(')') else {
        return (f64::NAN, f64::NAN);
    };
    let field = |n: usize| {
        fields
            .split_whitespace()
            .nth(n)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    ((field(11) + field(12)) / 100.0, field(7))
}

fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_and_faults(pid).0
}

/// What a run measured, with the CPU the server and this load generator spent per answer.
struct Run {
    report: Report,
    server_us: f64,
    loadgen_us: f64,
    /// The server's minor page faults per answer.
    server_faults: f64,
}

/// CPU seconds `server` (if known) and this process use between `from` and `to`, and the
/// server's minor page faults.
fn cpu_between(
    server: Option<u32>,
    from: Instant,
    to: Instant,
) -> tokio::task::JoinHandle<(f64, f64, f64)> {
    let read = move || {
        let (server_s, faults) = server.map_or((f64::NAN, f64::NAN), cpu_seconds_and_faults);
        (server_s, cpu_seconds(std::process::id()), faults)
    };
    tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let before = read();
        tokio::time::sleep_until(to.into()).await;
        let after = read();
        (after.0 - before.0, after.1 - before.1, after.2 - before.2)
    })
}

impl Run {
    fn new(report: Report, (server_s, loadgen_s, faults): (f64, f64, f64)) -> Run {
        let per_answer = |total: f64| total / report.requests as f64;
        Run {
            server_us: per_answer(server_s * 1e6),
            loadgen_us: per_answer(loadgen_s * 1e6),
            server_faults: per_answer(faults),
            report,
        }
    }
}

/// A closed loop after a warm-up, with its CPU accounting.
async fn closed(
    server: Option<u32>,
    senders: &[SendRequest<Bytes>],
    call: &Call,
    concurrency: usize,
    measure: Duration,
) -> Run {
    let start = Instant::now() + WARMUP;
    let cpu = cpu_between(server, start, start + measure);
    let report = closed_loop(senders, call, concurrency, start, measure).await;
    Run::new(report, cpu.await.expect("cpu accounting"))
}

fn row(label: &str, run: &Run) {
    let report = &run.report;
    println!(
        "| {label:<28} | {:>9.0} | {:>8.3} | {:>8.3} | {:>8.3} | {:>6} | {:>10.1} | {:>11.1} |",
        report.throughput(),
        report.quantile_ms(0.5),
        report.quantile_ms(0.99),
        report.quantile_ms(0.999),
        report.errors,
        run.server_us,
        run.loadgen_us,
    );
    if let Some(error) = &report.first_error {
        println!("  (first error: {error})");
    }
}

fn header(title: &str) {
    println!("\n{title}\n");
    println!("(CPU columns: microseconds of CPU, user + system, per answered request)\n");
    println!(
        "| run                          |     req/s |  p50 ms  |  p99 ms  | p99.9 ms | errors | server CPU | loadgen CPU |"
    );
    println!(
        "|------------------------------|-----------|----------|----------|----------|--------|------------|-------------|"
    );
}

/// Rows per second of a bare libtorch forward of `model` in this process, on an input of
/// ones of `shape` (its first dimension the batch) already on `device`, and the time of one
/// forward. Each forward is waited for (on a GPU, its stream synchronised).
fn raw_forward(
    model: &std::path::Path,
    shape: &[i64],
    device: tch::Device,
    seconds: f64,
) -> (f64, Duration) {
    let module = tch::CModule::load_on_device(model, device).expect("load model");
    let _no_grad = tch::no_grad_guard();
    let input = tch::Tensor::ones(shape, (tch::Kind::Float, device));
    let run = || {
        let _ = module.forward_is(&[tch::IValue::Tensor(input.shallow_clone())]);
        if let tch::Device::Cuda(gpu) = device {
            tch::Cuda::synchronize(gpu as i64);
        }
    };
    // Warm up: 20 forwards, or a quarter of the measuring time for a slow model.
    let warming = Instant::now();
    for _ in 0..20 {
        run();
        if warming.elapsed().as_secs_f64() > seconds / 4.0 {
            break;
        }
    }
    let (started, mut calls) = (Instant::now(), 0u64);
    while calls < 2 || started.elapsed().as_secs_f64() < seconds {
        run();
        calls += 1;
    }
    let elapsed = started.elapsed();
    (
        calls as f64 * shape[0] as f64 / elapsed.as_secs_f64(),
        elapsed / calls as u32,
    )
}

async fn tables() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("modelgate serving benchmark: {cores} cores, load generator on the same machine");
    let mlp = one_row("mlp", "images", 784);
    let tiny = one_row("tiny", "x", 1);

    header("1. batching gain: mlp (784-512-512-10), 1-row requests, closed loop");
    let mut served = Vec::new();
    let mut tf_64 = None;
    let mut v2_run: Option<Run> = None;
    for batching in [false, true] {
        let dir = TempDir::new("bench");
        let server = start(batching, &dir);
        server.wait_available(&["mlp", "tiny"]).await;
        let clients = connect(server.grpc, CONNECTIONS).await;
        let mlp = Call::new(server.grpc, PREDICT, &mlp);
        for concurrency in [1, 8, 64] {
            let run = closed(Some(server.pid()), &clients, &mlp, concurrency, MEASURE).await;
            let label = format!(
                "c={concurrency} batching={}",
                if batching { "on" } else { "off" }
            );
            row(&label, &run);
            if batching && concurrency == 64 {
                tf_64 = Some(run.server_us);
            }
            served.push((batching, concurrency, run.report));
        }
        if batching {
            // The same load in the V2 protocol, right after, on the same server.
            let v2 = Call::new(server.grpc, MODEL_INFER, &one_row_v2("mlp", "images", 784));
            let run = closed(Some(server.pid()), &clients, &v2, 64, MEASURE).await;
            row("c=64 batching=on, V2 gRPC", &run);
            v2_run = Some(run);
            let best = served
                .iter()
                .map(|(_, _, r)| r.throughput())
                .fold(0.0, f64::max);
            let rate = (best * 0.7).max(100.0);
            let now = Instant::now();
            let cpu = cpu_between(Some(server.pid()), now, now + MEASURE);
            let report = open_loop(&clients, &mlp, rate, MEASURE).await;
            let run = Run::new(report, cpu.await.expect("cpu accounting"));
            row(&format!("open loop {rate:.0}/s batching=on"), &run);
        }
    }
    let find = |batching, concurrency| {
        served
            .iter()
            .find(|(b, c, _)| *b == batching && *c == concurrency)
            .map(|(_, _, r)| r.throughput())
            .unwrap_or(f64::NAN)
    };
    println!(
        "\nbatching on vs off at c=64: {:.2}x",
        find(true, 64) / find(false, 64)
    );
    if let (Some(tf), Some(v2)) = (tf_64, &v2_run) {
        println!(
            "V2 gRPC vs TF Serving gRPC at c=64, batching on: {:.2}x the req/s, {:.2}x the server CPU per request ({:.1} vs {tf:.1} us)",
            v2.report.throughput() / find(true, 64),
            v2.server_us / tf,
            v2.server_us
        );
    }

    tch::set_num_threads(cores as i32);
    let mlp_path = demo_models().join("mlp/2/model.pt");
    let cpu = tch::Device::Cpu;
    let (raw_64, _) = raw_forward(&mlp_path, &[BATCH as i64, 784], cpu, 3.0);
    let (raw_1, _) = raw_forward(&mlp_path, &[1, 784], cpu, 3.0);
    println!("\n2. serving efficiency: served rows/s / raw libtorch forward rows/s (same model, same batch)\n");
    println!("| batch | raw forward rows/s | served rows/s | efficiency |");
    println!("|-------|--------------------|---------------|------------|");
    println!(
        "| {BATCH:>5} | {raw_64:>18.0} | {:>13.0} | {:>9.1}% |",
        find(true, 64),
        100.0 * find(true, 64) / raw_64
    );
    println!(
        "| {:>5} | {raw_1:>18.0} | {:>13.0} | {:>9.1}% |",
        1,
        find(false, 1),
        100.0 * find(false, 1) / raw_1
    );

    let dir = TempDir::new("bench-tiny");
    let server = start(false, &dir);
    server.wait_available(&["tiny"]).await;
    let clients = connect(server.grpc, 1).await;
    let tiny = Call::new(server.grpc, PREDICT, &tiny);
    let report = closed(Some(server.pid()), &clients, &tiny, 1, MEASURE)
        .await
        .report;
    drop(server);
    let tiny_path = demo_models().join("tiny/1/model.pt");
    let (_, bare) = raw_forward(&tiny_path, &[1, 1], tch::Device::Cpu, 2.0);
    let p50 = report.quantile_ms(0.5);
    println!("\n3. overhead: tiny at concurrency 1 over gRPC\n");
    println!("| p50 round trip | bare forward | overhead | p99 round trip |");
    println!("|----------------|--------------|----------|----------------|");
    println!(
        "| {:>11.1} us | {:>9.1} us | {:>5.1} us | {:>11.1} us |",
        p50 * 1000.0,
        bare.as_secs_f64() * 1e6,
        p50 * 1000.0 - bare.as_secs_f64() * 1e6,
        report.quantile_ms(0.99) * 1000.0
    );
}

async fn loadgen_only(args: &[String]) {
    let usage = "usage: loadgen ADDR MODEL CONCURRENCY SECONDS [CONNECTIONS [ROWS]]";
    let [addr, model, concurrency, seconds, rest @ ..] = args else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let number = |text: Option<&String>, default: usize| {
        text.map_or(Ok(default), |t| t.parse::<usize>())
            .unwrap_or_else(|_| {
                eprintln!("{usage}");
                std::process::exit(2)
            })
    };
    let (connections, rows) = (number(rest.first(), CONNECTIONS), number(rest.get(1), 1));
    let addr = addr.parse().expect("ADDR");
    let request = request_from_metadata(addr, model, "serving_default", rows)
        .await
        .unwrap_or_else(|e| panic!("GetModelMetadata of '{model}': {e}"));
    let clients = connect(addr, connections).await;
    let run = closed(
        None,
        &clients,
        &Call::new(addr, PREDICT, &request),
        concurrency.parse().expect("CONCURRENCY"),
        Duration::from_secs(seconds.parse().expect("SECONDS")),
    )
    .await;
    header(&format!(
        "{model} c={concurrency}, {rows} row(s) per request"
    ));
    row("closed loop", &run);
}

fn main() {
    // cargo bench passes `--bench`; anything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match args.first().map(String::as_str) {
        Some("loadgen") => runtime.block_on(loadgen_only(&args[1..])),
        Some("images") => runtime.block_on(images::tables()),
        Some("formats") => runtime.block_on(formats::tables()),
        Some("residency") => runtime.block_on(residency::tables()),
        Some("soak") => {
            let minutes = args.get(1).and_then(|m| m.parse().ok()).unwrap_or(5);
            runtime.block_on(residency::soak(minutes, args.get(2).map(String::as_str)))
        }
        _ => runtime.block_on(async {
            tables().await;
            images::tables().await;
            formats::tables().await;
        }),
    }
}
