//! Table 6 of the serving benchmark: the same models as TorchScript, frozen TorchScript
//! (`--freeze_models`), an AOTInductor package (`model.pt2`) and a package compiled with
//! inductor's freezing (`aotifrozen`, the export command's `--freeze`), made by the export command
//! (`models/bench_pt2.py export`): `mlp` (784-512-512-10) and a small ResNet-like CNN on
//! 3x64x64 images (on a GPU, ResNet-50 in its place). Each is served alone over gRPC with batching
//! (max_batch_size 64, 1-row requests) at concurrency 1 and a high one (64 on the CPU, 256
//! on a GPU, where a batch of 64 costs little more than one row), next to its raw forward
//! in PyTorch on one intra-op thread (each CPU worker's) or on the GPU, with the time its
//! version took to load (warm-up included) and the server's CPU per request.
//!
//! The CPU's models come from `make bench` (`target/bench-pt2`). On a GPU the bench exports
//! its own into `target/bench-pt2-cuda` on its first run there: a CUDA package compiles
//! only on the GPU it will run on (AOTInductor does not cross-compile).

use super::loadgen::{connect, request_from_metadata, Call};
use super::{closed, Run, MEASURE, PREDICT};
use crate::common::{repo_root, write_config, Server, TempDir};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where the table runs: `cuda` when libtorch sees a GPU (the server's `--device auto`
/// takes it too), else `cpu`.
fn device() -> &'static str {
    if tch::Cuda::is_available() {
        "cuda"
    } else {
        "cpu"
    }
}

fn bench_pt2() -> std::process::Command {
    let mut command = std::process::Command::new(repo_root().join(".venv/bin/python"));
    command.arg(repo_root().join("models/bench_pt2.py"));
    command
}

/// The models of this device's table, exported on a GPU the first time (see the module docs).
fn models() -> PathBuf {
    let (dir, stamp) = match device() {
        "cuda" => ("target/bench-pt2-cuda", "resnet50_aotifrozen/1/model.pt2"),
        _ => ("target/bench-pt2", "cnn_aotifrozen/1/model.pt2"),
    };
    let dir = repo_root().join(dir);
    if !dir.join(stamp).is_file() && device() == "cuda" {
        println!(
            "(exporting the GPU's models into {}: minutes)",
            dir.display()
        );
        let status = bench_pt2()
            .args(["export", &dir.display().to_string(), "cuda"])
            .status()
            .expect("run models/bench_pt2.py export");
        assert!(
            status.success(),
            "models/bench_pt2.py export {dir:?} cuda failed"
        );
    }
    assert!(
        dir.join(stamp).is_file(),
        "format bench models missing: run `make bench` (or \
         `python models/bench_pt2.py export target/bench-pt2`)"
    );
    dir
}

/// The models of this device's table.
fn model_names() -> &'static [&'static str] {
    match device() {
        "cuda" => &["mlp", "resnet50"],
        _ => &["mlp", "cnn"],
    }
}

/// The high concurrency: enough 1-row clients to fill batches of 64 on a GPU.
fn high_concurrency() -> usize {
    match device() {
        "cuda" => 256,
        _ => 64,
    }
}

