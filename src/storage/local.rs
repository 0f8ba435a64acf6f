//! Local base paths: versions are listed with `read_dir` and loaded in place. Blocking; run
//! on a blocking thread.

use super::{
    embedded_signature, layout, package_has_signature, parse_version, preferred_dir_name,
    EmbeddedSignature, StorageError, VersionEntry, MODEL_FILE, PACKAGE_FILE,
};
use std::collections::BTreeMap;
use std::path::Path;

/// The versions under `dir`. A version directory that cannot be read is a listing error,
/// not a missing version: storage trouble must never unload what serves.
pub(super) fn list(dir: &Path) -> Result<BTreeMap<i64, VersionEntry>, StorageError> {
    let list_error = |path: &Path, e: std::io::Error| StorageError::List {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut versions: BTreeMap<i64, VersionEntry> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| list_error(dir, e))? {
        let entry = entry.map_err(|e| list_error(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(version) = parse_version(&name) else {
            continue;
        };
        if let Some(listed) = versions.get(&version) {
            if preferred_dir_name(version, &listed.dir_name, &name) == listed.dir_name {
                continue;
            }
        }
        let path = entry.path();
        // A version directory may be a symlink (git-sync, a volume's `..data` links): it
        // counts when it leads to a directory; one that leads nowhere is not a version.
        let kind = entry.file_type().map_err(|e| list_error(dir, e))?;
        let is_dir = kind.is_dir() || (kind.is_symlink() && path.is_dir());
        if !is_dir {
            continue;
        }
        match version_entry(&path, name) {
            Ok(Some(found)) => {
                versions.insert(version, found);
            }
            Ok(None) => {}
            // Removed since `dir` was read: it is not part of this listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(list_error(&path, e)),
        }
    }
    Ok(versions)
}

/// How deep under a version directory its files count in its fingerprint
/// (`assets.extra/tf_serving_warmup_requests` is one level down).
const SUBDIRECTORY_DEPTH: usize = 2;

/// Adds `name:size:mtime` for each file under `dir` (paths from `prefix`, `depth` levels of
/// subdirectories) to `files`, and the names directly in it to `names` when `prefix` is
/// empty. Symlinks are followed: a linked file (DVC, git-annex) counts as its target, one
/// that leads nowhere as the link.
fn stamp_files(
    dir: &Path,
    prefix: &str,
    depth: usize,
    names: &mut Vec<String>,
    files: &mut Vec<String>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = match std::fs::metadata(entry.path()) {
            Ok(meta) => meta,
            // A link to nothing yet (a volume not mounted yet) counts as the link itself.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match entry.metadata() {
                Ok(link) => link,
                // Removed since the directory was read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if meta.is_dir() {
            if depth > 0 {
                stamp_files(&entry.path(), &format!("{name}/"), depth - 1, names, files)?;
            }
        } else {
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            files.push(format!("{name}:{}:{modified}", meta.len()));
        }
        if prefix.is_empty() {
            names.push(name);
        }
    }
    Ok(())
}

/// The local version directory `dir`, listed as `dir_name`, or `None` while it holds no
/// model.
fn version_entry(dir: &Path, dir_name: String) -> std::io::Result<Option<VersionEntry>> {
    let mut names = Vec::new();
    let mut files = Vec::new();
    stamp_files(dir, "", SUBDIRECTORY_DEPTH, &mut names, &mut files)?;
    let Some(complete) = layout(names.iter().map(String::as_str)) else {
        return Ok(None);
    };
    let complete = complete || {
        // Reading the archive's directory is cheap here, so a model with an embedded
        // signature serves at once; one that cannot be opened may still be being written.
        has_embedded_signature(&dir.join(MODEL_FILE))
            || package_has_signature(&dir.join(PACKAGE_FILE))
    };
    files.sort();
    Ok(Some(VersionEntry {
        dir_name,
        fingerprint: files.join(";"),
        complete,
        files: Vec::new(),
    }))
}

/// Whether `model` is a complete TorchScript archive holding `extra/signature.json`.
fn has_embedded_signature(model: &Path) -> bool {
    matches!(embedded_signature(model), Ok(EmbeddedSignature::Found(_)))
}

#[cfg(test)]
mod tests {
    use super::super::{BasePath, SIGNATURE_FILE};
    use super::*;

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
        // Symlinks: to a version directory (it counts), and to nothing (it does not).
        std::os::unix::fs::symlink(root.join("3"), root.join("5")).unwrap();
        std::os::unix::fs::symlink(root.join("gone"), root.join("6")).unwrap();
        let base = BasePath::Local(root.clone());
        let versions = base.list_versions().await.unwrap();
        assert_eq!(versions.keys().copied().collect::<Vec<_>>(), vec![1, 3, 5]);
        // model.pt alone, not an archive with a signature: maybe still being written.
        assert!(!versions[&1].complete);
        assert!(versions[&3].complete);
        let before = versions[&1].fingerprint.clone();
        std::fs::write(root.join("1").join(SIGNATURE_FILE), b"{}").unwrap();
        let versions = base.list_versions().await.unwrap();
        assert_ne!(versions[&1].fingerprint, before);
        assert!(versions[&1].complete);

        // Files one level down and files behind symlinks count: rewriting either is a change.
        let before = versions[&1].fingerprint.clone();
        std::fs::create_dir_all(root.join("1/assets.extra")).unwrap();
        std::fs::write(root.join("1/assets.extra/tf_serving_warmup_requests"), b"a").unwrap();
        let versions = base.list_versions().await.unwrap();
        assert_ne!(versions[&1].fingerprint, before);
        let before = versions[&1].fingerprint.clone();
        std::fs::write(root.join("target.bin"), b"short").unwrap();
        std::os::unix::fs::symlink(root.join("target.bin"), root.join("1/linked.bin")).unwrap();
        let versions = base.list_versions().await.unwrap();
        assert_ne!(versions[&1].fingerprint, before);
        let before = versions[&1].fingerprint.clone();
        std::fs::write(root.join("target.bin"), b"longer than before").unwrap();
        let versions = base.list_versions().await.unwrap();
        assert_ne!(
            versions[&1].fingerprint, before,
            "the link's target changed"
        );

        // A zero-padded directory is its version, loaded from where it was listed.
        std::fs::create_dir_all(root.join("0009")).unwrap();
        std::fs::write(root.join("0009").join(MODEL_FILE), b"x").unwrap();
        let versions = base.list_versions().await.unwrap();
        let (dir, _) = base.localize(9, &versions[&9]).await.unwrap();
        assert_eq!(dir, root.join("0009"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn embedded_signatures_are_found_in_the_archive() {
        let root = std::env::temp_dir().join(format!("modelgate-embedded-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let path = root.join(MODEL_FILE);
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        zip.start_file(
            "tiny/extra/signature.json",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        std::io::Write::write_all(&mut zip, b"{}").unwrap();
        zip.finish().unwrap();
        assert!(has_embedded_signature(&path));
        // Cut short, as during a copy: the archive's directory is missing.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(!has_embedded_signature(&path));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
