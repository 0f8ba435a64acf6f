//! The registry: which model versions exist, which serve, and their status.
//!
//! The read path is one atomic load of an immutable [`ServingMap`]; the [`Manager`] task is
//! its only writer and swaps a rebuilt map in whole. A request clones the `Arc<Servable>` it
//! resolved and so keeps that version alive until it answers, even once a newer version has
//! replaced it: an unloaded version is freed when its last request drops it.

mod loader;
mod manager;
mod package;
mod policy;
mod retries;
mod source;
mod warmup_records;

pub use loader::{LoadSettings, VersionLoadError};
pub use manager::{
    ApplyError, BoxError, ConfigHook, Manager, ManagerConfig, ManagerHandle, ModelChange,
};
pub use policy::{AvailabilityPreserving, VersionPolicy};
pub use retries::LoadRetries;
pub use warmup_records::{ReplayError, WarmUpReplay, MAX_WARMUP_RECORDS, WARMUP_FILE};

use crate::batching::Scheduler;
use crate::error::Error;
use crate::signature::SignatureMap;
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One loaded model version, ready to run.
pub struct Servable {
    pub model: String,
    pub version: i64,
    pub signatures: SignatureMap,
    /// The batch sizes the model allows, when it says (an AOTInductor package's export
    /// range): requests with more or fewer rows are refused before they reach it.
    pub batch_range: Option<std::ops::RangeInclusive<usize>>,
    pub scheduler: Scheduler,
}

impl Servable {
    /// The model's name and the version number, as errors name them.
    pub fn id(&self) -> (&str, i64) {
        (&self.model, self.version)
    }
}

/// Which version a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionSelector {
    /// The highest available version.
    Latest,
    Number(i64),
    Label(String),
}

/// TF Serving's version states (ModelVersionStatus.State), in lifecycle order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum VersionState {
    Start,
    Loading,
    Available,
    Unloading,
    End,
}

/// The status of one version, as GetModelStatus reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionStatus {
    pub state: VersionState,
    /// Why the version failed to load; `None` when all is well.
    pub error: Option<String>,
}

/// What serves now: immutable, swapped whole.
#[derive(Default)]
pub struct ServingMap {
    models: HashMap<String, ServingModel>,
}

#[derive(Default)]
struct ServingModel {
    versions: BTreeMap<i64, Arc<Servable>>,
    labels: BTreeMap<String, i64>,
}

/// Whether every configured model can answer, and if not, which cannot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub draining: bool,
    /// Configured models with no AVAILABLE version.
    pub models_not_ready: Vec<String>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        !self.draining && self.models_not_ready.is_empty()
    }
}

/// Shared, read-mostly view of the served models. Thread safe; cheap to read.
#[derive(Default)]
pub struct Registry {
    serving: ArcSwap<ServingMap>,
    /// Every configured model (even one with no version yet) and its versions' states.
    status: Mutex<BTreeMap<String, BTreeMap<i64, VersionStatus>>>,
    draining: AtomicBool,
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Versions that serve with a device on which all their workers died, or which failed
    /// under them (a sticky CUDA error): the process can no longer run them there, and
    /// liveness (`/healthz`) says so, so that Kubernetes restarts the pod.
    pub fn lost_workers(&self) -> Vec<String> {
        let serving = self.serving.load();
        let mut lost: Vec<String> = serving
            .models
            .values()
            .flat_map(|model| model.versions.values())
            .flat_map(|servable| {
                servable.scheduler.lost_devices().into_iter().map(|device| {
                    format!(
                        "model '{}' version {} can no longer run on {device} (its workers died or the device failed)",
                        servable.model, servable.version
                    )
                })
            })
            .collect();
        lost.sort();
        lost
    }

    /// The version a request should run on; errors are NOT_FOUND with what was missing.
    pub fn resolve(&self, model: &str, selector: &VersionSelector) -> Result<Arc<Servable>, Error> {
        let serving = self.serving.load();
        let Some(entry) = serving.models.get(model) else {
            return Err(if self.is_configured(model) {
                Error::NotFound(format!("model '{model}' has no available version yet"))
            } else {
                Error::NotFound(format!("model '{model}' is not served here"))
            });
        };
        let found = match selector {
            VersionSelector::Latest => entry.versions.values().next_back(),
            VersionSelector::Number(v) => entry.versions.get(v),
            VersionSelector::Label(label) => {
                let version = entry.labels.get(label).ok_or_else(|| {
                    Error::NotFound(format!("model '{model}' has no version label '{label}'"))
                })?;
                return entry.versions.get(version).cloned().ok_or_else(|| {
                    Error::NotFound(format!(
                        "version label '{label}' of model '{model}' points at version {version}, which is not available"
                    ))
                });
            }
        };
        found.cloned().ok_or_else(|| match selector {
            VersionSelector::Number(v) => {
                Error::NotFound(format!("model '{model}' has no available version {v}"))
            }
            _ => Error::NotFound(format!("model '{model}' has no available version yet")),
        })
    }