/// Raw rows/s of every model and form at batch 1 and 64, measured by PyTorch in a child
/// process (`models/bench_pt2.py raw`), keyed `"{model}_{form}/{batch}"`.
fn raw_forwards(threads: usize) -> BTreeMap<String, f64> {
    let output = bench_pt2()
        .args([
            "raw",
            &models().display().to_string(),
            &threads.to_string(),
            device(),
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run models/bench_pt2.py raw");
    assert!(output.status.success(), "models/bench_pt2.py raw failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().unwrap_or("{}");
    serde_json::from_str(line).expect("raw forwards as JSON")
}

/// One served model: its load time and its runs at concurrency 1 and the high one.
struct Served {
    load_seconds: f64,
    runs: Vec<(usize, Run)>,
}

async fn serve(model: &str, form: &str) -> Served {
    let dir = TempDir::new("bench-formats");
    let name = format!("{model}_{form}");
    let base = models().join(match form {
        "aoti" | "aotifrozen" => format!("{model}_{form}"),
        _ => format!("{model}_ts"),
    });
    let config = write_config(&dir.0, &[(name.as_str(), base, "")]);
    let params = dir.0.join("batching.config");
    std::fs::write(
        &params,
        "max_batch_size { value: 64 }\nbatch_timeout_micros { value: 0 }\n\
         max_enqueued_batches { value: 100 }\n",
    )
    .expect("write batching config");
    let mut args = vec![
        format!("--model_config_file={}", config.display()),
        "--enable_batching".into(),
        format!("--batching_parameters_file={}", params.display()),
    ];
    if form == "frozen" {
        args.push(format!("--freeze_models={name}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with_env(
        &args,
        &[(
            "MODELGATE_LOG",
            "warn,modelgate::app=info,modelgate::registry::manager=info",
        )],
    );
    server.wait_available(&[name.as_str()]).await;
    let load_seconds = server
        .log
        .lines()
        .iter()
        .find(|line| line.contains("available") && line.contains(&format!("model={name}")))
        .and_then(|line| line.rsplit("seconds=").next())
        .and_then(|seconds| seconds.trim().parse().ok())
        .unwrap_or(f64::NAN);
    let request = request_from_metadata(server.grpc, &name, "serving_default", 1)
        .await
        .expect("GetModelMetadata");
    let call = Call::new(server.grpc, PREDICT, &request);
    let clients = connect(server.grpc, super::CONNECTIONS).await;
    let mut runs = Vec::new();
    for concurrency in [1, high_concurrency()] {
        runs.push((
            concurrency,
            closed(Some(server.pid()), &clients, &call, concurrency, MEASURE).await,
        ));
    }
    Served { load_seconds, runs }
}

/// The run of `served` at `concurrency`.
fn at(served: &Served, concurrency: usize) -> &Run {
    served
        .runs
        .iter()
        .find(|(c, _)| *c == concurrency)
        .map(|(_, run)| run)
        .expect("a run at that concurrency")
}

pub async fn tables() {
    let (device, high) = (device(), high_concurrency());
    println!(
        "\n6. formats on {device}: TorchScript, frozen TorchScript, AOTInductor; gRPC, 1-row \
         requests, batching (max 64)\n"
    );
    println!(
        "(raw: PyTorch's own forward of the same file on {device}{}, rows/s at batch 1 | 64)\n",
        if device == "cpu" { ", 1 thread" } else { "" }
    );
    println!(
        "| model    | form       | load s | c=1 req/s | c=1 p99 ms | c={high} req/s | c={high} p99 ms | server CPU us/req (c={high}) | raw b1 rows/s | raw b64 rows/s |"
    );
    println!(
        "|----------|------------|--------|-----------|------------|------------|-------------|--------------------------|---------------|----------------|"
    );
    let mut served = BTreeMap::new();
    for &model in model_names() {
        for form in ["ts", "frozen", "aoti", "aotifrozen"] {
            served.insert((model, form), serve(model, form).await);
        }
    }
    let raw = raw_forwards(1);
    for ((model, form), result) in &served {
        let (one, many) = (at(result, 1), at(result, high));
        let raw_at = |batch: usize| raw.get(&format!("{model}_{form}/{batch}")).copied();
        println!(
            "| {model:<8} | {form:<10} | {:>6.3} | {:>9.0} | {:>10.2} | {:>10.0} | {:>11.2} | {:>24.0} | {:>13.0} | {:>14.0} |",
            result.load_seconds,
            one.report.throughput(),
            one.report.quantile_ms(0.99),
            many.report.throughput(),
            many.report.quantile_ms(0.99),
            many.server_us,
            raw_at(1).unwrap_or(f64::NAN),
            raw_at(64).unwrap_or(f64::NAN),
        );
    }
    let raw_b64 = |name: &str| raw.get(&format!("{name}/64")).copied().unwrap_or(f64::NAN);
    for &model in model_names() {
        for form in ["aoti", "aotifrozen"] {
            let ts = &served[&(model, "ts")];
            let aoti = &served[&(model, form)];
            let ratio = |c| at(aoti, c).report.throughput() / at(ts, c).report.throughput();
            let p99 = |served: &Served| at(served, high).report.quantile_ms(0.99);
            println!(
                "{model}: {form} vs TorchScript served req/s {:.2}x at c=1, {:.2}x at c={high} \
                 (p99 {:.1} vs {:.1} ms); load {:.3} vs {:.3} s; server CPU {:.0} vs {:.0} us/req",
                ratio(1),
                ratio(high),
                p99(aoti),
                p99(ts),
                aoti.load_seconds,
                ts.load_seconds,
                at(aoti, high).server_us,
                at(ts, high).server_us,
            );
            let (raw_form, raw_ts) = (
                raw_b64(&format!("{model}_{form}")),
                raw_b64(&format!("{model}_ts")),
            );
            println!(
                "{model}: raw {form} vs raw TorchScript at batch 64: {:.2}x",
                raw_form / raw_ts
            );
            // On the CPU the raw forward has one thread and the server two workers; on a
            // GPU both have the one card, and the issue asks ResNet-50's package for 0.8x.
            if device == "cuda" {
                println!(
                    "{model}: {form} served at c={high} over its raw forward at batch 64: {:.2}x",
                    at(aoti, high).report.throughput() / raw_form
                );
            }
        }
    }
}
