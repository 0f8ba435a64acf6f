//! The gRPC API (PredictionService, ModelService, health), end to end against the real
//! binary over TCP.

pub mod common;

use bytes::Bytes;
use common::*;
use modelgate::proto::serving::{
    GetModelMetadataRequest, GetModelStatusRequest, ModelVersionStatus, PredictRequest,
    SignatureDefMap,
};
use modelgate::proto::tensor::{dims, shape_proto, tensor_to_proto};
use modelgate::proto::tensorflow::{DataType, TensorProto, TensorShapeProto};
use modelgate::tensor::{DType, Tensor};
use prost::Message;
use tonic::Code;

/// A server with every fixture model plus the demo mlp.
async fn fixture_server(extra_args: &[&str]) -> (Server, TempDir) {
    let fixtures = fixtures();
    let dir = TempDir::new("grpc");
    let config = write_config(
        &dir.0,
        &[
            ("tiny", fixtures.join("tiny"), ""),
            ("echo", fixtures.join("echo"), ""),
            ("faulty", fixtures.join("faulty"), ""),
            ("multi", fixtures.join("multi"), ""),
            (
                "scaled",
                fixtures.join("scaled"),
                "model_version_policy { all {} } version_labels { key: \"stable\" value: 1 }",
            ),
            (
                "mlp",
                demo_models().join("mlp"),
                "model_version_policy { all {} } version_labels { key: \"stable\" value: 1 } version_labels { key: \"canary\" value: 2 }",
            ),
        ],
    );
    let config_arg = format!("--model_config_file={}", config.display());
    let mut args = vec![config_arg.as_str()];
    args.extend_from_slice(extra_args);
    let server = Server::start(&args);
    server
        .wait_available(&["tiny", "echo", "faulty", "multi", "scaled", "mlp"])
        .await;
    (server, dir)
}

fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
    Some(shape_proto(Some(dims)))
}

fn predict(
    spec: modelgate::proto::serving::ModelSpec,
    inputs: Vec<(&str, TensorProto)>,
) -> PredictRequest {
    PredictRequest {
        model_spec: Some(spec),
        inputs: inputs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..Default::default()
    }
}

fn output(response: &modelgate::proto::serving::PredictResponse, name: &str) -> Tensor {
    let proto = response
        .outputs
        .get(name)
        .unwrap_or_else(|| panic!("no output {name}"));
    common::decode_tensor(name, proto).expect("decodable output")
}

fn served_version(response: &modelgate::proto::serving::PredictResponse) -> i64 {
    match response
        .model_spec
        .as_ref()
        .and_then(|s| s.version_choice.clone())
    {
        Some(modelgate::proto::serving::model_spec::VersionChoice::Version(v)) => v,
        other => panic!("response names no version: {other:?}"),
    }
}

/// Deterministic pseudo-random rows for the mlp.
fn images(rows: usize) -> Vec<f32> {
    (0..rows * 784)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5)
        .collect()
}

#[tokio::test]
async fn tiny_gives_exact_numbers() {
    let (server, _dir) = fixture_server(&[]).await;
    let mut client = server.prediction().await;
    let response = client
        .predict(predict(
            spec("tiny"),
            vec![("x", floats(&[3, 1], &[1.0, 2.0, 3.5]))],
        ))
        .await
        .expect("predict")
        .into_inner();
    let y = output(&response, "y");
    assert_eq!(y.shape, vec![3, 1]);
    assert_eq!(y.to_values::<f32>().unwrap(), vec![3.0, 5.0, 8.0]);
    let spec = response.model_spec.clone().unwrap();
    assert_eq!(spec.name, "tiny");
    assert_eq!(spec.signature_name, "serving_default");
    assert_eq!(served_version(&response), 1);
    // Typed fields by default: TF Serving clients read float_val directly.
    assert_eq!(response.outputs["y"].float_val, vec![3.0, 5.0, 8.0]);
    assert!(response.outputs["y"].tensor_content.is_empty());
}

