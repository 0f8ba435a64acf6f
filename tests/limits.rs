//! The bounds on what one connection or request may hold, against the real binary: the
//! REST timeout, the bytes of REST bodies and gRPC messages in flight, and the HTTP/2
//! settings: the
//! default stream limit and what `--grpc_channel_arguments` applies (max concurrent
//! streams, maximum connection age).

pub mod common;

use common::{fixture_config, Server, TIMEOUT};
use std::io::{Read, Write};
use std::net::TcpStream;

/// The head of a `tiny` predict whose body is `length` bytes.
fn predict_head(length: usize) -> String {
    format!(
        "POST /v1/models/tiny:predict HTTP/1.1\r\nHost: modelgate\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// A valid `tiny` predict body padded with spaces to `length` bytes.
fn predict_body(length: usize) -> String {
    let body = r#"{"instances": [[1.0]]}"#;
    format!("{body}{}", " ".repeat(length - body.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_call_past_its_timeout_is_answered_504() {
    let server = Server::with_config(
        &fixture_config(&["tiny"]),
        &["--rest_api_timeout_in_ms=200"],
    );
    server.wait_readyz(200).await;
    // A body that stops half way: only the timeout answers it.
    let answer = tokio::task::block_in_place(|| {
        let mut slow = TcpStream::connect(server.rest_addr()).unwrap();
        slow.write_all(predict_head(100).as_bytes()).unwrap();
        slow.write_all(b"{\"instances\": ").unwrap();
        let mut answer = String::new();
        slow.read_to_string(&mut answer).unwrap();
        answer
    });
    assert!(answer.starts_with("HTTP/1.1 504 "), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let error: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("--rest_api_timeout_in_ms")),
        "{body}"
    );
}

/// Reads the head of the next response on `stream` (up to its blank line): its status line.
fn status_line(stream: &mut TcpStream) -> String {
    tokio::task::block_in_place(|| {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        head.lines().next().unwrap_or_default().to_string()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_bodies_in_flight_are_bounded() {
    let limit = 64 << 10;
    let server = Server::with_config(
        &fixture_config(&["tiny"]),
        &[
            &format!("--rest_api_max_body_bytes={limit}"),
            &format!("--rest_api_max_bytes_in_flight={limit}"),
        ],
    );
    server.wait_readyz(200).await;
    let url = server.url("/v1/models/tiny:predict");
    let small = predict_body(16 << 10);
    let large = predict_body(60 << 10);
    let refused = |(status, body): (u16, String)| {
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("--rest_api_max_bytes_in_flight"), "{body}");
    };

    // A head that declares most of the budget holds it before any of its body arrives
    // (the buffer is set aside for it). The server's "100 Continue" says its handler is
    // reading the body, so the bytes are held by then.
    let mut declared = TcpStream::connect(server.rest_addr()).unwrap();
    let head = predict_head(large.len());
    let head = head.replace("\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n");
    declared.write_all(head.as_bytes()).unwrap();
    assert_eq!(status_line(&mut declared), "HTTP/1.1 100 Continue");

    // So a request that declares more than what is left is turned away...
    refused(common::http::post(&url, &small).await.unwrap());
    // ... and so is one without a declared length, once what has arrived is too much.
    let mut chunked = TcpStream::connect(server.rest_addr()).unwrap();
    let request = format!(
        "POST /v1/models/tiny:predict HTTP/1.1\r\nHost: modelgate\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{small}\r\n0\r\n\r\n",
        small.len()
    );
    chunked.write_all(request.as_bytes()).unwrap();
    let answer = tokio::task::block_in_place(|| {
        let mut answer = String::new();
        chunked.read_to_string(&mut answer).unwrap();
        answer
    });
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(
        answer.contains("--rest_api_max_bytes_in_flight"),
        "{answer}"
    );

    // The first completes, and its bytes are free again.
    tokio::task::block_in_place(|| declared.write_all(large.as_bytes()).unwrap());
    assert_eq!(status_line(&mut declared), "HTTP/1.1 200 OK");
    let (status, body) = common::http::post(&url, &small).await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"predictions": [[3.0]]}"#)
    );
}

#[test]
fn bytes_in_flight_below_the_body_limit_stop_the_start() {
    let stderr = common::refused_start(&[
        "--rest_api_max_body_bytes=1000",
        "--rest_api_max_bytes_in_flight=999",
    ]);
    assert!(
        stderr.contains("--rest_api_max_bytes_in_flight (999) must be at least"),
        "{stderr}"
    );
    let stderr = common::refused_start(&[
        "--grpc_max_message_bytes=1000",
        "--grpc_max_bytes_in_flight=999",
    ]);
    assert!(
        stderr.contains("--grpc_max_bytes_in_flight (999) must be at least"),
        "{stderr}"
    );
}

/// An HTTP/2 client connection, driven until the server has answered a ping (its SETTINGS
/// come before that answer) or has closed the connection.
struct Http2Client {
    /// Held: dropping it would close the connection from this side.
    _send: h2::client::SendRequest<bytes::Bytes>,
    connection: h2::client::Connection<tokio::net::TcpStream, bytes::Bytes>,
    /// How the connection ended meanwhile, if it did.
    ended: Option<Result<(), h2::Error>>,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS.
    streams: usize,
}

async fn http2_client(addr: std::net::SocketAddr) -> Http2Client {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping = connection.ping_pong().unwrap();
    let ended = tokio::select! {
        pong = ping.ping(h2::Ping::opaque()) => {
            pong.unwrap();
            None
        }
        ended = &mut connection => Some(ended),
    };
    Http2Client {
        _send: send,
        streams: connection.max_concurrent_send_streams(),
        connection,
        ended,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_channel_arguments_reach_http2() {
    let server = Server::with_config(
        &fixture_config(&["tiny"]),
        &["--grpc_channel_arguments=grpc.max_concurrent_streams=3,\
             grpc.max_connection_age_ms=300,grpc.max_connection_age_grace_ms=300,\
             grpc.http2.max_pings_without_data=0"],
    );
    assert!(
        server
            .log()
            .contains("ignoring gRPC channel argument grpc.http2.max_pings_without_data"),
        "{}",
        server.log()
    );
    let client = http2_client(server.grpc).await;
    assert_eq!(client.streams, 3);
    // Past its maximum age (and grace) the server sends GOAWAY and closes: the connection
    // ends cleanly (without a maximum age, it would stay open).
    let ended = match client.ended {
        Some(ended) => ended,
        None => tokio::time::timeout(TIMEOUT, client.connection)
            .await
            .expect("the server closes the connection"),
    };
    assert!(ended.is_ok(), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_per_connection_are_bounded_by_default() {
    let server = Server::with_config(&fixture_config(&["tiny"]), &[]);
    for addr in [server.grpc, server.rest_addr()] {
        let client = http2_client(addr).await;
        assert!(client.ended.is_none(), "{addr}: {:?}", client.ended);
        assert_eq!(client.streams, 100, "{addr}");
    }
}

#[test]
fn bad_grpc_channel_arguments_stop_the_start() {
    let stderr =
        common::refused_start(&["--grpc_channel_arguments=grpc.max_concurrent_streams=lots"]);
    assert!(
        stderr.contains("--grpc_channel_arguments: 'grpc.max_concurrent_streams=lots'"),
        "{stderr}"
    );
}

/// The bytes gRPC calls hold while their messages arrive are bounded all together, as
/// REST bodies are: a call that would go over is RESOURCE_EXHAUSTED, and the bytes of a
/// call that ends are given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bytes_in_flight_are_bounded() {
    use modelgate::proto::serving::PredictRequest;
    let server = Server::with_config(
        &fixture_config(&["tiny"]),
        &[
            "--grpc_max_message_bytes=80000",
            "--grpc_max_bytes_in_flight=80000",
        ],
    );
    server.wait_available(&["tiny"]).await;

    // A call that sends 60,000 bytes of a 70,000-byte message, then nothing more: within
    // HTTP/2's initial 65,535-byte windows, so that all of it arrives without waiting for
    // a window update (a CI run once timed out here holding 80,000 bytes, past them).
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = axum::http::Request::post(format!(
        "http://{}/tensorflow.serving.PredictionService/Predict",
        server.grpc
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (held_response, mut held) = send.send_request(request, false).unwrap();
    let mut partial = vec![0u8, 0x00, 0x01, 0x11, 0x70]; // uncompressed, 70,000 bytes
    partial.resize(5 + 60_000, 0);
    held.send_data(bytes::Bytes::from(partial), false).unwrap();

    // A 30,000-byte call finds no room while those are held.
    let x = common::floats(&[7500, 1], &vec![1.0; 7500]);
    let request = move || PredictRequest {
        model_spec: Some(common::spec("tiny")),
        inputs: [("x".to_string(), x.clone())].into(),
        ..Default::default()
    };
    let client = server.prediction().await;
    let refused = common::wait_for("a call past the bytes in flight to be refused", || {
        let (mut client, request) = (client.clone(), request());
        async move {
            match client.predict(request).await {
                Err(status) if status.code() == tonic::Code::ResourceExhausted => Some(status),
                _ => None,
            }
        }
    })
    .await;
    assert!(
        refused.message().contains("--grpc_max_bytes_in_flight"),
        "{refused:?}"
    );

    // The held call ends (reset): its bytes are given back.
    held.send_reset(h2::Reason::CANCEL);
    drop(held_response);
    common::wait_for("the same call to be served again", || {
        let (mut client, request) = (client.clone(), request());
        async move { client.predict(request).await.ok() }
    })
    .await;
}
