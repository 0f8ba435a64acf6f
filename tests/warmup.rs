//! Warm-up from recorded requests (`assets.extra/tf_serving_warmup_requests`) against the
//! real binary: the records are replayed before the version serves (the counter fixture
//! counts its forwards), readiness waits for them, and a malformed file fails the load
//! while the version before it keeps serving.

pub mod common;

use common::{
    counter_record, examples, fixtures, float_row, forwards, spec, spec_signature, tfrecord,
    Server, TempDir,
};
use modelgate::proto::serving::model_version_status::State;
use modelgate::proto::serving::{
    prediction_log, ClassificationRequest, ClassifyLog, InferenceTask, MultiInferenceLog,
    MultiInferenceRequest, PredictRequest, PredictionLog, RegressLog, RegressionRequest,
};
use modelgate::registry::WARMUP_FILE;
use prost::Message;
use std::path::Path;

/// A Predict record for the counter: one row `[1, rounds]` (busy for `rounds` matmuls).
fn predict_record(rounds: f32) -> Vec<u8> {
    counter_record("x", rounds)
}

/// A copy of the counter fixture's version 1 as `version` under `base`, with `warm_up` as
/// its warm-up file when given.
fn counter_version(base: &Path, version: i64, warm_up: Option<&[u8]>) {
    let dir = base.join(version.to_string());
    std::fs::create_dir_all(dir.join("assets.extra")).unwrap();
    for file in ["model.pt", "signature.json"] {
        std::fs::copy(fixtures().join("counter/1").join(file), dir.join(file)).unwrap();
    }
    if let Some(bytes) = warm_up {
        std::fs::write(dir.join(WARMUP_FILE), bytes).unwrap();
    }
}

