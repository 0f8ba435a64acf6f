//! The admin API and its fan-out, end to end: several real modelgate servers on 127.0.0.1,
//! and a small HTTP server answering the Kubernetes Endpoints API with their addresses, in
//! the API's own JSON shape, as `kubectl proxy` would relay it.

pub mod common;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use common::http::call;
use common::{fixture_config, free_port, model_status, run_to_exit, scratch, Server};
use modelgate::proto::serving::ReloadConfigRequest;
use serde_json::{json, Value};
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const TOKEN: &str = "test-admin-token";
const NAMESPACE: &str = "ml";
const SERVICE: &str = "modelgate";
/// A config of the named fixture models, written to `path`.
fn write_config(path: &FsPath, models: &[&str]) {
    std::fs::write(path, fixture_config(models)).unwrap();
}

/// One pod: modelgate with REST on, `args`, no file system polling and the CPU.
fn start_pod(args: &[String]) -> Server {
    let mut all = args.to_vec();
    all.extend([
        "--file_system_poll_wait_seconds=0".to_string(),
        "--device=cpu".to_string(),
    ]);
    Server::start_rest(&all, &[])
}

/// The fake Kubernetes API: `GET /api/v1/namespaces/{ns}/endpoints/{name}` answers the
/// Endpoints object held in `endpoints`; every request is counted.
struct FakeKubernetes {
    url: String,
    endpoints: Arc<Mutex<Value>>,
    requests: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct FakeState {
    endpoints: Arc<Mutex<Value>>,
    requests: Arc<AtomicUsize>,
}

impl FakeKubernetes {
    async fn start() -> FakeKubernetes {
        let state = FakeState {
            endpoints: Arc::new(Mutex::new(json!({}))),
            requests: Arc::new(AtomicUsize::new(0)),
        };
        let app = Router::new()
            .route(
                "/api/v1/namespaces/{namespace}/endpoints/{name}",
                get(endpoints),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeKubernetes {
            url,
            endpoints: state.endpoints,
            requests: state.requests,
        }
    }

    /// Lists `ready` and `not_ready` as `(pod name, REST port)` on 127.0.0.1. Pods share
    /// an IP here, so each gets a subset of its own, as the API groups addresses by ports.
    fn set_pods(&self, ready: &[(&str, u16)], not_ready: &[(&str, u16)]) {
        let address = |name: &str| {
            json!({
                "ip": "127.0.0.1",
                "nodeName": "node-1",
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": name, "uid": format!("uid-{name}")}
            })
        };
        let subset = |name: &str, port: u16, is_ready: bool| {
            let key = if is_ready {
                "addresses"
            } else {
                "notReadyAddresses"
            };
            json!({
                key: [address(name)],
                "ports": [
                    {"name": "grpc", "port": 8500, "protocol": "TCP", "appProtocol": "grpc"},
                    {"name": "http", "port": port, "protocol": "TCP"}
                ]
            })
        };
        let subsets: Vec<Value> = ready
            .iter()
            .map(|&(n, p)| subset(n, p, true))
            .chain(not_ready.iter().map(|&(n, p)| subset(n, p, false)))
            .collect();
        *self.endpoints.lock().unwrap() = json!({
            "kind": "Endpoints",
            "apiVersion": "v1",
            "metadata": {
                "name": SERVICE,
                "namespace": NAMESPACE,
                "uid": "endpoints-uid",
                "resourceVersion": "12345",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app.kubernetes.io/name": "modelgate"}
            },
            "subsets": subsets
        });
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn endpoints(
    State(state): State<FakeState>,
    Path((namespace, name)): Path<(String, String)>,
) -> (StatusCode, Json<Value>) {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if namespace == NAMESPACE && name == SERVICE {
        return (
            StatusCode::OK,
            Json(state.endpoints.lock().unwrap().clone()),
        );
    }
    // What the API server answers for a missing object.
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("endpoints \"{name}\" not found"), "reason": "NotFound",
        "details": {"name": name, "kind": "endpoints"}, "code": 404
    });
    (StatusCode::NOT_FOUND, Json(status))
}

fn admin_args(config: &FsPath, kubernetes: &FakeKubernetes) -> Vec<String> {
    vec![
        format!("--model_config_file={}", config.display()),
        format!("--admin_token={TOKEN}"),
        format!("--kubernetes_api_url={}", kubernetes.url),
        format!("--fanout_namespace={NAMESPACE}"),
        format!("--fanout_service={SERVICE}"),
        "--fanout_timeout_seconds=60".to_string(),
    ]
}

fn model_names(status: &Value) -> Vec<String> {
    status["models"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .map(|m| m["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fanned_out_reload_reaches_every_pod_and_a_down_pod_fails_alone() {
    let dir = scratch("reload");
    let config = dir.join("models.config");
    write_config(&config, &["tiny"]);
    let kubernetes = FakeKubernetes::start().await;
    let args = admin_args(&config, &kubernetes);
    let pods: Vec<Server> = (0..3).map(|_| start_pod(&args)).collect();
    for pod in &pods {
        pod.wait_readyz(200).await;
    }
    let down_port = free_port();
    let names = ["modelgate-a", "modelgate-b", "modelgate-c"];
    let ready: Vec<(&str, u16)> = names
        .iter()
        .zip(&pods)
        .map(|(n, p)| (*n, p.rest_port()))
        .collect();
    kubernetes.set_pods(&ready, &[]);

    // The config gains a model; one call to one pod reloads them all.
    write_config(&config, &["tiny", "scaled"]);
    let (status, answer) = call(
        "POST",
        &pods[1].url("/admin/reload?fanout=true"),
        Some(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer:#}\n{}", pods[1].log());
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["succeeded"], 3);
    let results = answer["pods"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (result, (name, port)) in results.iter().zip(&ready) {
        assert_eq!(result["pod"], *name);
        assert_eq!(result["address"], format!("127.0.0.1:{port}"));
        assert_eq!(result["ok"], true, "{result:#}");
        assert_eq!(result["status"], 200);
        assert_eq!(model_names(&result["response"]), ["scaled", "tiny"]);
    }
    // Each pod, asked directly (no fan-out), now serves the new model.
    for pod in &pods {
        let (status, answer) = call("GET", &pod.url("/admin/models"), Some(TOKEN))
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(model_names(&answer), ["scaled", "tiny"], "{}", pod.log());
        let scaled = &answer["models"][0]["model_version_status"];
        assert!(
            scaled
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["state"] == "AVAILABLE"),
            "{answer:#}"
        );
    }

    // One pod goes down and another is not ready: both fail, the others still answer.
    kubernetes.set_pods(
        &[ready[0], ("modelgate-down", down_port), ready[2]],
        &[("modelgate-starting", ready[1].1)],
    );
    let (status, answer) = call(
        "GET",
        &pods[0].url("/admin/models?fanout=true"),
        Some(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(status, 502, "{answer:#}");
    assert_eq!(answer["ok"], false);
    assert_eq!(
        (answer["succeeded"].as_u64(), answer["failed"].as_u64()),
        (Some(2), Some(2))
    );
    let results = answer["pods"].as_array().unwrap();
    let by_pod = |name: &str| {
        results
            .iter()
            .find(|r| r["pod"] == name)
            .unwrap_or_else(|| panic!("no result for {name}: {answer:#}"))
    };
    for name in ["modelgate-a", "modelgate-c"] {
        assert_eq!(by_pod(name)["ok"], true);
        assert_eq!(model_names(&by_pod(name)["response"]), ["scaled", "tiny"]);
    }
    let down = by_pod("modelgate-down");
    assert_eq!(down["ok"], false);
    assert!(down.get("status").is_none(), "{down:#}");
    assert!(
        down["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("refused"),
        "{down:#}"
    );
    let starting = by_pod("modelgate-starting");
    assert_eq!(starting["ok"], false);
    assert!(starting["error"].as_str().unwrap().contains("not ready"));

    // A bad config fails the reload on every pod, with the reason, and what serves stays.
    std::fs::write(&config, "model_config_list { config { name: ").unwrap();
    kubernetes.set_pods(&ready, &[]);
    let (status, answer) = call(
        "POST",
        &pods[2].url("/admin/reload?fanout=true"),
        Some(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(status, 502, "{answer:#}");
    for result in answer["pods"].as_array().unwrap() {
        assert_eq!(result["ok"], false);
        assert_eq!(result["status"], 400);
        assert!(
            result["error"].as_str().unwrap().contains("models.config"),
            "{result:#}"
        );
    }
    let (status, _) = call("GET", &pods[0].url("/readyz"), None).await.unwrap();
    assert_eq!(status, 200);

    // A file caught empty (mid-rewrite) is not a config that unloads everything, as TF
    // Serving takes no action for a config that sets no list; an explicit empty list is.
    let models_of = |pod: &Server| {
        let url = pod.url("/admin/models");
        async move {
            let (_, answer) = call("GET", &url, Some(TOKEN)).await.unwrap();
            model_names(&answer)
        }
    };
    for (text, status, left) in [
        ("", 400, vec!["scaled", "tiny"]),
        ("# being rewritten\n", 400, vec!["scaled", "tiny"]),
        ("model_config_list {}\n", 200, vec![]),
    ] {
        std::fs::write(&config, text).unwrap();
        let (got, answer) = call("POST", &pods[0].url("/admin/reload"), Some(TOKEN))
            .await
            .unwrap();
        assert_eq!(got, status, "{text:?}: {answer:#}");
        if status == 400 {
            let error = answer["error"].as_str().unwrap_or_default();
            assert!(error.contains("sets no model_config_list"), "{answer:#}");
        }
        assert_eq!(models_of(&pods[0]).await, left, "{text:?}");
    }
    drop(pods);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_token() {
    let dir = scratch("auth");
    let config = dir.join("models.config");
    write_config(&config, &["tiny"]);
    let kubernetes = FakeKubernetes::start().await;
    let pod = start_pod(&admin_args(&config, &kubernetes));
    kubernetes.set_pods(&[("modelgate-a", pod.rest_port())], &[]);

    for path in [
        "/admin/reload?fanout=true",
        "/admin/reload",
        "/admin/models?fanout=true",
        "/admin/peers",
    ] {
        let method = if path.starts_with("/admin/reload") {
            "POST"
        } else {
            "GET"
        };
        for token in [None, Some("wrong-token"), Some("")] {
            let (status, answer) = call(method, &pod.url(path), token).await.unwrap();
            assert_eq!(status, 401, "{method} {path} with {token:?}: {answer}");
            assert!(answer["error"].as_str().unwrap().contains("token"));
        }
    }
    // Refused before any pod is listed, let alone called.
    assert_eq!(kubernetes.requests(), 0);
    assert!(!pod.log().contains("wrong-token"), "the log shows a token");

    // The right token passes; the peer list is what the Endpoints say.
    let (status, answer) = call("GET", &pod.url("/admin/peers"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["pods"][0]["pod"], "modelgate-a");
    assert_eq!(answer["pods"][0]["ready"], true);
    assert!(answer["endpoints"]
        .as_str()
        .unwrap()
        .ends_with("/api/v1/namespaces/ml/endpoints/modelgate"));

    // TF Serving's ReloadConfig changes what is served too: with a token it needs it. An
    // empty model list would unload everything.
    let mut models = pod.models().await;
    let empty = || {
        let config =
            modelgate::config::parse_model_server_config("test", "model_config_list {}").unwrap();
        tonic::Request::new(ReloadConfigRequest {
            config: Some(config),
            ..Default::default()
        })
    };
    for token in [None, Some("Bearer wrong-token")] {
        let mut request = empty();
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", token.parse().unwrap());
        }
        let refused = models
            .handle_reload_config_request(request)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().contains("admin token"), "{refused:?}");
    }
    assert_eq!(pod.http_get("/readyz").await.0, 200, "tiny still serves");
    let mut request = empty();
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    models
        .handle_reload_config_request(request)
        .await
        .expect("the token passes");
    assert!(model_status(&mut models, "tiny").await.is_err(), "unloaded");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_off_without_a_token_and_kubernetes_errors_are_reported() {
    let dir = scratch("off");
    let config = dir.join("models.config");
    write_config(&config, &["tiny"]);
    let plain = start_pod(&[format!("--model_config_file={}", config.display())]);
    let (status, _) = call("GET", &plain.url("/admin/models"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _) = call("GET", &plain.url("/healthz"), None).await.unwrap();
    assert_eq!(status, 200);
    drop(plain);

    // A fan-out whose Service has no Endpoints says so, with the API's own message.
    let kubernetes = FakeKubernetes::start().await;
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let pod = start_pod(&[
        format!("--model_config_file={}", config.display()),
        format!("--admin_token_file={}", token_file.display()),
        format!("--kubernetes_api_url={}", kubernetes.url),
        format!("--fanout_namespace={NAMESPACE}"),
        "--fanout_service=other".to_string(),
    ]);
    let (status, answer) = call("GET", &pod.url("/admin/models?fanout=true"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(status, 503, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("404") && error.contains("endpoints \"other\" not found"),
        "{error}"
    );
    let (status, answer) = call("GET", &pod.url("/admin/models?fanout=yes"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("fanout"),
        "{answer}"
    );
    // Without fan-out the same pod answers for itself.
    let (status, answer) = call("GET", &pod.url("/admin/models"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(model_names(&answer), ["tiny"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_admin_flags_stop_the_server_with_the_flag_named() {
    let dir = scratch("flags");
    let config = dir.join("models.config");
    write_config(&config, &["tiny"]);
    let cases: [(&[&str], &str); 4] = [
        (
            &["--admin_token=a", "--admin_token_file=/nonexistent"],
            "not both",
        ),
        (
            &["--admin_token_file=/nonexistent/token"],
            "--admin_token_file",
        ),
        (
            &[
                "--admin_token=a",
                "--kubernetes_api_url=https://kubernetes.default.svc",
            ],
            "--kubernetes_api_url",
        ),
        (
            &["--admin_token=a", "--fanout_namespace=Not_A_Name"],
            "--fanout_namespace",
        ),
    ];
    for (args, expected) in cases {
        let config_arg = format!("--model_config_file={}", config.display());
        let mut all = vec![
            "--port=0",
            "--rest_api_port=0",
            "--bind_address=127.0.0.1",
            &config_arg,
        ];
        all.extend_from_slice(args);
        let (ok, stderr) = run_to_exit(&all);
        assert!(!ok, "{args:?} started:\n{stderr}");
        assert!(stderr.contains(expected), "{args:?}:\n{stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
