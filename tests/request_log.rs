//! Request logging (`logging_config`) against the real binary: what a record holds on every
//! protocol, sampling rates over many requests, every collector type (stdout, files with
//! rotation, TFRecord PredictionLog, HTTP batches), and a stuck collector that drops and
//! counts records while requests carry on.

pub mod common;

use common::{
    examples, fixtures, float_row, model_config, predict, spec, spec_signature, wait_for, Server,
    TempDir, WithLog, TIMEOUT,
};
use modelgate::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use modelgate::proto::inference::model_infer_request::InferInputTensor;
use modelgate::proto::inference::{InferTensorContents, ModelInferRequest};
use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::{
    prediction_log, ClassificationRequest, PredictRequest, PredictionLog, RegressionRequest,
};
use modelgate::tfrecord;
use prost::Message;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// A `logging_config` block: collector `kind` (with `prefix`) at `rate`.
fn logging(kind: &str, prefix: &str, rate: f64) -> String {
    format!(
        r#"logging_config {{ log_collector_config {{ type: "{kind}" filename_prefix: "{prefix}" }} sampling_config {{ sampling_rate: {rate} }} }}"#
    )
}

/// A config serving `scaled` (or another fixture) under each name, with its extra text.
fn config(models: &[(&str, &str, String)]) -> String {
    let paths: Vec<PathBuf> = models.iter().map(|(_, f, _)| fixtures().join(f)).collect();
    let entries: Vec<(&str, &Path, &str)> = models
        .iter()
        .zip(&paths)
        .map(|((name, _, extra), path)| (*name, path.as_path(), extra.as_str()))
        .collect();
    model_config(&entries)
}

