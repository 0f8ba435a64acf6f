//! The hostile battery: one real server, both ports, and every kind of request an attacker
//! (or a broken client) can send. After each attack the server must be alive, still answer
//! a correct Predict with the right numbers, and its resident memory must have stayed
//! within `RSS_HEADROOM` of what it used once warm.
//!
//! The server runs with `--max_request_tensor_bytes=8 MiB` and `--rest_api_max_body_bytes=
//! 4 MiB`, so that every bound is crossed by requests a test can send quickly; the same
//! code guards the defaults (1 GiB and 256 MiB).

pub mod common;

use bytes::Bytes;
use common::{spec, spec_signature, Server, TempDir};
use modelgate::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use modelgate::proto::inference::infer_parameter::ParameterChoice;
use modelgate::proto::inference::model_infer_request::InferInputTensor;
use modelgate::proto::inference::{InferParameter, InferTensorContents, ModelInferRequest};
use modelgate::proto::serving::{
    input, ClassificationRequest, ExampleListWithContext, Input, PredictRequest, RegressionRequest,
};
use modelgate::proto::tensor::{dims, shape_proto};
use modelgate::proto::tensorflow::{
    feature, DataType, Example, Feature, Features, FloatList, TensorProto,
};
use prost::Message;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::Code;

/// What one request may decode to on the battery's server.
const MAX_TENSOR_BYTES: usize = 8 << 20;
/// The largest REST body on the battery's server.
const MAX_BODY_BYTES: usize = 4 << 20;
/// How far resident memory may grow over the whole battery, beyond the server's RSS once
/// warm: every attack is refused before it allocates, so what remains is buffers (HTTP/2
/// windows, the largest legitimate requests of the battery: 8 MB) and allocator slack.
const RSS_HEADROOM: u64 = 256 << 20;

struct Battery {
    server: Server,
    baseline_rss: u64,
    _params: TempDir,
}

impl Battery {
    async fn start() -> Battery {
        let params = TempDir::new("hostile");
        let path = params.path().join("batching.pbtxt");
        std::fs::write(
            &path,
            "max_batch_size { value: 16 } batch_timeout_micros { value: 0 } \
             allowed_batch_sizes: 16",
        )
        .expect("write batching parameters");
        // A regress signature whose examples may have any width: the kind a context can be
        // copied into a million times (scaled's module, y = 3x, under another signature).
        let wide = params.path().join("wide");
        std::fs::create_dir_all(wide.join("1")).expect("version directory");
        std::fs::copy(
            common::fixtures().join("scaled/3/model.pt"),
            wide.join("1/model.pt"),
        )
        .expect("copy the scaled module");
        std::fs::write(
            wide.join("1/signature.json"),
            r#"{"signatures": {"serving_default": {"method_name": "tensorflow/serving/regress",
                "inputs": [{"name": "x", "dtype": "DT_FLOAT", "shape": [-1, -1]}],
                "outputs": [{"name": "outputs", "dtype": "DT_FLOAT", "shape": [-1, -1]}]}}}"#,
        )
        .expect("write signature.json");
        let fixtures = common::fixtures();
        let models = ["tiny", "scaled", "regressor", "echo"].map(|name| fixtures.join(name));
        // An AOTInductor package (two inputs, batches 1..1024), which checks nothing itself.
        let pair = common::pt2_fixtures().join("pair");
        let server = Server::with_config(
            &common::model_config(&[
                ("tiny", &models[0], ""),
                ("scaled", &models[1], ""),
                ("regressor", &models[2], ""),
                ("echo", &models[3], ""),
                ("wide", &wide, ""),
                ("pair", &pair, ""),
            ]),
            &[
                "--enable_batching",
                &format!("--batching_parameters_file={}", path.display()),
                &format!("--max_request_tensor_bytes={MAX_TENSOR_BYTES}"),
                &format!("--rest_api_max_body_bytes={MAX_BODY_BYTES}"),
            ],
        );
        server
            .wait_available(&["tiny", "scaled", "regressor", "echo", "wide", "pair"])
            .await;
        let mut battery = Battery {
            baseline_rss: 0,
            server,
            _params: params,
        };
        battery.check_alive("start").await;
        battery.baseline_rss = battery.rss();
        battery
    }

    /// The server's resident set size, from /proc.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.server.pid()))
            .unwrap_or_else(|e| panic!("the server is gone: {e}\n{}", self.server.log()));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("VmRSS in /proc/PID/status")
    }

    /// The server is alive, answers a correct Predict over gRPC and REST with the right
    /// numbers, and its memory stayed within bounds.
    async fn check_alive(&self, after: &str) {
        let mut client = self.server.prediction().await;
        let (_, y) = common::predict(&mut client, spec("tiny"), &[1.0])
            .await
            .unwrap_or_else(|e| {
                panic!("after {after}: Predict failed: {e}\n{}", self.server.log())
            });
        assert_eq!(y, vec![3.0], "after {after}");
        let (status, body) = rest(
            &self.server,
            "/v1/models/tiny:predict",
            r#"{"instances": [[2.0]]}"#,
        )
        .await
        .unwrap_or_else(|e| panic!("after {after}: REST failed: {e}"));
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"predictions": [[5.0]]}"#),
            "after {after}"
        );
        if self.baseline_rss > 0 {
            let rss = self.rss();
            eprintln!(
                "RSS after {after}: {} MiB (warm: {} MiB)",
                rss >> 20,
                self.baseline_rss >> 20
            );
            assert!(
                rss <= self.baseline_rss + RSS_HEADROOM,
                "after {after}: RSS {rss} bytes, more than {} above the warm server's {}",
                RSS_HEADROOM,
                self.baseline_rss
            );
        }
    }
}

