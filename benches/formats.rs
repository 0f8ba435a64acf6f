//! Table 6 of the serving benchmark: the same models as TorchScript, frozen TorchScript
//! (`--freeze_models`), an AOTInductor package (`model.pt2`) and a package compiled with
//! inductor's freezing (`aotifrozen`, the export command's `--freeze`), made by the export command
//! (`models/bench_pt2.py export`): `mlp` (784-512-512-10) and a small ResNet-like CNN on
//! 3x64x64 images. Each is served alone over gRPC with batching (max_batch_size 64,
//! 1-row requests) at concurrency 1 and 64, next to its raw forward in PyTorch on one
//! intra-op thread (each server worker's), with the time its version took to load (warm-up
//! included) and the server's CPU per request.
//!
//! On a GPU this table is not run: CUDA packages compile only on the GPU they run on, and
//! the bench makes its packages on the CPU.

use super::loadgen::{connect, request_from_metadata, Call};
use super::{closed, Run, MEASURE, PREDICT};
use crate::common::{repo_root, write_config, Server, TempDir};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `make bench` writes these.
fn models() -> PathBuf {
    let dir = repo_root().join("target/bench-pt2");
    assert!(
        dir.join("cnn_aotifrozen/1/model.pt2").is_file(),
        "format bench models missing: run `make bench` (or \
         `python models/bench_pt2.py export target/bench-pt2`)"
    );
    dir
}

/// Raw rows/s of every model and form at batch 1 and 64, measured by PyTorch in a child
/// process (`models/bench_pt2.py raw`), keyed `"{model}_{form}/{batch}"`.
fn raw_forwards(threads: usize) -> BTreeMap<String, f64> {
    let python = repo_root().join(".venv/bin/python");
    let output = std::process::Command::new(python)
        .arg(repo_root().join("models/bench_pt2.py"))
        .args(["raw", &models().display().to_string(), &threads.to_string()])
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run models/bench_pt2.py raw");
    assert!(output.status.success(), "models/bench_pt2.py raw failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().unwrap_or("{}");
    serde_json::from_str(line).expect("raw forwards as JSON")
}

/// One served model: its load time and its runs at concurrency 1 and 64.
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
    for concurrency in [1, 64] {
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
    if tch::Cuda::is_available() {
        println!("\n6. formats: skipped on a GPU (the bench compiles its packages for the CPU)");
        return;
    }
    println!(
        "\n6. formats: TorchScript, frozen TorchScript, AOTInductor; gRPC, 1-row requests, \
         batching (max 64)\n"
    );
    println!("(raw: PyTorch's own forward of the same file, 1 thread, rows/s at batch 1 | 64)\n");
    println!(
        "| model | form       | load s | c=1 req/s | c=1 p99 ms | c=64 req/s | c=64 p99 ms | server CPU us/req (c=64) | raw b1 rows/s | raw b64 rows/s |"
    );
    println!(
        "|-------|------------|--------|-----------|------------|------------|-------------|--------------------------|---------------|----------------|"
    );
    let mut served = BTreeMap::new();
    for model in ["mlp", "cnn"] {
        for form in ["ts", "frozen", "aoti", "aotifrozen"] {
            served.insert((model, form), serve(model, form).await);
        }
    }
    let raw = raw_forwards(1);
    for ((model, form), result) in &served {
        let (one, many) = (at(result, 1), at(result, 64));
        let raw_at = |batch: usize| raw.get(&format!("{model}_{form}/{batch}")).copied();
        println!(
            "| {model:<5} | {form:<10} | {:>6.3} | {:>9.0} | {:>10.2} | {:>10.0} | {:>11.2} | {:>24.0} | {:>13.0} | {:>14.0} |",
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
    for (model, form) in [
        ("mlp", "aoti"),
        ("cnn", "aoti"),
        ("mlp", "aotifrozen"),
        ("cnn", "aotifrozen"),
    ] {
        let ts = &served[&(model, "ts")];
        let aoti = &served[&(model, form)];
        let ratio = |c| at(aoti, c).report.throughput() / at(ts, c).report.throughput();
        let p99 = |served: &Served| at(served, 64).report.quantile_ms(0.99);
        println!(
            "{model}: {form} vs TorchScript served req/s {:.2}x at c=1, {:.2}x at c=64 (p99 {:.1} vs {:.1} ms); \
             load {:.3} vs {:.3} s; server CPU {:.0} vs {:.0} us/req",
            ratio(1),
            ratio(64),
            p99(aoti),
            p99(ts),
            aoti.load_seconds,
            ts.load_seconds,
            at(aoti, 64).server_us,
            at(ts, 64).server_us,
        );
        let raw_ratio = raw
            .get(&format!("{model}_{form}/64"))
            .copied()
            .unwrap_or(f64::NAN)
            / raw
                .get(&format!("{model}_ts/64"))
                .copied()
                .unwrap_or(f64::NAN);
        println!("{model}: raw {form} vs raw TorchScript at batch 64: {raw_ratio:.2}x");
    }
}
