//! S3 base paths and config files, through aws-sdk-s3.
//!
//! The client is built on first use from the environment (see `config::env`: `S3_ENDPOINT`,
//! `S3_USE_HTTPS`, `S3_VERIFY_SSL`) and aws-config's default chains: region from
//! `AWS_REGION` or the profile (else `us-east-1`, as TF Serving did), credentials from
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, the profile, web identity
//! (IRSA), ECS or IMDS. modelgate never reads the credentials itself; the SDK redacts them
//! from its own logs.

use super::cache::Cache;
use super::{layout, parse_version, preferred_dir_name, StorageError, StoredFile, VersionEntry};
use crate::config::S3Env;
use crate::error::error_chain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OnceCell, Semaphore};

/// The region when neither the environment nor the profile names one (TF Serving's default).
const DEFAULT_REGION: &str = "us-east-1";
/// Objects of one version downloaded at once.
const PARALLEL_DOWNLOADS: usize = 8;
/// Attempts per S3 call (the SDK backs off between them); the manager's own backoff takes
/// over when they are all spent.
const MAX_ATTEMPTS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a response to start (not for a whole download).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// `s3://bucket/key-or-prefix`, without trailing slashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub key: String,
}

impl S3Location {
    pub fn parse(url: &str) -> Result<S3Location, StorageError> {
        let invalid = |message: &str| StorageError::Invalid {
            location: url.to_string(),
            message: message.to_string(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("not an s3:// URL"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket name"));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            key: key.trim_matches('/').to_string(),
        })
    }

    /// The key prefix of the objects under this location taken as a directory.
    fn dir_prefix(&self) -> String {
        if self.key.is_empty() {
            String::new()
        } else {
            format!("{}/", self.key)
        }
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// The S3 client (built once, on first use) and the download cache.
pub struct S3Store {
    env: S3Env,
    client: OnceCell<Client>,
    cache: Cache,
}

impl S3Store {
    pub fn new(env: S3Env, cache: Cache) -> S3Store {
        S3Store {
            env,
            client: OnceCell::new(),
            cache,
        }
    }

    async fn client(&self) -> &Client {
        self.client.get_or_init(|| build_client(&self.env)).await
    }

    /// The whole content of one object.
    pub async fn read_object(&self, location: &S3Location) -> Result<Vec<u8>, StorageError> {
        let read_error = |message: String| StorageError::Read {
            path: location.to_string(),
            message,
        };
        let output = self
            .client()
            .await
            .get_object()
            .bucket(&location.bucket)
            .key(&location.key)
            .send()
            .await
            .map_err(|e| read_error(error_chain(&e)))?;
        let bytes = output
            .body
            .collect()
            .await
            .map_err(|e| read_error(error_chain(&e)))?;
        Ok(bytes.into_bytes().to_vec())
    }

    /// Every version directory under `location`, from one (paginated) listing.
    pub async fn list_versions(
        &self,
        location: &S3Location,
    ) -> Result<BTreeMap<i64, VersionEntry>, StorageError> {
        let client = self.client().await;
        let prefix = location.dir_prefix();
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = client
                .list_objects_v2()
                .bucket(&location.bucket)
                .prefix(&prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| StorageError::List {
                    path: location.to_string(),
                    message: error_chain(&e),
                })?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    objects.push((
                        key.to_string(),
                        u64::try_from(object.size().unwrap_or(0)).unwrap_or(0),
                        object.e_tag().unwrap_or_default().to_string(),
                    ));
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => break,
            }
        }
        Ok(group_versions(&prefix, objects))
    }

    /// Removes from the cache everything under none of `locations`.
    pub async fn retain_locations(&self, locations: &[&S3Location]) {
        let bases: Vec<(String, String)> = locations
            .iter()
            .map(|l| (l.bucket.clone(), l.key.clone()))
            .collect();
        self.cache.retain_bases(&bases).await;
    }

    /// Removes from the cache the versions under `location` other than `keep`.
    pub async fn retain_cached(&self, location: &S3Location, keep: &BTreeSet<i64>) {
        self.cache
            .retain(&location.bucket, &location.key, keep)
            .await;
    }

    /// The cached copy of `version`, downloaded first unless the cache already holds it,
    /// and how many bytes that download fetched (0 from the cache).
    pub async fn localize(
        &self,
        location: &S3Location,
        version: i64,
        entry: &VersionEntry,
    ) -> Result<(PathBuf, u64), StorageError> {
        let dir =
            self.cache
                .version_dir(&location.bucket, &location.key, version, &entry.fingerprint);
        let client = self.client().await.clone();
        let key_prefix = format!("{}{}/", location.dir_prefix(), entry.dir_name);
        let fetched = std::sync::atomic::AtomicU64::new(0);
        let fetched_by_fill = &fetched;
        let dir = self
            .cache
            .fill(&dir, |temp| async move {
                let started = std::time::Instant::now();
                let bytes: u64 = entry.files.iter().map(|f| f.size).sum();
                download_all(&client, &location.bucket, &key_prefix, &entry.files, &temp).await?;
                fetched_by_fill.store(bytes, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    "fetched {location}/{version} ({} files, {bytes} bytes) in {:.1}s",
                    entry.files.len(),
                    started.elapsed().as_secs_f64()
                );
                Ok(())
            })
            .await?;
        Ok((dir, fetched.into_inner()))
    }
}

/// Groups the objects under `prefix` into version directories. Keys that are not
/// `<prefix><positive integer>/<relative path>` (or whose relative path could step out of
/// the directory) are ignored, as are directories holding no model yet.
fn group_versions(
    prefix: &str,
    objects: Vec<(String, u64, String)>,
) -> BTreeMap<i64, VersionEntry> {
    // By version: the directory's name and its files.
    let mut files: BTreeMap<i64, (String, Vec<StoredFile>)> = BTreeMap::new();
    for (key, size, etag) in objects {
        let Some((dir_name, path)) = key.strip_prefix(prefix).and_then(|r| r.split_once('/'))
        else {
            continue;
        };
        let Some(version) = parse_version(dir_name) else {
            continue;
        };
        let safe = !path.is_empty()
            && path
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !safe {
            continue; // "1/" folder markers, and keys no local path should be made from
        }
        let (listed, version_files) = files
            .entry(version)
            .or_insert_with(|| (dir_name.to_string(), Vec::new()));
        if listed != dir_name {
            // Two directories of one number (`7/`, `007/`): one is the version.
            if preferred_dir_name(version, listed, dir_name) == listed.as_str() {
                continue;
            }
            *listed = dir_name.to_string();
            version_files.clear();
        }
        version_files.push(StoredFile {
            path: path.to_string(),
            size,
            etag,
        });
    }
    files
        .into_iter()
        .filter_map(|(version, (dir_name, mut files))| {
            files.sort_by(|a, b| a.path.cmp(&b.path));
            // An object named as another's directory (`assets` beside `assets/vocab.txt`)
            // cannot be a file of a directory on disk: left out, as folder markers are.
            let directories: BTreeSet<String> = files
                .iter()
                .flat_map(|f| {
                    f.path
                        .match_indices('/')
                        .map(|(at, _)| f.path[..at].to_string())
                })
                .collect();
            files.retain(|f| !directories.contains(&f.path));
            let complete = layout(files.iter().map(|f| f.path.as_str()))?;
            let fingerprint = files
                .iter()
                .map(|f| format!("{}:{}:{}", f.path, f.size, f.etag))
                .collect::<Vec<_>>()
                .join(";");
            Some((
                version,
                VersionEntry {
                    dir_name,
                    fingerprint,
                    complete,
                    files,
                },
            ))
        })
        .collect()
}

/// Downloads `files` (keys `<key_prefix><path>`) into `dir`, several at once.
async fn download_all(
    client: &Client,
    bucket: &str,
    key_prefix: &str,
    files: &[StoredFile],
    dir: &Path,
) -> Result<(), StorageError> {
    let permits = Arc::new(Semaphore::new(PARALLEL_DOWNLOADS));
    let mut tasks = tokio::task::JoinSet::new();
    for file in files {
        let (client, permits) = (client.clone(), Arc::clone(&permits));
        let (bucket, key) = (bucket.to_string(), format!("{key_prefix}{}", file.path));
        let (target, file) = (dir.join(&file.path), file.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            download(&client, &bucket, &key, &file, &target).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        let result = done.unwrap_or_else(|e| {
            Err(StorageError::Fetch {
                path: format!("s3://{bucket}/{key_prefix}"),
                message: format!("download task failed: {e}"),
            })
        });
        if result.is_err() {
            tasks.abort_all();
            return result;
        }
    }
    Ok(())
}

/// Downloads one object to `target`, insisting on the listed ETag so that an object
/// rewritten since the listing is not mixed into this version.
async fn download(
    client: &Client,
    bucket: &str,
    key: &str,
    file: &StoredFile,
    target: &Path,
) -> Result<(), StorageError> {
    let fetch_error = |message: String| StorageError::Fetch {
        path: format!("s3://{bucket}/{key}"),
        message,
    };
    // Writing here is this machine's trouble, not the store's.
    let cache_error = |e| StorageError::cache(target, e);
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(cache_error)?;
    }
    let mut request = client.get_object().bucket(bucket).key(key);
    if !file.etag.is_empty() {
        request = request.if_match(&file.etag);
    }
    let mut body = request
        .send()
        .await
        .map_err(|e| {
            let refused = e.as_service_error().is_some_and(|service| {
                service.is_invalid_object_state() || service.meta().code() == Some("AccessDenied")
            });
            let message = error_chain(&e);
            if refused {
                StorageError::Refused {
                    path: format!("s3://{bucket}/{key}"),
                    message: format!(
                        "{message} (refused as it stands: an archived object must be restored, \
                         a denied one made readable to the server)"
                    ),
                }
            } else {
                fetch_error(message)
            }
        })?
        .body;
    let mut out = tokio::fs::File::create(target).await.map_err(cache_error)?;
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| fetch_error(error_chain(&e)))?;
        written += chunk.len() as u64;
        out.write_all(&chunk).await.map_err(cache_error)?;
    }
    out.sync_all().await.map_err(cache_error)?;
    if written != file.size {
        return Err(fetch_error(format!(
            "got {written} bytes, the listing said {}",
            file.size
        )));
    }
    Ok(())
}

