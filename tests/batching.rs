//! Batching, backpressure and deadlines, end to end against the real binary.

pub mod common;

use common::*;
use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::{PredictRequest, PredictResponse};
use modelgate::proto::tensor::dims;
use modelgate::proto::tensorflow::TensorProto;
use std::time::Duration;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

fn request(model: &str, signature: &str, x: TensorProto) -> PredictRequest {
    let mut spec = spec(model);
    spec.signature_name = signature.to_string();
    PredictRequest {
        model_spec: Some(spec),
        inputs: [("x".to_string(), x)].into(),
        ..Default::default()
    }
}

fn values(response: &PredictResponse, name: &str) -> Vec<f32> {
    common::decode_tensor(name, &response.outputs[name])
        .unwrap()
        .to_values::<f32>()
        .unwrap()
}

/// Starts a server on `models` with the batching parameters `params` (None = batching off),
/// and REST on.
async fn start_server(models: &[&str], params: Option<&str>, extra: &[&str]) -> (Server, TempDir) {
    let fixtures = fixtures();
    let dir = TempDir::new("batching");
    let entries: Vec<(&str, std::path::PathBuf, &str)> =
        models.iter().map(|m| (*m, fixtures.join(m), "")).collect();
    let config = write_config(&dir.0, &entries);
    // REST on: the tests watch the workers on /metrics.
    let mut args = vec![
        format!("--model_config_file={}", config.display()),
        format!("--rest_api_port={}", free_port()),
    ];
    if let Some(params) = params {
        let path = dir.0.join("batching.config");
        std::fs::write(&path, params).unwrap();
        args.push("--enable_batching".into());
        args.push(format!("--batching_parameters_file={}", path.display()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    server.wait_available(models).await;
    (server, dir)
}

/// Sends `n` one-row requests to the counter at once (request i sends i).
fn send_counter_requests(
    client: &PredictionServiceClient<Channel>,
    n: usize,
) -> Vec<JoinHandle<Result<Vec<f32>, Status>>> {
    (0..n)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .predict(request("counter", "", floats(&[1, 2], &[i as f32, 0.0])))
                    .await
                    .map(|r| values(&r.into_inner(), "y"))
            })
        })
        .collect()
}

/// Request i of [`send_counter_requests`] must get back 2 * i.
async fn expect_doubled(tasks: Vec<JoinHandle<Result<Vec<f32>, Status>>>) {
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), vec![2.0 * i as f32]);
    }
}

/// Sends `n` one-row requests to the counter at once; request i must get back 2 * i.
async fn counter_requests_at_once(client: &PredictionServiceClient<Channel>, n: usize) {
    expect_doubled(send_counter_requests(client, n)).await;
}

/// A request that keeps the counter's worker busy for `rounds` small matmuls (about 1 s per
/// 15,000 on one core).
fn busy(rounds: f32) -> PredictRequest {
    request("counter", "", floats(&[1, 2], &[1.0, rounds]))
}

/// Batches the counter's workers have started and finished so far: `modelgate_batch_size`
/// is recorded as a worker starts a batch, `modelgate_forward_duration_seconds` once it is
/// done.
async fn batches(server: &Server) -> (f64, f64) {
    let counter = ["model=\"counter\""];
    let started = server.metric("modelgate_batch_size_count", &counter).await;
    let finished = server
        .metric("modelgate_forward_duration_seconds_count", &counter)
        .await;
    (started, finished)
}

/// A slow request holding the counter's only worker.
struct Blocker {
    task: JoinHandle<Result<Response<PredictResponse>, Status>>,
    /// Batches finished before it started.
    finished: f64,
}

impl Blocker {
    /// Sends `busy(rounds)` and waits until the worker is running it.
    async fn start(server: &Server, rounds: f32) -> Blocker {
        let (started, finished) = batches(server).await;
        let mut client = server.prediction().await;
        let task = tokio::spawn(async move { client.predict(busy(rounds)).await });
        let what = server.awaiting("the worker to start the slow request");
        wait_for(what, || async {
            (batches(server).await.0 > started).then_some(())
        })
        .await;
        Blocker { task, finished }
    }

