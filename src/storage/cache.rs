//! The local cache of versions fetched from S3.
//!
//! Layout: `<root>/<bucket>/<prefix>/<version>/<hash of the version's fingerprint>/<files>`.
//! A version is downloaded into a temporary sibling directory and renamed into place only
//! once every file is complete, so a directory at its final name is always whole; the hash
//! covers every file's name, size and ETag, so an unchanged version is found again (even
//! after a restart) and never downloaded twice, and a rewritten one gets a new directory.
//! One server per cache directory (within it, one download per version at a time):
//! temporary directories left by a crash are removed on the next download of the same
//! version.
//!
//! The manager evicts the versions no model serves or wants any more ([`Cache::retain`]).
//! That is safe even while requests still run on an unloading version: libtorch reads the
//! whole module at load and keeps nothing open, and an unlinked file stays readable to
//! whoever had it open anyway.

use super::{parse_version, StorageError};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const TEMP_PREFIX: &str = ".tmp-";

/// The cache root and its naming rules.
pub struct Cache {
    root: PathBuf,
    temp_counter: AtomicU64,
    /// One fill at a time per version directory: a fill clears the version's leftover
    /// temporary directories and, once done, its other contents, which would otherwise
    /// pull files from under a second fill of the same version (two models on one base
    /// path, loaded at once with `--num_load_threads`).
    filling: std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// The default cache root: `modelgate-cache-<uid>` under the system temp dir, made for this
/// user alone (mode 0700). A shared temp dir lets anyone create that path first, and a
/// directory at a version's final name is trusted as a complete download, so a root that is
/// not a directory owned by this user, or that others may write to, is refused rather than
/// used: anyone able to write there could choose the model this server loads.
pub fn default_root() -> Result<PathBuf, StorageError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    private_root(
        &std::env::temp_dir().join(format!("modelgate-cache-{uid}")),
        uid,
    )
}

fn private_root(root: &Path, uid: u32) -> Result<PathBuf, StorageError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let refused = |message: String| StorageError::Cache {
        path: root.display().to_string(),
        message: format!("{message}; set --model_cache_dir to a directory of this server's own"),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(refused(format!("cannot create it: {e}"))),
    }
    let meta = std::fs::symlink_metadata(root).map_err(|e| refused(e.to_string()))?;
    if !meta.file_type().is_dir() {
        return Err(refused("it exists and is not a directory".into()));
    }
    if meta.uid() != uid {
        return Err(refused(format!(
            "it belongs to user {}, not to this server's user {uid}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refused(format!(
            "others may write to it (mode {:o})",
            meta.mode() & 0o777
        )));
    }
    Ok(root.to_path_buf())
}

impl Cache {
    pub fn new(root: PathBuf) -> Cache {
        Cache {
            root,
            temp_counter: AtomicU64::new(0),
            filling: std::sync::Mutex::default(),
        }
    }

    /// Where the versions under `s3://bucket/prefix` are kept.
    fn base_dir(&self, bucket: &str, prefix: &str) -> PathBuf {
        let mut dir = self.root.join(safe_component(bucket));
        for part in prefix.split('/').filter(|p| !p.is_empty()) {
            dir.push(safe_component(part));
        }
        dir
    }

    /// Where the version with this fingerprint lives once complete.
    pub fn version_dir(
        &self,
        bucket: &str,
        prefix: &str,
        version: i64,
        fingerprint: &str,
    ) -> PathBuf {
        let mut dir = self.base_dir(bucket, prefix);
        dir.push(version.to_string());
        dir.push(fingerprint_hash(fingerprint));
        dir
    }

    /// Removes the cached versions under `s3://bucket/prefix` other than `keep`. The caller
    /// runs no download of that prefix meanwhile.
    pub async fn retain(&self, bucket: &str, prefix: &str, keep: &BTreeSet<i64>) {
        let dir = self.base_dir(bucket, prefix);
        remove_entries(&dir, |name| {
            // Only the directories this cache names after versions; anything else (a nested
            // prefix of another model) is not this prefix's to remove.
            parse_version(name).is_some_and(|v| v.to_string() == name && !keep.contains(&v))
        })
        .await;
    }

    /// Removes everything in the cache that belongs to none of `bases` (`(bucket, prefix)`):
    /// what a previous run cached for models no longer configured, which no later listing
    /// would ever drop. The caller runs no download meanwhile (one server per cache).
    pub async fn retain_bases(&self, bases: &[(String, String)]) {
        let keep: Vec<PathBuf> = bases
            .iter()
            .map(|(bucket, prefix)| self.base_dir(bucket, prefix))
            .collect();
        let root = self.root.clone();
        let removed = tokio::task::spawn_blocking(move || prune(&root, &keep))
            .await
            .unwrap_or(0);
        if removed > 0 {
            tracing::info!(
                removed,
                "removed from the model cache what no configured model reads"
            );
        }
    }