/// The JSON records on the server's stdout so far.
fn records(server: &Server) -> Vec<Value> {
    server
        .stdout
        .lines()
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Waits until the server's stdout holds `n` records, then returns them; fails on more.
async fn wait_records(server: &Server, n: usize) -> Vec<Value> {
    let what = WithLog(format!("{n} records on stdout"), &server.stdout);
    let found = wait_for(what, || async {
        let found = records(server);
        (found.len() >= n).then_some(found)
    })
    .await;
    assert_eq!(found.len(), n, "records: {found:#?}");
    found
}

#[tokio::test]
async fn records_carry_the_request_its_answer_and_its_outcome_on_every_protocol() {
    let stdout = logging("stdout", "", 1.0);
    let server = Server::with_config(
        &config(&[
            ("scaled", "scaled", stdout.clone()),
            ("regressor", "regressor", stdout),
            ("on_stderr", "scaled", logging("stderr", "", 1.0)),
        ]),
        &[],
    );
    server
        .wait_available(&["scaled", "regressor", "on_stderr"])
        .await;
    let mut client = server.prediction().await;

    // The stderr collector: its lines among the server's own log lines.
    predict(&mut client, spec("on_stderr"), &[7.0])
        .await
        .unwrap();
    let on_stderr = server.log.wait_until(TIMEOUT, |lines| {
        lines
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|record| record["model"] == "on_stderr")
    });
    let on_stderr = on_stderr.expect("a record on stderr");
    assert_eq!(on_stderr["request"]["inputs"]["x"]["values"], json!([7.0]));

    // gRPC Predict.
    let (version, y) = predict(&mut client, spec("scaled"), &[1.0, 2.0, 3.0])
        .await
        .unwrap();
    // REST and V2 REST Predict.
    let (status, _) = common::http::post(
        &server.url("/v1/models/scaled:predict"),
        r#"{"instances": [[4.0, 5.0]]}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let (status, _) = common::http::post(
        &server.url("/v2/models/scaled/infer"),
        r#"{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [6.0]}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // V2 gRPC ModelInfer.
    let mut v2 = GrpcInferenceServiceClient::new(server.channel().await);
    v2.model_infer(ModelInferRequest {
        model_name: "scaled".into(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 2],
            contents: Some(InferTensorContents {
                fp32_contents: vec![8.0, 9.0],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    // A failure: an input the signature does not have.
    let refused = client
        .predict(PredictRequest {
            model_spec: Some(spec("scaled")),
            inputs: [("nope".to_string(), float_row(&[1.0]))].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    // Classify, on a signature named in the request.
    classify(&mut client).await;
    // Neither a model this server does not know nor metadata is logged.
    predict(&mut client, spec("unknown"), &[1.0])
        .await
        .unwrap_err();
    server.http_get("/v1/models/scaled/metadata").await;

    let found = wait_records(&server, 6).await;
    let grpc = &found[0];
    assert_eq!(grpc["type"], "ok");
    assert_eq!(grpc["model"], "scaled");
    assert_eq!(grpc["version"], version);
    assert_eq!(grpc["signature"], "serving_default");
    assert_eq!(grpc["method"], "predict");
    assert_eq!(grpc["protocol"], "grpc");
    assert_eq!(grpc["code"], "ok");
    assert_eq!(
        grpc["request"]["inputs"]["x"],
        json!({"dtype": "DT_FLOAT", "shape": [1, 3], "values": [1.0, 2.0, 3.0]})
    );
    let logged_y: Vec<f64> =
        serde_json::from_value(grpc["response"]["outputs"]["y"]["values"].clone()).unwrap();
    assert_eq!(
        logged_y,
        y.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()
    );
    assert!(grpc["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(grpc["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(grpc["values_omitted"], false);

    assert_eq!(found[1]["protocol"], "rest");
    assert_eq!(
        found[1]["request"]["inputs"]["x"]["values"],
        json!([4.0, 5.0])
    );
    assert_eq!(found[2]["protocol"], "v2-rest");
    assert_eq!(found[2]["request"]["inputs"]["x"]["values"], json!([6.0]));
    assert_eq!(found[3]["protocol"], "v2-grpc");
    assert_eq!(found[3]["method"], "predict");
    assert_eq!(
        found[3]["request"]["inputs"]["x"]["values"],
        json!([8.0, 9.0])
    );

    let failed = &found[4];
    assert_eq!(failed["type"], "error");
    assert_eq!(failed["code"], "invalid_argument");
    assert!(
        failed["message"].as_str().unwrap().contains("nope"),
        "{failed}"
    );
    assert_eq!(failed["response"], Value::Null);

    let classified = &found[5];
    assert_eq!(classified["method"], "classify");
    assert_eq!(classified["signature"], "classify");
    let feature = &classified["request"]["input"]["exampleList"]["examples"][0]["features"]
        ["feature"]["x"]["floatList"]["value"];
    assert_eq!(feature, &json!([1.0, 2.0, 3.0]), "{classified}");
    assert_eq!(classified["response"][0]["signature"], "classify");
    assert!(classified["response"][0]["classification_result"]["classifications"].is_array());

    assert_eq!(
        server
            .metric(
                "modelgate_prediction_logs_written_total",
                &["model=\"scaled\""]
            )
            .await,
        5.0
    );
}

/// Sends `n` 1-row Predicts to `model`, 8 at a time; `ok` picks a valid or a refused input.
async fn predicts(server: &Server, model: &str, n: usize, ok: bool) {
    let client = server.prediction().await;
    let input = if ok { "x" } else { "nope" };
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut client = client.clone();
        let request = PredictRequest {
            model_spec: Some(spec(model)),
            inputs: [(input.to_string(), float_row(&[i as f32]))].into(),
            ..Default::default()
        };
        pending.spawn(async move { client.predict(request).await.is_ok() });
        if pending.len() >= 8 {
            assert_eq!(pending.join_next().await.unwrap().unwrap(), ok);
        }
    }
    while let Some(done) = pending.join_next().await {
        assert_eq!(done.unwrap(), ok);
    }
}

fn count_model(records: &[Value], model: &str) -> usize {
    records.iter().filter(|r| r["model"] == model).count()
}

#[tokio::test]
async fn sampling_rates_hold_over_many_requests() {
    const N: usize = 600;
    let rated = |rate: f64| logging("stdout", "", rate);
    let server = Server::with_config(
        &config(&[
            ("never", "scaled", rated(0.0)),
            ("always", "scaled", rated(1.0)),
            ("tenth", "scaled", rated(0.1)),
        ]),
        &[],
    );
    server.wait_available(&["never", "always", "tenth"]).await;
    for model in ["never", "always", "tenth"] {
        predicts(&server, model, N, true).await;
    }
    // Failures are sampled like the rest: none logged at rate 0 without --log_all_errors.
    predicts(&server, "never", 50, false).await;
    // One writer, first in first out: once this last request's record is out, all are.
    predicts(&server, "always", 1, true).await;
    let what = WithLog(format!("{} records of 'always'", N + 1), &server.stdout);
    let found = wait_for(what, || async {
        let found = records(&server);
        (count_model(&found, "always") > N).then_some(found)
    })
    .await;
    assert_eq!(count_model(&found, "never"), 0);
    assert_eq!(count_model(&found, "always"), N + 1);
    // Binomial(600, 0.1): mean 60, standard deviation 7.3; five of them either side.
    let tenth = count_model(&found, "tenth");
    assert!((24..=96).contains(&tenth), "rate 0.1 logged {tenth} of {N}");

    // --log_all_errors logs every failure of a logging model, sampled or not.
    let server = Server::with_config(
        &config(&[("never", "scaled", rated(0.0))]),
        &["--log_all_errors"],
    );
    server.wait_available(&["never"]).await;
    predicts(&server, "never", 20, true).await;
    predicts(&server, "never", 30, false).await;
    let found = wait_records(&server, 30).await;
    assert!(found.iter().all(|r| r["type"] == "error"));
}

/// Per-task (per-method) rates override the model's rate.
#[tokio::test]
async fn per_method_rates_override_the_default() {
    let extra = r#"logging_config { log_collector_config { type: "stdout" }
        sampling_config { sampling_rate: 0 per_task_sampling_configs { dc: "regress" sampling_rate: 1 } } }"#;
    let server = Server::with_config(&config(&[("regressor", "regressor", extra.into())]), &[]);
    server.wait_available(&["regressor"]).await;
    for _ in 0..5 {
        classify_then_regress(&server).await;
    }
    let found = wait_records(&server, 5).await;
    assert!(found.iter().all(|r| r["method"] == "regress"), "{found:#?}");
}

/// A Classify of one example `[1, 2, 3]` on the `regressor` fixture's `classify` signature.
async fn classify(client: &mut PredictionServiceClient<Channel>) {
    client
        .classify(ClassificationRequest {
            model_spec: Some(spec_signature("regressor", "classify")),
            input: examples(&[[1., 2., 3.]]),
        })
        .await
        .unwrap();
}

/// One Classify (the `classify` signature) and one Regress on the `regressor` fixture.
async fn classify_then_regress(server: &Server) {
    let mut client = server.prediction().await;
    classify(&mut client).await;
    client
        .regress(RegressionRequest {
            model_spec: Some(spec("regressor")),
            input: examples(&[[4., 5., 6.]]),
        })
        .await
        .unwrap();
}

/// The files of `dir` whose names start with `stem`, sorted.
fn files(dir: &Path, stem: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(stem))
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn file_collectors_rotate_json_lines_and_write_prediction_logs() {
    let dir = TempDir::new("request-log-files");
    let logs = dir.path().join("logs");
    let prefix = |name: &str| logs.join(name).display().to_string();
    let server = Server::with_config(
        &config(&[
            ("scaled", "scaled", logging("file", &prefix("scaled"), 1.0)),
            ("tf", "scaled", logging("file", &prefix("tf.tfrecord"), 1.0)),
            (
                "regressor",
                "regressor",
                logging("file", &prefix("regressor.tfrecord"), 1.0),
            ),
        ]),
        &["--prediction_log_file_rotate_bytes=2048"],
    );
    server.wait_available(&["scaled", "tf", "regressor"]).await;
    predicts(&server, "scaled", 40, true).await;
    predicts(&server, "tf", 12, true).await;
    // A failure has no place in a PredictionLog: only JSON collectors keep it.
    predicts(&server, "tf", 3, false).await;
    classify_then_regress(&server).await;
    // SIGTERM writes what is queued before the process exits.
    let mut server = server;
    server.signal("TERM");
    assert!(server.wait_exit().success());

    let json_files = files(&logs, "scaled-");
    assert!(
        json_files.len() > 2,
        "2 KiB files should rotate: {json_files:?}"
    );
    let mut lines = 0;
    for file in &json_files {
        assert!(file.extension().unwrap() == "jsonl", "{file:?}");
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            text.len() <= 2048 || text.lines().count() == 1,
            "{file:?} over its size"
        );
        for line in text.lines() {
            let record: Value = serde_json::from_str(line).unwrap();
            assert_eq!(record["model"], "scaled");
            lines += 1;
        }
    }
    assert_eq!(lines, 40);

    let mut predict_logs = Vec::new();
    for file in files(&logs, "tf-") {
        assert!(file.extension().unwrap() == "tfrecord", "{file:?}");
        let bytes = std::fs::read(&file).unwrap();
        for record in tfrecord::records(&bytes).unwrap() {
            predict_logs.push(PredictionLog::decode(record).unwrap());
        }
    }
    assert_eq!(predict_logs.len(), 12);
    for log in &predict_logs {
        let metadata = log.log_metadata.as_ref().unwrap();
        assert_eq!(metadata.model_spec.as_ref().unwrap().name, "tf");
        assert_eq!(
            metadata.sampling_config.as_ref().unwrap().sampling_rate,
            1.0
        );
        let Some(prediction_log::LogType::PredictLog(predict)) = &log.log_type else {
            panic!("not a PredictLog: {log:?}");
        };
        let request = predict.request.as_ref().unwrap();
        assert!(request.inputs.contains_key("x"));
        assert!(predict.response.as_ref().unwrap().outputs.contains_key("y"));
    }

    let mut kinds = Vec::new();
    for file in files(&logs, "regressor-") {
        for record in tfrecord::records(&std::fs::read(&file).unwrap()).unwrap() {
            kinds.push(match PredictionLog::decode(record).unwrap().log_type {
                Some(prediction_log::LogType::ClassifyLog(log)) => {
                    assert!(log.response.unwrap().result.is_some());
                    "classify"
                }
                Some(prediction_log::LogType::RegressLog(log)) => {
                    let examples = log.request.unwrap().input.unwrap();
                    assert!(examples.encoded_len() > 0);
                    "regress"
                }
                other => panic!("unexpected {other:?}"),
            });
        }
    }
    assert_eq!(kinds, ["classify", "regress"]);
}

/// Written and dropped records of `model` once `n` are accounted for, either way.
async fn accounted(server: &Server, model: &str, n: usize) -> (f64, f64) {
    let label = format!("model=\"{model}\"");
    let what = server.awaiting(format!("{n} records of '{model}' written or dropped"));
    wait_for(what, || async {
        let written = server
            .metric("modelgate_prediction_logs_written_total", &[&label])
            .await;
        let dropped = server
            .metric("modelgate_prediction_logs_dropped_total", &[&label])
            .await;
        (written + dropped >= n as f64).then_some((written, dropped))
    })
    .await
}

#[tokio::test]
async fn file_rotation_skips_names_another_writer_took() {
    const N: usize = 40;
    let dir = TempDir::new("request-log-taken");
    let logs = dir.path().join("logs");
    let prefix = logs.join("m").display().to_string();
    let server = Server::with_config(
        &config(&[("m", "scaled", logging("file", &prefix, 1.0))]),
        &["--prediction_log_file_rotate_bytes=2048"],
    );
    server.wait_available(&["m"]).await;
    assert!(logs.join("m-00000.jsonl").is_file());
    // Another server writing the same prefix (a shared volume) took the next two names.
    let taken = ["m-00001.jsonl", "m-00002.jsonl"];
    for name in taken {
        std::fs::write(logs.join(name), "taken\n").unwrap();
    }
    predicts(&server, "m", N, true).await;
    assert_eq!(accounted(&server, "m", N).await, (N as f64, 0.0));
    let mut server = server;
    server.signal("TERM");
    assert!(server.wait_exit().success());

    let mut lines = 0;
    for file in files(&logs, "m-") {
        let text = std::fs::read_to_string(&file).unwrap();
        if taken.iter().any(|name| file.ends_with(name)) {
            assert_eq!(text, "taken\n", "{file:?} was written to");
            continue;
        }
        for line in text.lines() {
            let record: Value = serde_json::from_str(line).unwrap();
            assert_eq!(record["model"], "m");
            lines += 1;
        }
    }
    assert_eq!(lines, N);
    assert!(
        logs.join("m-00003.jsonl").is_file(),
        "rotation went on after the taken names"
    );
}

/// A Classify of `rows` on the `classify` signature of `model` (a `regressor`).
async fn classify_rows(server: &Server, model: &str, rows: &[[f32; 3]]) {
    server
        .prediction()
        .await
        .classify(ClassificationRequest {
            model_spec: Some(spec_signature(model, "classify")),
            input: examples(rows),
        })
        .await
        .unwrap();
}

/// A request and answer over 64 KiB of values: a JSON record keeps their shapes only
/// (`values_omitted`); a PredictionLog cannot say that (a tensor whose shape disagrees with
/// its content does not replay as warm-up), so a TFRecord file drops and counts it.
#[tokio::test]
async fn records_over_the_value_cap_keep_no_values_and_no_prediction_log() {
    let dir = TempDir::new("request-log-cap");
    let logs = dir.path().join("logs");
    let prefix = |name: &str| logs.join(name).display().to_string();
    let server = Server::with_config(
        &config(&[
            ("tf", "scaled", logging("file", &prefix("tf.tfrecord"), 1.0)),
            (
                "classes",
                "regressor",
                logging("file", &prefix("classes.tfrecord"), 1.0),
            ),
            ("classes_json", "regressor", logging("stdout", "", 1.0)),
        ]),
        &[],
    );
    server
        .wait_available(&["tf", "classes", "classes_json"])
        .await;
    let mut client = server.prediction().await;
    // 40 KB in and 40 KB out: over the cap once answered; 80 KB in: over it on arrival.
    for n in [10_000, 20_000] {
        predict(&mut client, spec("tf"), &vec![0.5; n])
            .await
            .unwrap();
    }
    predict(&mut client, spec("tf"), &[1.0, 2.0, 3.0])
        .await
        .unwrap();
    // About 40 KB of tf.Examples and 48 KB of results: over the cap with the results.
    let many = vec![[1.0, 2.0, 3.0]; 1500];
    classify_rows(&server, "classes", &many).await;
    classify_rows(&server, "classes_json", &many).await;
    classify_rows(&server, "classes", &[[1.0, 2.0, 3.0]]).await;

    let too_large = |model: &str| {
        let label = format!("model=\"{model}\"");
        let server = &server;
        async move {
            server
                .metric(
                    "modelgate_prediction_logs_dropped_total",
                    &[&label, "reason=\"too_large\""],
                )
                .await
        }
    };
    assert_eq!(accounted(&server, "tf", 3).await, (1.0, 2.0));
    assert_eq!(too_large("tf").await, 2.0);
    assert_eq!(accounted(&server, "classes", 2).await, (1.0, 1.0));
    assert_eq!(too_large("classes").await, 1.0);

    let json = wait_records(&server, 1).await;
    let record = &json[0];
    assert_eq!(record["values_omitted"], true, "{record}");
    assert_eq!(record["request"]["input"], Value::Null);
    assert_eq!(
        record["response"],
        json!([{"signature": "classify", "classification_result": null}])
    );

    let mut server = server;
    server.signal("TERM");
    assert!(server.wait_exit().success());
    let read = |stem: &str| -> Vec<PredictionLog> {
        files(&logs, stem)
            .iter()
            .flat_map(|file| {
                let bytes = std::fs::read(file).unwrap();
                let records: Vec<PredictionLog> = tfrecord::records(&bytes)
                    .unwrap()
                    .into_iter()
                    .map(|r| PredictionLog::decode(r).unwrap())
                    .collect();
                records
            })
            .collect()
    };
    let predicts = read("tf-");
    assert_eq!(predicts.len(), 1, "{predicts:?}");
    let Some(prediction_log::LogType::PredictLog(logged)) = &predicts[0].log_type else {
        panic!("not a PredictLog: {predicts:?}");
    };
    let inputs = &logged.request.as_ref().unwrap().inputs;
    let outputs = &logged.response.as_ref().unwrap().outputs;
    // Every tensor's content matches its shape, as a warm-up replay needs.
    for (name, tensor) in inputs.iter().chain(outputs) {
        common::decode_tensor(name, tensor).unwrap();
    }
    let x = common::decode_tensor("x", &inputs["x"]).unwrap();
    assert_eq!(x.to_values::<f32>().unwrap(), [1.0, 2.0, 3.0]);

    let classified = read("classes-");
    assert_eq!(classified.len(), 1, "{classified:?}");
    let Some(prediction_log::LogType::ClassifyLog(logged)) = &classified[0].log_type else {
        panic!("not a ClassifyLog: {classified:?}");
    };
    assert_eq!(
        logged.request.as_ref().unwrap().input,
        examples(&[[1.0, 2.0, 3.0]])
    );
    let result = logged.response.as_ref().unwrap().result.as_ref().unwrap();
    assert_eq!(result.classifications.len(), 1);
}

/// A collector service on 127.0.0.1: every POST's content type and body.
async fn collector_service() -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/ingest",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let store = Arc::clone(&store);
            async move {
                let kind = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                store.lock().unwrap().push((kind, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ingest", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

#[tokio::test]
async fn an_http_collector_receives_batches_of_json_lines() {
    let (url, received) = collector_service().await;
    let server = Server::with_config(
        &config(&[("scaled", "scaled", logging("http", &url, 1.0))]),
        &[],
    );
    server.wait_available(&["scaled"]).await;
    predicts(&server, "scaled", 64, true).await;
    let lines = wait_for(server.awaiting("64 records at the collector"), || async {
        let lines: usize = received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| body.lines().count())
            .sum();
        (lines >= 64).then_some(lines)
    })
    .await;
    assert_eq!(lines, 64);
    let posts = received.lock().unwrap().clone();
    assert!(
        posts.len() < 64,
        "records are batched: {} POSTs",
        posts.len()
    );
    for (kind, body) in posts {
        assert_eq!(kind, "application/x-ndjson");
        for line in body.lines() {
            let record: Value = serde_json::from_str(line).unwrap();
            assert_eq!(record["model"], "scaled");
        }
    }
}

/// Nanoseconds-resolution median of `samples`.
fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test]
async fn a_stuck_collector_drops_and_counts_records_and_requests_never_wait_for_it() {
    // Accepts connections and never reads or answers them.
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/ingest", stuck.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in stuck.incoming() {
            held.push(stream);
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let server = Server::with_config(
        &config(&[
            ("logged", "scaled", logging("http", &url, 1.0)),
            ("quiet", "scaled", String::new()),
        ]),
        &["--prediction_log_queue_records=4"],
    );
    server.wait_available(&["logged", "quiet"]).await;
    let mut client = server.prediction().await;
    // The first record sends the writer into a POST that never ends: once the collector has
    // its connection, the writer waits on it.
    predict(&mut client, spec("logged"), &[1.0]).await.unwrap();
    let what = server.awaiting("the writer to connect to the stuck collector");
    wait_for(what, || async {
        (accepted.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;

    let (mut logged, mut quiet) = (Vec::new(), Vec::new());
    let requests = async {
        for i in 0..200 {
            for (model, times) in [("logged", &mut logged), ("quiet", &mut quiet)] {
                let started = Instant::now();
                predict(&mut client, spec(model), &[i as f32])
                    .await
                    .unwrap();
                times.push(started.elapsed());
            }
        }
    };
    // A request that waited for the collector would never finish: fail rather than hang.
    tokio::time::timeout(TIMEOUT, requests)
        .await
        .expect("requests finished while the collector was stuck");
    // Reported, not asserted (no timing thresholds in tests): docs/request-logging.md quotes this.
    println!(
        "median latency: logging to a stuck collector {:?}, not logging {:?}",
        median(logged),
        median(quiet)
    );
    let dropped = server
        .metric(
            "modelgate_prediction_logs_dropped_total",
            &["model=\"logged\"", "reason=\"queue_full\""],
        )
        .await;
    // 200 records, of which the queue holds 4.
    assert!(dropped >= 196.0, "dropped {dropped}");
}

#[test]
fn a_logging_config_that_cannot_be_honoured_stops_the_start() {
    let dir = TempDir::new("request-log-refused");
    let path = dir.path().join("models.config");
    for (extra, needle) in [
        (logging("kafka", "", 1.0), "'kafka'"),
        (logging("stdout", "", 2.0), "[0, 1]"),
        (logging("http", "https://collector/x", 1.0), "http://"),
        // A folder that cannot be made: its parent is a file.
        (
            logging("file", &format!("{}/logs/m", path.display()), 1.0),
            "file collector",
        ),
    ] {
        std::fs::write(&path, config(&[("scaled", "scaled", extra)])).unwrap();
        let (ok, stderr) = common::run_to_exit(&[
            "--port=0",
            "--rest_api_port=0",
            &format!("--model_config_file={}", path.display()),
        ]);
        assert!(!ok, "started with {needle}");
        assert!(stderr.contains(needle), "{stderr}");
    }
}