    /// Waits until `n` requests of the counter queue behind it; fails if it finishes
    /// first (they would not have queued together).
    async fn wait_queued(&self, server: &Server, n: usize) {
        let what = server.awaiting(format!("{n} requests to queue behind the slow one"));
        wait_for(what, || async {
            let depth = server
                .metric("modelgate_queue_depth", &["model=\"counter\""])
                .await;
            if depth < n as f64 {
                let running = self.running(server).await;
                assert!(
                    running,
                    "the slow request finished with {depth} of the {n} queued"
                );
            }
            (depth >= n as f64).then_some(())
        })
        .await;
    }

    /// Whether the worker is still running it.
    async fn running(&self, server: &Server) -> bool {
        batches(server).await.1 == self.finished
    }

    async fn finish(self) {
        self.task
            .await
            .unwrap()
            .expect("the slow request completes");
    }
}

#[tokio::test]
async fn concurrent_requests_get_exactly_their_own_rows() {
    let params = "max_batch_size { value: 8 } batch_timeout_micros { value: 2000 } max_enqueued_batches { value: 100 }";
    let (server, _dir) = start_server(&["tiny", "echo"], Some(params), &[]).await;
    let channel = server.channel().await;
    let mut tasks = Vec::new();
    for i in 0..96usize {
        let mut client = PredictionServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            if i % 4 == 3 {
                // Another model and signature in the mix: never batched with tiny.
                let x: Vec<f32> = (0..6).map(|k| (i * 10 + k) as f32).collect();
                let response = client
                    .predict(request("echo", "float32", floats(&[2, 3], &x)))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(values(&response, "y"), x);
            } else {
                let rows = 1 + i % 3;
                let x: Vec<f32> = (0..rows).map(|r| (i * 100 + r) as f32).collect();
                let response = client
                    .predict(request("tiny", "", floats(&[rows as i64, 1], &x)))
                    .await
                    .unwrap()
                    .into_inner();
                let expected: Vec<f32> = x.iter().map(|v| 2.0 * v + 1.0).collect();
                assert_eq!(values(&response, "y"), expected, "request {i}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn a_full_batch_is_one_forward() {
    // The batch closes when full (16 rows) long before its 10 s timeout.
    let params = "max_batch_size { value: 16 } batch_timeout_micros { value: 10000000 } num_batch_threads { value: 1 }";
    let (server, _dir) = start_server(&["counter"], Some(params), &[]).await;
    let client = server.prediction().await;
    let before = forwards(&server).await;
    counter_requests_at_once(&client, 16).await;
    assert_eq!(
        forwards(&server).await - before,
        1,
        "16 requests, one forward"
    );
}

#[tokio::test]
async fn padding_to_allowed_sizes_is_dropped_from_outputs() {
    // 3 one-row requests queue behind a slow one on the only worker; when it frees, they
    // close as one batch of 3, padded to the allowed size 4. Waiting on the queue depth,
    // not on the 3 arriving within the batch timeout.
    let params = "max_batch_size { value: 8 } batch_timeout_micros { value: 300000 } allowed_batch_sizes: 4 allowed_batch_sizes: 8 num_batch_threads { value: 1 }";
    let (server, _dir) = start_server(&["counter"], Some(params), &[]).await;
    let client = server.prediction().await;
    let before = forwards(&server).await;
    let blocker = Blocker::start(&server, 60000.0).await;
    let mut tasks = Vec::new();
    for i in 1..=3 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let response = client
                .predict(request(
                    "counter",
                    "",
                    floats(&[1, 2], &[i as f32 * 10.0, 0.0]),
                ))
                .await
                .unwrap()
                .into_inner();
            let y = &response.outputs["y"];
            assert_eq!(
                dims(y.tensor_shape.as_ref().unwrap()),
                vec![1, 1],
                "padding rows never reach the client"
            );
            assert_eq!(values(&response, "y"), vec![i as f32 * 20.0]);
        }));
    }
    blocker.wait_queued(&server, 3).await;
    blocker.finish().await;
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        forwards(&server).await - before,
        2,
        "the slow request, then one padded batch of the three"
    );
}

