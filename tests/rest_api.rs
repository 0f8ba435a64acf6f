//! TF Serving's REST API against the real server over HTTP: every endpoint and format,
//! exact numbers, golden JSON for status and metadata, errors with their HTTP codes.

pub mod common;

use common::Server;
use modelgate::proto::serving::{ModelSpec, PredictRequest};
use modelgate::proto::tensor::tensor_to_proto;
use modelgate::tensor::Tensor;
use serde_json::{json, Value};
use std::path::Path;

/// Small enough that a 4x784 request fits and a 200 KB body does not.
const BODY_LIMIT: usize = 100_000;

fn config(demo: &Path, fixtures: &Path) -> String {
    common::model_config(&[
        ("tiny", &demo.join("tiny"), ""),
        (
            "mlp",
            &demo.join("mlp"),
            "model_version_policy { all {} }\n    version_labels { key: \"stable\" value: 1 }\n    version_labels { key: \"canary\" value: 2 }",
        ),
        (
            "scaled",
            &fixtures.join("scaled"),
            "model_version_policy { all {} }\n    version_labels { key: \"stable\" value: 1 }",
        ),
        ("multi", &fixtures.join("multi"), ""),
        ("echo", &fixtures.join("echo"), ""),
        ("faulty", &fixtures.join("faulty"), ""),
        ("regressor", &fixtures.join("regressor"), ""),
    ])
}

struct Rest<'a> {
    server: &'a Server,
    http: reqwest::Client,
}

impl Rest<'_> {
    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(self.server.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
        let response = self
            .http
            .post(self.server.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        assert_eq!(
            content_type.as_deref(),
            Some("application/json"),
            "POST {path}"
        );
        (status, response.text().await.unwrap())
    }

    /// POSTs `body` and expects 200 with exactly `expected` as the answer's text.
    async fn expect_text(&self, path: &str, body: Value, expected: &str) {
        let (status, text) = self.post(path, body.to_string()).await;
        assert_eq!(status, 200, "POST {path} {body}: {text}");
        assert_eq!(text, expected, "POST {path} {body}");
    }

    /// POSTs `body` and expects `status` with an error message containing `needle`.
    async fn expect_error(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        status: u16,
        needle: &str,
    ) {
        let (got, text) = self.post(path, body).await;
        assert_eq!(got, status, "POST {path}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let message = error["error"].as_str().unwrap_or_else(|| panic!("{text}"));
        assert!(
            message.contains(needle),
            "POST {path}: '{message}' should contain '{needle}'"
        );
    }
}

fn golden(name: &str) -> Value {
    let path = common::repo_root().join("tests/golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api() {
    let (demo, fixtures) = (common::demo_models(), common::fixtures());
    let limit = format!("--rest_api_max_body_bytes={BODY_LIMIT}");
    let server = Server::with_config(&config(&demo, &fixtures), &[&limit]);
    server.wait_readyz(200).await;
    let rest = Rest {
        server: &server,
        http: reqwest::Client::new(),
    };

    status_and_metadata(&rest).await;
    predict_formats(&rest).await;
    predict_dtypes(&rest).await;
    predict_float32_matches_grpc(&rest).await;
    classify_and_regress(&rest).await;
    errors(&rest).await;
    compressed_bodies(&rest).await;
}

/// POSTs `body` with `Content-Encoding: coding`.
async fn post_encoded(rest: &Rest<'_>, path: &str, coding: &str, body: Vec<u8>) -> (u16, String) {
    let response = rest
        .http
        .post(rest.server.url(path))
        .header("content-type", "application/json")
        .header("content-encoding", coding)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    (response.status().as_u16(), response.text().await.unwrap())
}

/// TF Serving un-gzips request bodies, and Triton's clients send gzip or deflate; the
/// decompressed body is held to --rest_api_max_body_bytes like a plain one.
async fn compressed_bodies(rest: &Rest<'_>) {
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::io::Write;
    let gzip = |bytes: &[u8]| {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    };
    let predict = json!({"instances": [[1.0], [2.0]]}).to_string();
    let (status, body) = post_encoded(
        rest,
        "/v1/models/tiny:predict",
        "gzip",
        gzip(predict.as_bytes()),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"predictions": [[3.0], [5.0]]}"#)
    );

    let infer =
        json!({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [4.0]}]})
            .to_string();
    let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
    zlib.write_all(infer.as_bytes()).unwrap();
    let (status, body) = post_encoded(
        rest,
        "/v2/models/tiny/infer",
        "deflate",
        zlib.finish().unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[9.0]"), "{body}");

    // Small on the wire, past the limit once inflated: 413, not a buffer of its size.
    let mut bomb = b"{\"instances\": [".to_vec();
    bomb.extend(std::iter::repeat_n(b' ', 8 * BODY_LIMIT));
    let (status, body) = post_encoded(rest, "/v1/models/tiny:predict", "gzip", gzip(&bomb)).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("once decompressed"), "{body}");
    let (status, body) = post_encoded(
        rest,
        "/v1/models/tiny:predict",
        "gzip",
        predict.clone().into_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("cannot decompress the gzip request body"),
        "{body}"
    );
    let (status, body) = post_encoded(rest, "/v1/models/tiny:predict", "br", gzip(b"{}")).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("Content-Encoding 'br' is not supported"),
        "{body}"
    );
}

