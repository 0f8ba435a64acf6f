//! Storage: where model versions live. Lists the version directories under a model's
//! base path and hands the registry a local directory to load each one from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The TorchScript module of a version directory.
pub const MODEL_FILE: &str = "model.pt";
/// The signatures of a version directory (optional when embedded in the module).
pub const SIGNATURE_FILE: &str = "signature.json";
/// What a TensorFlow SavedModel directory holds; recognised only to refuse it clearly.
pub const SAVED_MODEL_FILES: &[&str] = &["saved_model.pb", "saved_model.pbtxt"];

/// Why storage could not answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    #[error("cannot list {path}: {message}")]
    List { path: String, message: String },
    #[error("unsupported base path '{0}'")]
    Unsupported(String),
}

/// A version directory as found in storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionEntry {
    /// Changes whenever a file of the version changes (names, sizes, modification times), so
    /// a version that failed to load is retried only once it has been rewritten.
    pub fingerprint: String,
}

/// A model's base path: one directory per version, named by a positive integer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BasePath {
    Local(PathBuf),
}

impl BasePath {
    pub fn parse(base_path: &str) -> Result<BasePath, StorageError> {
        if base_path.contains("://") {
            return Err(StorageError::Unsupported(base_path.to_string()));
        }
        Ok(BasePath::Local(PathBuf::from(base_path)))
    }

    /// The versions present now. A directory counts once it holds a model file (or a
    /// SavedModel, so that it can be refused with a clear error); other entries are ignored.
    pub async fn list_versions(&self) -> Result<BTreeMap<i64, VersionEntry>, StorageError> {
        match self {
            BasePath::Local(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || list_local(&dir))
                    .await
                    .map_err(|e| StorageError::List {
                        path: String::new(),
                        message: e.to_string(),
                    })?
            }
        }
    }

    /// A local directory holding the files of `version`.
    pub async fn localize(&self, version: i64) -> Result<PathBuf, StorageError> {
        match self {
            BasePath::Local(dir) => Ok(dir.join(version.to_string())),
        }
    }
}

fn list_local(dir: &Path) -> Result<BTreeMap<i64, VersionEntry>, StorageError> {
    let list_error = |e: std::io::Error| StorageError::List {
        path: dir.display().to_string(),
        message: e.to_string(),
    };
    let mut versions = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        let Some(version) = parse_version(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        if !entry.file_type().map_err(list_error)?.is_dir() {
            continue;
        }
        if let Some(fingerprint) = local_fingerprint(&entry.path()) {
            versions.insert(version, VersionEntry { fingerprint });
        }
    }
    Ok(versions)
}

/// The fingerprint of a local version directory, or `None` while it holds no model.
fn local_fingerprint(dir: &Path) -> Option<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            Some(format!(
                "{}:{}:{}",
                entry.file_name().to_string_lossy(),
                meta.len(),
                modified
            ))
        })
        .collect();
    let has_model = files.iter().any(|f| {
        let name = f.split(':').next().unwrap_or("");
        name == MODEL_FILE || SAVED_MODEL_FILES.contains(&name)
    });
    if !has_model {
        return None;
    }
    files.sort();
    Some(files.join(";"))
}

/// A version directory name: a positive integer, as in TF Serving.
pub fn parse_version(name: &str) -> Option<i64> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok().filter(|&v: &i64| v > 0)
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

    #[tokio::test]
    async fn lists_only_directories_with_a_model() {
        let root = std::env::temp_dir().join(format!("modelgate-storage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (dir, file) in [
            ("1", Some(MODEL_FILE)),
            ("2", Some(SIGNATURE_FILE)),
            ("3", Some("saved_model.pb")),
            ("x", Some(MODEL_FILE)),
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            if let Some(file) = file {
                std::fs::write(root.join(dir).join(file), b"x").unwrap();
            }
        }
        std::fs::write(root.join("4"), b"a file, not a directory").unwrap();
        let versions = BasePath::parse(root.to_str().unwrap())
            .unwrap()
            .list_versions()
            .await
            .unwrap();
        assert_eq!(versions.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
        let before = versions[&1].fingerprint.clone();
        std::fs::write(root.join("1").join(SIGNATURE_FILE), b"{}").unwrap();
        let versions = BasePath::Local(root.clone()).list_versions().await.unwrap();
        assert_ne!(versions[&1].fingerprint, before);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
