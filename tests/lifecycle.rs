//! Probes and shutdown against the real binary: `/healthz`, `/readyz` and gRPC health from
//! start-up (models loading) to ready and through draining; SIGTERM with requests in
//! flight; a second signal; the drain's bound (a health watch, a request that never ends).

pub mod common;

use common::{wait_for, Server, TempDir};
use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::{ModelSpec, PredictRequest};
use modelgate::proto::tensor::tensor_to_proto;
use modelgate::tensor::Tensor;
use std::io::{Read, Write};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The gRPC health of `service`; `None` when the service is unknown (NOT_FOUND).
async fn health(server: &Server, service: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(server.grpc_url())
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// Polls until gRPC health of `service` is `status`.
async fn wait_health(server: &Server, service: &str, status: ServingStatus) {
    let what = server.awaiting(format!("health of '{service}' to become {status:?}"));
    wait_for(what, || async move {
        (health(server, service).await == Some(status)).then_some(())
    })
    .await
}

async fn readyz(server: &Server) -> (u16, serde_json::Value) {
    let response = reqwest::get(server.url("/readyz")).await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().await.unwrap()).unwrap(),
    )
}

/// Copies a version directory under a temporary name, then renames it into place, so
/// the server never sees it half written.
fn publish_version(from: &std::path::Path, base: &std::path::Path, version: u32) {
    let staging = base.join(format!(".staging-{version}"));
    std::fs::create_dir_all(&staging).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), staging.join(entry.file_name())).unwrap();
    }
    std::fs::rename(&staging, base.join(version.to_string())).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_follow_start_up_and_shutdown() {
    let fixtures = common::fixtures();
    // "late" has no version yet: the server is up but not ready until one appears.
    let late = TempDir::new("late");
    let config = common::model_config(&[
        ("tiny", &fixtures.join("tiny"), ""),
        ("late", late.path(), ""),
    ]);
    let mut server = Server::with_config(
        &config,
        &[
            "--file_system_poll_wait_seconds=1",
            "--shutdown_grace_seconds=2",
        ],
    );

    // Liveness at once; readiness says what is missing.
    let healthz = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(healthz.status(), 200);
    wait_health(&server, "tiny", ServingStatus::Serving).await;
    let (status, body) = readyz(&server).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["models_not_ready"],
        serde_json::json!(["late"]),
        "{}",
        server.log()
    );
    assert_eq!(body["draining"], false);
    for service in [
        "",
        "late",
        "tensorflow.serving.PredictionService",
        "ModelService",
    ] {
        assert_eq!(
            health(&server, service).await,
            Some(ServingStatus::NotServing),
            "'{service}'"
        );
    }
    assert_eq!(health(&server, "no_such_model").await, None);

    // A version appears: ready, everywhere.
    publish_version(&fixtures.join("tiny/1"), late.path(), 1);
    server.wait_readyz(200).await;
    let (_, body) = readyz(&server).await;
    assert_eq!(body["ready"], true, "{body}");
    for service in [
        "",
        "late",
        "tiny",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "PredictionService",
        "ModelService",
    ] {
        wait_health(&server, service, ServingStatus::Serving).await;
    }

    // SIGTERM: not ready at once (the grace period keeps the port open), then exit 0.
    server.signal("TERM");
    server.wait_readyz(503).await;
    let (_, body) = readyz(&server).await;
    assert_eq!(body["draining"], true, "{body}");
    for service in ["", "tiny", "late", "PredictionService"] {
        wait_health(&server, service, ServingStatus::NotServing).await;
    }
    let healthz = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(healthz.status(), 200, "alive while draining");
    let status = tokio::task::block_in_place(|| server.wait_exit());
    assert_eq!(status.code(), Some(0), "{}", server.log());
}

