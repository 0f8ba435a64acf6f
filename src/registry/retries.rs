//! Load retries (`--max_num_load_retries`, `--load_retry_interval_micros`): how often a
//! version whose files are there but do not load is tried again, and what its status says.

use std::time::Duration;
use tokio::time::Instant;

/// How often a version that failed to load is tried again with the same files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadRetries {
    /// Tries after the first failure (`--max_num_load_retries`).
    pub max_retries: u32,
    /// Wait before each of them (`--load_retry_interval_micros`).
    pub interval: Duration,
}

impl LoadRetries {
    /// Records a failed load of files with `fingerprint`, after `previous` failures of the
    /// same version: the next try is one interval away until the retries are spent. Other
    /// files start the count afresh.
    pub(super) fn after_failure(
        &self,
        previous: Option<FailedLoad>,
        fingerprint: &str,
        now: Instant,
    ) -> FailedLoad {
        let attempts = attempts_before(previous, fingerprint).saturating_add(1);
        FailedLoad {
            fingerprint: fingerprint.to_string(),
            attempts,
            retry_at: (attempts <= self.max_retries).then(|| now + self.interval),
        }
    }

    /// Records a load that found no room in the memory budget though the budget could
    /// hold it: tried again one interval later, however many retries were spent, since
    /// room comes as on-demand versions go idle or age past `--min_residency_seconds`.
    pub(super) fn after_no_room(
        &self,
        previous: Option<FailedLoad>,
        fingerprint: &str,
        now: Instant,
    ) -> FailedLoad {
        FailedLoad {
            fingerprint: fingerprint.to_string(),
            attempts: attempts_before(previous, fingerprint),
            retry_at: Some(now + self.interval),
        }
    }

    /// What GetModelStatus adds to the error of a failed load.
    pub(super) fn note(&self, failed: &FailedLoad) -> String {
        match failed.retry_at {
            Some(_) => format!(
                "retry {} of {} in {:?}",
                failed.attempts, self.max_retries, self.interval
            ),
            None if self.max_retries > 0 => format!(
                "failed {} times; tried again when its files change",
                failed.attempts
            ),
            None => "tried again when its files change".to_string(),
        }
    }
}

/// The failed loads counted so far against the files with `fingerprint`.
fn attempts_before(previous: Option<FailedLoad>, fingerprint: &str) -> u32 {
    match previous {
        Some(failed) if failed.fingerprint == fingerprint => failed.attempts,
        _ => 0,
    }
}

/// A version whose files are there but did not load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FailedLoad {
    /// The files that failed; other files are tried afresh.
    pub(super) fingerprint: String,
    /// Failed loads of these files so far.
    pub(super) attempts: u32,
    /// When to try again; `None` once the retries are spent.
    pub(super) retry_at: Option<Instant>,
}

impl FailedLoad {
    /// Whether the version must not be loaded at `now`: it waits for its next try, or has
    /// no try left.
    pub(super) fn waiting(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now < at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_loads_are_retried_an_interval_apart_until_the_retries_are_spent() {
        let retries = LoadRetries {
            max_retries: 2,
            interval: Duration::from_secs(60),
        };
        let now = Instant::now();
        let first = retries.after_failure(None, "fp", now);
        assert_eq!(
            (first.attempts, first.retry_at),
            (1, Some(now + retries.interval))
        );
        assert!(first.waiting(now) && !first.waiting(now + retries.interval));
        assert_eq!(retries.note(&first), "retry 1 of 2 in 60s");
        let later = now + retries.interval;
        let second = retries.after_failure(Some(first), "fp", later);
        assert_eq!(
            (second.attempts, second.retry_at),
            (2, Some(later + retries.interval))
        );
        // The last retry fails too: no more tries for these files, however long it waits.
        let third = retries.after_failure(Some(second.clone()), "fp", later);
        assert_eq!((third.attempts, third.retry_at), (3, None));
        assert!(third.waiting(later + Duration::from_secs(86_400)));
        assert_eq!(
            retries.note(&third),
            "failed 3 times; tried again when its files change"
        );
        // Rewritten files start the count afresh.
        let rewritten = retries.after_failure(Some(third), "fp2", later);
        assert_eq!(rewritten.attempts, 1);
        assert!(rewritten.retry_at.is_some());
        // Without retries, the first failure is final.
        let none = LoadRetries {
            max_retries: 0,
            ..retries
        };
        let once = none.after_failure(None, "fp", now);
        assert_eq!(once.retry_at, None);
        assert_eq!(none.note(&once), "tried again when its files change");
        // No room yet is no failure: tried again, the count unchanged.
        let waiting = none.after_no_room(Some(once), "fp", now);
        assert_eq!(
            (waiting.attempts, waiting.retry_at),
            (1, Some(now + none.interval))
        );
    }
}
