//! A real S3 server for the S3 repository tests: moto's server mode on 127.0.0.1, and an S3
//! client for the tests' own uploads.

use super::{free_port, repo_root, wait_until, Log, WithLog};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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
        self.log = Log::follow(child.stderr.take().unwrap());
        self.child = Some(child);
        let what = WithLog(format!("moto to open port {}", self.port), &self.log);
        wait_until(what, || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "moto server exited ({status}); is moto[server] installed for {}?\n{}",
                    python.display(),
                    self.log.text()
                );
            }
            std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
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
