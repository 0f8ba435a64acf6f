//! Metrics and logs of the real binary after real traffic: the Prometheus scrape (at
//! `/metrics` and at the monitoring config's path) has the counters and histograms with
//! the right labels and counts; JSON logs have one object per line, a debug line per
//! request, a warn line per error, and no payload.

pub mod common;

use common::{examples, spec_signature, wait_for, Server, TempDir};
use modelgate::proto::serving::{
    ClassificationRequest, InferenceTask, MultiInferenceRequest, PredictRequest, RegressionRequest,
};
use modelgate::proto::tensor::tensor_to_proto;
use modelgate::tensor::Tensor;
use serde_json::Value;

/// Polls the REST status of `model` until its text contains `needle`.
async fn wait_status(server: &Server, model: &str, needle: &str) {
    let url = server.url(&format!("/v1/models/{model}"));
    let what = server.awaiting(format!("{model} to report {needle}"));
    wait_for(what, || async {
        let (_, text) = common::http::request("GET", &url, None).await.ok()?;
        text.contains(needle).then_some(())
    })
    .await
}

/// The value of the sample line starting with `series ` (labels included).
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_logs_after_traffic() {
    let fixtures = common::fixtures();
    let dir = TempDir::new("telemetry");
    let monitoring = dir.path().join("monitoring.config");
    std::fs::write(
        &monitoring,
        "prometheus_config { enable: true, path: \"/monitoring/prometheus/metrics\" }\n",
    )
    .unwrap();
    let config = common::model_config(&[
        ("tiny", &fixtures.join("tiny"), ""),
        ("regressor", &fixtures.join("regressor"), ""),
        ("corrupt", &fixtures.join("corrupt"), ""),
        ("missing", &dir.path().join("no-such-dir"), ""),
    ]);
    let monitoring_flag = format!("--monitoring_config_file={}", monitoring.display());
    let server = Server::with_config_env(
        &config,
        &[&monitoring_flag, "--log_format=json"],
        &[("MODELGATE_LOG", "info,modelgate::telemetry=debug")],
    );
    wait_status(&server, "tiny", "AVAILABLE").await;
    wait_status(&server, "regressor", "AVAILABLE").await;
    wait_status(&server, "corrupt", "\"END\"").await;

    // REST: three answers, an unknown model, a bad input. 123.25 must never reach a log.
    let http = reqwest::Client::new();
    let post = |model: &str, body: &str| {
        http.post(server.url(&format!("/v1/models/{model}:predict")))
            .body(body.to_string())
            .send()
    };
    for _ in 0..3 {
        let response = post("tiny", r#"{"instances": [[123.25]]}"#).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        post("nope", r#"{"instances": [[1]]}"#)
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        post("tiny", r#"{"instances": [[1, 2]]}"#)
            .await
            .unwrap()
            .status(),
        400
    );

    // gRPC: two predictions, and one each of Classify, Regress, MultiInference.
    let mut grpc = server.prediction().await;
    let x = Tensor::from_values(vec![1, 1], &[123.25f32]).unwrap();
    for _ in 0..2 {
        grpc.predict(PredictRequest {
            model_spec: Some(spec_signature("tiny", "")),
            inputs: [("x".to_string(), tensor_to_proto(&x, false))].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let classified = grpc
        .classify(ClassificationRequest {
            model_spec: Some(spec_signature("regressor", "classify")),
            input: examples(&[[1., 2., 3.]]),
        })
        .await
        .unwrap()
        .into_inner();
    let classes = &classified.result.unwrap().classifications[0].classes;
    let got: Vec<(&str, f32)> = classes
        .iter()
        .map(|c| (c.label.as_str(), c.score))
        .collect();
    assert_eq!(got, vec![("a", 0.5), ("b", 1.0), ("c", 1.5)]);
    let regressed = grpc
        .regress(RegressionRequest {
            model_spec: Some(spec_signature("regressor", "")),
            input: examples(&[[1., 2., 3.], [0., 0., 1.]]),
        })
        .await
        .unwrap()
        .into_inner();
    let values: Vec<f32> = regressed
        .result
        .unwrap()
        .regressions
        .iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(values, vec![14.5, 3.5]);
    let multi = grpc
        .multi_inference(MultiInferenceRequest {
            tasks: vec![
                InferenceTask {
                    model_spec: Some(spec_signature("regressor", "classify")),
                    method_name: "tensorflow/serving/classify".into(),
                },
                InferenceTask {
                    model_spec: Some(spec_signature("regressor", "")),
                    method_name: "tensorflow/serving/regress".into(),
                },
            ],
            input: examples(&[[2., 0., 0.]]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(multi.results.len(), 2);

    // The scrape, at both paths.
    for path in ["/metrics", "/monitoring/prometheus/metrics"] {
        let response = reqwest::get(server.url(path)).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let scrape = response.text().await.unwrap();
        let expect = |series: &str, value: f64| {
            assert_eq!(
                sample(&scrape, series),
                Some(value),
                "{series} in {path}:\n{scrape}"
            );
        };
        let requests = |model: &str, version: &str, api: &str, protocol: &str, code: &str| {
            format!(
                "modelgate_requests_total{{model=\"{model}\",version=\"{version}\",api=\"{api}\",protocol=\"{protocol}\",code=\"{code}\"}}"
            )
        };
        expect(&requests("tiny", "1", "predict", "rest", "ok"), 3.0);
        expect(&requests("", "", "predict", "rest", "not_found"), 1.0);
        expect(
            &requests("tiny", "", "predict", "rest", "invalid_argument"),
            1.0,
        );
        expect(&requests("tiny", "1", "predict", "grpc", "ok"), 2.0);
        expect(&requests("regressor", "1", "classify", "grpc", "ok"), 1.0);
        expect(&requests("regressor", "1", "regress", "grpc", "ok"), 1.0);
        expect(
            &requests("regressor", "1", "multi_inference", "grpc", "ok"),
            1.0,
        );
        let latency = r#"{model="tiny",api="predict",protocol="rest"}"#;
        expect(
            &format!("modelgate_request_duration_seconds_count{latency}"),
            4.0,
        );
        expect(
            r#"modelgate_request_duration_seconds_bucket{model="tiny",api="predict",protocol="rest",le="+Inf"}"#,
            4.0,
        );
        expect(
            r#"modelgate_request_duration_seconds_bucket{model="tiny",api="predict",protocol="rest",le="30"}"#,
            4.0,
        );
        expect(
            r#"modelgate_model_loads_total{model="tiny",outcome="success",reason="config"}"#,
            1.0,
        );
        expect(
            r#"modelgate_model_loads_total{model="corrupt",outcome="failure",reason="config"}"#,
            1.0,
        );
        expect(
            r#"modelgate_model_load_duration_seconds_count{model="tiny"}"#,
            1.0,
        );
        let storage_errors = sample(
            &scrape,
            r#"modelgate_storage_errors_total{model="missing"}"#,
        );
        assert!(storage_errors.is_some_and(|n| n >= 1.0), "{scrape}");
        for line in [
            "# TYPE modelgate_requests_total counter",
            "# TYPE modelgate_request_duration_seconds histogram",
            "# TYPE modelgate_model_load_duration_seconds histogram",
            "# HELP modelgate_requests_total ",
        ] {
            assert!(scrape.contains(line), "no '{line}' in {path}:\n{scrape}");
        }
    }

    // Logs: JSON objects only; a debug line per request, a warn line per error.
    let log = server.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let request = lines
        .iter()
        .find(|l| {
            l["message"] == "request"
                && l["model"] == "tiny"
                && l["protocol"] == "rest"
                && l["api"] == "predict"
        })
        .unwrap_or_else(|| panic!("no request line:\n{log}"));
    assert_eq!(request["level"], "DEBUG");
    assert_eq!(request["version"], 1);
    assert_eq!(request["code"], "ok");
    assert!(request["latency_ms"].as_f64().is_some(), "{request}");
    let failure = lines
        .iter()
        .find(|l| l["message"] == "request failed" && l["model"] == "nope")
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert_eq!(failure["level"], "WARN");
    assert_eq!(failure["code"], "not_found");
    assert!(failure["error"].as_str().unwrap().contains("nope"));
    assert!(
        !log.contains("123.25"),
        "a payload value reached the log:\n{log}"
    );
}

/// Logs written to a pipe (kubectl logs, a log shipper) carry no ANSI colour codes, even
/// without NO_COLOR.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args([
            "--port=0",
            "--rest_api_port=0",
            "--model_config_file=/nonexistent/models.config",
        ])
        .env_remove("NO_COLOR")
        .env("MODELGATE_LOG", "info")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run modelgate");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("ERROR") || log.contains("error"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
}

/// A version's own series (forward and queue times, batch sizes, queue depth, refusals)
/// leave `/metrics` once the version is unloaded, so the scrape does not grow with every
/// version ever served; the version that replaced it keeps its own. (Request counts keep
/// their `version` label: `modelgate_requests_total` is the API edge's history.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versions_series_leave_the_scrape_when_it_unloads() {
    let fixtures = common::fixtures();
    let dir = TempDir::new("series");
    let base = dir.path().join("scaled");
    let publish = |version: &str| {
        let target = base.join(version);
        std::fs::create_dir_all(&target).expect("version directory");
        // signature.json last: a version counts once it is there.
        for file in ["model.pt", "signature.json"] {
            std::fs::copy(
                fixtures.join("scaled").join(version).join(file),
                target.join(file),
            )
            .expect("copy the version");
        }
    };
    publish("1");
    let server = Server::with_config(
        &common::model_config(&[("scaled", &base, "")]),
        &["--enable_batching", "--file_system_poll_wait_seconds=1"],
    );
    server.wait_available(&["scaled"]).await;
    let mut client = server.prediction().await;
    let series = |version: i64| {
        format!(r#"modelgate_forward_duration_seconds_count{{model="scaled",version="{version}"}}"#)
    };
    common::predict(&mut client, common::spec("scaled"), &[1.0, 2.0])
        .await
        .expect("version 1 answers");
    let (_, text) = server.http_get("/metrics").await;
    assert!(text.contains(&series(1)), "{text}");
    assert!(
        text.contains(r#"modelgate_queue_depth{model="scaled",version="1"}"#),
        "{text}"
    );

    publish("2");
    let models = server.models().await;
    let state = modelgate::proto::serving::model_version_status::State::End;
    common::wait_for_state(&models, "scaled", 1, state).await;
    common::predict(&mut client, common::spec("scaled"), &[1.0, 2.0])
        .await
        .expect("version 2 answers");
    let (_, text) = server.http_get("/metrics").await;
    assert!(
        !text.contains(r#"version="1""#),
        "version 1 still scraped:\n{text}"
    );
    assert!(text.contains(&series(2)), "{text}");
}