async fn build_client(env: &S3Env) -> Client {
    for warning in &env.warnings {
        tracing::warn!("{warning}");
    }
    // The loader's own region and credential chains share its HTTP client (a chain built
    // apart, e.g. RegionProviderChain::default_provider(), would have none).
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client(env.verify_ssl))
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(READ_TIMEOUT)
                .build(),
        )
        .load()
        .await;
    let mut config = aws_sdk_s3::config::Builder::from(&sdk);
    if sdk.region().is_none() {
        config = config.region(Region::from_static(DEFAULT_REGION));
    }
    if let Some(endpoint) = &env.endpoint {
        // MinIO-like servers are addressed by path, as TF Serving's S3 file system did.
        config = config.endpoint_url(endpoint).force_path_style(true);
    }
    tracing::info!(
        endpoint = env.endpoint.as_deref().unwrap_or("AWS"),
        region = sdk.region().map_or(DEFAULT_REGION, |r| r.as_ref()),
        verify_ssl = env.verify_ssl,
        "S3 client ready"
    );
    Client::from_conf(config.build())
}

/// The HTTP client for S3 under `S3_VERIFY_SSL` (rustls on ring; HTTP or HTTPS).
pub fn http_client(verify_ssl: bool) -> aws_sdk_s3::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    if !verify_ssl {
        tracing::warn!("S3_VERIFY_SSL=0: S3 server certificates are not verified");
        return super::insecure_tls::http_client(CONNECT_TIMEOUT);
    }
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let l = S3Location::parse("s3://bucket/models/mlp/").unwrap();
        assert_eq!(
            (l.bucket.as_str(), l.key.as_str()),
            ("bucket", "models/mlp")
        );
        assert_eq!(l.dir_prefix(), "models/mlp/");
        let root = S3Location::parse("s3://bucket").unwrap();
        assert_eq!(root.dir_prefix(), "");
        assert!(S3Location::parse("s3:///x").is_err());
    }

    #[test]
    fn objects_group_into_versions() {
        let object = |key: &str, etag: &str| (key.to_string(), 10, etag.to_string());
        let versions = group_versions(
            "m/",
            vec![
                object("m/1/model.pt", "a"),
                object("m/1/signature.json", "b"),
                object("m/1/assets/vocab.txt", "c"),
                object("m/2/model.pt", "d"),
                object("m/3/signature.json", "e"),
                object("m/4/", ""),
                object("m/x/model.pt", "f"),
                object("m/5/../../etc/model.pt", "g"),
                object("m/model.pt", "h"),
            ],
        );
        assert_eq!(versions.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert!(versions[&1].complete);
        assert_eq!(versions[&1].files.len(), 3);
        assert_eq!(
            versions[&1].fingerprint,
            "assets/vocab.txt:10:c;model.pt:10:a;signature.json:10:b"
        );
        assert!(
            !versions[&2].complete,
            "model.pt alone may still be uploading"
        );
        let changed = group_versions("m/", vec![object("m/2/model.pt", "z")]);
        assert_ne!(changed[&2].fingerprint, versions[&2].fingerprint);
    }

    /// An object named as another's directory cannot be written beside it: left out.
    #[test]
    fn an_object_named_as_a_directory_is_left_out() {
        let object = |key: &str| (key.to_string(), 10, "e".to_string());
        let versions = group_versions(
            "m/",
            vec![
                object("m/1/model.pt"),
                object("m/1/signature.json"),
                object("m/1/assets"),
                object("m/1/assets/vocab.txt"),
            ],
        );
        let paths: Vec<&str> = versions[&1].files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["assets/vocab.txt", "model.pt", "signature.json"]);
    }

    /// A zero-padded directory is its version, fetched from where it was listed; of two
    /// directories of one number, the plain one is the version, in any listing order.
    #[test]
    fn zero_padded_directories_keep_their_names() {
        let object = |key: &str| (key.to_string(), 10, "e".to_string());
        let padded = group_versions(
            "m/",
            vec![object("m/0007/model.pt"), object("m/0007/signature.json")],
        );
        assert_eq!(padded[&7].dir_name, "0007");
        for order in [
            ["m/07/model.pt", "m/7/model.pt"],
            ["m/7/model.pt", "m/07/model.pt"],
        ] {
            let both = group_versions("m/", order.iter().map(|k| object(k)).collect());
            assert_eq!(both[&7].dir_name, "7");
            assert_eq!(both[&7].files.len(), 1, "{:?}", both[&7].files);
        }
    }
}
