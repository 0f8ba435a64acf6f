//! Harness of the S3 repository and hot-swap tests: the real modelgate binary, a real S3
//! server (moto's server mode, on 127.0.0.1) and gRPC/HTTP clients. Every wait is bounded;
//! nothing is skipped: a missing prerequisite fails with a message saying how to install it.
#![allow(dead_code)] // each test binary uses its own part of the harness

use modelgate::proto::serving::model_version_status::State;
use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::{
    model_service_client::ModelServiceClient, model_spec, GetModelStatusRequest, ModelSpec,
    PredictRequest,
};
use modelgate::proto::tensorflow::{
    tensor_shape_proto::Dim, DataType, TensorProto, TensorShapeProto,
};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Longest wait for anything (a port, a model version, a log line).
pub const WAIT: Duration = Duration::from_secs(60);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture repository written by `models/generate.py fixtures target/test-models`.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("MODELGATE_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-models"));
    let dir = if dir.is_absolute() {
        dir
    } else {
        repo_root().join(dir)
    };
    assert!(
        dir.join("scaled/3/model.pt").is_file(),
        "test models missing in {}: run `python models/generate.py fixtures target/test-models`",
        dir.display()
    );
    dir
}

/// A fresh scratch directory under the target dir, removed first if a run left it.
pub fn scratch(name: &str) -> PathBuf {
    let dir = repo_root()
        .join("target/test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns `Some`, for at most `WAIT`.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lines a child process wrote to stderr, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn follow(&self, stream: impl std::io::Read + Send + 'static) {
        let lines = Arc::clone(&self.0);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// Lines containing every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .count()
    }

    pub async fn wait_for(&self, needles: &[&str]) {
        let what = format!("a log line with {needles:?}");
        wait_for(&what, || async { (self.count(needles) > 0).then_some(()) }).await;
    }
}

/// moto's S3 server on 127.0.0.1, run with the Python named by `MODELGATE_PYTHON` (default
/// `.venv/bin/python`, where `pip install -r tests/python/requirements.txt` puts moto).
pub struct Moto {
    pub port: u16,
    /// HTTPS with a self-signed certificate (moto's `-s`) instead of HTTP.
    pub tls: bool,
    child: Option<Child>,
    pub log: Log,
}

impl Moto {
    pub fn start() -> Moto {
        Moto::start_with(false)
    }

    /// moto over HTTPS, with a certificate no one can verify.
    pub fn start_tls() -> Moto {
        Moto::start_with(true)
    }

