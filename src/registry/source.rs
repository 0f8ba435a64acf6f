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

/// The versions of a listing that count. A version whose entry is not `complete` (a
/// `model.pt` without `signature.json`, which may be an upload in progress) counts only
/// once it is unchanged since the previous listing: `previous` holds every listed
/// version's fingerprint from one listing to the next. Unchanged files are what counts,
/// not how the previous listing judged them, so a version already counted stays counted
/// when one listing cannot confirm its signature (an archive that could not be read that
/// once would otherwise unload a serving version). With polling off there is no next
/// listing, so this one decides.
pub(super) fn settled_versions(
    model: &str,
    listing: &BTreeMap<i64, VersionEntry>,
    previous: &mut HashMap<i64, String>,
    polling: bool,
) -> BTreeSet<i64> {
    let mut present = BTreeSet::new();
    for (&version, entry) in listing {
        let unchanged = previous.get(&version) == Some(&entry.fingerprint);
        if !entry.complete && polling && !unchanged {
            tracing::debug!(
                model,
                version,
                "model.pt without signature.json; waiting for the next listing"
            );
            continue;
        }
        present.insert(version);
    }
    *previous = listing
        .iter()
        .map(|(&version, entry)| (version, entry.fingerprint.clone()))
        .collect();
    present
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fingerprint: &str, complete: bool) -> VersionEntry {
        VersionEntry {
            fingerprint: fingerprint.into(),
            complete,
            files: Vec::new(),
        }
    }

    #[test]
    fn an_incomplete_version_counts_once_two_listings_agree() {
        let mut previous = HashMap::new();
        let first: BTreeMap<i64, VersionEntry> =
            [(1, entry("a", true)), (2, entry("b", false))].into();
        assert_eq!(
            settled_versions("m", &first, &mut previous, true),
            [1].into()
        );
        assert_eq!(
            settled_versions("m", &first, &mut previous, true),
            [1, 2].into()
        );
        // Rewritten since: it waits again.
        let rewritten: BTreeMap<i64, VersionEntry> = [(2, entry("c", false))].into();
        assert_eq!(
            settled_versions("m", &rewritten, &mut previous, true),
            BTreeSet::new()
        );
        // A counted version that one listing cannot confirm stays while its files are
        // unchanged.
        let counted: BTreeMap<i64, VersionEntry> = [(2, entry("c", true))].into();
        settled_versions("m", &counted, &mut previous, true);
        let unconfirmed: BTreeMap<i64, VersionEntry> = [(2, entry("c", false))].into();
        assert_eq!(
            settled_versions("m", &unconfirmed, &mut previous, true),
            [2].into()
        );
        // Without polling, one listing decides.
        let mut fresh = HashMap::new();
        assert_eq!(
            settled_versions("m", &first, &mut fresh, false),
            [1, 2].into()
        );
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
