//! `--ssl_config_file` against the real binary: TLS on both ports with certificates made
//! here, mTLS with `client_verify`, and a config that cannot be used stopping the start.

pub mod common;

use common::tls::{grpc_client, https_request, https_request_with, ssl_config, Ca, Identity};
use common::{float_row, spec, Server, TempDir};
use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::PredictRequest;

/// Starts `tiny` with `ssl` as its SSLConfig and waits, over TLS as `identity`, until it
/// is ready.
async fn start(ssl: &str, ca: &Ca, identity: Option<&Identity>) -> (Server, TempDir) {
    start_with(ssl, ca, identity, &[]).await
}

/// [`start`] with more flags.
async fn start_with(
    ssl: &str,
    ca: &Ca,
    identity: Option<&Identity>,
    extra: &[&str],
) -> (Server, TempDir) {
    let dir = TempDir::new("tls");
    let path = dir.path().join("ssl.config");
    std::fs::write(&path, ssl).unwrap();
    let ssl_flag = format!("--ssl_config_file={}", path.display());
    let mut flags = vec![ssl_flag.as_str()];
    flags.extend_from_slice(extra);
    let server = Server::with_config(&common::fixture_config(&["tiny"]), &flags);
    let url = https_url(&server, "/readyz");
    common::wait_for("readiness over TLS", || async {
        let answer = https_request(ca, identity, "GET", &url, "").await;
        (answer.ok()?.0 == 200).then_some(())
    })
    .await;
    (server, dir)
}

fn https_url(server: &Server, path: &str) -> String {
    format!("https://{}{path}", server.rest_addr())
}

/// Predict on `tiny` (y = 2x + 1) over gRPC with TLS: y for x = 10, or the error.
async fn grpc_predict(
    server: &Server,
    ca: &Ca,
    identity: Option<&Identity>,
) -> Result<f32, String> {
    let origin = format!("https://{}", server.grpc).parse().unwrap();
    let mut client = PredictionServiceClient::with_origin(grpc_client(ca, identity), origin);
    predict_ten(&mut client).await
}

async fn predict_ten<T>(client: &mut PredictionServiceClient<T>) -> Result<f32, String>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let response = client
        .predict(PredictRequest {
            model_spec: Some(spec("tiny")),
            inputs: [("x".to_string(), float_row(&[10.0]))].into(),
            ..Default::default()
        })
        .await
        .map_err(|status| format!("{status:?}"))?
        .into_inner();
    let y = common::decode_tensor("y", &response.outputs["y"]).unwrap();
    Ok(y.to_values::<f32>().unwrap()[0])
}

async fn rest_predict(
    server: &Server,
    ca: &Ca,
    identity: Option<&Identity>,
) -> Result<(u16, String), String> {
    let url = https_url(server, "/v1/models/tiny:predict");
    https_request(ca, identity, "POST", &url, r#"{"instances": [[10.0]]}"#).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ports_serve_tls_and_refuse_plaintext() {
    let ca = Ca::new("modelgate test CA");
    let (server, _dir) = start(&ssl_config(&ca.server_identity(), None), &ca, None).await;

    // A client that connects and never starts its handshake holds up nobody else.
    let stalled = std::net::TcpStream::connect(server.grpc).unwrap();

    assert_eq!(grpc_predict(&server, &ca, None).await, Ok(21.0));
    let (status, body) = rest_predict(&server, &ca, None).await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"predictions": [[21.0]]}"#)
    );

    // Plaintext gets no answer on either port.
    let mut plaintext = server.raw_prediction();
    let err = predict_ten(&mut plaintext).await.unwrap_err();
    assert!(!err.is_empty());
    let plain = common::http::request("GET", &server.url("/readyz"), None).await;
    assert!(plain.is_err(), "{plain:?}");

    // A client that does not trust this server's CA refuses it.
    let other = Ca::new("another CA");
    assert!(grpc_predict(&server, &other, None).await.is_err());
    drop(stalled);
    assert_eq!(grpc_predict(&server, &ca, None).await, Ok(21.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_verify_requires_a_certificate_signed_by_custom_ca() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let client = client_ca.issue(&["client.example"]);
    let ssl = ssl_config(&server_ca.server_identity(), Some(&client_ca));
    let (server, _dir) = start(&ssl, &server_ca, Some(&client)).await;

    assert_eq!(
        grpc_predict(&server, &server_ca, Some(&client)).await,
        Ok(21.0)
    );
    let (status, _) = rest_predict(&server, &server_ca, Some(&client))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // A certificate the client CA did not sign: refused at the handshake on both ports.
    let stranger = Ca::new("stranger CA").issue(&["client.example"]);
    let grpc = grpc_predict(&server, &server_ca, Some(&stranger)).await;
    assert!(grpc.is_err(), "{grpc:?}");
    let rest = rest_predict(&server, &server_ca, Some(&stranger)).await;
    assert!(rest.is_err(), "{rest:?}");
    for addr in [server.grpc, server.rest_addr()] {
        let refusal = common::tls::refusal(&server_ca, Some(&stranger), addr).await;
        assert!(refusal.contains("UnknownCA"), "{addr}: {refusal}");
    }

    // No certificate at all (a kubelet's probe): the probes answer, everything else is
    // UNAUTHENTICATED on both ports before any handler runs.
    for probe in ["/healthz", "/readyz"] {
        let url = https_url(&server, probe);
        let (status, body) = https_request(&server_ca, None, "GET", &url, "")
            .await
            .unwrap();
        assert_eq!(status, 200, "{probe}: {body}");
    }
    let (status, body) = rest_predict(&server, &server_ca, None).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("client certificate"), "{body}");
    for path in ["/metrics", "/v2/models/tiny", "/v1/models/tiny"] {
        let url = https_url(&server, path);
        let (status, body) = https_request(&server_ca, None, "GET", &url, "")
            .await
            .unwrap();
        assert_eq!(status, 401, "{path}: {body}");
    }
    let grpc = grpc_predict(&server, &server_ca, None).await.unwrap_err();
    assert!(grpc.contains("Unauthenticated"), "{grpc}");
    assert!(grpc.contains("client certificate"), "{grpc}");
    assert_eq!(
        grpc_predict(&server, &server_ca, Some(&client)).await,
        Ok(21.0)
    );
}

