//! Shared by the integration tests: the real `modelgate` binary on 127.0.0.1, its log, and
//! model configs over the test fixtures.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long any wait in these tests may take before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(120);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture repository written by `models/generate.py fixtures target/test-models`.
pub fn fixtures() -> PathBuf {
    let dir = repo_root().join("target").join("test-models");
    assert!(
        dir.join("regressor/1/model.pt").is_file(),
        "test models missing: run `python models/generate.py fixtures target/test-models` \
         (and `python models/generate.py demo models`) first"
    );
    dir
}

/// The demo repository written by `models/generate.py demo models`.
pub fn demo_models() -> PathBuf {
    let dir = repo_root().join("models");
    assert!(
        dir.join("mlp/2/model.pt").is_file(),
        "demo models missing: run `python models/generate.py demo models` first"
    );
    dir
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("modelgate-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
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

/// A ModelServerConfig over `(name, base_path, extra config lines)`.
pub fn model_config(models: &[(&str, &Path, &str)]) -> String {
    let mut text = String::from("model_config_list {\n");
    for (name, base, extra) in models {
        text.push_str(&format!(
            "  config {{\n    name: \"{name}\"\n    base_path: \"{}\"\n    model_platform: \"pytorch\"\n    {extra}\n  }}\n",
            base.display()
        ));
    }
    text.push_str("}\n");
    text
}

/// A port free right now on 127.0.0.1 (REST needs a fixed one: port 0 turns REST off).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Default)]
struct Log {
    lines: Vec<String>,
    grpc: Option<SocketAddr>,
    rest: Option<SocketAddr>,
    closed: bool,
}

/// The server binary, running. Killed on drop if still running.
pub struct Server {
    child: Child,
    log: Arc<(Mutex<Log>, Condvar)>,
    pub grpc: SocketAddr,
    pub rest: SocketAddr,
    _config_dir: TempDir,
}

impl Server {
    /// Starts the binary with `config` as its model config file, ephemeral gRPC port, a
    /// free REST port, and `extra` flags.
    pub fn start(config: &str, extra: &[&str]) -> Server {
        Server::start_with_env(config, extra, &[])
    }

    pub fn start_with_env(config: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let config_dir = TempDir::new("config");
        let config_path = config_dir.path().join("models.config");
        std::fs::write(&config_path, config).unwrap();
        let rest_port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_modelgate"));
        command
            .arg("--port=0")
            .arg(format!("--rest_api_port={rest_port}"))
            .arg("--bind_address=127.0.0.1")
            .arg(format!("--model_config_file={}", config_path.display()))
            .args(extra)
            .env("NO_COLOR", "1")
            .env_remove("MODELGATE_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start modelgate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let reader_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, changed) = &*reader_log;
                let mut guard = lock.lock().unwrap();
                let log = &mut *guard;
                for (marker, slot) in [
                    ("gRPC server listening on ", &mut log.grpc),
                    ("REST server listening on ", &mut log.rest),
                ] {
                    if let Some(at) = line.find(marker) {
                        let addr = line[at + marker.len()..]
                            .split(|c: char| c.is_whitespace() || c == '"')
                            .next()
                            .unwrap_or_default();
                        *slot = addr.parse().ok();
                    }
                }
                log.lines.push(line);
                changed.notify_all();
            }
            let (lock, changed) = &*reader_log;
            lock.lock().unwrap().closed = true;
            changed.notify_all();
        });
        let (grpc, rest) = {
            let (lock, changed) = &*log;
            let guard = lock.lock().unwrap();
            let (guard, _) = changed
                .wait_timeout_while(guard, TIMEOUT, |log| {
                    !log.closed && (log.grpc.is_none() || log.rest.is_none())
                })
                .unwrap();
            match (guard.grpc, guard.rest) {
                (Some(grpc), Some(rest)) => (grpc, rest),
                _ => panic!(
                    "modelgate did not announce its ports:\n{}",
                    guard.lines.join("\n")
                ),
            }
        };
        Server {
            child,
            log,
            grpc,
            rest,
            _config_dir: config_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.rest)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.0.lock().unwrap().lines.join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let (lock, changed) = &*self.log;
        let guard = lock.lock().unwrap();
        let (guard, _) = changed
            .wait_timeout_while(guard, TIMEOUT, |log| {
                !log.closed && !log.lines.iter().any(|l| l.contains(needle))
            })
            .unwrap();
        assert!(
            guard.lines.iter().any(|l| l.contains(needle)),
            "no log line with '{needle}':\n{}",
            guard.lines.join("\n")
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

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "modelgate did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `/readyz` until it answers `status`.
    pub async fn wait_readyz(&self, status: u16) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(response) = client.get(self.url("/readyz")).send().await {
                if response.status().as_u16() == status {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "/readyz never answered {status}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