#[tokio::test]
async fn large_requests_split_across_batches_or_are_refused() {
    // As in TF Serving: max_batch_size bounds a request, max_execution_batch_size a batch.
    let split = "max_batch_size { value: 16 } max_execution_batch_size { value: 4 } \
                 enable_large_batch_splitting { value: true }";
    let (server, _dir) = start_server(&["tiny"], Some(split), &[]).await;
    let mut client = server.prediction().await;
    let x: Vec<f32> = (0..10).map(|v| v as f32).collect();
    let response = client
        .predict(request("tiny", "", floats(&[10, 1], &x)))
        .await
        .expect("split request")
        .into_inner();
    let expected: Vec<f32> = x.iter().map(|v| 2.0 * v + 1.0).collect();
    assert_eq!(values(&response, "y"), expected);
    let too_many: Vec<f32> = (0..17).map(|v| v as f32).collect();
    let status = client
        .predict(request("tiny", "", floats(&[17, 1], &too_many)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("17 rows, more than max_batch_size 16"),
        "{}",
        status.message()
    );

    let (server, _dir) = start_server(&["tiny"], Some("max_batch_size { value: 4 }"), &[]).await;
    let mut client = server.prediction().await;
    let status = client
        .predict(request("tiny", "", floats(&[10, 1], &x)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("10 rows"), "{}", status.message());
}

/// A signature whose input has no batch dimension runs alone: its first dimension is not
/// rows, and it takes one row's room in the queue however long that dimension is.
#[tokio::test]
async fn an_input_without_a_batch_dimension_takes_one_place_in_the_queue() {
    let params = "max_batch_size { value: 4 } max_enqueued_batches { value: 2 }";
    let (server, _dir) = start_server(&["echo"], Some(params), &[]).await;
    let mut client = server.prediction().await;
    let x: Vec<f32> = (0..256).map(|v| v as f32).collect();
    let response = client
        .predict(request("echo", "float32", floats(&[256], &x)))
        .await
        .expect("a 256-element vector is one request, not 256 rows")
        .into_inner();
    assert_eq!(values(&response, "y"), x);
}

/// Holds the single worker with a slow request, then sends `burst` more at once: the
/// queue (one batch) overflows, the overflow is refused UNAVAILABLE, and the server
/// still serves afterwards.
async fn overflow(server: &Server, burst: usize) {
    let client = server.prediction().await;
    let blocker = Blocker::start(server, 8000.0).await;
    let mut tasks = Vec::new();
    for _ in 0..burst {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .predict(request("counter", "", floats(&[1, 2], &[1.0, 0.0])))
                .await
        }));
    }
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "a queue of one batch took {burst} requests");
    assert!(refused < burst, "nothing at all was queued");
    blocker.finish().await;
    let mut client = client.clone();
    client
        .predict(request("counter", "", floats(&[1, 2], &[1.0, 0.0])))
        .await
        .expect("healthy after overload");
}

#[tokio::test]
async fn a_full_queue_answers_unavailable() {
    let params = "max_batch_size { value: 1 } max_enqueued_batches { value: 1 } num_batch_threads { value: 1 }";
    let (server, _dir) = start_server(&["counter"], Some(params), &[]).await;
    overflow(&server, 10).await;
    // The same without batching, bounded by --max_queued_requests.
    let (server, _dir) = start_server(
        &["counter"],
        None,
        &["--instances_per_device=1", "--max_queued_requests=2"],
    )
    .await;
    overflow(&server, 10).await;
}

/// Without batching, the queue depth counts the requests waiting for a worker (the
/// autoscaler's signal in docker/k8s), and comes back to 0 once they have run.
#[tokio::test]
async fn without_batching_the_queue_depth_counts_requests_waiting_for_a_worker() {
    let (server, _dir) = start_server(
        &["counter"],
        None,
        &["--instances_per_device=1", "--max_queued_requests=8"],
    )
    .await;
    let client = server.prediction().await;
    let blocker = Blocker::start(&server, 60000.0).await;
    let queued = send_counter_requests(&client, 3);
    blocker.wait_queued(&server, 3).await;
    blocker.finish().await;
    expect_doubled(queued).await;
    let depth = server
        .metric("modelgate_queue_depth", &["model=\"counter\""])
        .await;
    assert_eq!(depth, 0.0);
}

