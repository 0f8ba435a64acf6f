//! Shared test support: start the real `modelgate` binary on 127.0.0.1 and talk to it.
#![allow(dead_code)]

use modelgate::proto::serving::model_service_client::ModelServiceClient;
use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::{model_spec, GetModelStatusRequest, ModelSpec};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub type RawTransport = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture repository written by `models/generate.py fixtures` (`make models`).
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("MODELGATE_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-models"));
    assert!(
        dir.join("fixtures.config").is_file(),
        "test models missing in {}: run `make models` (or models/generate.py fixtures {})",
        dir.display(),
        dir.display()
    );
    dir
}

/// The demo repository (`models/`), with its generated mlp.
pub fn demo_models() -> PathBuf {
    let dir = repo_root().join("models");
    assert!(
        dir.join("mlp/2/model.pt").is_file(),
        "demo models missing: run `make models`"
    );
    dir
}

/// Writes a ModelServerConfig listing `(name, base_path, extra text)` entries.
pub fn write_config(dir: &std::path::Path, models: &[(&str, PathBuf, &str)]) -> PathBuf {
    let mut text = String::from("model_config_list {\n");
    for (name, base, extra) in models {
        text.push_str(&format!(
            "  config {{ name: \"{name}\" base_path: \"{}\" model_platform: \"pytorch\" {extra} }}\n",
            base.display()
        ));
    }
    text.push_str("}\n");
    let path = dir.join("models.config");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("modelgate-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[derive(Default)]
struct Log {
    text: String,
    grpc: Option<SocketAddr>,
    rest: Option<SocketAddr>,
    exited: bool,
}

/// The real server process. Killed on drop.
pub struct Server {
    child: Child,
    pub grpc: SocketAddr,
    pub rest: Option<SocketAddr>,
    log: Arc<(Mutex<Log>, Condvar)>,
}

impl Server {
    /// Starts `modelgate` with `args` plus an ephemeral gRPC port on 127.0.0.1 (REST off
    /// unless `args` names a --rest_api_port), and waits until its ports are open.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_modelgate"));
        command
            .args(["--port=0", "--bind_address=127.0.0.1"])
            .args(if args.iter().any(|a| a.starts_with("--rest_api_port")) {
                &[][..]
            } else {
                &["--rest_api_port=0"][..]
            })
            .args(args)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn modelgate");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let reader_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, cvar) = &*reader_log;
                let mut log = lock.lock().unwrap();
                if let Some(addr) = listening_addr(&line, "gRPC server listening on ") {
                    log.grpc = Some(addr);
                }
                if let Some(addr) = listening_addr(&line, "REST server listening on ") {
                    log.rest = Some(addr);
                }
                log.text.push_str(&line);
                log.text.push('\n');
                cvar.notify_all();
            }
            let (lock, cvar) = &*reader_log;
            lock.lock().unwrap().exited = true;
            cvar.notify_all();
        });
        let wants_rest = args
            .iter()
            .any(|a| a.starts_with("--rest_api_port") && *a != "--rest_api_port=0");
        let (grpc, rest) = {
            let (lock, cvar) = &*log;
            let deadline = Instant::now() + START_TIMEOUT;
            let mut state = lock.lock().unwrap();
            while (state.grpc.is_none() || (wants_rest && state.rest.is_none())) && !state.exited {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(
                    !left.is_zero(),
                    "server did not open its ports:\n{}",
                    state.text
                );
                state = cvar.wait_timeout(state, left).unwrap().0;
            }
            assert!(
                state.grpc.is_some(),
                "server exited before listening:\n{}",
                state.text
            );
            (state.grpc.unwrap(), state.rest)
        };
        Server {
            child,
            grpc,
            rest,
            log,
        }
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.0.lock().unwrap().text.clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let (lock, cvar) = &*self.log;
        let deadline = Instant::now() + timeout;
        let mut state = lock.lock().unwrap();
        while !state.text.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state.exited {
                return false;
            }
            state = cvar.wait_timeout(state, left).unwrap().0;
        }
        true
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn prediction(&self) -> PredictionServiceClient<Channel> {
        PredictionServiceClient::new(self.channel().await)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// A client whose transport sends `grpc-timeout` without acting on it.
    pub fn raw_prediction(&self) -> PredictionServiceClient<RawTransport> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let origin = format!("http://{}", self.grpc).parse().expect("uri");
        PredictionServiceClient::with_origin(client, origin)
    }

    pub async fn models(&self) -> ModelServiceClient<Channel> {
        ModelServiceClient::new(self.channel().await)
    }

    /// Waits until every model in `models` has an AVAILABLE version.
    pub async fn wait_available(&self, models: &[&str]) {
        let mut client = self.models().await;
        let deadline = Instant::now() + START_TIMEOUT;
        for model in models {
            loop {
                let status = client
                    .get_model_status(GetModelStatusRequest {
                        model_spec: Some(spec(model)),
                    })
                    .await;
                let available = status.is_ok_and(|s| {
                    s.into_inner()
                        .model_version_status
                        .iter()
                        .any(|v| v.state == 30)
                });
                if available {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "model {model} never became available:\n{}",
                    self.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Waits for the process to exit, returning its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening_addr(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A ModelSpec for the latest version.
pub fn spec(model: &str) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        ..Default::default()
    }
}

pub fn spec_version(model: &str, version: i64) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        version_choice: Some(model_spec::VersionChoice::Version(version)),
        ..Default::default()
    }
}

pub fn spec_label(model: &str, label: &str) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        version_choice: Some(model_spec::VersionChoice::VersionLabel(label.to_string())),
        ..Default::default()
    }
}

pub fn spec_signature(model: &str, signature: &str) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        signature_name: signature.to_string(),
        ..Default::default()
    }
}
