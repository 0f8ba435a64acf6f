//! Storage: where model versions and config files live, a local directory or S3. Lists the
//! version directories under a model's base path and hands the registry a local directory to
//! load each one from: a local version is loaded in place, an S3 version is first fetched
//! into the local cache ([`cache`]) and loaded from there.

mod cache;
mod insecure_tls;
mod local;
mod s3;

use crate::config::S3Env;
use cache::Cache;
use s3::{S3Location, S3Store};

pub use s3::http_client as s3_http_client;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

/// The TorchScript module of a version directory.
pub const MODEL_FILE: &str = "model.pt";
/// The AOTInductor package (PyTorch 2) of a version directory, in place of `model.pt`.
pub const PACKAGE_FILE: &str = "model.pt2";
/// The files a version directory may hold its model in (one of them).
pub const MODEL_FILES: &[&str] = &[MODEL_FILE, PACKAGE_FILE];
/// The signatures of a version directory (optional when embedded in the module).
pub const SIGNATURE_FILE: &str = "signature.json";
/// What a TensorFlow SavedModel directory holds; recognised only to refuse it clearly.
pub const SAVED_MODEL_FILES: &[&str] = &["saved_model.pb", "saved_model.pbtxt"];
/// Where `torch.jit.save(..., _extra_files=...)` puts an embedded signature in the archive
/// (`<archive name>/extra/`).
const EMBEDDED_SIGNATURE_SUFFIX: &str = "/extra/signature.json";

/// Why storage could not answer. Every variant but [`StorageError::Refused`] and
/// [`StorageError::Cache`] is transient from the manager's point of view (retried with
/// backoff); a version whose files are there but do not load is a load error, not a
/// storage error.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    #[error("cannot list {path}: {message}")]
    List { path: String, message: String },
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("cannot fetch {path}: {message}")]
    Fetch { path: String, message: String },
    /// The store answers, but refuses one object for good as it stands (access denied to
    /// it, an archived object): a load failure of that version, retried as load failures
    /// are, not an outage that backs off the whole model.
    #[error("cannot fetch {path}: {message}")]
    Refused { path: String, message: String },
    /// This machine could not keep a fetched version (disk full, a path it cannot make):
    /// a load failure of that version, retried as load failures are, so that a version
    /// that can never be written is not fetched again and again.
    #[error("model cache {path}: {message}")]
    Cache { path: String, message: String },
    #[error("invalid storage location '{location}': {message}")]
    Invalid { location: String, message: String },
}

impl StorageError {
    /// This machine's trouble with `path` in the model cache.
    fn cache(path: &std::path::Path, e: std::io::Error) -> StorageError {
        StorageError::Cache {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

impl From<StorageError> for crate::error::Error {
    /// The code GetModelStatus reports for a version storage could not hand over.
    fn from(e: StorageError) -> Self {
        use crate::error::Error;
        let message = e.to_string();
        match e {
            StorageError::List { .. } | StorageError::Read { .. } | StorageError::Fetch { .. } => {
                Error::Unavailable(message)
            }
            StorageError::Refused { .. } => Error::FailedPrecondition(message),
            StorageError::Cache { .. } => Error::Internal(message),
            StorageError::Invalid { .. } => Error::InvalidArgument(message),
        }
    }
}

/// A file of a version directory, as listed in S3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFile {
    /// Path relative to the version directory (`model.pt`, `assets/vocab.txt`).
    pub path: String,
    pub size: u64,
    /// The object's ETag, quoted as S3 sends it; a download insists on it (If-Match).
    pub etag: String,
}

/// A version directory as found in storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionEntry {
    /// The directory's name as listed: `7`, or a zero-padded `0007` (TF Serving serves both
    /// as version 7, from the directory it found).
    pub dir_name: String,
    /// Changes whenever a file of the version changes (names, sizes, and modification times
    /// or ETags), so a version that failed to load is retried only once it has been
    /// rewritten, and a cached download is reused only while it is unchanged.
    pub fingerprint: String,
    /// `false` for a `model.pt` or `model.pt2` without `signature.json` whose signature is
    /// not known to be embedded: it may be an upload still in progress. The manager counts such a version
    /// once it has stayed unchanged across two listings (see `registry::manager`).
    pub complete: bool,
    /// The files to fetch (S3 only; a local version is loaded in place).
    pub files: Vec<StoredFile>,
}

/// What a version directory's top-level file names say about it: `None` while it holds no
/// model; `Some(true)` when it can be loaded (model and signature, or a SavedModel to be
/// refused clearly); `Some(false)` for a model without `signature.json`.
pub(crate) fn layout<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<bool> {
    let (mut model, mut signature, mut saved_model) = (false, false, false);
    for name in names {
        model |= MODEL_FILES.contains(&name);
        signature |= name == SIGNATURE_FILE;
        saved_model |= SAVED_MODEL_FILES.contains(&name);
    }
    match (model, signature, saved_model) {
        (true, true, _) => Some(true),
        (true, false, _) => Some(false),
        (false, _, true) => Some(true),
        (false, _, false) => None,
    }
}

/// Storage access shared by every base path: the S3 client (built on first use, from the
/// environment and the AWS default credential chain) and the download cache. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    s3: Arc<S3Store>,
}