/// POST `body` to `path` on the REST port: status and body.
async fn rest(
    server: &Server,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> Result<(u16, String), String> {
    let response = reqwest::Client::new()
        .post(server.url(path))
        .body(body)
        .timeout(common::TIMEOUT)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.map_err(|e| e.to_string())?))
}

/// A Predict request with one float input `x` of `shape` on `model`.
fn predict_request(model: &str, shape: &[i64], tensor: TensorProto) -> PredictRequest {
    PredictRequest {
        model_spec: Some(spec(model)),
        inputs: [(
            "x".to_string(),
            TensorProto {
                dtype: DataType::DtFloat as i32,
                tensor_shape: Some(shape_proto(Some(shape))),
                ..tensor
            },
        )]
        .into(),
        ..Default::default()
    }
}

/// A Predict request for the `pair` package: float inputs `a` and `b` of these shapes,
/// filled with ones (as many values as each shape holds, when that is small).
fn pair_request(a: &[i64], b: &[i64]) -> PredictRequest {
    let input = |shape: &[i64]| {
        let count = shape.iter().product::<i64>().clamp(0, 1 << 16) as usize;
        TensorProto {
            dtype: DataType::DtFloat as i32,
            tensor_shape: Some(shape_proto(Some(shape))),
            float_val: vec![1.0; count],
            ..Default::default()
        }
    };
    PredictRequest {
        model_spec: Some(spec("pair")),
        inputs: [("a".to_string(), input(a)), ("b".to_string(), input(b))].into(),
        ..Default::default()
    }
}

/// Sends `request` and expects it refused with `code` and a message containing `needle`.
async fn expect_refused(server: &Server, request: PredictRequest, code: Code, needle: &str) {
    let mut client = server.prediction().await;
    let status = client.predict(request).await.expect_err("refused");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "{} should say {needle}",
        status.message()
    );
}

