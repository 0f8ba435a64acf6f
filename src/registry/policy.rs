//! Which version to load or unload next: TF Serving's AspiredVersionPolicy, as a pure
//! function of one model's versions, unit tested without threads, files or time. The
//! manager asks for one action, carries it out, and asks again until there is none.

use std::collections::BTreeSet;
use std::fmt;

/// One step the manager takes for a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Load(i64),
    Unload(i64),
}

/// One model's versions as the policy sees them.
#[derive(Clone, Copy, Debug)]
pub struct Versions<'a> {
    /// The versions the model's version policy wants (latest N, all, specific).
    pub aspired: &'a BTreeSet<i64>,
    /// The versions loaded and serving.
    pub loaded: &'a BTreeSet<i64>,
    /// Aspired versions that are not loaded and may be tried now: neither waiting for a
    /// load retry nor tried already in this pass.
    pub loadable: &'a BTreeSet<i64>,
}

/// Decides the next action for a model, or that there is none.
pub trait VersionPolicy: fmt::Debug + Send + Sync {
    fn next_action(&self, versions: Versions<'_>) -> Option<Action>;
}

/// TF Serving's default: a new version is loaded before the one it replaces unloads, and
/// the last serving version is never unloaded while no aspired version serves, so a model
/// stays available across every change at the cost of holding two versions for a while.
/// Newer versions load first.
#[derive(Clone, Copy, Debug, Default)]
pub struct AvailabilityPreserving;

impl VersionPolicy for AvailabilityPreserving {
    fn next_action(&self, versions: Versions<'_>) -> Option<Action> {
        if let Some(&newest) = versions.loadable.last() {
            return Some(Action::Load(newest));
        }
        let serving_aspired = versions.loaded.iter().any(|v| versions.aspired.contains(v));
        if !serving_aspired {
            return None;
        }
        versions
            .loaded
            .iter()
            .find(|v| !versions.aspired.contains(v))
            .map(|&v| Action::Unload(v))
    }
}

/// TF Serving's ResourcePreservingPolicy (`--unload_first_models`), for models whose two
/// versions do not fit at once: a version no longer aspired unloads before the new one
/// loads, and requests in the gap wait for it. The price: when the new version fails to
/// load, the model serves nothing until a retry succeeds. As in the default policy, a
/// model none of whose versions is aspired any more keeps the ones it serves.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResourcePreserving;

impl VersionPolicy for ResourcePreserving {
    fn next_action(&self, versions: Versions<'_>) -> Option<Action> {
        let serving_aspired = versions.loaded.iter().any(|v| versions.aspired.contains(v));
        if serving_aspired || !versions.loadable.is_empty() {
            if let Some(&stale) = versions
                .loaded
                .iter()
                .find(|v| !versions.aspired.contains(v))
            {
                return Some(Action::Unload(stale));
            }
        }
        versions.loadable.last().map(|&newest| Action::Load(newest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(versions: &[i64]) -> BTreeSet<i64> {
        versions.iter().copied().collect()
    }

    /// Runs `policy` as the manager does, with `fails` never loading; returns the actions.
    fn run(
        policy: &dyn VersionPolicy,
        aspired: &[i64],
        loaded: &[i64],
        fails: &[i64],
    ) -> Vec<Action> {
        let (aspired, mut loaded) = (set(aspired), set(loaded));
        let mut tried = BTreeSet::new();
        let mut actions = Vec::new();
        loop {
            let loadable: BTreeSet<i64> = aspired
                .iter()
                .filter(|v| !loaded.contains(v) && !tried.contains(*v))
                .copied()
                .collect();
            let versions = Versions {
                aspired: &aspired,
                loaded: &loaded,
                loadable: &loadable,
            };
            let Some(action) = policy.next_action(versions) else {
                return actions;
            };
            actions.push(action);
            match action {
                Action::Load(v) => {
                    tried.insert(v);
                    if !fails.contains(&v) {
                        loaded.insert(v);
                    }
                }
                Action::Unload(v) => {
                    loaded.remove(&v);
                }
            }
        }
    }

    #[test]
    fn unload_first_unloads_the_old_version_before_the_new_one_loads() {
        let actions = run(&ResourcePreserving, &[2], &[1], &[]);
        assert_eq!(actions, vec![Action::Unload(1), Action::Load(2)]);
        // Nothing aspired (every version removed from disk): keep serving.
        assert_eq!(run(&ResourcePreserving, &[], &[1], &[]), vec![]);
        // Versions that stay aspired stay loaded.
        let actions = run(&ResourcePreserving, &[2, 3], &[1, 2], &[]);
        assert_eq!(actions, vec![Action::Unload(1), Action::Load(3)]);
    }

    #[test]
    fn a_new_version_loads_before_the_old_one_unloads() {
        let actions = run(&AvailabilityPreserving, &[2], &[1], &[]);
        assert_eq!(actions, vec![Action::Load(2), Action::Unload(1)]);
    }

    #[test]
    fn the_last_serving_version_stays_while_no_aspired_one_loads() {
        assert_eq!(
            run(&AvailabilityPreserving, &[2], &[1], &[2]),
            vec![Action::Load(2)]
        );
        // Nothing aspired at all (every version removed from disk): keep serving.
        assert_eq!(run(&AvailabilityPreserving, &[], &[1], &[]), vec![]);
    }

    #[test]
    fn stale_versions_still_unload_when_storage_stops_the_loads() {
        // The manager clears `loadable` after a storage error: v4 never loads, but v3 is
        // aspired and serving, so v1 goes.
        let (aspired, loaded, loadable) = (set(&[3, 4]), set(&[1, 3]), BTreeSet::new());
        let versions = Versions {
            aspired: &aspired,
            loaded: &loaded,
            loadable: &loadable,
        };
        assert_eq!(
            AvailabilityPreserving.next_action(versions),
            Some(Action::Unload(1))
        );
    }

    #[test]
    fn newer_versions_load_first_and_every_stale_one_goes() {
        let actions = run(&AvailabilityPreserving, &[3, 4], &[1, 2], &[]);
        assert_eq!(
            actions,
            vec![
                Action::Load(4),
                Action::Load(3),
                Action::Unload(1),
                Action::Unload(2)
            ]
        );
        // One aspired version enough: the other's failure does not keep stale ones.
        let actions = run(&AvailabilityPreserving, &[3, 4], &[1], &[4]);
        assert_eq!(
            actions,
            vec![Action::Load(4), Action::Load(3), Action::Unload(1)]
        );
    }
}