impl Storage {
    /// Storage whose S3 versions are cached under `cache_dir`.
    pub fn new(cache_dir: PathBuf, env: S3Env) -> Storage {
        Storage {
            s3: Arc::new(S3Store::new(env, Cache::new(cache_dir))),
        }
    }

    /// Drops from the S3 cache what none of `bases` reads (left by an earlier run whose
    /// config had other models). Call it before any download starts.
    pub async fn retain_cached_bases(&self, bases: &[&BasePath]) {
        let locations: Vec<&S3Location> = bases
            .iter()
            .filter_map(|base| match base {
                BasePath::S3 { location, .. } => Some(location),
                BasePath::Local(_) => None,
            })
            .collect();
        self.s3.retain_locations(&locations).await;
    }

    /// The default cache directory, private to this user (see [`cache::default_root`]).
    pub fn default_cache_dir() -> Result<PathBuf, StorageError> {
        cache::default_root()
    }

    /// A model's base path: `s3://bucket/prefix` or a local directory.
    pub fn base_path(&self, base_path: &str) -> Result<BasePath, StorageError> {
        if base_path.starts_with("s3://") {
            let location = S3Location::parse(base_path)?;
            return Ok(BasePath::S3 {
                location,
                store: Arc::clone(&self.s3),
            });
        }
        if let Some((scheme, _)) = base_path.split_once("://") {
            return Err(StorageError::Invalid {
                location: base_path.to_string(),
                message: format!("'{scheme}://' is not supported; use a local path or s3://"),
            });
        }
        Ok(BasePath::Local(PathBuf::from(base_path)))
    }

    /// The whole text of a file (the model config): a local path or `s3://bucket/key`.
    pub async fn read_text(&self, location: &str) -> Result<String, StorageError> {
        let bytes = if location.starts_with("s3://") {
            let location = S3Location::parse(location)?;
            self.s3.read_object(&location).await?
        } else {
            tokio::fs::read(location)
                .await
                .map_err(|e| StorageError::Read {
                    path: location.to_string(),
                    message: e.to_string(),
                })?
        };
        String::from_utf8(bytes).map_err(|_| StorageError::Read {
            path: location.to_string(),
            message: "not UTF-8 text".into(),
        })
    }
}

/// A model's base path: one directory per version, named by a positive integer.
#[derive(Clone)]
pub enum BasePath {
    Local(PathBuf),
    S3 {
        location: S3Location,
        store: Arc<S3Store>,
    },
}

impl PartialEq for BasePath {
    fn eq(&self, other: &BasePath) -> bool {
        match (self, other) {
            (BasePath::Local(a), BasePath::Local(b)) => a == b,
            (BasePath::S3 { location: a, .. }, BasePath::S3 { location: b, .. }) => a == b,
            _ => false,
        }
    }
}

impl std::fmt::Display for BasePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BasePath::Local(dir) => write!(f, "{}", dir.display()),
            BasePath::S3 { location, .. } => write!(f, "{location}"),
        }
    }
}

impl BasePath {
    /// The versions present now. A directory counts once it holds a model file (or a
    /// SavedModel, so that it can be refused with a clear error); other entries are ignored.
    pub async fn list_versions(&self) -> Result<BTreeMap<i64, VersionEntry>, StorageError> {
        match self {
            BasePath::Local(dir) => {
                let dir = dir.clone();
                let shown = dir.display().to_string();
                tokio::task::spawn_blocking(move || local::list(&dir))
                    .await
                    .map_err(|e| StorageError::List {
                        path: shown,
                        message: e.to_string(),
                    })?
            }
            BasePath::S3 { location, store } => store.list_versions(location).await,
        }
    }

    /// Drops the local copies of the versions other than `keep` (S3 only: a local version is
    /// loaded in place). Call it only between downloads of this base path.
    pub async fn retain_cached(&self, keep: &BTreeSet<i64>) {
        if let BasePath::S3 { location, store } = self {
            store.retain_cached(location, keep).await;
        }
    }

    /// A local directory holding the files of `version` as listed in `entry`, and how many
    /// bytes were fetched to make it (0 for a local or already cached version).
    pub async fn localize(
        &self,
        version: i64,
        entry: &VersionEntry,
    ) -> Result<(PathBuf, u64), StorageError> {
        match self {
            BasePath::Local(dir) => Ok((dir.join(&entry.dir_name), 0)),
            BasePath::S3 { location, store } => store.localize(location, version, entry).await,
        }
    }
}