    /// The versions of `model` that serve now, oldest first.
    pub fn serving_versions(&self, model: &str) -> Vec<i64> {
        let serving = self.serving.load();
        serving
            .models
            .get(model)
            .map(|m| m.versions.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The status of every version of `model` (or of one version), oldest first.
    pub fn model_status(
        &self,
        model: &str,
        version: Option<i64>,
    ) -> Result<Vec<(i64, VersionStatus)>, Error> {
        let status = self.lock_status();
        let versions = status
            .get(model)
            .ok_or_else(|| Error::NotFound(format!("model '{model}' is not served here")))?;
        match version {
            Some(v) => versions
                .get(&v)
                .map(|s| vec![(v, s.clone())])
                .ok_or_else(|| Error::NotFound(format!("model '{model}' has no version {v}"))),
            None if versions.is_empty() => Err(Error::NotFound(format!(
                "model '{model}' has no versions yet"
            ))),
            None => Ok(versions.iter().map(|(&v, s)| (v, s.clone())).collect()),
        }
    }

    /// Readiness: not draining, and every configured model has an AVAILABLE version.
    pub fn readiness(&self) -> Readiness {
        let serving = self.serving.load();
        let status = self.lock_status();
        let models_not_ready = status
            .keys()
            .filter(|name| {
                serving
                    .models
                    .get(*name)
                    .is_none_or(|m| m.versions.is_empty())
            })
            .cloned()
            .collect();
        Readiness {
            draining: self.draining.load(Ordering::SeqCst),
            models_not_ready,
        }
    }

    /// Marks the server as draining: readiness turns false for good.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Names of the configured models.
    pub fn model_names(&self) -> Vec<String> {
        self.lock_status().keys().cloned().collect()
    }

    /// Whether `model` is in the configuration (loaded or not).
    pub fn is_configured(&self, model: &str) -> bool {
        self.lock_status().contains_key(model)
    }

    /// The metrics label of a request that named `model`: the name when it is configured,
    /// else "" (metric labels must not take arbitrary client text).
    pub fn metrics_label<'a>(&self, model: &'a str) -> &'a str {
        if self.is_configured(model) {
            model
        } else {
            ""
        }
    }

    fn lock_status(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<i64, VersionStatus>>> {
        // A poisoned lock only means a panic elsewhere while holding it; the map stays usable.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    // The writers below are for the manager only.

    fn publish(&self, map: ServingMap) {
        self.serving.store(Arc::new(map));
    }

    /// Records a version's state; ignored for a model no longer configured.
    fn set_status(&self, model: &str, version: i64, state: VersionState, error: Option<String>) {
        if let Some(versions) = self.lock_status().get_mut(model) {
            versions.insert(version, VersionStatus { state, error });
        }
    }

    /// Marks a retired version END once its last request has answered, unless its status has
    /// moved on meanwhile (the model was removed and added again, and the version reloaded).
    fn finish_unload(&self, model: &str, version: i64) {
        if let Some(status) = self
            .lock_status()
            .get_mut(model)
            .and_then(|versions| versions.get_mut(&version))
        {
            if status.state == VersionState::Unloading {
                *status = VersionStatus {
                    state: VersionState::End,
                    error: None,
                };
            }
        }
    }

    /// Keeps the status of the models named (adding empty ones) and forgets the others.
    fn configure_models(&self, names: &[String]) {
        let mut status = self.lock_status();
        status.retain(|name, _| names.contains(name));
        for name in names {
            status.entry(name.clone()).or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_unload_does_not_overwrite_a_newer_state() {
        let registry = Registry::new();
        registry.configure_models(&["m".to_string()]);
        registry.set_status("m", 1, VersionState::Unloading, None);
        registry.finish_unload("m", 1);
        assert_eq!(
            registry.model_status("m", Some(1)).unwrap()[0].1.state,
            VersionState::End
        );
        // Removed and added again while an old copy of version 1 was still draining.
        registry.set_status("m", 1, VersionState::Unloading, None);
        registry.configure_models(&[]);
        registry.configure_models(&["m".to_string()]);
        registry.set_status("m", 1, VersionState::Available, None);
        registry.finish_unload("m", 1);
        assert_eq!(
            registry.model_status("m", Some(1)).unwrap()[0].1.state,
            VersionState::Available
        );
        // A removed model's statuses are gone, not left behind.
        registry.configure_models(&[]);
        registry.finish_unload("m", 1);
        assert!(registry.model_status("m", None).is_err());
    }
}