    /// Returns `dir`, filling it first with `download` (given a temporary directory to write
    /// into) unless it is already there.
    pub async fn fill<F, Fut>(&self, dir: &Path, download: F) -> Result<PathBuf, StorageError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), StorageError>>,
    {
        if tokio::fs::metadata(dir).await.is_ok_and(|m| m.is_dir()) {
            return Ok(dir.to_path_buf());
        }
        let parent = dir.parent().ok_or_else(|| StorageError::Cache {
            path: dir.display().to_string(),
            message: "no parent directory".into(),
        })?;
        let turn = Arc::clone(self.lock_filling().entry(parent.to_path_buf()).or_default());
        let result = {
            let _turn = turn.lock().await;
            // A fill that went first may have made it.
            if tokio::fs::metadata(dir).await.is_ok_and(|m| m.is_dir()) {
                Ok(dir.to_path_buf())
            } else {
                self.fill_alone(dir, parent, download).await
            }
        };
        let mut filling = self.lock_filling();
        // The last one out forgets the version's lock (the map holds one reference).
        if Arc::strong_count(&turn) == 2 {
            filling.remove(parent);
        }
        result
    }

    fn lock_filling(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>> {
        self.filling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Cache::fill`] once no other fill of `parent`'s version runs.
    async fn fill_alone<F, Fut>(
        &self,
        dir: &Path,
        parent: &Path,
        download: F,
    ) -> Result<PathBuf, StorageError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), StorageError>>,
    {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| StorageError::cache(parent, e))?;
        remove_entries(parent, |name| name.starts_with(TEMP_PREFIX)).await;
        let temp = parent.join(format!(
            "{TEMP_PREFIX}{}-{}",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        tokio::fs::create_dir_all(&temp)
            .await
            .map_err(|e| StorageError::cache(&temp, e))?;
        if let Err(e) = download(temp.clone()).await {
            let _ = tokio::fs::remove_dir_all(&temp).await;
            return Err(e);
        }
        if let Err(e) = tokio::fs::rename(&temp, dir).await {
            let _ = tokio::fs::remove_dir_all(&temp).await;
            if !tokio::fs::metadata(dir).await.is_ok_and(|m| m.is_dir()) {
                return Err(StorageError::cache(dir, e));
            }
        }
        // Older contents of this version are not needed again: they changed in storage.
        let keep = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        remove_entries(parent, |name| Some(name) != keep.as_deref()).await;
        Ok(dir.to_path_buf())
    }
}

/// Removes what under `dir` is neither one of `keep` nor on the way to one; how many
/// entries it removed. Blocking. Symlinks are removed, never followed.
fn prune(dir: &Path, keep: &[PathBuf]) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if keep.contains(&path) {
            continue; // a base path's own versions are `retain`'s to drop
        }
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && keep.iter().any(|base| base.starts_with(&path)) {
            removed += prune(&path, keep);
            continue;
        }
        let gone = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match gone {
            Ok(()) => removed += 1,
            Err(e) => tracing::debug!("cannot remove {}: {e}", path.display()),
        }
    }
    removed
}

/// Removes the entries of `dir` whose names match; failures only cost disk space.
async fn remove_entries(dir: &Path, matches: impl Fn(&str) -> bool) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if matches(&entry.file_name().to_string_lossy()) {
            let path = entry.path();
            match tokio::fs::remove_dir_all(&path).await {
                Ok(()) => tracing::debug!("removed {} from the model cache", path.display()),
                Err(e) => tracing::debug!("cannot remove {}: {e}", path.display()),
            }
        }
    }
}

/// A bucket or prefix component as a directory name: kept readable, never `.`/`..`.
fn safe_component(part: &str) -> String {
    let cleaned: String = part
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.chars().all(|c| c == '.') || cleaned.starts_with(TEMP_PREFIX) {
        format!("_{cleaned}")
    } else {
        cleaned
    }
}

fn fingerprint_hash(fingerprint: &str) -> String {
    Sha256::digest(fingerprint.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_safe() {
        let cache = Cache::new(PathBuf::from("/cache"));
        let a = cache.version_dir("bucket", "models/../mlp/", 3, "model.pt:10:\"e1\"");
        assert_eq!(
            a,
            cache.version_dir("bucket", "models/../mlp", 3, "model.pt:10:\"e1\"")
        );
        let text = a.display().to_string();
        assert!(
            text.starts_with("/cache/bucket/models/_../mlp/3/"),
            "{text}"
        );
        assert_ne!(
            a,
            cache.version_dir("bucket", "models/../mlp", 3, "model.pt:10:\"e2\"")
        );
        assert_eq!(safe_component("a b"), "a_b");
        assert_eq!(safe_component(".tmp-x"), "_.tmp-x");
    }

    #[test]
    fn the_default_root_is_private_to_its_user() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: as in `default_root`.
        let uid = unsafe { libc::geteuid() };
        let root = std::env::temp_dir().join(format!("modelgate-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);

        assert_eq!(private_root(&root, uid).unwrap(), root);
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(private_root(&root, uid).unwrap(), root, "found again");

        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = private_root(&root, uid).unwrap_err().to_string();
        assert!(
            error.contains("others may write to it (mode 777)"),
            "{error}"
        );
        assert!(error.contains("--model_cache_dir"), "{error}");

        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        let error = private_root(&root, uid.wrapping_add(1))
            .unwrap_err()
            .to_string();
        assert!(error.contains("belongs to user"), "{error}");
        std::fs::remove_dir_all(&root).unwrap();

        // A symlink planted at the path is not followed.
        let target = root.with_extension("target");
        std::fs::create_dir_all(&target).unwrap();
        std::os::unix::fs::symlink(&target, &root).unwrap();
        let error = private_root(&root, uid).unwrap_err().to_string();
        assert!(error.contains("not a directory"), "{error}");
        std::fs::remove_file(&root).unwrap();
        std::fs::remove_dir_all(&target).unwrap();
    }

    /// An empty cache in a directory of its own, and that directory.
    fn empty_cache(tag: &str) -> (Cache, PathBuf) {
        let root = std::env::temp_dir().join(format!("modelgate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        (Cache::new(root.clone()), root)
    }

    #[tokio::test]
    async fn fills_once_and_atomically() {
        let (cache, root) = empty_cache("cache-test");
        let dir = cache.version_dir("b", "m", 1, "fp1");
        let failed = cache
            .fill(&dir, |temp| async move {
                std::fs::write(temp.join("model.pt"), b"half").unwrap();
                Err(StorageError::Fetch {
                    path: "x".into(),
                    message: "connection reset".into(),
                })
            })
            .await;
        assert!(failed.is_err());
        assert!(!dir.exists(), "a failed download leaves nothing behind");
        let filled = cache
            .fill(&dir, |temp| async move {
                std::fs::write(temp.join("model.pt"), b"whole").unwrap();
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(std::fs::read(filled.join("model.pt")).unwrap(), b"whole");
        // Found again without downloading.
        cache
            .fill(&dir, |_| async { panic!("downloaded twice") })
            .await
            .unwrap();
        // A new fingerprint of the same version replaces the old directory.
        let newer = cache.version_dir("b", "m", 1, "fp2");
        cache.fill(&newer, |_| async { Ok(()) }).await.unwrap();
        assert!(newer.exists() && !dir.exists());
        let leftovers: Vec<_> = std::fs::read_dir(newer.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Two fills of one version at once (two models on one base path): one downloads, the
    /// other finds its result, and nothing is pulled from under the download.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fills_of_one_version_take_turns() {
        let (cache, root) = empty_cache("cache-turns");
        let dir = cache.version_dir("b", "m", 1, "fp");
        let downloads = AtomicU64::new(0);
        let downloads = &downloads;
        let fill = || {
            cache.fill(&dir, |temp| async move {
                downloads.fetch_add(1, Ordering::SeqCst);
                let write = |name: &str| {
                    let path = temp.join(name);
                    std::fs::write(&path, b"x").map_err(|e| StorageError::cache(&path, e))
                };
                write("model.pt")?;
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                write("signature.json")
            })
        };
        let (first, second) = tokio::join!(fill(), fill());
        assert_eq!(first.unwrap(), dir);
        assert_eq!(second.unwrap(), dir);
        assert_eq!(downloads.load(Ordering::SeqCst), 1);
        assert!(dir.join("model.pt").exists() && dir.join("signature.json").exists());
        assert!(
            cache.lock_filling().is_empty(),
            "the version's turn is forgotten"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn what_no_configured_base_reads_is_removed() {
        let (cache, root) = empty_cache("cache-bases");
        for (bucket, prefix) in [
            ("b", "models/mlp"),
            ("b", "models/old"),
            ("b", "models"),
            ("gone", "x"),
        ] {
            let dir = cache.version_dir(bucket, prefix, 1, "fp");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("model.pt"), b"m").unwrap();
        }
        // Only models/mlp is configured now: models' own versions, models/old and the
        // bucket "gone" go; models/mlp stays whole.
        cache
            .retain_bases(&[("b".to_string(), "models/mlp".to_string())])
            .await;
        assert!(cache
            .version_dir("b", "models/mlp", 1, "fp")
            .join("model.pt")
            .is_file());
        assert!(!root.join("b/models/old").exists());
        assert!(!root.join("b/models/1").exists());
        assert!(!root.join("gone").exists());
        // With nothing configured, nothing is left.
        cache.retain_bases(&[]).await;
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn retains_only_the_versions_kept() {
        let (cache, root) = empty_cache("cache-retain");
        for version in [1, 2, 3] {
            let dir = cache.version_dir("b", "m", version, "fp");
            cache.fill(&dir, |_| async { Ok(()) }).await.unwrap();
        }
        // Another model's prefix nested under this one is not this prefix's to remove.
        let nested = cache.version_dir("b", "m/sub", 1, "fp");
        cache.fill(&nested, |_| async { Ok(()) }).await.unwrap();
        cache.retain("b", "m", &BTreeSet::from([2])).await;
        let base = root.join("b").join("m");
        let mut left: Vec<_> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["2", "sub"]);
        assert!(nested.exists());
        // A prefix never cached is no error.
        cache.retain("b", "absent", &BTreeSet::new()).await;
        std::fs::remove_dir_all(&root).unwrap();
    }
}