#[tokio::test]
async fn mlp_versions_labels_and_softmax() {
    let (server, _dir) = fixture_server(&[]).await;
    // Available means one version is; the policy serves both, loaded one by one.
    let models = server.models().await;
    for version in [1, 2] {
        let available = modelgate::proto::serving::model_version_status::State::Available;
        wait_for_state(&models, "mlp", version, available).await;
    }
    let mut client = server.prediction().await;
    let batch = floats(&[4, 784], &images(4));
    let run = |spec| predict(spec, vec![("images", batch.clone())]);

    let latest = client.predict(run(spec("mlp"))).await.unwrap().into_inner();
    assert_eq!(served_version(&latest), 2, "no version means the latest");
    let probabilities = output(&latest, "probabilities").to_values::<f32>().unwrap();
    assert_eq!(probabilities.len(), 40);
    for row in probabilities.chunks(10) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
        assert!(row.iter().all(|&p| p > 0.0));
    }
    assert_eq!(output(&latest, "logits").shape, vec![4, 10]);

    let v1 = client
        .predict(run(spec_version("mlp", 1)))
        .await
        .unwrap()
        .into_inner();
    let stable = client
        .predict(run(spec_label("mlp", "stable")))
        .await
        .unwrap()
        .into_inner();
    let canary = client
        .predict(run(spec_label("mlp", "canary")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served_version(&v1), 1);
    assert_eq!(served_version(&stable), 1);
    assert_eq!(served_version(&canary), 2);
    assert_eq!(
        output(&v1, "probabilities"),
        output(&stable, "probabilities")
    );
    assert_eq!(
        output(&canary, "probabilities"),
        output(&latest, "probabilities")
    );
    assert_ne!(
        output(&v1, "probabilities"),
        output(&latest, "probabilities")
    );

    // Version 1 returns a tuple and version 2 a dict: both map onto the same names.
    let filtered = client
        .predict(PredictRequest {
            output_filter: vec!["logits".into()],
            ..run(spec_version("mlp", 1))
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.outputs.keys().collect::<Vec<_>>(), vec!["logits"]);
}

#[tokio::test]
async fn every_dtype_round_trips() {
    let (server, _dir) = fixture_server(&[]).await;
    let mut client = server.prediction().await;
    for dtype in DType::ALL {
        // Bytes that are valid values in every dtype (bools must be 0 or 1).
        let data: Vec<u8> = (0..6 * dtype.size()).map(|i| (i % 2) as u8).collect();
        let tensor = Tensor::new(dtype, vec![2, 3], Bytes::from(data)).unwrap();
        for as_content in [false, true] {
            let request = predict(
                spec_signature("echo", dtype.numpy_name()),
                vec![("x", tensor_to_proto(&tensor, as_content))],
            );
            let response = client
                .predict(request)
                .await
                .unwrap_or_else(|e| panic!("{dtype} content={as_content}: {e}"))
                .into_inner();
            assert_eq!(
                output(&response, "y"),
                tensor,
                "{dtype} content={as_content}"
            );
        }
    }
}

#[tokio::test]
async fn tensor_content_serialization_flag() {
    let (server, _dir) = fixture_server(&["--enable_serialization_as_tensor_content"]).await;
    let mut client = server.prediction().await;
    let response = client
        .predict(predict(
            spec("tiny"),
            vec![("x", floats(&[2, 1], &[0.5, -1.0]))],
        ))
        .await
        .unwrap()
        .into_inner();
    let y = &response.outputs["y"];
    assert!(y.float_val.is_empty());
    assert_eq!(y.tensor_content.len(), 8);
    assert_eq!(
        output(&response, "y").to_values::<f32>().unwrap(),
        vec![2.0, -1.0]
    );
}

#[tokio::test]
async fn single_value_broadcasts_like_tensorflow() {
    let (server, _dir) = fixture_server(&[]).await;
    let mut client = server.prediction().await;
    let response = client
        .predict(predict(spec("tiny"), vec![("x", floats(&[3, 1], &[4.0]))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        output(&response, "y").to_values::<f32>().unwrap(),
        vec![9.0; 3]
    );
}

#[tokio::test]
async fn dict_outputs_and_several_inputs() {
    let (server, _dir) = fixture_server(&[]).await;
    let mut client = server.prediction().await;
    let response = client
        .predict(predict(
            spec("multi"),
            vec![
                ("a", floats(&[1, 3], &[1.0, 2.0, 3.0])),
                ("b", floats(&[1, 3], &[10.0, 20.0, 30.0])),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        output(&response, "sum").to_values::<f32>().unwrap(),
        vec![11.0, 22.0, 33.0]
    );
    assert_eq!(
        output(&response, "product").to_values::<f32>().unwrap(),
        vec![10.0, 40.0, 90.0]
    );
}

#[tokio::test]
async fn messages_larger_than_tonic_default_limit() {
    let (server, _dir) = fixture_server(&[]).await;
    let mut client = server.prediction().await;
    // 2,000 rows x 784 floats = 6.3 MB, over tonic's 4 MiB default.
    let response = client
        .predict(predict(
            spec("mlp"),
            vec![("images", floats(&[2000, 784], &images(2000)))],
        ))
        .await
        .expect("large request")
        .into_inner();
    assert_eq!(output(&response, "probabilities").shape, vec![2000, 10]);
}

#[tokio::test]
async fn metadata_returns_the_signature_defs() {
    let (server, _dir) = fixture_server(&[]).await;
    let mut client = server.prediction().await;
    let response = client
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: Some(spec("mlp")),
            metadata_field: vec!["signature_def".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let any = &response.metadata["signature_def"];
    assert_eq!(
        any.type_url,
        "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    );
    let map = SignatureDefMap::decode(any.value.as_slice()).unwrap();
    let default = &map.signature_def["serving_default"];
    assert_eq!(default.method_name, "tensorflow/serving/predict");
    let images = &default.inputs["images"];
    assert_eq!(images.dtype, DataType::DtFloat as i32);
    assert_eq!(dims(images.tensor_shape.as_ref().unwrap()), vec![-1, 784]);
    let mut outputs: Vec<_> = default.outputs.keys().cloned().collect();
    outputs.sort();
    assert_eq!(outputs, vec!["logits", "probabilities"]);
    assert_eq!(
        map.signature_def["classify"].method_name,
        "tensorflow/serving/classify"
    );

    let missing_field = client
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: Some(spec("mlp")),
            metadata_field: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(missing_field.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn status_reports_states_and_load_errors() {
    let fixtures = fixtures();
    let dir = TempDir::new("status");
    let config = write_config(
        &dir.0,
        &[
            ("tiny", fixtures.join("tiny"), ""),
            ("corrupt", fixtures.join("corrupt"), ""),
            ("savedmodel", fixtures.join("savedmodel"), ""),
            (
                "scaled",
                fixtures.join("scaled"),
                "model_version_policy { all {} }",
            ),
        ],
    );
    let rest_port = free_port();
    let server = Server::start(&[
        &format!("--model_config_file={}", config.display()),
        &format!("--rest_api_port={rest_port}"),
    ]);
    server.wait_available(&["tiny", "scaled"]).await;
    let mut models = server.models().await;
    // Available means one version is; the policy serves all three, loaded one by one.
    for version in 1..=3 {
        wait_for_state(
            &models,
            "scaled",
            version,
            modelgate::proto::serving::model_version_status::State::Available,
        )
        .await;
    }
    let status = |model: &str| GetModelStatusRequest {
        model_spec: Some(spec(model)),
    };

    let scaled = models
        .get_model_status(status("scaled"))
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<(i64, i32)> = scaled
        .model_version_status
        .iter()
        .map(|v| (v.version, v.state))
        .collect();
    assert_eq!(versions, vec![(1, 30), (2, 30), (3, 30)], "all AVAILABLE");
    assert!(scaled
        .model_version_status
        .iter()
        .all(|v| v.status.as_ref().unwrap().error_code == 0));

    // Failed versions are END with the reason; loading is not retried in a loop.
    let what = server.awaiting("corrupt and savedmodel to be END");
    let (corrupt, savedmodel) = wait_for(what, || {
        let mut models = models.clone();
        async move {
            let corrupt = models.get_model_status(status("corrupt")).await.ok()?;
            let savedmodel = models.get_model_status(status("savedmodel")).await.ok()?;
            let (c, s) = (corrupt.into_inner(), savedmodel.into_inner());
            let end = |v: &[ModelVersionStatus]| v.first().is_some_and(|v| v.state == 50);
            (end(&c.model_version_status) && end(&s.model_version_status)).then_some((c, s))
        }
    })
    .await;
    let corrupt_status = corrupt.model_version_status[0].status.clone().unwrap();
    // tensorflow.error.Code: the file is wrong (INVALID_ARGUMENT), or no model is there
    // (NOT_FOUND).
    assert_eq!(corrupt_status.error_code, 3, "{corrupt_status:?}");
    assert!(
        corrupt_status.error_message.contains("model.pt"),
        "{corrupt_status:?}"
    );
    let saved_status = savedmodel.model_version_status[0].status.clone().unwrap();
    assert!(
        saved_status.error_message.contains("TensorFlow SavedModel"),
        "{saved_status:?}"
    );
    assert_eq!(saved_status.error_code, 5, "{saved_status:?}");

    // The healthy models keep serving, and readiness names what is missing.
    let mut client = server.prediction().await;
    client
        .predict(predict(spec("tiny"), vec![("x", floats(&[1, 1], &[1.0]))]))
        .await
        .expect("tiny still serves");
    let (code, ready) = server.http_get("/readyz").await;
    assert_eq!(code, 503, "{ready}");
    assert!(
        ready.contains("corrupt") && ready.contains("savedmodel"),
        "{ready}"
    );
    assert!(!ready.contains("\"tiny\""), "{ready}");
    let (code, health) = server.http_get("/healthz").await;
    assert_eq!(code, 200, "{health}");

    // Unknown model / version.
    assert_eq!(
        models
            .get_model_status(status("nope"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let one = GetModelStatusRequest {
        model_spec: Some(spec_version("scaled", 9)),
    };
    assert_eq!(
        models.get_model_status(one).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn errors_carry_tf_serving_codes() {
    let (server, _dir) = fixture_server(&[]).await;
    let mut client = server.prediction().await;
    let x = || floats(&[1, 1], &[1.0]);
    let cases: Vec<(&str, PredictRequest, Code, &str)> = vec![
        (
            "unknown model",
            predict(spec("nope"), vec![("x", x())]),
            Code::NotFound,
            "'nope'",
        ),
        (
            "unknown version",
            predict(spec_version("tiny", 99), vec![("x", x())]),
            Code::NotFound,
            "99",
        ),
        (
            "unknown label",
            predict(spec_label("mlp", "beta"), vec![("x", x())]),
            Code::InvalidArgument,
            "'beta'",
        ),
        (
            "unknown signature",
            predict(spec_signature("tiny", "nope"), vec![("x", x())]),
            Code::FailedPrecondition,
            "'nope'",
        ),
        (
            // The signature is looked up before any input's dtype is read.
            "unknown signature, unservable input",
            predict(
                spec_signature("tiny", "nope"),
                vec![(
                    "x",
                    TensorProto {
                        dtype: DataType::DtString as i32,
                        ..x()
                    },
                )],
            ),
            Code::FailedPrecondition,
            "'nope'",
        ),
        (
            "missing input",
            predict(spec("tiny"), vec![]),
            Code::InvalidArgument,
            "'x' is missing",
        ),
        (
            "extra input",
            predict(spec("tiny"), vec![("x", x()), ("z", x())]),
            Code::InvalidArgument,
            "'z'",
        ),
        (
            "wrong dtype",
            predict(
                spec("tiny"),
                vec![(
                    "x",
                    TensorProto {
                        dtype: DataType::DtInt32 as i32,
                        tensor_shape: shape(&[1, 1]),
                        int_val: vec![1],
                        ..Default::default()
                    },
                )],
            ),
            Code::InvalidArgument,
            "DT_INT32",
        ),
        (
            "shape mismatch",
            predict(spec("tiny"), vec![("x", floats(&[2], &[1.0, 2.0]))]),
            Code::InvalidArgument,
            "'x' has shape [2]",
        ),
        (
            "tensor_content length",
            predict(
                spec("tiny"),
                vec![(
                    "x",
                    TensorProto {
                        dtype: DataType::DtFloat as i32,
                        tensor_shape: shape(&[2, 1]),
                        tensor_content: Bytes::from_static(&[0; 5]),
                        ..Default::default()
                    },
                )],
            ),
            Code::InvalidArgument,
            "tensor_content has 5 bytes",
        ),
        (
            "too few values",
            predict(spec("tiny"), vec![("x", floats(&[3, 1], &[1.0, 2.0]))]),
            Code::InvalidArgument,
            "'x'",
        ),
        (
            "ragged batch",
            predict(
                spec("multi"),
                vec![
                    ("a", floats(&[2, 3], &[1.0; 6])),
                    ("b", floats(&[1, 3], &[1.0; 3])),
                ],
            ),
            Code::InvalidArgument,
            "batch sizes",
        ),
        (
            "unknown output filter",
            PredictRequest {
                output_filter: vec!["nope".into()],
                ..predict(spec("tiny"), vec![("x", x())])
            },
            Code::InvalidArgument,
            "'nope'",
        ),
        (
            "duplicate output filter",
            PredictRequest {
                output_filter: vec!["y".into(), "y".into()],
                ..predict(spec("tiny"), vec![("x", x())])
            },
            Code::InvalidArgument,
            "'y' more than once",
        ),
        (
            "model throws",
            predict(spec("faulty"), vec![("x", floats(&[1, 2], &[1.0, -1.0]))]),
            Code::Internal,
            "negative input",
        ),
        (
            "no model spec",
            PredictRequest::default(),
            Code::InvalidArgument,
            "model_spec",
        ),
    ];
    for (what, request, code, needle) in cases {
        let status = client.predict(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(
            status.message().contains(needle),
            "{what}: '{}' lacks {needle}",
            status.message()
        );
    }
    // None of that hurt the server.
    let ok = client
        .predict(predict(
            spec("faulty"),
            vec![("x", floats(&[1, 2], &[1.0, 2.0]))],
        ))
        .await
        .expect("faulty serves valid input")
        .into_inner();
    assert_eq!(output(&ok, "y").to_values::<f32>().unwrap(), vec![2.0, 3.0]);
}

#[tokio::test]
async fn single_model_mode_and_tf_serving_flags() {
    let base = fixtures().join("tiny");
    let server = Server::start(&[
        "--model_name=tiny",
        &format!("--model_base_path={}", base.display()),
        "--tensorflow_intra_op_parallelism=2",
        "--grpc_max_threads",
        "16",
        "--device=cpu",
    ]);
    server.wait_available(&["tiny"]).await;
    assert!(server
        .log()
        .contains("ignoring TF Serving flag --tensorflow_intra_op_parallelism"));
    assert!(server
        .log()
        .contains("ignoring TF Serving flag --grpc_max_threads"));
    let mut client = server.prediction().await;
    let response = client
        .predict(predict(spec("tiny"), vec![("x", floats(&[1, 1], &[10.0]))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        output(&response, "y").to_values::<f32>().unwrap(),
        vec![21.0]
    );
}

#[test]
fn bad_flags_and_configs_fail_at_start_with_a_clear_message() {
    let (ok, stderr) = run_to_exit(&["--prot=1"]);
    assert!(!ok && stderr.contains("--prot"), "{stderr}");
    let dir = TempDir::new("badconfig");
    let config = dir.0.join("bad.config");
    std::fs::write(
        &config,
        "model_config_list { config { name: \"a\" base_pth: \"/x\" } }",
    )
    .unwrap();
    let (ok, stderr) = run_to_exit(&[
        "--port=0",
        "--rest_api_port=0",
        &format!("--model_config_file={}", config.display()),
    ]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("line 1") && stderr.contains("base_pth"),
        "{stderr}"
    );
    let (ok, stderr) = run_to_exit(&["--port=0"]);
    assert!(!ok && stderr.contains("--model_config_file"), "{stderr}");
}

#[tokio::test]
async fn grpc_health_follows_readiness() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let (server, _dir) = fixture_server(&[]).await;
    let health = HealthClient::new(server.channel().await);
    for service in [
        "",
        "tensorflow.serving.PredictionService",
        "PredictionService",
        "ModelService",
    ] {
        let what = server.awaiting(format!("gRPC health of '{service}' to be SERVING"));
        wait_for(what, || {
            let mut health = health.clone();
            async move {
                let status = health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                matches!(status, Ok(1)).then_some(()) // SERVING
            }
        })
        .await;
    }
}