#[tokio::test]
async fn expired_and_abandoned_requests_never_reach_the_model() {
    for params in [
        None,
        Some("max_batch_size { value: 4 } num_batch_threads { value: 1 }"),
    ] {
        let (server, _dir) =
            start_server(&["counter"], params, &["--instances_per_device=1"]).await;
        let client = server.prediction().await;
        let before = forwards(&server).await;
        // About 2 s of work on two cores: it must outlast the 200 ms of waits below with
        // room to spare on a loaded machine, or the quitter's request would still run.
        let blocker = Blocker::start(&server, 60000.0).await;

        // A deadline that passes while the worker is busy: DEADLINE_EXCEEDED, no forward.
        let mut late = tonic::Request::new(request("counter", "", floats(&[1, 2], &[5.0, 0.0])));
        late.metadata_mut()
            .insert("grpc-timeout", "100m".parse().unwrap());
        let status = server.raw_prediction().predict(late).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "{}",
            status.message()
        );

        // A client that gives up (drops the call): its request is dropped from the queue.
        let mut quitter = client.clone();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            quitter.predict(request("counter", "", floats(&[1, 2], &[6.0, 0.0]))),
        )
        .await;
        assert!(gave_up.is_err());

        // Both were still queued behind the slow request when they expired and left.
        assert!(
            blocker.running(&server).await,
            "the slow request finished before the late and the abandoned requests gave up"
        );
        blocker.finish().await;
        assert_eq!(
            forwards(&server).await - before,
            1,
            "only the slow request ran (batching: {params:?})"
        );
    }
}

#[tokio::test]
async fn per_model_batching_parameters_override_the_global_file() {
    // The version directory says "batches of 16, wait up to 10 s"; the global file says
    // batches of 1. With the flag, 16 concurrent requests make one forward.
    let dir = TempDir::new("per-model");
    let version = dir.0.join("counter/1");
    std::fs::create_dir_all(&version).unwrap();
    for file in ["model.pt", "signature.json"] {
        std::fs::copy(fixtures().join("counter/1").join(file), version.join(file)).unwrap();
    }
    std::fs::write(
        version.join("batching_params.pbtxt"),
        "max_batch_size { value: 16 } batch_timeout_micros { value: 10000000 } num_batch_threads { value: 1 }",
    )
    .unwrap();
    let global = dir.0.join("batching.config");
    std::fs::write(
        &global,
        "max_batch_size { value: 1 } max_enqueued_batches { value: 64 }",
    )
    .unwrap();
    let config = write_config(&dir.0, &[("counter", dir.0.join("counter"), "")]);
    let server = Server::start(&[
        &format!("--model_config_file={}", config.display()),
        "--enable_batching",
        &format!("--batching_parameters_file={}", global.display()),
        "--enable_per_model_batching_parameters",
    ]);
    server.wait_available(&["counter"]).await;
    let client = server.prediction().await;
    let before = forwards(&server).await;
    counter_requests_at_once(&client, 16).await;
    assert_eq!(forwards(&server).await - before, 1);
}

#[tokio::test]
async fn requests_queued_behind_a_busy_worker_run_in_one_batch() {
    // Timeout 0: a batch is whatever has queued when a worker is free. While the only
    // worker is held, eight requests queue; once it is free they make a single forward.
    let params = "max_batch_size { value: 16 } batch_timeout_micros { value: 0 } num_batch_threads { value: 1 }";
    let (server, _dir) = start_server(&["counter"], Some(params), &[]).await;
    let client = server.prediction().await;
    let before = forwards(&server).await;
    let blocker = Blocker::start(&server, 60000.0).await;
    let eight = tokio::spawn(async move { counter_requests_at_once(&client, 8).await });
    // All eight wait in the queue at once, so the batch the worker takes next holds them all.
    blocker.wait_queued(&server, 8).await;
    eight.await.unwrap();
    blocker.finish().await;
    assert_eq!(
        forwards(&server).await - before,
        2,
        "the slow request, then one batch of the eight queued behind it"
    );
}

