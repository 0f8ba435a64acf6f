//! PyTorch 2 packages (`model.pt2`, AOTInductor) served by the real binary: answers equal
//! PyTorch's own loader, inputs and outputs keep their order, batching gives each request
//! its own rows, the export's batch range bounds requests, formats swap under load, and
//! broken or foreign packages fail their version naming why, leaving nothing in /tmp.
//!
//! The fixtures come from the project's export command (models/pt2_fixtures.py). Tests
//! here run one at a time: the /tmp check sees what every server of this file unpacked.

pub mod common;

use common::*;
use modelgate::proto::serving::model_version_status::State;
use modelgate::proto::serving::{ModelSpec, PredictRequest};
use modelgate::proto::tensorflow::{DataType, TensorProto};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tonic::Code;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Flags that let a server exit at once on SIGTERM, so that it unloads (and the loader
/// removes what it unpacked) instead of being killed.
const QUICK_EXIT: [&str; 2] = ["--shutdown_grace_seconds=0", "--shutdown_drain_seconds=1"];

/// Stops `server` the way Kubernetes does and waits for it to exit.
fn stop(mut server: Server) {
    server.signal("TERM");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}\n{}", server.log());
}

/// The directories in /tmp that hold an unpacked AOTInductor package.
fn unpacked_packages() -> BTreeSet<PathBuf> {
    std::fs::read_dir("/tmp")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|dir| {
            let name = dir.file_name().map(|n| n.len()).unwrap_or(0);
            name == 6
                && (dir.join("data/aotinductor").is_dir()
                    || std::fs::read_dir(dir)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|entry| entry.path().join("data/aotinductor").is_dir()))
        })
        .collect()
}

fn tensor(shape: &[i64], values: &[f32]) -> TensorProto {
    floats(shape, values)
}