/// What a `model.pt` holds in place of a `signature.json` beside it.
#[derive(Debug, PartialEq, Eq)]
pub enum EmbeddedSignature {
    /// The text of its `extra/signature.json`.
    Found(String),
    /// A TorchScript archive without one.
    Missing,
    /// Not a (complete) zip archive, with the reason: not TorchScript, or still being written.
    NotAnArchive(String),
}

/// The most of a model file's signature or metadata entry read (they are a few KiB; a
/// compressed entry could otherwise expand to fill memory on every listing).
const SIGNATURE_READ_LIMIT: u64 = 16 << 20;

/// Reads the signature embedded in the TorchScript archive `model` (only the archive's
/// directory and that one entry are read). Blocking.
pub fn embedded_signature(model: &std::path::Path) -> std::io::Result<EmbeddedSignature> {
    use std::io::Read;
    let file = std::io::BufReader::new(std::fs::File::open(model)?);
    let mut archive = match zip::ZipArchive::new(file) {
        Ok(archive) => archive,
        Err(zip::result::ZipError::Io(e)) => return Err(e),
        Err(e) => return Ok(EmbeddedSignature::NotAnArchive(e.to_string())),
    };
    let entry = archive
        .file_names()
        .filter_map(Result::ok)
        .find(|name| name.ends_with(EMBEDDED_SIGNATURE_SUFFIX))
        .map(|name| name.into_owned());
    let Some(entry) = entry else {
        return Ok(EmbeddedSignature::Missing);
    };
    let mut text = String::new();
    archive
        .by_name(&entry)
        .map_err(std::io::Error::other)?
        .take(SIGNATURE_READ_LIMIT + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > SIGNATURE_READ_LIMIT {
        return Err(std::io::Error::other(format!(
            "its {entry} is over {SIGNATURE_READ_LIMIT} bytes"
        )));
    }
    Ok(EmbeddedSignature::Found(text))
}

/// Whether the AOTInductor package `package` is a complete zip whose metadata carries a
/// signature (the export command's `modelgate.signature` key). Reads only the archive's
/// directory and its metadata entry; a cheap completeness test, not the loader's parse.
pub fn package_has_signature(package: &std::path::Path) -> bool {
    use std::io::Read;
    let Ok(file) = std::fs::File::open(package) else {
        return false;
    };
    let Ok(mut archive) = zip::ZipArchive::new(std::io::BufReader::new(file)) else {
        return false;
    };
    let Some(entry) = archive
        .file_names()
        .filter_map(Result::ok)
        .find(|name| name.ends_with("wrapper_metadata.json"))
        .map(|name| name.into_owned())
    else {
        return false;
    };
    let mut text = String::new();
    archive.by_name(&entry).is_ok_and(|entry| {
        entry
            .take(SIGNATURE_READ_LIMIT)
            .read_to_string(&mut text)
            .is_ok()
    }) && text.contains("\"modelgate.signature\"")
}

/// A version directory name: a positive integer, as in TF Serving.
pub fn parse_version(name: &str) -> Option<i64> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok().filter(|&v: &i64| v > 0)
}

/// Of two directory names of one version number (`7` and `007`), the one that is the
/// version: the plain number, else the first in name order. Every listing picks the same.
pub(crate) fn preferred_dir_name<'a>(version: i64, a: &'a str, b: &'a str) -> &'a str {
    let plain = version.to_string();
    match (a == plain, b == plain) {
        (true, _) => a,
        (_, true) => b,
        _ => a.min(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_are_positive_integers() {
        assert_eq!(parse_version("1"), Some(1));
        assert_eq!(parse_version("0042"), Some(42));
        assert_eq!(parse_version("0"), None);
        assert_eq!(parse_version("-1"), None);
        assert_eq!(parse_version("1a"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("99999999999999999999"), None);
    }

    #[test]
    fn layouts() {
        assert_eq!(layout([MODEL_FILE, SIGNATURE_FILE]), Some(true));
        assert_eq!(layout([MODEL_FILE]), Some(false));
        assert_eq!(layout([SIGNATURE_FILE]), None);
        assert_eq!(layout(["saved_model.pb", "variables"]), Some(true));
        assert_eq!(layout(["README"]), None);
    }

    #[test]
    fn base_paths() {
        let storage = Storage::new(std::env::temp_dir(), S3Env::from_lookup(|_| None));
        assert!(matches!(
            storage.base_path("/models/a").unwrap(),
            BasePath::Local(_)
        ));
        let s3 = storage.base_path("s3://bucket/models/a/").unwrap();
        assert_eq!(s3.to_string(), "s3://bucket/models/a");
        assert!(s3 == storage.base_path("s3://bucket/models/a").unwrap());
        assert!(storage.base_path("gs://bucket/a").is_err());
        assert!(storage.base_path("s3://").is_err());
    }
}