/// TF Serving and V2 (KServe / Triton) requests for one model share its queue: a burst of
/// both, sent at once, is one forward, and each request gets its own rows back.
#[tokio::test]
async fn tf_serving_and_v2_requests_batch_together() {
    use modelgate::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use modelgate::proto::inference::model_infer_request::InferInputTensor;
    use modelgate::proto::inference::{InferTensorContents, ModelInferRequest};

    let params = "max_batch_size { value: 16 } batch_timeout_micros { value: 10000000 } num_batch_threads { value: 1 }";
    let (server, _dir) = start_server(&["counter"], Some(params), &[]).await;
    let client = server.prediction().await;
    let v2 = GrpcInferenceServiceClient::new(server.channel().await);
    let before = forwards(&server).await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (mut tf, mut v2) = (client.clone(), v2.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let x = floats(&[1, 2], &[i as f32, 0.0]);
                    let response = tf.predict(request("counter", "", x)).await.unwrap();
                    return values(&response.into_inner(), "y");
                }
                let infer = ModelInferRequest {
                    model_name: "counter".into(),
                    inputs: vec![InferInputTensor {
                        name: "x".into(),
                        datatype: "FP32".into(),
                        shape: vec![1, 2],
                        contents: Some(InferTensorContents {
                            fp32_contents: vec![i as f32, 0.0],
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                let response = v2.model_infer(infer).await.unwrap().into_inner();
                let raw = &response.raw_output_contents[0];
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), vec![2.0 * i as f32], "request {i}");
    }
    assert_eq!(
        forwards(&server).await - before,
        1,
        "8 TF Serving and 8 V2 requests, one forward"
    );
}

/// V2 statistics time every batch in three phases, each counted once per batch (Triton's
/// perf_analyzer aborts when compute_input, compute_infer and compute_output counts differ),
/// in all and by batch size, on gRPC and REST alike.
#[tokio::test]
async fn v2_statistics_count_every_phase_of_every_batch() {
    use modelgate::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use modelgate::proto::inference::{ModelStatisticsRequest, StatisticDuration};

    // Full batches close at once (16 rows) long before the 10 s timeout: two bursts, two
    // batches of 16.
    let params = "max_batch_size { value: 16 } batch_timeout_micros { value: 10000000 } num_batch_threads { value: 1 }";
    let (server, _dir) = start_server(&["counter"], Some(params), &[]).await;
    let client = server.prediction().await;
    counter_requests_at_once(&client, 16).await;
    counter_requests_at_once(&client, 16).await;
    // A request the version refuses is a failure in its statistics, and no batch.
    let mut wrong = request("counter", "", floats(&[1, 2], &[1.0, 0.0]));
    wrong.inputs = [("nope".to_string(), floats(&[1, 2], &[1.0, 0.0]))].into();
    let refused = client.clone().predict(wrong).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    // Metadata calls run no model: they are no inferences.
    let metadata = server.http_get("/v1/models/counter/metadata").await;
    assert_eq!(metadata.0, 200, "{}", metadata.1);

    let mut v2 = GrpcInferenceServiceClient::new(server.channel().await);
    let metadata = modelgate::proto::inference::ModelMetadataRequest {
        name: "counter".into(),
        version: String::new(),
    };
    v2.model_metadata(metadata).await.unwrap();
    let request = ModelStatisticsRequest {
        name: "counter".into(),
        version: String::new(),
    };
    let stats = v2.model_statistics(request).await.unwrap().into_inner();
    let [model] = stats.model_stats.as_slice() else {
        panic!("one version: {stats:?}");
    };
    let counted = |d: &Option<StatisticDuration>| {
        let d = d.expect("a duration");
        assert!(d.ns > 0, "{d:?}");
        d.count
    };
    let inference = model.inference_stats.as_ref().expect("inference_stats");
    let answered = |d: &Option<StatisticDuration>| d.map_or(0, |d| d.count);
    assert_eq!(answered(&inference.success), 32, "{inference:?}");
    assert_eq!(answered(&inference.fail), 1, "{inference:?}");
    assert_eq!(model.inference_count, 32, "one per row answered");
    let phases = [
        &inference.compute_input,
        &inference.compute_infer,
        &inference.compute_output,
    ];
    assert_eq!(model.execution_count, 2);
    assert_eq!(phases.map(counted), [2, 2, 2]);
    let [batch] = model.batch_stats.as_slice() else {
        panic!("one batch size: {:?}", model.batch_stats);
    };
    let phases = [
        &batch.compute_input,
        &batch.compute_infer,
        &batch.compute_output,
    ];
    assert_eq!((batch.batch_size, phases.map(counted)), (16, [2, 2, 2]));

    let (status, body) = server.http_get("/v2/models/counter/stats").await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let model = &body["model_stats"][0];
    for phase in ["compute_input", "compute_infer", "compute_output"] {
        assert_eq!(model["inference_stats"][phase]["count"], 2, "{body}");
        assert_eq!(model["batch_stats"][0][phase]["count"], 2, "{body}");
    }
    assert_eq!(model["batch_stats"][0]["batch_size"], 16, "{body}");
    assert_eq!(model["batch_stats"].as_array().map(Vec::len), Some(1));
}