/// One worker: the counter's count is a plain `+= 1` on a shared buffer, which two
/// workers warming up at once could race on.
fn start(base: &Path, extra: &[&str]) -> Server {
    let config = common::model_config(&[("counter", base, "")]);
    let mut flags = vec!["--instances_per_device=1"];
    flags.extend_from_slice(extra);
    Server::with_config(&config, &flags)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_requests_are_replayed_before_the_version_serves() {
    let dir = TempDir::new("warmup");
    let records: Vec<Vec<u8>> = (0..5).map(|_| predict_record(0.0)).collect();
    counter_version(dir.path(), 1, Some(&tfrecord(&records)));

    // The same version without replay: only the synthetic warm-up ran.
    let plain = start(dir.path(), &["--enable_model_warmup=false"]);
    plain.wait_available(&["counter"]).await;
    let synthetic = forwards(&plain).await;
    drop(plain);

    let warmed = start(dir.path(), &["--num_request_iterations_for_warmup=2"]);
    warmed.wait_available(&["counter"]).await;
    assert_eq!(
        forwards(&warmed).await - synthetic,
        10,
        "5 records, each replayed twice"
    );
    assert!(
        warmed.log().contains("replayed the warm-up requests"),
        "{}",
        warmed.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_replay() {
    let dir = TempDir::new("warmup-slow");
    // Seconds of matmuls (30,000 rounds each) before the version may serve.
    let records: Vec<Vec<u8>> = (0..3).map(|_| predict_record(30_000.0)).collect();
    counter_version(dir.path(), 1, Some(&tfrecord(&records)));
    let plain = start(dir.path(), &["--enable_model_warmup=false"]);
    plain.wait_available(&["counter"]).await;
    let synthetic = forwards(&plain).await;
    drop(plain);

    let server = start(dir.path(), &[]);
    server.wait_readyz(200).await;
    // The replay sends its records one after another through the version's queue. Had
    // readiness come before it finished, this count would have run between two records
    // and seen fewer than three.
    assert_eq!(forwards(&server).await - synthetic, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_warm_up_file_fails_the_load_and_the_old_version_serves() {
    let dir = TempDir::new("warmup-bad");
    counter_version(dir.path(), 1, None);
    let server = start(dir.path(), &["--file_system_poll_wait_seconds=1"]);
    server.wait_available(&["counter"]).await;

    let mut corrupt = tfrecord(&[predict_record(0.0)]);
    let last = corrupt.len() - 5;
    corrupt[last] ^= 0xff;
    counter_version(dir.path(), 2, Some(&corrupt));
    let mut models = server.models().await;
    let status = common::wait_for("version 2 to fail its warm-up", || {
        let mut models = models.clone();
        async move {
            let versions = common::model_status(&mut models, "counter").await.ok()?;
            versions
                .into_iter()
                .find(|(version, _, error)| *version == 2 && !error.is_empty())
        }
    })
    .await;
    assert!(
        status.2.contains("warm-up") && status.2.contains("checksum"),
        "{status:?}"
    );
    // Version 1 still answers.
    let versions = common::model_status(&mut models, "counter").await.unwrap();
    assert!(
        versions
            .iter()
            .any(|(v, state, _)| *v == 1 && *state == State::Available),
        "{versions:?}"
    );
    let mut client = server.prediction().await;
    let answer = client
        .predict(PredictRequest {
            model_spec: Some(spec("counter")),
            inputs: [("x".to_string(), float_row(&[4.0, 0.0]))].into(),
            ..Default::default()
        })
        .await
        .expect("version 1 serves")
        .into_inner();
    assert_eq!(
        answer.model_spec.and_then(|s| s.version_choice),
        Some(modelgate::proto::serving::model_spec::VersionChoice::Version(1))
    );
}

fn log(log_type: prediction_log::LogType) -> Vec<u8> {
    PredictionLog {
        log_type: Some(log_type),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Regress, Classify and MultiInference records run on the regressor (whose `x` has 3
/// columns): a good file loads, and one whose record the model refuses fails the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_regress_and_multi_inference_records_are_replayed() {
    use prediction_log::LogType;
    let rows: &[&[f32]] = &[&[1.0, 2.0, 3.0]];
    let regress = |rows: &[&[f32]]| {
        log(LogType::RegressLog(RegressLog {
            request: Some(RegressionRequest {
                model_spec: Some(spec("regressor")),
                input: examples(rows),
            }),
            response: None,
        }))
    };
    let classify = log(LogType::ClassifyLog(ClassifyLog {
        request: Some(ClassificationRequest {
            model_spec: Some(spec_signature("regressor", "classify")),
            input: examples(rows),
        }),
        response: None,
    }));
    let task = |signature: &str, method: &str| InferenceTask {
        model_spec: Some(spec_signature("regressor", signature)),
        method_name: method.into(),
    };
    let multi = log(LogType::MultiInferenceLog(MultiInferenceLog {
        request: Some(MultiInferenceRequest {
            tasks: vec![
                task("serving_default", "tensorflow/serving/regress"),
                task("classify", "tensorflow/serving/classify"),
            ],
            input: examples(rows),
        }),
        response: None,
    }));

    for (file, fails) in [
        (tfrecord(&[regress(rows), classify, multi]), None),
        (
            tfrecord(&[regress(rows), regress(&[&[1.0, 2.0]])]),
            Some("record 1 failed"),
        ),
    ] {
        let dir = TempDir::new("warmup-tasks");
        let version = dir.path().join("1");
        std::fs::create_dir_all(version.join("assets.extra")).unwrap();
        for name in ["model.pt", "signature.json"] {
            std::fs::copy(
                fixtures().join("regressor/1").join(name),
                version.join(name),
            )
            .unwrap();
        }
        std::fs::write(version.join(WARMUP_FILE), &file).unwrap();
        let server =
            Server::with_config(&common::model_config(&[("regressor", dir.path(), "")]), &[]);
        let models = server.models().await;
        let (_, state, error) = common::wait_for("the regressor to load or fail", || {
            let mut models = models.clone();
            async move {
                let status = common::model_status(&mut models, "regressor").await.ok()?;
                status
                    .into_iter()
                    .find(|(_, state, error)| *state == State::Available || !error.is_empty())
            }
        })
        .await;
        match fails {
            None => assert_eq!(state, State::Available, "{error}"),
            Some(needle) => assert!(error.contains(needle), "{error}"),
        }
    }
}

/// While a new version warms up, a request for a version that is not coming (a number no
/// one loads) is answered NOT_FOUND at once rather than held until the load ends or its
/// deadline passes; a request for the version that is loading still waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_for_a_loading_version_wait_for_it() {
    let dir = TempDir::new("warmup-wait");
    counter_version(dir.path(), 1, None);
    let server = start(dir.path(), &["--file_system_poll_wait_seconds=1"]);
    server.wait_available(&["counter"]).await;
    // Version 2 warms up for minutes: ten million rounds of a matmul.
    counter_version(
        dir.path(),
        2,
        Some(&tfrecord(&[predict_record(10_000_000.0)])),
    );
    tokio::task::block_in_place(|| server.wait_for_log("replaying the warm-up requests"));

    // The raw transport: tonic's own would cancel at the deadline before the server answers.
    let mut client = server.raw_prediction();
    let within = |spec| {
        let mut request = tonic::Request::new(PredictRequest {
            model_spec: Some(spec),
            inputs: [("x".to_string(), float_row(&[1.0, 0.0]))].into(),
            ..Default::default()
        });
        request.set_timeout(std::time::Duration::from_secs(10));
        request
    };
    let missing = client
        .predict(within(common::spec_version("counter", 99)))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let mut short = within(common::spec_version("counter", 2));
    short.set_timeout(std::time::Duration::from_millis(500));
    let loading = client.predict(short).await.unwrap_err();
    assert_eq!(loading.code(), tonic::Code::DeadlineExceeded, "{loading:?}");
    // Version 1 serves throughout.
    client
        .predict(within(spec("counter")))
        .await
        .expect("the latest available version answers");
}

/// `--num_load_threads`: with 2, a model whose version warms up for minutes does not hold
/// up another model's load; with the default (one at a time, as TF Serving's 0), it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn num_load_threads_lets_models_load_side_by_side() {
    let slow = TempDir::new("load-threads");
    // Ten million rounds of a matmul: minutes of warm-up.
    counter_version(
        slow.path(),
        1,
        Some(&tfrecord(&[predict_record(10_000_000.0)])),
    );
    let config = common::model_config(&[
        ("counter", slow.path(), ""),
        ("tiny", &fixtures().join("tiny"), ""),
    ]);

    let serial = Server::with_config(&config, &["--instances_per_device=1"]);
    tokio::task::block_in_place(|| serial.wait_for_log("replaying the warm-up requests"));
    // The counter is listed first; tiny waits its turn.
    assert_ne!(first_state(&serial, "tiny").await, Some(State::Available));
    drop(serial);

    let parallel = Server::with_config(
        &config,
        &["--instances_per_device=1", "--num_load_threads=2"],
    );
    parallel.wait_available(&["tiny"]).await;
    assert_eq!(
        first_state(&parallel, "counter").await,
        Some(State::Loading)
    );
}

/// The state of `model`'s first version, if it has one.
async fn first_state(server: &Server, model: &str) -> Option<State> {
    let mut models = server.models().await;
    common::model_status(&mut models, model)
        .await
        .ok()
        .and_then(|versions| versions.first().map(|(_, state, _)| *state))
}