async fn status_and_metadata(rest: &Rest<'_>) {
    for (path, file) in [
        ("/v1/models/mlp", "status_mlp.json"),
        ("/v1/models/mlp/versions/2", "status_mlp_v2.json"),
        ("/v1/models/mlp/labels/stable", "status_mlp_v1.json"),
        ("/v1/models/tiny/metadata", "metadata_tiny.json"),
        (
            "/v1/models/regressor/versions/1/metadata",
            "metadata_regressor.json",
        ),
        (
            "/v1/models/scaled/labels/stable/metadata",
            "metadata_scaled_v1.json",
        ),
    ] {
        let (status, text) = rest.get(path).await;
        assert_eq!(status, 200, "GET {path}: {text}");
        let got: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(got, golden(file), "GET {path}:\n{text}");
    }
    let (status, text) = rest.get("/v1/models/nope").await;
    assert_eq!((status, text.contains("not served")), (404, true), "{text}");
    let (status, text) = rest.get("/v1/models").await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = rest.get("/v1/models/mlp/versions/7/metadata").await;
    assert_eq!(status, 404, "{text}");
}

async fn predict_formats(rest: &Rest<'_>) {
    // One input, one output: row and columnar, unnamed and named.
    let tiny = "/v1/models/tiny:predict";
    rest.expect_text(
        tiny,
        json!({"instances": [[1.0], [2.0], [3.5]]}),
        r#"{"predictions": [[3.0], [5.0], [8.0]]}"#,
    )
    .await;
    rest.expect_text(
        tiny,
        json!({"instances": [{"x": [1]}, {"x": [-2.25]}]}),
        r#"{"predictions": [[3.0], [-3.5]]}"#,
    )
    .await;
    rest.expect_text(
        tiny,
        json!({"inputs": [[1], [2]]}),
        r#"{"outputs": [[3.0], [5.0]]}"#,
    )
    .await;
    rest.expect_text(
        tiny,
        json!({"signature_name": "serving_default", "inputs": {"x": [[0.1]]}}),
        r#"{"outputs": [[1.2]]}"#,
    )
    .await;

    // NaN and the infinities as bare tokens, as TF Serving's parser reads and writes them;
    // the same words in strings are still strings, and integers cannot take them.
    let (status, text) = rest
        .post(tiny, r#"{"instances": [[NaN], [Infinity], [-Infinity]]}"#)
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, r#"{"predictions": [[NaN], [Infinity], [-Infinity]]}"#);
    rest.expect_error(tiny, r#"{"instances": [["NaN"]]}"#, 400, "a string")
        .await;
    rest.expect_error(
        "/v1/models/echo:predict",
        r#"{"signature_name": "int64", "instances": [NaN]}"#,
        400,
        "NaN, which DT_INT64 cannot take",
    )
    .await;

    // Several inputs and outputs: objects per batch element, or an object of tensors.
    let multi = "/v1/models/multi:predict";
    rest.expect_text(
        multi,
        json!({"instances": [{"a": [1, 2, 3], "b": [10, 20, 30]}, {"a": [4, 5, 6], "b": [0.5, -1, 2]}]}),
        r#"{"predictions": [{"sum": [11.0, 22.0, 33.0], "product": [10.0, 40.0, 90.0]}, {"sum": [4.5, 4.0, 8.0], "product": [2.0, -5.0, 12.0]}]}"#,
    )
    .await;
    rest.expect_text(
        multi,
        json!({"inputs": {"a": [[1, 2, 3]], "b": [[2, 2, 2]]}}),
        r#"{"outputs": {"sum": [[3.0, 4.0, 5.0]], "product": [[2.0, 4.0, 6.0]]}}"#,
    )
    .await;

    // Version and label in the path.
    for (path, factor) in [
        ("/v1/models/scaled:predict", 3.0),
        ("/v1/models/scaled/versions/2:predict", 2.0),
        ("/v1/models/scaled/labels/stable:predict", 1.0),
    ] {
        let (status, text) = rest
            .post(path, json!({"instances": [[1.5, -2.0]]}).to_string())
            .await;
        assert_eq!(status, 200, "{path}: {text}");
        let got: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            got,
            json!({"predictions": [[1.5 * factor, -2.0 * factor]]}),
            "{path}"
        );
    }
    // A signature with a regress method_name still predicts, with every output.
    rest.expect_text(
        "/v1/models/regressor:predict",
        json!({"signature_name": "predict", "instances": [[1, 2, 3]]}),
        r#"{"predictions": [{"outputs": 14.5, "scores": [0.5, 1.0, 1.5]}]}"#,
    )
    .await;
}

async fn predict_dtypes(rest: &Rest<'_>) {
    let echo = "/v1/models/echo:predict";
    let cases = [
        (
            "int64",
            json!([[9007199254740993_i64, i64::MIN, i64::MAX]]),
            "[[9007199254740993, -9223372036854775808, 9223372036854775807]]",
        ),
        (
            "int32",
            json!([[-2147483648_i64, 0, 2147483647]]),
            "[[-2147483648, 0, 2147483647]]",
        ),
        ("int8", json!([[-128, 0, 127]]), "[[-128, 0, 127]]"),
        ("uint8", json!([[0, 128, 255]]), "[[0, 128, 255]]"),
        ("bool", json!([[true, false]]), "[[true, false]]"),
        (
            "float64",
            json!([[0.1, 1e300, -2.5]]),
            "[[0.1, 1e300, -2.5]]",
        ),
        (
            "float32",
            json!([[0.1, 3.4028235e38, 1e-45]]),
            "[[0.1, 3.4028235e38, 1e-45]]",
        ),
        // 0.1 has no exact float16: the nearest one is printed in full.
        (
            "float16",
            json!([[1.5, 0.1, -65504]]),
            "[[1.5, 0.099975586, -65504.0]]",
        ),
        ("bfloat16", json!([[1.5, -2, 256]]), "[[1.5, -2.0, 256.0]]"),
    ];
    for (signature, inputs, outputs) in cases {
        rest.expect_text(
            echo,
            json!({"signature_name": signature, "inputs": inputs}),
            &format!(r#"{{"outputs": {outputs}}}"#),
        )
        .await;
    }
    // Bytes: {"b64": ...} fills the innermost dimension of a DT_UINT8 input.
    rest.expect_text(
        echo,
        json!({"signature_name": "uint8", "instances": [{"b64": "AAEC"}, {"b64": "/f7/"}]}),
        r#"{"predictions": [[0, 1, 2], [253, 254, 255]]}"#,
    )
    .await;
    // A scalar tensor in the columnar format.
    rest.expect_text(
        echo,
        json!({"signature_name": "int16", "inputs": -300}),
        r#"{"outputs": -300}"#,
    )
    .await;
}

/// The REST answer's float32 values are the same bits as the gRPC answer's.
async fn predict_float32_matches_grpc(rest: &Rest<'_>) {
    let values: Vec<f32> = (0..4 * 784)
        .map(|i| ((i * 7919) % 1000) as f32 / 317.0 - 1.5)
        .collect();
    let images = Tensor::from_values(vec![4, 784], &values).unwrap();

    let mut client = rest.server.prediction().await;
    let response = client
        .predict(PredictRequest {
            model_spec: Some(ModelSpec {
                name: "mlp".into(),
                ..Default::default()
            }),
            inputs: [("images".to_string(), tensor_to_proto(&images, false))].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let grpc = |name: &str| {
        common::decode_tensor(name, &response.outputs[name])
            .unwrap()
            .to_values::<f32>()
            .unwrap()
    };

    // The request carries each float32 as its shortest text, which must read back exactly.
    let rows: Vec<String> = values
        .chunks(784)
        .map(|row| {
            let numbers: Vec<String> = row.iter().map(|v| format!("{v:?}")).collect();
            format!("[{}]", numbers.join(","))
        })
        .collect();
    let body = format!("{{\"instances\": [{}]}}", rows.join(","));
    let (status, text) = rest.post("/v1/models/mlp:predict", body).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    let predictions = answer["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 4);
    for name in ["probabilities", "logits"] {
        let rest_values: Vec<f32> = predictions
            .iter()
            .flat_map(|p| p[name].as_array().unwrap().iter())
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let grpc_values = grpc(name);
        assert_eq!(rest_values.len(), 40);
        for (r, g) in rest_values.iter().zip(&grpc_values) {
            assert_eq!(r.to_bits(), g.to_bits(), "{name}: REST {r} vs gRPC {g}");
        }
    }
}

async fn classify_and_regress(rest: &Rest<'_>) {
    let classify = "/v1/models/regressor:classify";
    let regress = "/v1/models/regressor:regress";
    rest.expect_text(
        classify,
        json!({"signature_name": "classify", "examples": [{"x": [1, 2, 3]}, {"x": [0.5, 0, -1]}]}),
        r#"{"results": [[["a", 0.5], ["b", 1.0], ["c", 1.5]], [["a", 0.25], ["b", 0.0], ["c", -0.5]]]}"#,
    )
    .await;
    // An int64 feature, and a signature without class labels.
    rest.expect_text(
        classify,
        json!({"signature_name": "classify_ids", "examples": [{"ids": [1, 2]}, {"ids": [-3, 0]}]}),
        r#"{"results": [[["", 2.0], ["", 4.0]], [["", -6.0], ["", 0.0]]]}"#,
    )
    .await;
    rest.expect_text(
        regress,
        json!({"examples": [{"x": [1, 2, 3]}, {"x": [0.5, 0, 1]}]}),
        r#"{"results": [14.5, 4.0]}"#,
    )
    .await;
    // The context fills the features an example lacks; the example's own win.
    rest.expect_text(
        "/v1/models/regressor/versions/1:regress",
        json!({"context": {"x": [1, 1, 1]}, "examples": [{}, {"x": [0, 0, 0]}]}),
        r#"{"results": [6.5, 0.5]}"#,
    )
    .await;
    rest.expect_error(
        regress,
        json!({"signature_name": "classify", "examples": [{"x": [1, 2, 3]}]}).to_string(),
        400,
        "tensorflow/serving/regress",
    )
    .await;
    rest.expect_error(
        "/v1/models/mlp:classify",
        json!({"examples": [{"images": [1]}]}).to_string(),
        400,
        "method_name 'tensorflow/serving/predict'",
    )
    .await;
    rest.expect_error(
        regress,
        json!({"examples": [{"x": [1, 2]}]}).to_string(),
        400,
        "example 0, feature 'x': has 2 value(s) but the input takes 3",
    )
    .await;
    rest.expect_error(regress, json!({"examples": []}).to_string(), 400, "empty")
        .await;
}

async fn errors(rest: &Rest<'_>) {
    let tiny = "/v1/models/tiny:predict";
    let ok = json!({"instances": [[1.0]]}).to_string();
    rest.expect_error("/v1/models/nope:predict", ok.clone(), 404, "'nope'")
        .await;
    rest.expect_error(
        "/v1/models/tiny/versions/9:predict",
        ok.clone(),
        404,
        "version 9",
    )
    .await;
    rest.expect_error(
        "/v1/models/tiny/labels/gold:predict",
        ok.clone(),
        400,
        "Unrecognized servable version label: model 'tiny' has no version label 'gold'",
    )
    .await;
    rest.expect_error(
        "/v1/models/tiny:explain",
        ok.clone(),
        400,
        "Malformed request: POST",
    )
    .await;
    rest.expect_error(
        tiny,
        json!({"signature_name": "nope", "instances": [[1.0]]}).to_string(),
        400,
        "no signature 'nope'",
    )
    .await;
    rest.expect_error(
        tiny,
        json!({"instances": [[1.0], [2.0, 3.0]]}).to_string(),
        400,
        "instances[1]: a list of 2 element(s)",
    )
    .await;
    rest.expect_error(
        tiny,
        "{\"instances\": [[1.0], ",
        400,
        "JSON parse error: EOF while parsing a value at line 1 column 22",
    )
    .await;
    rest.expect_error(tiny, "{\"instances\": [[1.0]], }", 400, "line 1 column 24")
        .await;
    rest.expect_error(tiny, "[]", 400, "must be a JSON object")
        .await;
    rest.expect_error(
        tiny,
        json!({"instances": [["a"]]}).to_string(),
        400,
        "instances[0][0]: a string",
    )
    .await;
    rest.expect_error(
        tiny,
        json!({"instances": [[1]], "inputs": [[1]]}).to_string(),
        400,
        "only one",
    )
    .await;
    rest.expect_error(
        tiny,
        json!({"inputs": [[1, 2]]}).to_string(),
        400,
        "input 'x' has shape [1, 2]",
    )
    .await;
    // A model that raises: INTERNAL is 500, and the server keeps serving.
    rest.expect_error(
        "/v1/models/faulty:predict",
        json!({"instances": [[1.0, -2.0]]}).to_string(),
        500,
        "negative input",
    )
    .await;
    rest.expect_text(
        tiny,
        json!({"instances": [[1.0]]}),
        r#"{"predictions": [[3.0]]}"#,
    )
    .await;
    // Over the body limit: 413, with the same JSON error shape.
    let big = format!("{{\"instances\": [[{}1]]}}", "1,".repeat(BODY_LIMIT));
    rest.expect_error(tiny, big, 413, "--rest_api_max_body_bytes")
        .await;
    // Outside /v1/: a plain 404.
    let (status, _) = rest.get("/nothing/here").await;
    assert_eq!(status, 404);
}