fn predict_request(images: &Tensor) -> PredictRequest {
    PredictRequest {
        model_spec: Some(ModelSpec {
            name: "mlp".into(),
            ..Default::default()
        }),
        inputs: [("images".to_string(), tensor_to_proto(images, true))].into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish() {
    let demo = common::demo_models();
    let config = common::model_config(&[("mlp", &demo.join("mlp"), "")]);
    let mut server = Server::with_config_env(
        &config,
        &["--shutdown_grace_seconds=1"],
        &[("MODELGATE_LOG", "info,modelgate::telemetry=debug")],
    );
    server.wait_readyz(200).await;

    // Large batches on one worker: the queue holds work well past the grace period.
    let batch = 2048;
    let values: Vec<f32> = (0..batch * 784).map(|i| (i % 255) as f32 / 255.0).collect();
    let images = Tensor::from_values(vec![batch as i64, 784], &values).unwrap();
    let client = server.prediction().await;
    let grpc_call = |client: &PredictionServiceClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        let request = predict_request(&images);
        tokio::spawn(async move {
            client
                .predict(request)
                .await
                .map(|r| r.into_inner().outputs["probabilities"].float_val.len())
        })
    };
    let rest_body = {
        let row = format!("[{}]", vec!["0.5"; 784].join(","));
        format!("{{\"instances\": [{}]}}", vec![row; 64].join(","))
    };
    let rest_call = || {
        let (url, body) = (server.url("/v1/models/mlp:predict"), rest_body.clone());
        tokio::spawn(async move {
            let response = reqwest::Client::new().post(url).body(body).send().await?;
            let status = response.status().as_u16();
            Ok::<_, reqwest::Error>((status, response.text().await?))
        })
    };

    // A request whose body arrives in two halves stays in flight as long as the test
    // wants: across the end of the grace period, when the servers stop accepting.
    let mut slow = std::net::TcpStream::connect(server.rest_addr()).unwrap();
    let head = format!(
        "POST /v1/models/mlp:predict HTTP/1.1\r\nHost: modelgate\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        rest_body.len()
    );
    let half = rest_body.len() / 2;
    slow.write_all(head.as_bytes()).unwrap();
    slow.write_all(&rest_body.as_bytes()[..half]).unwrap();

    let mut grpc_calls: Vec<_> = (0..16).map(|_| grpc_call(&client)).collect();
    let mut rest_calls: Vec<_> = (0..2).map(|_| rest_call()).collect();
    // Once the first answer is out, the rest are queued or running: in flight.
    tokio::task::block_in_place(|| server.wait_for_log("telemetry: request "));
    server.signal("TERM");
    tokio::task::block_in_place(|| server.wait_for_log("shutting down"));
    // During the grace period: not ready, yet still accepting.
    let (status, body) = readyz(&server).await;
    assert_eq!(status, 503, "{body}");
    grpc_calls.push(grpc_call(&client));
    rest_calls.push(rest_call());

    // Past the grace period the slow request is still in flight; it completes.
    tokio::task::block_in_place(|| {
        server.wait_for_log("grace period over");
        slow.write_all(&rest_body.as_bytes()[half..]).unwrap();
        let mut answer = String::new();
        slow.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{}",
            &answer[..80.min(answer.len())]
        );
        assert!(answer.contains("{\"predictions\": [{\"probabilities\": ["));
    });

    for call in grpc_calls {
        let answer = call.await.unwrap();
        let values = answer.unwrap_or_else(|e| panic!("a gRPC call failed: {e}\n{}", server.log()));
        assert_eq!(values, batch * 10);
    }
    for call in rest_calls {
        let (status, text) = call.await.unwrap().unwrap();
        assert_eq!(status, 200, "{text}");
        assert!(
            text.starts_with("{\"predictions\": [{\"probabilities\": ["),
            "{}",
            &text[..50.min(text.len())]
        );
    }
    let status = tokio::task::block_in_place(|| server.wait_exit());
    assert_eq!(status.code(), Some(0), "{}", server.log());
    let log = server.log();
    let order = [
        "shutting down",
        "grace period over",
        "unloading models",
        // The workers have exited and freed the module before the process says it stopped.
        " unloaded ",
        "stopped",
    ]
    .map(|step| {
        log.find(step)
            .unwrap_or_else(|| panic!("no '{step}' in log:\n{log}"))
    });
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let fixtures = common::fixtures();
    let config = common::model_config(&[("tiny", &fixtures.join("tiny"), "")]);
    let mut server = Server::with_config(&config, &["--shutdown_grace_seconds=600"]);
    server.wait_readyz(200).await;
    server.signal("TERM");
    tokio::task::block_in_place(|| server.wait_for_log("shutting down"));
    server.signal("INT");
    let status = tokio::task::block_in_place(|| server.wait_exit());
    assert_eq!(status.code(), Some(130), "{}", server.log());
    assert!(server.log().contains("second signal"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watch_does_not_hold_the_process_up() {
    let config = common::fixture_config(&["tiny"]);
    // A drain limit far past the harness's patience: the process can exit in time only if
    // the watch stream ends.
    let mut server = Server::with_config(
        &config,
        &[
            "--shutdown_grace_seconds=1",
            "--shutdown_drain_seconds=3600",
        ],
    );
    wait_health(&server, "", ServingStatus::Serving).await;
    let channel = server.channel().await;
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || {
        let message = watch.message().await?.expect("the stream goes on");
        Ok::<_, tonic::Status>(ServingStatus::try_from(message.status).unwrap())
    };
    assert_eq!(next_status().await.unwrap(), ServingStatus::Serving);

    server.signal("TERM");
    // NOT_SERVING while draining; once the server stops accepting, the watch ends:
    // UNAVAILABLE, retry elsewhere.
    let end = loop {
        match next_status().await {
            Ok(status) => assert_eq!(status, ServingStatus::NotServing),
            Err(end) => break end,
        }
    };
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    let status = tokio::task::block_in_place(|| server.wait_exit());
    assert_eq!(status.code(), Some(0), "{}", server.log());
    drop(channel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_finishes_is_cut_at_the_drain_limit() {
    let config = common::fixture_config(&["tiny"]);
    let mut server = Server::with_config(
        &config,
        &[
            "--shutdown_grace_seconds=0",
            "--shutdown_drain_seconds=1",
            // No REST timeout: only the drain limit ends the request below.
            "--rest_api_timeout_in_ms=0",
        ],
    );
    server.wait_readyz(200).await;

    // A body that never arrives in full. The server's "100 Continue" says the handler is
    // reading it: the request is in flight.
    let mut stuck = std::net::TcpStream::connect(server.rest_addr()).unwrap();
    stuck
        .write_all(
            b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: modelgate\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\
              Expect: 100-continue\r\n\r\n",
        )
        .unwrap();
    let mut continued = [0u8; 25];
    stuck.read_exact(&mut continued).unwrap();
    assert_eq!(&continued, b"HTTP/1.1 100 Continue\r\n\r\n");
    stuck.write_all(b"{\"instances\": ").unwrap();

    server.signal("TERM");
    let status = tokio::task::block_in_place(|| server.wait_exit());
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(
        server.log().contains("still open after the drain limit"),
        "{}",
        server.log()
    );
    // The connection was closed, not answered.
    let mut rest = Vec::new();
    let _ = stuck.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

/// The default S3 cache lives in the shared temp dir: a cache directory there that another
/// user could have planted, or could write to, is refused at start rather than trusted
/// (a complete-looking version directory in it would be loaded as the model).
#[test]
fn a_default_cache_others_can_write_to_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = common::scratch("shared-tmp");
    let uid = std::fs::metadata(&tmp).expect("scratch").uid();
    let cache = tmp.join(format!("modelgate-cache-{uid}"));
    std::fs::create_dir(&cache).expect("cache dir");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");

    let base = format!(
        "--model_base_path={}",
        common::fixtures().join("tiny").display()
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["--port=0", "--rest_api_port=0", &base])
        .env("TMPDIR", &tmp)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run modelgate");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    assert!(
        status.is_some_and(|s| !s.success()),
        "started ({status:?}):\n{stderr}"
    );
    assert!(
        stderr.contains("others may write to it (mode 777)")
            && stderr.contains("--model_cache_dir"),
        "{stderr}"
    );
}

/// SIGTERM while a version is still warming up: the server stops within its bounds (the
/// unload waits at most 30 s) instead of living on until the warm-up ends, which here
/// would take many minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_during_a_long_warm_up_still_exits() {
    let dir = TempDir::new("warming-at-exit");
    let version = dir.path().join("1");
    std::fs::create_dir_all(version.join("assets.extra")).unwrap();
    for file in ["model.pt", "signature.json"] {
        std::fs::copy(
            common::fixtures().join("counter/1").join(file),
            version.join(file),
        )
        .unwrap();
    }
    // One record busy for ten million rounds of a matmul.
    let record = common::counter_record("x", 10_000_000.0);
    std::fs::write(
        version.join(modelgate::registry::WARMUP_FILE),
        common::tfrecord(&[record]),
    )
    .unwrap();
    let config = common::model_config(&[("counter", dir.path(), "")]);
    let mut server = Server::with_config(
        &config,
        &["--instances_per_device=1", "--shutdown_grace_seconds=0"],
    );
    tokio::task::block_in_place(|| server.wait_for_log("replaying the warm-up requests"));
    server.signal("TERM");
    let status = tokio::task::block_in_place(|| server.wait_exit());
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(
        server.log().contains("models still unloading"),
        "{}",
        server.log()
    );
}