async fn predict(
    server: &Server,
    model: ModelSpec,
    inputs: &[(&str, TensorProto)],
) -> Result<(i64, BTreeMap<String, (Vec<i64>, Vec<f32>)>), tonic::Status> {
    let mut client = server.prediction().await;
    let response = client
        .predict(PredictRequest {
            model_spec: Some(model),
            inputs: inputs
                .iter()
                .map(|(name, t)| (name.to_string(), t.clone()))
                .collect(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let version = match response.model_spec.and_then(|s| s.version_choice) {
        Some(modelgate::proto::serving::model_spec::VersionChoice::Version(v)) => v,
        other => panic!("response without a version: {other:?}"),
    };
    let outputs = response
        .outputs
        .iter()
        .map(|(name, proto)| {
            let t = decode_tensor(name, proto).expect("decodable output");
            (
                name.clone(),
                (t.shape.clone(), t.to_values::<f32>().expect("float output")),
            )
        })
        .collect();
    Ok((version, outputs))
}

/// What models/pt2_fixtures.py recorded: inputs, and PyTorch's loader's outputs for them.
struct Case {
    inputs: Vec<(String, Vec<i64>, Vec<f32>)>,
    outputs: Vec<(Vec<i64>, Vec<f32>)>,
}

fn expected(model: &str) -> Case {
    let text = std::fs::read_to_string(pt2_fixtures().join("expected.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let case = &all[model];
    let read = |t: &Value| -> (Vec<i64>, Vec<f32>) {
        let shape = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect();
        let values = t["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        (shape, values)
    };
    Case {
        inputs: case["inputs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, t)| {
                let (shape, values) = read(t);
                (name.clone(), shape, values)
            })
            .collect(),
        outputs: case["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(read)
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn packages_answer_as_pytorchs_own_loader_in_order_over_tf_and_v2() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let fixtures = pt2_fixtures();
    let config = model_config(&[
        ("small", &fixtures.join("small"), ""),
        ("pair", &fixtures.join("pair"), ""),
    ]);
    let server = Server::with_config(&config, &QUICK_EXIT);
    server.wait_available(&["small", "pair"]).await;

    for (model, names) in [("small", vec!["scores"]), ("pair", vec!["mixed", "offset"])] {
        let case = expected(model);
        let inputs: Vec<(&str, TensorProto)> = case
            .inputs
            .iter()
            .map(|(name, shape, values)| (name.as_str(), tensor(shape, values)))
            .collect();
        let (version, outputs) = predict(&server, spec(model), &inputs).await.unwrap();
        assert_eq!(version, if model == "small" { 2 } else { 1 }, "{model}");
        for (name, want) in names.iter().zip(&case.outputs) {
            assert_eq!(
                &outputs[*name], want,
                "{model} output {name} differs from PyTorch's"
            );
        }

        // V2 names the outputs in the signature's order, with the same numbers.
        let body = serde_json::json!({
            "inputs": case.inputs.iter().map(|(name, shape, values)| serde_json::json!({
                "name": name, "shape": shape, "datatype": "FP32", "data": values,
            })).collect::<Vec<_>>(),
        });
        let (status, text) = http::post(
            &server.url(&format!("/v2/models/{model}/infer")),
            &body.to_string(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        let outputs = answer["outputs"].as_array().unwrap();
        for ((output, name), (shape, values)) in outputs.iter().zip(&names).zip(&case.outputs) {
            assert_eq!(output["name"], *name);
            assert_eq!(output["shape"], serde_json::json!(shape));
            let got: Vec<f32> = output["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(&got, values, "V2 {model} {name}");
        }
    }

    // Metadata comes from the signature the export wrote.
    let (status, metadata) = http::call("GET", &server.url("/v1/models/pair/metadata"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let inputs =
        &metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"];
    assert!(
        inputs["a"].is_object() && inputs["b"].is_object(),
        "{metadata}"
    );
    stop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_outside_the_signature_or_the_export_range_are_refused() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let small = pt2_fixtures().join("small");
    let config = model_config(&[("small", &small, "")]);
    let server = Server::with_config(&config, &QUICK_EXIT);
    server.wait_available(&["small"]).await;

    // small/2 was exported for batches of 1 to 64; the package itself would run 65.
    let rows = 65;
    let status = predict(
        &server,
        spec("small"),
        &[("x", tensor(&[rows, 4], &vec![0.5; 4 * rows as usize]))],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("1 to 64"), "{}", status.message());
    let ok = predict(
        &server,
        spec("small"),
        &[("x", tensor(&[64, 4], &[0.5; 256]))],
    )
    .await;
    assert_eq!(ok.unwrap().1["scores"].0, vec![64, 3]);

    // A float64 input to a float32 package would run and answer; the server refuses it.
    let doubles = TensorProto {
        dtype: DataType::DtDouble as i32,
        tensor_shape: Some(modelgate::proto::tensor::shape_proto(Some(&[1, 4]))),
        double_val: vec![1.0; 4],
        ..Default::default()
    };
    let status = predict(&server, spec("small"), &[("x", doubles)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = predict(
        &server,
        spec("small"),
        &[("x", tensor(&[2, 5], &[0.0; 10]))],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("[2, 5]"), "{}", status.message());
    stop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_concurrent_rows_each_get_their_own_answer() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = TempDir::new("aoti-batching");
    // Larger than the package's range: the load clamps it and says so.
    let params = dir.path().join("batching.pbtxt");
    std::fs::write(
        &params,
        "max_batch_size { value: 128 } batch_timeout_micros { value: 20000 } \
         num_batch_threads { value: 2 }",
    )
    .unwrap();
    let config = model_config(&[("small", &pt2_fixtures().join("small"), "")]);
    let params_flag = format!("--batching_parameters_file={}", params.display());
    let mut flags = vec!["--enable_batching", params_flag.as_str()];
    flags.extend(QUICK_EXIT);
    let server = Server::with_config(&config, &flags);
    server.wait_available(&["small"]).await;
    assert!(
        server.log().contains("clamped to max_batch_size 64"),
        "{}",
        server.log()
    );

    let row = |i: usize| -> Vec<f32> { (0..4).map(|j| (i * 4 + j) as f32 / 10.0 - 3.0).collect() };
    let mut alone = Vec::new();
    for i in 0..24 {
        let (_, out) = predict(&server, spec("small"), &[("x", float_row(&row(i)))])
            .await
            .unwrap();
        alone.push(out["scores"].1.clone());
    }
    let mut calls = Vec::new();
    for i in 0..24 {
        let server_url = server.grpc_url();
        calls.push(tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(server_url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client =
                modelgate::proto::serving::prediction_service_client::PredictionServiceClient::new(
                    channel,
                );
            let response = client
                .predict(PredictRequest {
                    model_spec: Some(spec("small")),
                    inputs: [("x".to_string(), float_row(&row(i)))].into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            decode_tensor("scores", &response.outputs["scores"])
                .unwrap()
                .to_values::<f32>()
                .unwrap()
        }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let together = call.await.unwrap();
        for (a, b) in together.iter().zip(&alone[i]) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "row {i}: {together:?} vs {:?}",
                alone[i]
            );
        }
    }
    let batches = server
        .metric("modelgate_batch_size_count", &["model=\"small\""])
        .await;
    let rows = server
        .metric("modelgate_batch_size_sum", &["model=\"small\""])
        .await;
    assert!(
        rows > batches,
        "concurrent requests never shared a batch ({rows} rows in {batches} batches)"
    );

    // Past the clamped batch size, a request is refused rather than split into the package.
    let status = predict(
        &server,
        spec("small"),
        &[("x", tensor(&[65, 4], &[0.0; 260]))],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    stop(server);
}

/// `version`'s package and signature into `to`, its metadata saying the export takes
/// batches of `min` rows or more.
fn with_batch_min(version: &Path, to: &Path, min: usize) {
    use std::io::{Read, Write};
    std::fs::create_dir_all(to).unwrap();
    let source = std::fs::File::open(version.join("model.pt2")).unwrap();
    let mut archive = zip::ZipArchive::new(source).unwrap();
    let mut rewritten = zip::ZipWriter::new(std::fs::File::create(to.join("model.pt2")).unwrap());
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).unwrap();
        let name = entry.name().unwrap().to_string();
        if !name.ends_with("_metadata.json") {
            drop(entry);
            rewritten
                .raw_copy_file(archive.by_index_raw(index).unwrap())
                .unwrap();
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        let mut metadata: Value = serde_json::from_str(&text).unwrap();
        metadata["modelgate.batch_min"] = Value::String(min.to_string());
        rewritten
            .start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        rewritten
            .write_all(metadata.to_string().as_bytes())
            .unwrap();
    }
    rewritten.finish().unwrap();
    std::fs::copy(version.join("signature.json"), to.join("signature.json")).unwrap();
}

/// A request split into batches leaves a tail smaller than the export's smallest batch:
/// the tail is padded up to it. The package checks its own inputs here
/// (`AOTI_RUNTIME_CHECK_INPUTS=1`), so a batch below its range would be an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_requests_tail_is_padded_to_the_exports_smallest_batch() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = TempDir::new("aoti-batch-min");
    with_batch_min(
        &pt2_fixtures().join("small/2"),
        &dir.path().join("small/1"),
        4,
    );
    let params = dir.path().join("batching.pbtxt");
    std::fs::write(
        &params,
        "max_batch_size { value: 64 } max_execution_batch_size { value: 8 } \
         enable_large_batch_splitting { value: true }",
    )
    .unwrap();
    let config = model_config(&[("small", &dir.path().join("small"), "")]);
    let params_flag = format!("--batching_parameters_file={}", params.display());
    let mut flags = vec!["--enable_batching", params_flag.as_str()];
    flags.extend(QUICK_EXIT);
    let server = Server::with_config_env(&config, &flags, &[("AOTI_RUNTIME_CHECK_INPUTS", "1")]);
    server.wait_available(&["small"]).await;

    let values: Vec<f32> = (0..36).map(|i| i as f32 / 10.0 - 1.5).collect();
    let scores = |rows: std::ops::Range<usize>| {
        let server = &server;
        let part = values[rows.start * 4..rows.end * 4].to_vec();
        async move {
            let rows = i64::try_from(rows.len()).unwrap();
            let (_, out) = predict(server, spec("small"), &[("x", tensor(&[rows, 4], &part))])
                .await
                .unwrap_or_else(|e| panic!("{rows} rows: {e:?}\n{}", server.log()));
            out["scores"].1.clone()
        }
    };
    // 9 rows run as 8 + 1, the 1 padded to 4.
    let whole = scores(0..9).await;
    assert_eq!(whole.len(), 9 * 3);
    let head = scores(0..8).await;
    let tail = scores(5..9).await;
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-5);
    assert!(close(&whole[..24], &head), "{whole:?} vs {head:?}");
    assert!(close(&whole[24..], &tail[9..]), "{whole:?} vs {tail:?}");
    stop(server);
}

/// Copies a version directory into `base` as `version`, the signature last.
fn copy_version(from: &Path, base: &Path, version: i64) {
    let to = base.join(version.to_string());
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let name = entry.file_name();
        if name != "signature.json" {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
    if from.join("signature.json").is_file() {
        std::fs::copy(from.join("signature.json"), to.join(".signature.part")).unwrap();
        std::fs::rename(to.join(".signature.part"), to.join("signature.json")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn formats_swap_both_ways_under_load_without_failed_requests() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let small = pt2_fixtures().join("small");
    let base = scratch("aoti-swap");
    copy_version(&small.join("1"), &base, 1); // TorchScript
    let config = model_config(&[("small", &base, "")]);
    let mut flags = vec!["--file_system_poll_wait_seconds=1"];
    flags.extend(QUICK_EXIT);
    let server = Arc::new(Server::with_config(&config, &flags));
    server.wait_available(&["small"]).await;
    let models = server.models().await;

    let stop_clients = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(std::sync::Mutex::new((
        BTreeMap::<i64, u64>::new(),
        Vec::new(),
    )));
    let mut clients = Vec::new();
    for client in 0..4 {
        let (server, stop_clients, tally) = (
            Arc::clone(&server),
            Arc::clone(&stop_clients),
            Arc::clone(&tally),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop_clients.load(Ordering::Relaxed) {
                n += 1;
                let x = [client as f32, n as f32 / 100.0, 1.0, -1.0];
                let result = predict(&server, spec("small"), &[("x", float_row(&x))]).await;
                let mut tally = tally.lock().unwrap();
                match result {
                    Ok((version, out)) if out["scores"].0 == vec![1, 3] => {
                        *tally.0.entry(version).or_default() += 1
                    }
                    Ok(other) => tally.1.push(format!("{other:?}")),
                    Err(status) => tally.1.push(format!("{status:?}")),
                }
            }
        }));
    }
    let answered = |version: i64| {
        let tally = Arc::clone(&tally);
        move || {
            let enough = tally
                .lock()
                .unwrap()
                .0
                .get(&version)
                .is_some_and(|&n| n >= 20);
            async move { enough.then_some(()) }
        }
    };
    wait_for("answers from the TorchScript version 1", answered(1)).await;
    copy_version(&small.join("2"), &base, 2); // AOTInductor
    wait_for_state(&models, "small", 1, State::End).await;
    wait_for("answers from the package, version 2", answered(2)).await;
    copy_version(&small.join("1"), &base, 3); // TorchScript again
    wait_for_state(&models, "small", 2, State::End).await;
    wait_for("answers from the TorchScript version 3", answered(3)).await;
    stop_clients.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let (answers, failures) = &*tally.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(answers.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    eprintln!("format swap: answers by version {answers:?}, 0 failed");
    let server = Arc::into_inner(server).expect("the clients are done");
    stop(server);
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_packages_fail_their_version_naming_why_and_leave_nothing_behind() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let fixtures = pt2_fixtures();
    let before = unpacked_packages();
    let cases = [
        ("truncated", "not an AOTInductor package"),
        ("cut_so", "cut short"),
        ("cuda", "compiled for device 'cuda'"),
        ("isa", "this CPU lacks"),
        (
            "unsigned",
            "no signature.json next to model.pt2 and none in its metadata",
        ),
        // Made below: a signature.json freeing a dimension the export fixed, and a package
        // whose compiled library was left out.
        (
            "resigned",
            "inputs 0 ('x') has -1 at dimension 1 in signature.json",
        ),
        ("uncompiled", "holds no compiled library"),
    ];
    let root = scratch("aoti-broken");
    let made = root.join(".made");
    resigned_version(&fixtures.join("small/2"), &made.join("resigned"));
    uncompiled_version(&fixtures.join("small/2"), &made.join("uncompiled"));
    let mut models = Vec::new();
    for (case, _) in cases {
        // Version 1 is the good package; version 2 arrives broken.
        copy_version(&fixtures.join("small/2"), &root.join(case), 1);
        models.push((case, root.join(case), ""));
    }
    let config = model_config(
        &models
            .iter()
            .map(|(name, path, extra)| (*name, path.as_path(), *extra))
            .collect::<Vec<_>>(),
    );
    let mut flags = vec![
        "--file_system_poll_wait_seconds=1",
        "--max_num_load_retries=2",
        "--load_retry_interval_micros=100000",
    ];
    flags.extend(QUICK_EXIT);
    let server = Server::with_config(&config, &flags);
    let names: Vec<&str> = cases.iter().map(|(case, _)| *case).collect();
    server.wait_available(&names).await;
    for (case, _) in cases {
        let source = match made.join(case) {
            made if made.is_dir() => made,
            _ => fixtures.join("broken").join(case),
        };
        copy_version(&source, &root.join(case), 2);
    }
    let status = server.models().await;
    for (case, needle) in cases {
        let error = wait_for_state(&status, case, 2, State::End).await;
        assert!(
            error.contains(needle),
            "{case}: '{error}' should name {needle}"
        );
        // The version before keeps serving.
        let (version, out) = predict(
            &server,
            spec(case),
            &[("x", float_row(&[1.0, 2.0, 3.0, 4.0]))],
        )
        .await
        .unwrap_or_else(|e| panic!("{case}: {e:?}"));
        assert_eq!(
            (version, out["scores"].0.clone()),
            (1, vec![1, 3]),
            "{case}"
        );
    }
    // Every failed load and retry cleaned up after itself, and a CPU package that loaded
    // needs nothing in /tmp any more (so that not even a killed server leaves anything).
    let serving: Vec<_> = unpacked_packages().difference(&before).cloned().collect();
    assert!(serving.is_empty(), "in /tmp while serving: {serving:?}");
    stop(server);
    let left: Vec<_> = unpacked_packages().difference(&before).cloned().collect();
    assert!(left.is_empty(), "left in /tmp: {left:?}");
    let _ = std::fs::remove_dir_all(&root);
}

/// `version` (a package with its signature.json) into `to`, its signature.json letting
/// the second dimension of the first input go free where the package was compiled for 4.
fn resigned_version(version: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(version.join("model.pt2"), to.join("model.pt2")).unwrap();
    let text = std::fs::read_to_string(version.join("signature.json")).unwrap();
    let mut signature: Value = serde_json::from_str(&text).unwrap();
    signature["signatures"]["serving_default"]["inputs"][0]["shape"] = serde_json::json!([-1, -1]);
    std::fs::write(to.join("signature.json"), signature.to_string()).unwrap();
}

/// `version`'s package into `to` without its compiled libraries (sources and metadata
/// only), and its signature.json.
fn uncompiled_version(version: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let source = std::fs::File::open(version.join("model.pt2")).unwrap();
    let mut archive = zip::ZipArchive::new(source).unwrap();
    let mut rewritten = zip::ZipWriter::new(std::fs::File::create(to.join("model.pt2")).unwrap());
    for index in 0..archive.len() {
        let entry = archive.by_index_raw(index).unwrap();
        if !entry.name().unwrap().ends_with(".so") {
            rewritten.raw_copy_file(entry).unwrap();
        }
    }
    rewritten.finish().unwrap();
    std::fs::copy(version.join("signature.json"), to.join("signature.json")).unwrap();
}

/// A directory shaped like one the loader unpacks, in /tmp, marked as held by `owner`
/// ("PID START_TIME") when given.
fn unpack_dir_of(owner: Option<String>) -> PathBuf {
    let dir = (0u32..)
        .map(|n| PathBuf::from(format!("/tmp/mt{:04x}", (std::process::id() + n) & 0xffff)))
        .find(|dir| std::fs::create_dir(dir).is_ok())
        .expect("a free name in /tmp");
    std::fs::create_dir_all(dir.join("model/data/aotinductor")).expect("unpack dir");
    if let Some(owner) = owner {
        std::fs::write(dir.join(".modelgate-owner"), owner).expect("owner mark");
    }
    dir
}

/// A server killed while it held CUDA packages leaves their directories in /tmp: the next
/// server to start removes those, and nothing of a running process or of anyone else.
#[tokio::test]
async fn a_starting_server_removes_what_servers_no_longer_running_left_in_tmp() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let gone = {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    };
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    let started = stat[stat.rfind(')').expect("comm") + 1..]
        .split_whitespace()
        .nth(19)
        .expect("start time")
        .to_string();
    let stale = unpack_dir_of(Some(format!("{gone} 1")));
    let running = unpack_dir_of(Some(format!("{} {started}", std::process::id())));
    let unmarked = unpack_dir_of(None);
    let fixtures = pt2_fixtures();
    let root = scratch("aoti-stale");
    copy_version(&fixtures.join("small/2"), &root.join("small"), 1);
    let config = model_config(&[("small", root.join("small").as_path(), "")]);
    let server = Server::with_config(&config, &QUICK_EXIT);
    server.wait_available(&["small"]).await;
    assert!(!stale.exists(), "{} is still there", stale.display());
    assert!(running.exists() && unmarked.exists());
    assert!(
        server
            .log()
            .contains("removed package directories left in /tmp by servers no longer running"),
        "{}",
        server.log()
    );
    stop(server);
    for dir in [running, unmarked] {
        std::fs::remove_dir_all(dir).expect("remove");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// `--intra_op_threads` holds for a package's own kernels, which ask OpenMP for their team
/// size: each worker computes on its own thread, and no OpenMP team appears beside it (it
/// would carry the worker's name). Before, each worker got a team of one thread per core.
#[tokio::test]
async fn a_package_runs_on_its_workers_threads_alone() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let root = scratch("aoti-threads");
    copy_version(&pt2_fixtures().join("small/2"), &root.join("small"), 1);
    let config = model_config(&[("small", root.join("small").as_path(), "")]);
    let mut flags = vec!["--intra_op_threads=1", "--instances_per_device=2"];
    flags.extend(QUICK_EXIT);
    let server = Server::with_config(&config, &flags);
    server.wait_available(&["small"]).await;
    for _ in 0..4 {
        predict(
            &server,
            spec("small"),
            &[("x", float_row(&[1.0, 2.0, 3.0, 4.0]))],
        )
        .await
        .expect("predict");
    }
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .expect("tasks")
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("small/"))
        .collect();
    assert_eq!(names.len(), 2, "threads computing for the model: {names:?}");
    stop(server);
    let _ = std::fs::remove_dir_all(&root);
}
