//! The one harness of the integration tests (and of `benches/serving.rs`, which includes this
//! file by path): the real `modelgate` binary on 127.0.0.1 with its log, gRPC and HTTP
//! clients, the test model repositories and configs over them, and bounded waits. Every wait
//! is bounded; nothing is skipped: a missing prerequisite fails saying how to get it.
//! `http` holds the small HTTP client, `s3` a real S3 server (moto) and an S3 client, `tls`
//! certificates made for a test and TLS clients.
//!
//! Each test binary compiles this harness on its own and uses a part of it, so each declares
//! it `pub mod common;`: its public items are then the binary's exported API, which the
//! `dead_code` lint leaves alone, while anything private here that nothing uses still warns.

pub mod http;
pub mod s3;
pub mod tls;

use modelgate::proto::serving::model_service_client::ModelServiceClient;
use modelgate::proto::serving::model_version_status::State;
use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::{model_spec, GetModelStatusRequest, ModelSpec, PredictRequest};
use modelgate::proto::tensor::{shape_proto, tensor_from_proto};
use modelgate::proto::tensorflow::{DataType, TensorProto};
use std::fmt::Display;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// How long any wait (a port, a model version, a log line, an exit) may take before it fails.
/// Generous: several servers may start libtorch at once on a small machine.
pub const TIMEOUT: Duration = Duration::from_secs(120);

pub type RawTransport = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture repository written by `models/generate.py fixtures target/test-models`
/// (`make models`), or the one `MODELGATE_TEST_MODELS` names (relative to the repo root).
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
        dir.join("fixtures.config").is_file(),
        "test models missing in {}: run `make models` (or \
         `python models/generate.py fixtures {}`)",
        dir.display(),
        dir.display()
    );
    dir
}

/// The PyTorch 2 fixtures written by `models/pt2_fixtures.py target/pt2-models`
/// (`make models`): AOTInductor packages made by the project's export command.
pub fn pt2_fixtures() -> PathBuf {
    let dir = repo_root().join("target/pt2-models");
    assert!(
        dir.join("expected.json").is_file(),
        "PyTorch 2 fixtures missing in {}: run `make models` (or \
         `python models/pt2_fixtures.py target/pt2-models`)",
        dir.display()
    );
    dir
}