#[test]
fn an_unusable_ssl_config_stops_the_start() {
    let dir = TempDir::new("tls-bad");
    let ca = Ca::new("CA");
    let server = ca.server_identity();
    let other = ca.server_identity();
    let cases = [
        ("missing", None, "cannot read --ssl_config_file="),
        (
            "syntax",
            Some("server_key: 1 bogus: 2".to_string()),
            "line 1",
        ),
        (
            "no key",
            Some(format!("server_cert: {:?}", server.cert_pem)),
            "server_key",
        ),
        (
            "not a certificate",
            Some(format!(
                "server_key: {:?} server_cert: \"junk\"",
                server.key_pem
            )),
            "server_cert",
        ),
        (
            "another certificate's key",
            Some(format!(
                "server_key: {:?} server_cert: {:?}",
                other.key_pem, server.cert_pem
            )),
            "server_key and server_cert",
        ),
        (
            "client_verify without custom_ca",
            Some(format!(
                "server_key: {:?} server_cert: {:?} client_verify: true",
                server.key_pem, server.cert_pem
            )),
            "custom_ca",
        ),
    ];
    for (case, text, expected) in cases {
        let path = dir.path().join(format!("{case}.config"));
        if let Some(text) = text {
            std::fs::write(&path, text).unwrap();
        }
        let flag = format!("--ssl_config_file={}", path.display());
        let stderr = common::refused_start(&[&flag]);
        assert!(stderr.contains(&flag), "{case}: {stderr}");
        assert!(stderr.contains(expected), "{case}: {stderr}");
        assert!(!stderr.contains("listening on"), "{case}: {stderr}");
    }
}

#[test]
fn alts_is_refused_rather_than_ignored() {
    for flag in ["--use_alts_credentials", "--use_alts_credentials=true"] {
        let stderr = common::refused_start(&[flag]);
        assert!(
            stderr.contains("--use_alts_credentials: ALTS is not supported"),
            "{stderr}"
        );
    }
}

/// The admin fan-out calls pods over plain HTTP: with TLS on it is refused, before any pod
/// is listed or sent the token, while the pod's own admin calls work over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_fanout_is_refused_rather_than_sent_in_the_clear() {
    let ca = Ca::new("modelgate test CA");
    let (server, _dir) = start_with(
        &ssl_config(&ca.server_identity(), None),
        &ca,
        None,
        &["--admin_token=tls-admin-token"],
    )
    .await;
    let bearer = [("authorization", "Bearer tls-admin-token")];
    let url = https_url(&server, "/admin/models");
    let (status, body) = https_request_with(&ca, None, "GET", &url, "", &bearer)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let url = https_url(&server, "/admin/models?fanout=true");
    let (status, body) = https_request_with(&ca, None, "GET", &url, "", &bearer)
        .await
        .unwrap();
    assert_eq!(status, 501, "{body}");
    assert!(body.contains("admin token in the clear"), "{body}");
    assert!(
        !server.log().contains("admin call fanned out"),
        "{}",
        server.log()
    );
}
