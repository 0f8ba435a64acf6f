//! Model faults the real binary must survive, over both ports: a forward that runs out of
//! memory (RESOURCE_EXHAUSTED / 429, and the server keeps serving), and a device that
//! fails under a model (INTERNAL, then liveness fails naming the model, so Kubernetes
//! restarts the pod). The CPU machines drive the device failure with a model that raises
//! what CUDA raises after a device-side assert.

pub mod common;

use common::{predict, spec, Server};
use tonic::Code;

/// `hungry` allocates this many MiB of floats: 2^50 floats, 4 PiB, which no allocator gives.
const TOO_MANY_FLOATS: f32 = 1_073_741_824.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_is_resource_exhausted_and_the_server_keeps_serving() {
    let server = Server::with_config(&common::fixture_config(&["hungry", "tiny"]), &[]);
    server.wait_available(&["hungry", "tiny"]).await;
    let mut client = server.prediction().await;

    let status = predict(&mut client, spec("hungry"), &[TOO_MANY_FLOATS])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("model 'hungry' ran out of memory"),
        "{status:?}"
    );
    let (code, body) = common::http::post(
        &server.url("/v1/models/hungry:predict"),
        &format!(r#"{{"instances": [[{TOO_MANY_FLOATS:.1}]]}}"#),
    )
    .await
    .unwrap();
    assert_eq!(code, 429, "{body}");

    // The same model and its neighbours answer the next request.
    assert_eq!(
        predict(&mut client, spec("hungry"), &[3.0])
            .await
            .unwrap()
            .1,
        vec![3.0]
    );
    assert_eq!(
        predict(&mut client, spec("tiny"), &[1.0]).await.unwrap().1,
        vec![3.0]
    );
    assert_eq!(server.http_get("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_fails_under_a_model_fails_liveness_once_logged() {
    let server = Server::with_config(&common::fixture_config(&["poisoned", "tiny"]), &[]);
    server.wait_available(&["poisoned", "tiny"]).await;
    let mut client = server.prediction().await;
    assert_eq!(server.http_get("/healthz").await.0, 200);

    for _ in 0..2 {
        let status = predict(&mut client, spec("poisoned"), &[-1.0])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(
            status.message().contains("device-side assert triggered"),
            "{status:?}"
        );
    }
    let (code, health) = server.http_get("/healthz").await;
    assert_eq!(code, 503, "{health}");
    assert!(
        health.contains("model 'poisoned' version 1 can no longer run on cpu"),
        "{health}"
    );
    assert!(!health.contains("tiny"), "{health}");
    let log = server.log();
    assert_eq!(
        log.matches("the device failed while running this model")
            .count(),
        1,
        "logged once:\n{log}"
    );
    assert!(log.contains("poisoned/1@cpu"), "{log}");
}

/// A model that answers with a tensor that has no memory (a `meta` tensor) gets an error
/// naming the output; the server never reads it (which would crash the process) and serves
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_without_host_memory_is_an_error_not_a_crash() {
    let server = Server::with_config(&common::fixture_config(&["faulty"]), &[]);
    server.wait_available(&["faulty"]).await;
    let mut client = server.prediction().await;
    let request = |x: [f32; 2]| modelgate::proto::serving::PredictRequest {
        model_spec: Some(spec("faulty")),
        inputs: [("x".to_string(), common::floats(&[1, 2], &x))].into(),
        ..Default::default()
    };
    let status = client.predict(request([12345.0, 1.0])).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let answer = client
        .predict(request([1.0, 2.0]))
        .await
        .expect("faulty serves on")
        .into_inner();
    let y = common::decode_tensor("y", &answer.outputs["y"]).unwrap();
    assert_eq!(y.to_values::<f32>().unwrap(), vec![2.0, 3.0]);
    assert_eq!(server.http_get("/healthz").await.0, 200);
}