    fn start_with(tls: bool) -> Moto {
        let mut moto = Moto {
            port: free_port(),
            tls,
            child: None,
            log: Log::default(),
        };
        moto.restart();
        moto
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port (moto keeps its buckets in memory: they are
    /// gone after a stop).
    pub fn restart(&mut self) {
        self.stop();
        let python = std::env::var_os("MODELGATE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
        let mut child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(self.tls.then_some("-s"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (set MODELGATE_PYTHON to a Python with moto[server]; \
                     `pip install -r tests/python/requirements.txt`): {e}",
                    python.display()
                )
            });
        self.log.follow(child.stderr.take().unwrap());
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "moto server exited ({status}); is moto[server] installed for {}?\n{}",
                    python.display(),
                    self.log.text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto did not open port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// An S3 client for the tests' own uploads.
    pub fn client(&self) -> S3 {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "test-key",
                "test-secret",
                None,
                None,
                "tests",
            ))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .http_client(modelgate::storage::s3_http_client(!self.tls))
            .build();
        S3(aws_sdk_s3::Client::from_conf(config))
    }

    /// The environment modelgate needs to reach this server: static keys (first in the
    /// credential chain) and no instance metadata.
    pub fn server_env(&self, secret: &str) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test-key"),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("S3_ENDPOINT", &format!("127.0.0.1:{}", self.port)),
            ("S3_USE_HTTPS", if self.tls { "1" } else { "0" }),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Test-side S3 calls.
pub struct S3(pub aws_sdk_s3::Client);

impl S3 {
    pub async fn create_bucket(&self, bucket: &str) {
        self.0.create_bucket().bucket(bucket).send().await.unwrap();
    }

    pub async fn put(&self, bucket: &str, key: &str, body: impl Into<Vec<u8>>) {
        self.0
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.into().into())
            .send()
            .await
            .unwrap_or_else(|e| panic!("put s3://{bucket}/{key}: {e:?}"));
    }

    /// Uploads the files of a local version directory, in the order given.
    pub async fn put_files(&self, bucket: &str, prefix: &str, dir: &Path, names: &[&str]) {
        for name in names {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            self.put(bucket, &format!("{prefix}/{name}"), bytes).await;
        }
    }
}

/// The modelgate binary, started on ephemeral ports with its stderr collected.
pub struct Server {
    child: Child,
    pub grpc: String,
    pub rest_port: u16,
    pub log: Log,
}

impl Server {
    /// Starts modelgate with `args` (plus ports and bind address) and `env`.
    pub fn start(args: &[String], env: &[(String, String)]) -> Server {
        let rest_port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_modelgate"));
        command
            .args(["--port=0", "--bind_address=127.0.0.1", "--device=cpu"])
            .arg(format!("--rest_api_port={rest_port}"))
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_ENDPOINT_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if std::env::var_os("MODELGATE_LOG").is_none() {
            command.env("MODELGATE_LOG", "info");
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start modelgate");
        let log = Log::default();
        log.follow(child.stderr.take().unwrap());
        let deadline = Instant::now() + WAIT;
        let grpc = loop {
            let text = log.text();
            if let Some(at) = text.find("gRPC server listening on ") {
                let rest = &text[at + "gRPC server listening on ".len()..];
                break rest.split_whitespace().next().unwrap().to_string();
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("modelgate exited ({status}) before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "modelgate did not listen:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Server {
            child,
            grpc: format!("http://{grpc}"),
            rest_port,
            log,
        }
    }

    pub async fn prediction(&self) -> PredictionServiceClient<Channel> {
        PredictionServiceClient::connect(self.grpc.clone())
            .await
            .expect("connect gRPC")
    }

    pub async fn model_service(&self) -> ModelServiceClient<Channel> {
        ModelServiceClient::connect(self.grpc.clone())
            .await
            .expect("connect gRPC")
    }

    /// `GET path` on the REST port: the status code and the body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.rest_port))
            .await
            .expect("connect REST");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }

    pub async fn wait_ready(&self) {
        wait_for("/readyz to answer 200", || async {
            let ready = tokio::net::TcpStream::connect(("127.0.0.1", self.rest_port))
                .await
                .is_ok()
                && self.http_get("/readyz").await.0 == 200;
            ready.then_some(())
        })
        .await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `[1, n]` float tensor.
pub fn float_row(values: &[f32]) -> TensorProto {
    TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: Some(TensorShapeProto {
            dim: vec![
                Dim {
                    size: 1,
                    ..Default::default()
                },
                Dim {
                    size: values.len() as i64,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        float_val: values.to_vec(),
        ..Default::default()
    }
}

pub fn spec(model: &str, version: Option<model_spec::VersionChoice>) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        version_choice: version,
        ..Default::default()
    }
}

/// Predict on a `scaled`-like model (input `x`, output `y`): the version that answered and
/// the output values.
pub async fn predict(
    client: &mut PredictionServiceClient<Channel>,
    model: ModelSpec,
    x: &[f32],
) -> Result<(i64, Vec<f32>), tonic::Status> {
    let response = client
        .predict(PredictRequest {
            model_spec: Some(model),
            inputs: [("x".to_string(), float_row(x))].into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let version = match response.model_spec.and_then(|s| s.version_choice) {
        Some(model_spec::VersionChoice::Version(v)) => v,
        other => panic!("response without a version: {other:?}"),
    };
    let y = response.outputs.get("y").expect("output y");
    let values = if y.float_val.is_empty() {
        y.tensor_content
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        y.float_val.clone()
    };
    Ok((version, values))
}

/// GetModelStatus: `(version, state, error message)` of each version, or the error.
pub async fn model_status(
    client: &mut ModelServiceClient<Channel>,
    model: &str,
) -> Result<Vec<(i64, State, String)>, tonic::Status> {
    let response = client
        .get_model_status(GetModelStatusRequest {
            model_spec: Some(spec(model, None)),
        })
        .await?
        .into_inner();
    Ok(response
        .model_version_status
        .into_iter()
        .map(|s| {
            (
                s.version,
                State::try_from(s.state).unwrap_or(State::Unknown),
                s.status.map(|st| st.error_message).unwrap_or_default(),
            )
        })
        .collect())
}

/// Waits until `model` reports `version` in `state`; returns that version's error message.
pub async fn wait_for_state(
    client: &ModelServiceClient<Channel>,
    model: &str,
    version: i64,
    state: State,
) -> String {
    let what = format!("{model} version {version} to be {state:?}");
    wait_for(&what, || {
        let mut client = client.clone();
        async move {
            let statuses = model_status(&mut client, model).await.ok()?;
            statuses
                .into_iter()
                .find(|(v, s, _)| *v == version && *s == state)
                .map(|(_, _, error)| error)
        }
    })
    .await
}

/// A ModelServerConfig text with one `config { ... }` per entry (the entry's inside).
pub fn config_text(models: &[String]) -> String {
    let mut text = String::from("model_config_list {\n");
    for model in models {
        text.push_str(&format!("  config {{ {model} }}\n"));
    }
    text.push_str("}\n");
    text
}