/// The demo repository (`models/`) written by `models/generate.py demo models`.
pub fn demo_models() -> PathBuf {
    let dir = repo_root().join("models");
    assert!(
        dir.join("mlp/2/model.pt").is_file(),
        "demo models missing: run `make models` (or `python models/generate.py demo models`)"
    );
    dir
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("modelgate-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh scratch directory under cargo's target tmp dir, removed first if a run left it
/// (and left behind after the test, for a look at what the server wrote).
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A TCP port free right now on 127.0.0.1 (bound and released; fine for tests). REST needs
/// a fixed one: port 0 turns REST off.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
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

/// A ModelServerConfig over `(name, base_path, extra config text)` pytorch models.
pub fn model_config(models: &[(&str, &Path, &str)]) -> String {
    let entries: Vec<String> = models
        .iter()
        .map(|(name, base, extra)| {
            format!(
                "name: \"{name}\" base_path: \"{}\" model_platform: \"pytorch\"\n    {extra}",
                base.display()
            )
        })
        .collect();
    config_text(&entries)
}

/// A ModelServerConfig over the named fixture models.
pub fn fixture_config(names: &[&str]) -> String {
    let fixtures = fixtures();
    let paths: Vec<PathBuf> = names.iter().map(|name| fixtures.join(name)).collect();
    let models: Vec<_> = names
        .iter()
        .zip(&paths)
        .map(|(name, path)| (*name, path.as_path(), ""))
        .collect();
    model_config(&models)
}

/// Writes `model_config(models)` to `dir/models.config` and returns that path.
pub fn write_config(dir: &Path, models: &[(&str, PathBuf, &str)]) -> PathBuf {
    let models: Vec<_> = models
        .iter()
        .map(|(name, path, extra)| (*name, path.as_path(), *extra))
        .collect();
    let path = dir.join("models.config");
    std::fs::write(&path, model_config(&models)).expect("write config");
    path
}

/// Polls `check` until it returns `Some`, for at most `TIMEOUT`; fails saying it timed out
/// waiting for `what` (formatted only then: see [`WithLog`]).
pub async fn wait_for<T, F, Fut>(what: impl Display, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_for`] for code that is not async: polls `check` until it returns `Some`, for at
/// most `TIMEOUT`.
pub fn wait_until<T>(what: impl Display, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a wait is for, followed by what `log` holds when the wait fails (read only then).
pub struct WithLog<'a, W>(pub W, pub &'a Log);

impl<W: Display> Display for WithLog<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; the log so far:\n{}", self.0, self.1.text())
    }
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

/// The lines a child process writes to stderr, collected by a reader thread that drains the
/// pipe for the process's whole life (so that it never blocks on a full pipe).
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Lines>, Condvar)>);

impl Log {
    pub fn follow(stream: impl std::io::Read + Send + 'static) -> Log {
        let log = Log::default();
        let shared = Arc::clone(&log.0);
        std::thread::spawn(move || {
            let (lock, changed) = &*shared;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                lock.lock().unwrap().lines.push(line);
                changed.notify_all();
            }
            lock.lock().unwrap().closed = true;
            changed.notify_all();
        });
        log
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().lines.clone()
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.0 .0.lock().unwrap().lines.join("\n")
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.count(&[needle]) > 0
    }

    /// Lines containing every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.0
             .0
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .count()
    }

    /// Blocks until `find` finds something in the lines, the stream closes, or `timeout`.
    pub fn wait_until<T>(
        &self,
        timeout: Duration,
        mut find: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        let (lock, changed) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut state = lock.lock().unwrap();
        loop {
            if let Some(found) = find(&state.lines) {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state.closed {
                return None;
            }
            state = changed.wait_timeout(state, left).unwrap().0;
        }
    }

    /// Blocks until a line contains `needle`; false on timeout or when the stream closed.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_until(timeout, |lines| {
            lines.iter().any(|l| l.contains(needle)).then_some(())
        })
        .is_some()
    }

    /// Waits (asynchronously, at most `TIMEOUT`) for a line containing all of `needles`.
    pub async fn wait_for(&self, needles: &[&str]) {
        let what = WithLog(format!("a log line with {needles:?}"), self);
        wait_for(what, || async { (self.count(needles) > 0).then_some(()) }).await
    }
}

/// The address after `marker` in a log line (text or JSON log format).
fn listening_addr(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split(|c: char| c.is_whitespace() || c == '"')
        .next()?
        .parse()
        .ok()
}

/// The real server process, started on an ephemeral gRPC port of 127.0.0.1 and waited for
/// until its ports are open. Killed on drop if still running.
pub struct Server {
    child: Child,
    pub grpc: SocketAddr,
    /// The REST address; `None` when REST is off.
    pub rest: Option<SocketAddr>,
    pub log: Log,
    /// What the server writes to stdout (request log records of a `stdout` collector).
    pub stdout: Log,
    _config_dir: Option<TempDir>,
}

impl Server {
    /// Starts `modelgate` with `args`; REST is off unless `args` name a --rest_api_port.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn(
            args.iter().map(|a| a.to_string()).collect(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            None,
        )
    }

    /// Starts `modelgate` with `args` and `env`, and REST on a free port.
    pub fn start_rest(args: &[String], env: &[(String, String)]) -> Server {
        let mut all = vec![format!("--rest_api_port={}", free_port())];
        all.extend_from_slice(args);
        Server::spawn(all, env.to_vec(), None)
    }

    /// Starts `modelgate` with `config` as its model config file, REST on a free port, and
    /// `extra` flags.
    pub fn with_config(config: &str, extra: &[&str]) -> Server {
        Server::with_config_env(config, extra, &[])
    }

    pub fn with_config_env(config: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = TempDir::new("config");
        let path = dir.path().join("models.config");
        std::fs::write(&path, config).expect("write config");
        let mut args = vec![
            format!("--rest_api_port={}", free_port()),
            format!("--model_config_file={}", path.display()),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Server::spawn(args, env, Some(dir))
    }

    fn spawn(args: Vec<String>, env: Vec<(String, String)>, config_dir: Option<TempDir>) -> Server {
        let names_rest = args.iter().any(|a| a.starts_with("--rest_api_port"));
        let wants_rest = names_rest && !args.iter().any(|a| a == "--rest_api_port=0");
        let mut command = Command::new(env!("CARGO_BIN_EXE_modelgate"));
        command
            .args(["--port=0", "--bind_address=127.0.0.1"])
            .args((!names_rest).then_some("--rest_api_port=0"))
            .args(&args)
            .env("NO_COLOR", "1")
            // Nothing from the caller's environment reaches the server unless a test says so.
            .env_remove("MODELGATE_LOG_FORMAT")
            .env_remove("POD_NAMESPACE")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_ENDPOINT_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("MODELGATE_LOG").is_none() {
            command.env("MODELGATE_LOG", "info");
        }
        command.envs(env);
        let mut child = command.spawn().expect("spawn modelgate");
        let log = Log::follow(child.stderr.take().expect("stderr"));
        let stdout = Log::follow(child.stdout.take().expect("stdout"));
        let addrs = log.wait_until(TIMEOUT, |lines| {
            let find = |marker| lines.iter().find_map(|l| listening_addr(l, marker));
            let grpc = find("gRPC server listening on ")?;
            let rest = find("REST server listening on ");
            (!wants_rest || rest.is_some()).then_some((grpc, rest))
        });
        let Some((grpc, rest)) = addrs else {
            let _ = child.kill();
            let status = child.wait().ok();
            panic!(
                "modelgate did not open its ports (exit: {status:?}):\n{}",
                log.text()
            );
        };
        Server {
            child,
            grpc,
            rest,
            log,
            stdout,
            _config_dir: config_dir,
        }
    }

    /// The REST address (REST must be on).
    pub fn rest_addr(&self) -> SocketAddr {
        self.rest.expect("REST is off for this server")
    }

    pub fn rest_port(&self) -> u16 {
        self.rest_addr().port()
    }

    /// `http://REST_ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.rest_addr())
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident set now, and its anonymous part, from /proc.
    pub fn memory(&self) -> Memory {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
        let bytes = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                .map(|kib| kib * 1024)
                .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        };
        Memory {
            resident: bytes("VmRSS:"),
            anonymous: bytes("RssAnon:"),
        }
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Waits until a log line contains `needle`; fails after `TIMEOUT`.
    pub fn wait_for_log(&self, needle: &str) {
        assert!(
            self.log.wait_line(needle, TIMEOUT),
            "no log line with '{needle}':\n{}",
            self.log()
        );
    }

    /// Sends a signal (`TERM`, `INT`) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; fails after `TIMEOUT`.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        wait_until(WithLog("modelgate to exit", &self.log), || {
            child.try_wait().unwrap()
        })
    }

    /// `GET path` on the REST port: the status code and the body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http::request("GET", &self.url(path), None)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    /// Polls `/readyz` until it answers `status`.
    pub async fn wait_readyz(&self, status: u16) {
        let what = self.awaiting(format!("/readyz to answer {status}"));
        wait_for(what, || async {
            let answer = http::request("GET", &self.url("/readyz"), None).await;
            answer.is_ok_and(|(code, _)| code == status).then_some(())
        })
        .await
    }

    /// `what` a wait is for, with this server's log when it fails: for [`wait_for`].
    pub fn awaiting<W: Display>(&self, what: W) -> WithLog<'_, W> {
        WithLog(what, &self.log)
    }

    /// The sum of the samples on `/metrics` of the series `name` (a counter or gauge, or a
    /// histogram's `_count`) whose labels contain every one of `labels` (`model="x"`); 0
    /// when there is none.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let (_, text) = self.http_get("/metrics").await;
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?;
                let labelled = rest.starts_with('{') || rest.starts_with(' ');
                (labelled && labels.iter().all(|l| rest.contains(l))).then_some(rest)
            })
            .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.grpc_url())
            .expect("uri")
            .connect()
            .await
            .expect("connect gRPC")
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
        let origin = self.grpc_url().parse().expect("uri");
        PredictionServiceClient::with_origin(client, origin)
    }

    pub async fn models(&self) -> ModelServiceClient<Channel> {
        ModelServiceClient::new(self.channel().await)
    }

    /// Waits until every model in `models` has an AVAILABLE version.
    pub async fn wait_available(&self, models: &[&str]) {
        let client = self.models().await;
        for model in models {
            let what = self.awaiting(format!("model {model} to become available"));
            wait_for(what, || {
                let mut client = client.clone();
                async move {
                    let statuses = model_status(&mut client, model).await.ok()?;
                    let available = statuses.iter().any(|(_, s, _)| *s == State::Available);
                    available.then_some(())
                }
            })
            .await
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's memory, in bytes: its resident set, and the anonymous part of it (heap,
/// malloc arenas, thread stacks; the rest is mapped files such as libtorch's code).
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub resident: u64,
    pub anonymous: u64,
}

/// Runs `modelgate` with `args` to its exit (for flags and configs it refuses): whether it
/// succeeded, and its stderr.
pub fn run_to_exit(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run modelgate");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `modelgate` on the `tiny` fixture with `flags` to its exit, which must be a refusal
/// to start: its stderr.
pub fn refused_start(flags: &[&str]) -> String {
    let base = format!("--model_base_path={}", fixtures().join("tiny").display());
    let mut args = vec!["--port=0", "--rest_api_port=0", base.as_str()];
    args.extend_from_slice(flags);
    let (ok, stderr) = run_to_exit(&args);
    assert!(!ok, "modelgate {flags:?} started:\n{stderr}");
    stderr
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

/// Decodes a tensor the server answered with (without a budget: the server made it).
pub fn decode_tensor(
    name: &str,
    proto: &TensorProto,
) -> Result<modelgate::tensor::Tensor, modelgate::error::Error> {
    tensor_from_proto(
        name,
        proto,
        &mut modelgate::tensor::limits::DecodeBudget::unlimited(),
    )
}

/// tf.Example rows of one float feature `x`, as a Classify / Regress input.
pub fn examples<R: AsRef<[f32]>>(rows: &[R]) -> Option<modelgate::proto::serving::Input> {
    use modelgate::proto::serving::{input, ExampleList, Input};
    use modelgate::proto::tensorflow::{feature, Example, Feature, Features, FloatList};
    let examples = rows
        .iter()
        .map(|row| Example {
            features: Some(Features {
                feature: [(
                    "x".to_string(),
                    Feature {
                        kind: Some(feature::Kind::FloatList(FloatList {
                            value: row.as_ref().to_vec(),
                        })),
                    },
                )]
                .into(),
            }),
        })
        .collect();
    Some(Input {
        kind: Some(input::Kind::ExampleList(ExampleList { examples })),
    })
}

/// A float tensor of shape `dims`.
pub fn floats(dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: Some(shape_proto(Some(dims))),
        float_val: values.to_vec(),
        ..Default::default()
    }
}

/// A `[1, n]` float tensor.
pub fn float_row(values: &[f32]) -> TensorProto {
    floats(&[1, values.len() as i64], values)
}

/// The `counter` fixture's forwards so far, read from its `count` signature (on the CPU all
/// its workers share one module).
pub async fn forwards(server: &Server) -> i64 {
    let mut client = server.prediction().await;
    let response = client
        .predict(PredictRequest {
            model_spec: Some(spec_signature("counter", "count")),
            inputs: [("x".to_string(), floats(&[1], &[0.0]))].into(),
            ..Default::default()
        })
        .await
        .expect("count")
        .into_inner();
    decode_tensor("calls", &response.outputs["calls"])
        .unwrap()
        .to_values::<i64>()
        .unwrap()[0]
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
    let values = decode_tensor("y", y)
        .ok()
        .and_then(|t| t.to_values::<f32>())
        .expect("output y is float");
    Ok((version, values))
}

/// GetModelStatus: `(version, state, error message)` of each version, or the error.
pub async fn model_status(
    client: &mut ModelServiceClient<Channel>,
    model: &str,
) -> Result<Vec<(i64, State, String)>, tonic::Status> {
    let response = client
        .get_model_status(GetModelStatusRequest {
            model_spec: Some(spec(model)),
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

/// A warm-up record (a `PredictionLog`) for the counter fixture: one row `[1, rounds]`
/// (busy for `rounds` matmuls) as its input `input` (not `x`: a record it refuses).
pub fn counter_record(input: &str, rounds: f32) -> Vec<u8> {
    use modelgate::proto::serving::{prediction_log, PredictLog, PredictionLog};
    use prost::Message;
    let request = PredictRequest {
        model_spec: Some(spec("counter")),
        inputs: [(input.to_string(), float_row(&[1.0, rounds]))].into(),
        ..Default::default()
    };
    PredictionLog {
        log_type: Some(prediction_log::LogType::PredictLog(PredictLog {
            request: Some(request),
            response: None,
        })),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Warm-up records as one TFRecord file.
pub fn tfrecord(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        modelgate::tfrecord::frame_into(&mut out, record);
    }
    out
}