/// One raw gRPC call on a fresh HTTP/2 connection: the message bytes as given (prefixed
/// with gRPC's 5-byte frame header, whose length may lie), then the grpc-status.
async fn raw_grpc(addr: SocketAddr, path: &str, declared_len: u32, message: &[u8]) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("h2 ready");
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut stream) = client.send_request(request, false).expect("send");
    let mut frame = vec![0u8];
    frame.extend_from_slice(&declared_len.to_be_bytes());
    frame.extend_from_slice(message);
    stream.send_data(Bytes::from(frame), true).expect("data");
    let response = response.await.expect("response");
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().unwrap_or_default().to_string();
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    trailers
        .get("grpc-status")
        .map(|s| s.to_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

const PREDICT_PATH: &str = "/tensorflow.serving.PredictionService/Predict";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_survives_the_hostile_battery() {
    let battery = Battery::start().await;
    let server = &battery.server;

    // Malformed protobuf, and frames whose length prefix lies.
    let garbage: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(151)).collect();
    let status = raw_grpc(server.grpc, PREDICT_PATH, garbage.len() as u32, &garbage).await;
    assert_ne!(status, "0", "garbage decoded as a request");
    let valid = predict_request(
        "tiny",
        &[1, 1],
        TensorProto {
            float_val: vec![1.0],
            ..Default::default()
        },
    );
    let bytes = valid.encode_to_vec();
    let status = raw_grpc(server.grpc, PREDICT_PATH, bytes.len() as u32 + 1000, &bytes).await;
    assert_ne!(status, "0", "a short frame was answered as complete");
    let status = raw_grpc(server.grpc, PREDICT_PATH, u32::MAX, &bytes).await;
    assert_ne!(status, "0");
    battery.check_alive("malformed protobuf").await;

    // Lying shapes and byte counts.
    let lying_content = predict_request(
        "tiny",
        &[4, 1],
        TensorProto {
            tensor_content: Bytes::from_static(&[0; 12]),
            ..Default::default()
        },
    );
    expect_refused(
        server,
        lying_content,
        Code::InvalidArgument,
        "tensor_content has 12 bytes",
    )
    .await;
    let too_few = predict_request(
        "tiny",
        &[3, 1],
        TensorProto {
            float_val: vec![1.0, 2.0],
            ..Default::default()
        },
    );
    expect_refused(
        server,
        too_few,
        Code::InvalidArgument,
        "2 float_val value(s)",
    )
    .await;
    let negative = predict_request("tiny", &[-5, 1], TensorProto::default());
    expect_refused(server, negative, Code::InvalidArgument, "").await;
    // A bool byte other than 0 or 1 (echo's `bool` signature takes a DT_BOOL `x`).
    let not_a_bool = PredictRequest {
        model_spec: Some(spec_signature("echo", "bool")),
        inputs: [(
            "x".to_string(),
            TensorProto {
                dtype: DataType::DtBool as i32,
                tensor_shape: Some(shape_proto(Some(&[1, 3]))),
                tensor_content: Bytes::from_static(&[1, 0, 2]),
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    };
    expect_refused(
        server,
        not_a_bool,
        Code::InvalidArgument,
        "element 2 is the byte 2",
    )
    .await;
    battery.check_alive("lying shapes").await;

    // An AOTInductor package runs whatever it is given (a float64 input to a float32
    // model, a batch past its export's range): the server checks every request first.
    let mut client = server.prediction().await;
    let answer = client.predict(pair_request(&[2, 3], &[2, 1])).await;
    assert!(answer.is_ok(), "{answer:?}");
    for (a, b, needle) in [
        (vec![0, 3], vec![0, 1], "0 rows"),
        (vec![1025, 3], vec![1025, 1], "1025"),
        (vec![2, 3], vec![3, 1], "different batch sizes"),
        (vec![2, 4], vec![2, 1], "[2, 4]"),
        (vec![3], vec![1], "[3]"),
        (vec![2, 3, 1], vec![2, 1], "[2, 3, 1]"),
        (vec![1 << 40, 3], vec![1 << 40, 1], ""),
    ] {
        expect_refused(server, pair_request(&a, &b), Code::InvalidArgument, needle).await;
    }
    let mut doubles = pair_request(&[2, 3], &[2, 1]);
    let a = doubles.inputs.get_mut("a").expect("input a");
    a.dtype = DataType::DtDouble as i32;
    a.double_val = std::mem::take(&mut a.float_val)
        .into_iter()
        .map(f64::from)
        .collect();
    expect_refused(server, doubles, Code::InvalidArgument, "").await;
    let mut missing = pair_request(&[2, 3], &[2, 1]);
    missing.inputs.remove("b");
    expect_refused(server, missing, Code::InvalidArgument, "'b'").await;
    battery
        .check_alive("requests an AOTInductor package would run unchecked")
        .await;

    // Huge declared dimensions with tiny payloads: refused before anything is built.
    let overflow = predict_request(
        "scaled",
        &[1 << 40, 1 << 40],
        TensorProto {
            float_val: vec![1.0],
            ..Default::default()
        },
    );
    expect_refused(server, overflow, Code::InvalidArgument, "").await;
    let broadcast = predict_request(
        "scaled",
        &[1, 1 << 28],
        TensorProto {
            float_val: vec![1.0],
            ..Default::default()
        },
    );
    expect_refused(
        server,
        broadcast,
        Code::InvalidArgument,
        "max_request_tensor_bytes",
    )
    .await;
    // Zero rows beside a huge free dimension, on a batching signature with allowed batch
    // sizes: once padded to 4 rows of 2^60 bytes (issue 10, bug 1). Now: no rows, no
    // padding, an empty answer.
    let mut client = server.prediction().await;
    let empty = predict_request("scaled", &[0, (1 << 58) - 1], TensorProto::default());
    let answer = client
        .predict(empty)
        .await
        .expect("zero rows answer")
        .into_inner();
    let y = &answer.outputs["y"];
    assert_eq!(
        dims(y.tensor_shape.as_ref().expect("shape")),
        vec![0, (1 << 58) - 1]
    );
    battery.check_alive("huge declared dimensions").await;

    // Broadcast bombs: many inputs, each one value declared as 1 GiB. Names outside the
    // signature are refused before any is decoded; names inside it hit the request's budget.
    let mut bomb = predict_request(
        "tiny",
        &[1, 1],
        TensorProto {
            float_val: vec![1.0],
            ..Default::default()
        },
    );
    for i in 0..16 {
        bomb.inputs.insert(
            format!("bomb{i}"),
            TensorProto {
                dtype: DataType::DtFloat as i32,
                tensor_shape: Some(shape_proto(Some(&[1 << 28]))),
                float_val: vec![1.0],
                ..Default::default()
            },
        );
    }
    expect_refused(
        server,
        bomb,
        Code::InvalidArgument,
        "is not an input of signature",
    )
    .await;
    let int8_bomb = PredictRequest {
        model_spec: Some(spec("tiny")),
        inputs: [(
            "x".to_string(),
            TensorProto {
                dtype: DataType::DtInt8 as i32,
                tensor_shape: Some(shape_proto(Some(&[1 << 30, 1]))),
                int_val: vec![1],
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    };
    expect_refused(server, int8_bomb, Code::InvalidArgument, "DT_INT8").await;
    battery.check_alive("broadcast bombs").await;

    // Padding up to an allowed batch size counts against the budget: one 1 MB row would
    // be padded to 16 rows (16 MB, more than 8 MiB and than 8 x what it sent); sixteen
    // such rows need no padding and run.
    let rows = |rows: usize| {
        let values = vec![0.5f32; rows * 250_000];
        let content: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        predict_request(
            "scaled",
            &[rows as i64, 250_000],
            TensorProto {
                tensor_content: Bytes::from(content),
                ..Default::default()
            },
        )
    };
    expect_refused(
        server,
        rows(1),
        Code::InvalidArgument,
        "padded to the allowed batch size 16",
    )
    .await;
    let answer = client
        .predict(rows(16))
        .await
        .expect("sixteen rows need no padding");
    let y = &answer.into_inner().outputs["y"];
    assert_eq!(
        dims(y.tensor_shape.as_ref().expect("shape")),
        vec![16, 250_000]
    );
    battery.check_alive("padding").await;

    // tf.Example context amplification: a million empty examples (2 MB) and a context of
    // 10,000 floats (40 KB) ask for 40 GB; over Regress, Classify's tasks, and REST.
    let context_bomb = |examples: usize, width: usize| Input {
        kind: Some(input::Kind::ExampleListWithContext(
            ExampleListWithContext {
                examples: vec![Example::default(); examples],
                context: Some(Example {
                    features: Some(Features {
                        feature: [(
                            "x".to_string(),
                            Feature {
                                kind: Some(feature::Kind::FloatList(FloatList {
                                    value: vec![1.0; width],
                                })),
                            },
                        )]
                        .into(),
                    }),
                }),
            },
        )),
    };
    for model in ["wide", "regressor"] {
        let status = client
            .regress(RegressionRequest {
                model_spec: Some(spec(model)),
                input: Some(context_bomb(
                    1_000_000,
                    if model == "wide" { 10_000 } else { 3 },
                )),
            })
            .await
            .expect_err("context bomb refused");
        // The fixed-width regressor takes 12 bytes per 2-byte example, within 8 x what was
        // sent: refused for its rows, not its bytes.
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        if model == "wide" {
            let message = status.message();
            assert!(message.contains("max_request_tensor_bytes"), "{message}");
        }
    }
    let status = client
        .classify(ClassificationRequest {
            model_spec: Some(spec_signature("regressor", "classify")),
            input: Some(context_bomb(1_000_000, 3)),
        })
        .await
        .expect_err("context bomb refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    let small = client
        .regress(RegressionRequest {
            model_spec: Some(spec("regressor")),
            input: Some(context_bomb(3, 3)),
        })
        .await
        .expect("a small context serves");
    assert_eq!(
        small.into_inner().result.expect("result").regressions.len(),
        3
    );
    battery.check_alive("tf.Example contexts").await;

    // REST: deep JSON, huge JSON, bodies over the limit, JSON that is not an object.
    let deep = format!(
        "{{\"instances\": {}1{}}}",
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    let (status, _) = rest(server, "/v1/models/tiny:predict", deep)
        .await
        .expect("deep JSON");
    assert_eq!(status, 400);
    let wide = format!("{{\"instances\": [[{}]]}}", vec!["1"; 1_000_000].join(","));
    let (status, body) = rest(server, "/v1/models/tiny:predict", wide)
        .await
        .expect("wide JSON");
    assert_eq!(status, 400, "{body}");
    let oversized = vec![b' '; MAX_BODY_BYTES + 1];
    let (status, _) = rest(server, "/v1/models/tiny:predict", oversized)
        .await
        .expect("big body");
    assert_eq!(status, 413);
    let examples = format!(
        "{{\"context\": {{\"x\": [{}]}}, \"examples\": [{}]}}",
        vec!["1.5"; 10_000].join(","),
        vec!["{}"; 900_000].join(",")
    );
    let (status, body) = rest(server, "/v1/models/wide:regress", examples)
        .await
        .expect("REST context bomb");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("max_request_tensor_bytes"), "{body}");
    battery.check_alive("hostile JSON").await;

    // Slow clients: a byte at a time on both ports while others are served.
    let slow_rest = slow_writer(
        server.rest_addr(),
        b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 25\r\n\r\n{\"instances\": [[1.0]]}",
    );
    let slow_grpc = slow_writer(
        server.grpc,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    );
    for round in 0..5 {
        battery
            .check_alive(&format!("slow clients, round {round}"))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    slow_rest.abort();
    slow_grpc.abort();

    // Half-closed and idle connections: many sockets that send part of a request and stop.
    let mut held = Vec::new();
    for i in 0..200 {
        let addr = if i % 2 == 0 {
            server.grpc
        } else {
            server.rest_addr()
        };
        let mut socket = std::net::TcpStream::connect(addr).expect("connect");
        let _ = socket.write_all(if i % 2 == 0 {
            b"PRI * HTTP/2.0\r\n"
        } else {
            b"GET /healthz HT"
        });
        let _ = socket.shutdown(std::net::Shutdown::Write);
        held.push(socket);
    }
    battery.check_alive("half-closed connections").await;
    drop(held);

    // Thousands of concurrent streams on one HTTP/2 connection.
    let client = server.prediction().await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..2_000 {
        let mut client = client.clone();
        calls.spawn(async move {
            let x = [i as f32];
            common::predict(&mut client, spec("tiny"), &x)
                .await
                .map(|(_, y)| (y, 2.0 * x[0] + 1.0))
        });
    }
    let mut answered = 0;
    while let Some(call) = calls.join_next().await {
        match call.expect("call task") {
            Ok((y, expected)) => {
                assert_eq!(y, vec![expected]);
                answered += 1;
            }
            // A full queue is the one refusal allowed under this load.
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{}", status.message()),
        }
    }
    assert!(answered > 0, "no stream was answered");
    battery.check_alive("thousands of streams").await;
}

/// Writes `bytes` to `addr` one byte every 20 ms, then holds the connection, until aborted.
fn slow_writer(addr: SocketAddr, bytes: &'static [u8]) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let Ok(mut socket) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        for byte in bytes {
            if socket.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::future::pending::<()>().await;
    })
}

/// A V2 ModelInfer with one FP32 input `x` of `shape`.
fn v2_request(
    model: &str,
    shape: &[i64],
    contents: Option<InferTensorContents>,
    raw: Vec<Bytes>,
) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
            contents,
            ..Default::default()
        }],
        raw_input_contents: raw,
        ..Default::default()
    }
}

/// The V2 protocol on both ports under the same kind of attacks: every lie about shapes
/// and sizes is refused before anything is built, and the server stays alive and correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v2_protocol_survives_the_hostile_battery() {
    let battery = Battery::start().await;
    let server = &battery.server;
    let mut client = GrpcInferenceServiceClient::new(server.channel().await);
    let refused = |request: ModelInferRequest, needle: &'static str| {
        let mut client = client.clone();
        async move {
            let status = client.model_infer(request).await.expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
            assert!(
                status.message().contains(needle),
                "{} should say {needle}",
                status.message()
            );
        }
    };

    // gRPC: dims that overflow, a typed tensor declared far past the budget, raw bytes
    // that do not match the shape, too few typed values, raw entries that do not match
    // the inputs.
    refused(
        v2_request("scaled", &[1 << 40, 1 << 40], None, vec![Bytes::new()]),
        "too many elements",
    )
    .await;
    refused(
        v2_request(
            "scaled",
            &[1, 1 << 28],
            Some(InferTensorContents::default()),
            vec![],
        ),
        "",
    )
    .await;
    refused(
        v2_request("tiny", &[4, 1], None, vec![Bytes::from_static(&[0; 12])]),
        "raw_input_contents has 12 bytes",
    )
    .await;
    let too_few = InferTensorContents {
        fp32_contents: vec![1.0, 2.0],
        ..Default::default()
    };
    refused(
        v2_request("tiny", &[3, 1], Some(too_few), vec![]),
        "fp32_contents holds 2",
    )
    .await;
    refused(
        v2_request("tiny", &[1, 1], None, vec![Bytes::new(), Bytes::new()]),
        "2 entries for 1 inputs",
    )
    .await;
    // A bool byte other than 0 or 1, raw (echo's `bool` signature).
    let mut not_a_bool = v2_request("echo", &[1, 3], None, vec![Bytes::from_static(&[0, 7, 1])]);
    not_a_bool.inputs[0].datatype = "BOOL".into();
    not_a_bool.parameters.insert(
        "signature_name".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam("bool".into())),
        },
    );
    refused(not_a_bool, "element 1 is the byte 7").await;
    // Zero rows with a huge free dimension: nothing to pad, nothing to build.
    let empty = client
        .model_infer(v2_request(
            "scaled",
            &[0, (1 << 58) - 1],
            None,
            vec![Bytes::new()],
        ))
        .await;
    assert!(
        empty.as_ref().map_or_else(
            |s| s.code() == Code::InvalidArgument,
            |r| r.get_ref().outputs[0].shape == [0, (1 << 58) - 1]
        ),
        "{empty:?}"
    );
    battery.check_alive("V2 gRPC lies").await;

    // REST: a header length past the body, binary sizes that lie, more values than the
    // shape, nesting deeper than the parser allows, dims that overflow.
    let infer = |model: &str, json: String, binary: &'static [u8], header_length: Option<usize>| {
        let url = server.url(&format!("/v2/models/{model}/infer"));
        async move {
            let mut body = json.clone().into_bytes();
            body.extend_from_slice(binary);
            let mut request = reqwest::Client::new()
                .post(url)
                .body(body)
                .timeout(common::TIMEOUT);
            if let Some(length) = header_length.or((!binary.is_empty()).then_some(json.len())) {
                request = request.header("Inference-Header-Content-Length", length.to_string());
            }
            let response = request.send().await.expect("an answer");
            (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            )
        }
    };
    let input = |extra: &str| {
        format!(r#"{{"inputs": [{{"name": "x", "shape": [1, 1], "datatype": "FP32"{extra}}}]}}"#)
    };
    for (json, binary, header_length, needle) in [
        (input(r#", "data": [1]"#), &b""[..], Some(1 << 20), "no larger than the body"),
        (input(r#", "parameters": {"binary_data_size": 400}"#), &[0u8; 4][..], None, "binary_data_size 400"),
        (input(r#", "parameters": {"binary_data_size": 4}"#), &[0u8; 8][..], None, "follow the inputs"),
        (input(&format!(r#", "data": [{}]"#, vec!["1"; 100_000].join(","))), &b""[..], None, "more values than the shape holds"),
        (input(&format!(r#", "data": {}{}"#, "[".repeat(100_000), "]".repeat(100_000))), &b""[..], None, "recursion limit"),
        (r#"{"inputs": [{"name": "x", "shape": [1099511627776, 1099511627776], "datatype": "FP32", "data": []}]}"#.to_string(), &b""[..], None, "too many elements"),
    ] {
        // scaled's [-1, -1] lets any dims through to the size check.
        let (status, body) = infer("scaled", json, binary, header_length).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains(needle), "{body} should say {needle}");
    }
    let not_a_bool = r#"{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BOOL",
        "parameters": {"binary_data_size": 3}}], "parameters": {"signature_name": "bool"}}"#;
    let (status, body) = infer("echo", not_a_bool.to_string(), &[1, 1, 255], None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("element 2 is the byte 255"), "{body}");
    let (status, _) = rest(server, "/v2/models/tiny/nothing", "")
        .await
        .expect("an answer");
    assert_eq!(status, 404);
    battery.check_alive("V2 REST lies").await;
}
