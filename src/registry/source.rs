//! TF Serving's Source, the manager's half that watches storage: when to list a model's
//! base path again after storage failed (exponential backoff), and which listed versions
//! count (a version that may be an upload in progress counts once two listings agree).

use crate::storage::VersionEntry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// The longest wait between two listings of an unreachable base path (unless the poll
/// interval itself is longer).
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Exponential backoff for one model's storage: the first retry after one poll interval,
/// then twice as long each time, up to a cap.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    failures: u32,
    pub(super) retry_at: Option<Instant>,
}

impl Backoff {
    pub(super) fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    /// Records a failure; returns the wait before the next attempt.
    pub(super) fn failed(&mut self, now: Instant, base: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let cap = MAX_BACKOFF.max(base);
        let factor = 1u32 << (self.failures - 1).min(16);
        let delay = base.saturating_mul(factor).min(cap);
        self.retry_at = Some(now + delay);
        delay
    }

    pub(super) fn reset(&mut self) {
        *self = Backoff::default();
    }

    pub(super) fn is_failing(&self) -> bool {
        self.failures > 0
    }
}

/// The versions of a listing whose files have settled: the only ones a load may start on.
/// Files still being written (an `aws s3 sync` or a `cp -r` in progress: `model.pt` there,
/// the signature or warm-up records not yet) must not be loaded, as a loaded version is
/// never loaded again. While polling:
///
/// - at a model's first listing, a complete version (its signature there) has settled:
///   its files were there before the server looked;
/// - any other version has settled once a listing finds its files unchanged since the
///   previous one: new versions wait one poll interval, and a `model.pt` without
///   `signature.json` (which may be an upload in progress) always does.
///
/// Which versions a model aspires to is decided from the whole listing, not from this:
/// a version still settling holds back the versions it replaces (its older siblings are
/// not loaded in its stead), and a serving version whose files are rewritten stays aspired.
/// `previous` holds every listed version's fingerprint from one listing to the next. With
/// polling off there is no next listing, so this one decides.
pub(super) fn settled_versions(
    model: &str,
    listing: &BTreeMap<i64, VersionEntry>,
    previous: &mut Option<HashMap<i64, String>>,
    polling: bool,
) -> BTreeSet<i64> {
    let mut settled = BTreeSet::new();
    for (&version, entry) in listing {
        let unchanged = previous
            .as_ref()
            .is_some_and(|previous| previous.get(&version) == Some(&entry.fingerprint));
        let first_look = previous.is_none() && entry.complete;
        if polling && !first_look && !unchanged {
            tracing::debug!(
                model,
                version,
                "new or changed files; waiting for the next listing to find them unchanged"
            );
            continue;
        }
        settled.insert(version);
    }
    *previous = Some(
        listing
            .iter()
            .map(|(&version, entry)| (version, entry.fingerprint.clone()))
            .collect(),
    );
    settled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fingerprint: &str, complete: bool) -> VersionEntry {
        VersionEntry {
            dir_name: String::new(),
            fingerprint: fingerprint.into(),
            complete,
            files: Vec::new(),
        }
    }

    fn listing(entries: &[(i64, &str, bool)]) -> BTreeMap<i64, VersionEntry> {
        entries
            .iter()
            .map(|&(version, fingerprint, complete)| (version, entry(fingerprint, complete)))
            .collect()
    }

    #[test]
    fn versions_settle_once_their_files_stop_changing() {
        let mut previous = None;
        let mut settled = |listed: &[(i64, &str, bool)]| {
            settled_versions("m", &listing(listed), &mut previous, true)
        };
        // First look: complete versions have settled, an incomplete one waits a listing.
        let first = [(1, "a", true), (2, "b", false)];
        assert_eq!(settled(&first), [1].into());
        assert_eq!(settled(&first), [1, 2].into());
        // A new version, complete or not, waits for a listing that finds it unchanged (an
        // upload may still be adding its warm-up records).
        let uploading = [(1, "a", true), (2, "b", false), (3, "c", true)];
        assert_eq!(settled(&uploading), [1, 2].into());
        let grown = [(1, "a", true), (2, "b", false), (3, "c+warmup", true)];
        assert_eq!(settled(&grown), [1, 2].into());
        assert_eq!(settled(&grown), [1, 2, 3].into());
        // Rewritten in place: it waits again.
        let rewritten = [(1, "a2", true), (2, "b", false), (3, "c+warmup", true)];
        assert_eq!(settled(&rewritten), [2, 3].into());
        // One listing that cannot confirm a signature changes nothing for unchanged files.
        let unconfirmed = [(1, "a2", false), (2, "b", false), (3, "c+warmup", false)];
        assert_eq!(settled(&unconfirmed), [1, 2, 3].into());
        // Without polling, one listing decides.
        let mut fresh = None;
        let all = settled_versions("m", &listing(&uploading), &mut fresh, false);
        assert_eq!(all, [1, 2, 3].into());
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let now = Instant::now();
        let mut backoff = Backoff::default();
        assert!(backoff.ready(now) && !backoff.is_failing());
        let base = Duration::from_secs(1);
        let delays: Vec<u64> = (0..9)
            .map(|_| backoff.failed(now, base).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert!(!backoff.ready(now));
        assert!(backoff.ready(now + MAX_BACKOFF));
        backoff.reset();
        assert!(backoff.ready(now) && !backoff.is_failing());
        // A poll interval longer than the cap is never shortened.
        let long = Duration::from_secs(120);
        assert_eq!(backoff.failed(now, long), long);
        assert_eq!(backoff.failed(now, long), long);
    }
}
