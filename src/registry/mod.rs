//! The registry: which model versions exist, which serve, and their status.
//!
//! The read path is one atomic load of an immutable [`ServingMap`]; the [`Manager`] task is
//! its only writer and swaps a rebuilt map in whole. A request clones the `Arc<Servable>` it
//! resolved and so keeps that version alive until it answers, even once a newer version has
//! replaced it: an unloaded version is freed when its last request drops it.
//!
//! A version's workers live in its servable's slot while it is resident. A request leases
//! them ([`Registry::acquire`]) for as long as it is queued or running; an on-demand
//! version (`--on_demand_models`) starts empty, is loaded by its first request, and may be
//! evicted when no lease is out and a load needs its room in the memory budget
//! ([`residency`]).

mod loader;
mod manager;
mod package;
mod policy;
mod residency;
mod retries;
mod source;
mod warmup_records;

pub use loader::{LoadSettings, VersionLoadError};
pub use manager::{
    ApplyError, BoxError, ConfigHook, Manager, ManagerConfig, ManagerHandle, ModelChange,
};
pub use policy::{AvailabilityPreserving, ResourcePreserving, VersionPolicy};
pub use residency::{DeviceBytes, Ledger, ResidencySettings};
pub use retries::LoadRetries;
pub use warmup_records::{ReplayError, WarmUpReplay, MAX_WARMUP_RECORDS, WARMUP_FILE};

use crate::batching::{BatchingOptions, Scheduler};
use crate::error::Error;
use crate::signature::SignatureMap;
use arc_swap::ArcSwap;
use loader::VersionPlan;
use residency::{Candidate, Eviction, MakeRoom, NoRoom, Resident};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One version as the registry lists it: what it is (signatures, batch range, batching),
/// and the workers that run it while it is resident. A version loaded from the config is
/// resident until it unloads; an on-demand one (`--on_demand_models`) is listed from its
/// files, started by its first request and may be evicted when idle.
pub struct Servable {
    pub model: String,
    pub version: i64,
    pub signatures: SignatureMap,
    /// The batch sizes the model allows, when it says (an AOTInductor package's export
    /// range): requests with more or fewer rows are refused before they reach it.
    pub batch_range: Option<std::ops::RangeInclusive<usize>>,
    /// How its requests are batched (`None`: one by one).
    pub batching: Option<BatchingOptions>,
    /// Its workers while resident. A request clones the `Arc` (its lease) under this lock;
    /// an eviction takes it out under the same lock only while nobody else holds it.
    resident: Mutex<Option<Arc<Resident>>>,
    /// How to start it, for an on-demand version.
    on_demand: Option<OnDemand>,
}

/// An on-demand version's plan, and the single flight of its loads.
struct OnDemand {
    plan: VersionPlan,
    ledger: Arc<Ledger>,
    /// Held by the one load under way; the requests that wait for it wait here.
    flight: tokio::sync::Mutex<()>,
    /// Loads that failed, and the last one's error: a request that arrived before a load
    /// failed (while it ran, or queued behind it) gets its error rather than starting
    /// another.
    failures: AtomicU64,
    /// The last failed load's error and when it failed: until `retry_after` has passed,
    /// requests get it at once instead of loading a broken version again (each try reads
    /// the model and may evict healthy versions for its room).
    last_error: Mutex<Option<(Error, Instant)>>,
    retry_after: Duration,
    /// Whether the load under way still waits for room in the budget (what a request
    /// whose deadline passes is told).
    waiting_for_room: AtomicBool,
    /// Requests waiting for a load of it to finish: it is not evicted while any wait, or
    /// a version loaded for them could be gone before they take their leases.
    waiters: AtomicUsize,
}

/// A request counted in [`OnDemand::waiters`] until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(waiters: &'a AtomicUsize) -> Waiting<'a> {
        waiters.fetch_add(1, Ordering::SeqCst);
        Waiting(waiters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Servable {
    fn new(
        model: &str,
        version: i64,
        signatures: SignatureMap,
        batch_range: Option<std::ops::RangeInclusive<usize>>,
        batching: Option<BatchingOptions>,
        resident: Option<Arc<Resident>>,
    ) -> Servable {
        Servable {
            model: model.to_string(),
            version,
            signatures,
            batch_range,
            batching,
            resident: Mutex::new(resident),
            on_demand: None,
        }
    }

    /// An on-demand version, listed from its files and started by its first request; a
    /// load that fails is tried again `retry_after` later at the soonest.
    fn dormant(plan: VersionPlan, ledger: Arc<Ledger>, retry_after: Duration) -> Servable {
        let mut servable = plan.servable(None);
        servable.on_demand = Some(OnDemand {
            plan,
            ledger,
            flight: tokio::sync::Mutex::new(()),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            retry_after,
            waiting_for_room: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
        });
        servable
    }

    /// The model's name and the version number, as errors name them.
    pub fn id(&self) -> (&str, i64) {
        (&self.model, self.version)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Resident>>> {
        self.resident.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lease on its workers, if it is resident.
    fn lease(&self) -> Option<Arc<Resident>> {
        let lease = self.slot().clone();
        if let Some(resident) = &lease {
            resident.touch();
        }
        lease
    }

    /// The bytes it holds per device (empty when not resident).
    fn resident_bytes(&self) -> DeviceBytes {
        self.slot()
            .as_ref()
            .map(|resident| resident.bytes().clone())
            .unwrap_or_default()
    }

    /// What it holds, for people: "resident: 64.0 KiB on cpu", or that it is on demand and
    /// not resident.
    pub fn residency(&self) -> String {
        let bytes = self.resident_bytes();
        if bytes.is_empty() {
            return match &self.on_demand {
                Some(_) => "on demand: not resident (loads on its next request)".into(),
                None => "not resident".into(),
            };
        }
        let held: Vec<String> = bytes
            .iter()
            .map(|(device, b)| format!("{} on {device}", residency::human(*b)))
            .collect();
        let kind = if self.on_demand.is_some() {
            "on demand, resident"
        } else {
            "resident"
        };
        format!("{kind}: {}", held.join(", "))
    }

    /// Whether `resident` (its own) may be evicted: nobody holds a lease on it or waits for
    /// one, and it was loaded at least `min_residency` ago.
    fn is_idle(&self, resident: &Arc<Resident>, min_residency: Duration) -> bool {
        let waiters = self
            .on_demand
            .as_ref()
            .map_or(0, |on_demand| on_demand.waiters.load(Ordering::SeqCst));
        Arc::strong_count(resident) == 1
            && waiters == 0
            && resident.loaded_at.elapsed() >= min_residency
    }

    /// Takes its workers out for eviction, if it is idle (see [`Servable::is_idle`]).
    fn take_if_idle(&self, min_residency: Duration) -> Option<Arc<Resident>> {
        let mut slot = self.slot();
        let idle = slot
            .as_ref()
            .is_some_and(|resident| self.is_idle(resident, min_residency));
        if idle {
            slot.take()
        } else {
            None
        }
    }
}

/// A request's hold on a resident version's workers: the version is not evicted, nor
/// freed, while it is held.
pub struct Lease {
    resident: Arc<Resident>,
    /// When the request began waiting for the version to load, if it had to.
    pub cold_since: Option<Instant>,
}

impl Lease {
    pub fn scheduler(&self) -> &Scheduler {
        &self.resident.scheduler
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
    /// Why the version failed to load, with the code GetModelStatus reports; `None` when
    /// all is well.
    pub error: Option<Error>,
}

/// What serves now: immutable, swapped whole.
#[derive(Default)]
pub struct ServingMap {
    models: HashMap<String, ServingModel>,
}

#[derive(Clone, Default)]
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
pub struct Registry {
    serving: ArcSwap<ServingMap>,
    /// Every configured model (even one with no version yet) and its versions' states.
    status: Mutex<BTreeMap<String, BTreeMap<i64, VersionStatus>>>,
    draining: AtomicBool,
    /// What resident versions hold of the memory budget.
    ledger: Arc<Ledger>,
    /// `--min_residency_seconds`: younger on-demand versions are not evicted.
    min_residency: Duration,
    /// Bumped on every publish, for requests that wait for a version to appear.
    published: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    /// A registry with no memory budget.
    pub fn new() -> Arc<Registry> {
        Registry::with_residency(Ledger::new(Default::default()), Duration::ZERO)
    }

    /// A registry whose loads are held to `ledger`'s budget, sparing on-demand versions
    /// younger than `min_residency` from eviction.
    pub fn with_residency(ledger: Arc<Ledger>, min_residency: Duration) -> Arc<Registry> {
        Arc::new(Registry {
            serving: ArcSwap::default(),
            status: Mutex::default(),
            draining: AtomicBool::new(false),
            ledger,
            min_residency,
            published: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The ledger of the memory budget.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
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
                let lost = servable
                    .slot()
                    .as_ref()
                    .map(|resident| resident.scheduler.lost_devices())
                    .unwrap_or_default();
                lost.into_iter().map(|device| {
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

    /// A lease on `servable`'s workers for one request, loading it first when it is an
    /// on-demand version that is not resident: one load however many requests wait for
    /// it. Errors: DEADLINE_EXCEEDED when `deadline` passes first (the load goes on, for
    /// the next request), RESOURCE_EXHAUSTED when the budget has no room for it,
    /// UNAVAILABLE when it fails to load or is unloading.
    pub async fn acquire(
        self: &Arc<Self>,
        servable: &Arc<Servable>,
        deadline: Option<Instant>,
    ) -> Result<Lease, Error> {
        if let Some(resident) = servable.lease() {
            return Ok(Lease {
                resident,
                cold_since: None,
            });
        }
        let Some(on_demand) = &servable.on_demand else {
            return Err(Error::Unavailable(format!(
                "model '{}' version {} is unloading",
                servable.model, servable.version
            )));
        };
        let arrived = Instant::now();
        let _waiting = Waiting::on(&on_demand.waiters);
        let failures = on_demand.failures.load(Ordering::SeqCst);
        let load =
            tokio::spawn(Arc::clone(self).load_on_demand(Arc::clone(servable), failures, deadline));
        let loaded = match deadline {
            Some(at) => tokio::time::timeout_at(at.into(), load)
                .await
                .map_err(|_| {
                    let (model, version) = servable.id();
                    if on_demand.waiting_for_room.load(Ordering::SeqCst) {
                        Error::ResourceExhausted(format!(
                            "model '{model}' version {version} found no room in the memory \
                             budget before the deadline: the resident versions are in use or \
                             loaded less than --min_residency_seconds ago"
                        ))
                    } else {
                        Error::DeadlineExceeded(format!(
                            "model '{model}' version {version} was still loading on demand \
                             when the deadline passed"
                        ))
                    }
                })?,
            None => load.await,
        };
        let resident = loaded.map_err(|e| Error::Internal(format!("on-demand load: {e}")))??;
        resident.touch();
        Ok(Lease {
            resident,
            cold_since: Some(arrived),
        })
    }

    /// The single flight of an on-demand load (see [`Registry::acquire`]). `failures`: how
    /// many loads had failed when the request arrived.
    async fn load_on_demand(
        self: Arc<Self>,
        servable: Arc<Servable>,
        failures: u64,
        deadline: Option<Instant>,
    ) -> Result<Arc<Resident>, Error> {
        let Some(on_demand) = &servable.on_demand else {
            return Err(Error::Internal("not an on-demand version".into()));
        };
        let _flight = on_demand.flight.lock().await;
        if let Some(resident) = servable.lease() {
            return Ok(resident);
        }
        let (model, version) = (servable.model.clone(), servable.version);
        if deadline.is_some_and(|at| Instant::now() >= at) {
            // Its request has given up (and been answered): no load for nobody.
            return Err(Error::DeadlineExceeded(format!(
                "model '{model}' version {version}: the deadline passed before its turn to load"
            )));
        }
        let failed = on_demand
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((error, at)) = failed {
            if on_demand.failures.load(Ordering::SeqCst) != failures {
                // A load failed after this request arrived: its error, not another load.
                return Err(error);
            }
            if at.elapsed() < on_demand.retry_after {
                return Err(error.noted(&format!(
                    "tried again {:?} after the failure",
                    on_demand.retry_after
                )));
            }
        }
        tracing::info!(model = %model, version, "loading on demand");
        let started = Instant::now();
        let what = format!("model '{model}' version {version} (on demand)");
        let registry = Arc::clone(&self);
        on_demand.waiting_for_room.store(true, Ordering::SeqCst);
        let reserved = on_demand
            .ledger
            .reserve(&what, &on_demand.plan.estimate(), deadline, |missing| {
                registry.evict(missing)
            })
            .await;
        // Left set when no room came: a request whose deadline passes at that same moment
        // is told so, whichever of the two is seen first.
        if reserved.is_ok() {
            on_demand.waiting_for_room.store(false, Ordering::SeqCst);
        }
        // No room before this request's deadline says nothing to a request that can wait
        // longer: such a failure is not passed on to the waiters (they try in turn, each
        // within its own deadline); one that can never fit is.
        let mut timed_out =
            reserved.is_err() && on_demand.ledger.could_ever_fit(&on_demand.plan.estimate());
        let result = match reserved {
            Ok(charge) => {
                let starting = Arc::clone(&servable);
                let make_room = self.make_room();
                tokio::task::spawn_blocking(move || match &starting.on_demand {
                    Some(on_demand) => on_demand.plan.start(charge, make_room),
                    None => Err(VersionLoadError::NotAModel("not on demand".into())),
                })
                .await
                .unwrap_or_else(|e| {
                    Err(VersionLoadError::Io {
                        path: String::new(),
                        message: format!("load task failed: {e}"),
                    })
                })
                .map_err(|e| match e {
                    VersionLoadError::NoRoom(no_room) => {
                        // Giving way to another load says nothing about this version
                        // either: the waiters try again.
                        timed_out |= matches!(no_room, NoRoom::GaveWay(_));
                        Error::ResourceExhausted(format!("{what}: {no_room}"))
                    }
                    other => Error::Unavailable(format!("{what} failed to load: {other}")),
                })
            }
            Err(e) => Err(e.into()),
        };
        crate::telemetry::record_model_load(
            &model,
            crate::telemetry::LoadReason::OnDemand,
            started.elapsed(),
            result.is_ok(),
        );
        let mut last_error = on_demand
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(resident) => {
                tracing::info!(model = %model, version, seconds = started.elapsed().as_secs_f64(), "resident");
                *last_error = None;
                *servable.slot() = Some(Arc::clone(&resident));
                Ok(resident)
            }
            Err(error) if timed_out => {
                tracing::info!(model = %model, version, "on-demand load gave up: {error}");
                Err(error)
            }
            Err(error) => {
                tracing::warn!(model = %model, version, "on-demand load failed: {error}");
                *last_error = Some((error.clone(), Instant::now()));
                on_demand.failures.fetch_add(1, Ordering::SeqCst);
                Err(error)
            }
        }
    }

    /// How a load that measured more than its estimate gets the difference: evicting as
    /// its reservation did, waiting for room up to `residency::ROOM_WAIT` (the model is
    /// already in memory: whatever request started the load, it serves those after it),
    /// from the blocking thread it loads on (see `Charge::grow_to`).
    pub(super) fn make_room(self: &Arc<Self>) -> MakeRoom {
        let registry = Arc::clone(self);
        let runtime = tokio::runtime::Handle::current();
        Box::new(move |charge, measured| {
            let what = "measured once loaded, it needs more room";
            runtime
                .block_on(charge.grow_to(what, measured, None, |missing| registry.evict(missing)))
        })
    }

    /// Takes idle on-demand versions out of service, least recently used first, until
    /// `missing` bytes are on their way back (see `residency::choose_victims`).
    fn evict(&self, missing: &DeviceBytes) -> Vec<Eviction> {
        let serving = self.serving.load();
        let on_demand = || {
            serving
                .models
                .values()
                .flat_map(|model| model.versions.values())
                .filter(|servable| servable.on_demand.is_some())
        };
        let candidates = on_demand()
            .filter_map(|servable| {
                let slot = servable.slot();
                let resident = slot.as_ref()?;
                servable
                    .is_idle(resident, self.min_residency)
                    .then(|| Candidate {
                        model: servable.model.clone(),
                        version: servable.version,
                        last_used: resident.last_used.load(Ordering::Relaxed),
                        bytes: resident.bytes().clone(),
                    })
            })
            .collect();
        residency::choose_victims(candidates, missing)
            .into_iter()
            .filter_map(|chosen| {
                let servable =
                    on_demand().find(|s| s.model == chosen.model && s.version == chosen.version)?;
                let resident = servable.take_if_idle(self.min_residency)?;
                Some(Eviction {
                    model: chosen.model,
                    version: chosen.version,
                    resident,
                })
            })
            .collect()
    }

    /// As [`Registry::resolve`], but while the model has a version loading and none that
    /// serves (an unload-first swap's gap, or a model still starting), waits for one until
    /// `deadline` (or `residency::ROOM_WAIT`): DEADLINE_EXCEEDED if it passes first.
    pub async fn resolve_waiting(
        &self,
        model: &str,
        selector: &VersionSelector,
        deadline: Option<Instant>,
    ) -> Result<Arc<Servable>, Error> {
        let mut published = self.published.subscribe();
        let give_up = deadline.unwrap_or_else(|| Instant::now() + residency::ROOM_WAIT);
        loop {
            published.mark_unchanged();
            match self.resolve(model, selector) {
                Err(Error::NotFound(message)) if self.may_come(model, selector) => {
                    let waited = tokio::time::timeout_at(give_up.into(), published.changed()).await;
                    if waited.is_err() {
                        return Err(Error::DeadlineExceeded(format!(
                            "{message}: a version of it was still loading when the deadline passed"
                        )));
                    }
                }
                other => return other,
            }
        }
    }

    /// Whether a version that `selector` may pick is about to load or loading: the version
    /// asked for by number, or any version of `model` for the latest or a label (which
    /// binds once its version serves). A request for a version that is not coming is
    /// answered at once, not held through another version's load.
    fn may_come(&self, model: &str, selector: &VersionSelector) -> bool {
        let loading =
            |s: &VersionStatus| matches!(s.state, VersionState::Start | VersionState::Loading);
        self.lock_status()
            .get(model)
            .is_some_and(|versions| match selector {
                VersionSelector::Number(v) => versions.get(v).is_some_and(loading),
                VersionSelector::Latest | VersionSelector::Label(_) => {
                    versions.values().any(loading)
                }
            })
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
                // INVALID_ARGUMENT, as TF Serving answers a label it does not know.
                let version = entry.labels.get(label).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "Unrecognized servable version label: model '{model}' has no version label '{label}'"
                    ))
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
        self.published.send_modify(|generation| *generation += 1);
    }

    /// Records a version's state; ignored for a model no longer configured.
    fn set_status(&self, model: &str, version: i64, state: VersionState, error: Option<Error>) {
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

    /// A registry with a budget, publishing model `m` whose version 1 (the repository's
    /// `tiny` model) loads on demand, and that version.
    fn on_demand_version() -> (Arc<Registry>, Arc<Servable>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny/1");
        let settings = LoadSettings {
            runner: crate::runtime::RunnerConfig {
                devices: vec![crate::runtime::Device::Cpu],
                instances_per_device: 1,
                freeze: None,
            },
            batching: None,
            per_model_batching: false,
            direct_queue_capacity: 4,
            warm_up: None,
            freeze_models: Vec::new(),
        };
        let plan = loader::plan_version("m", 1, &dir, &settings).unwrap();
        let ledger = Ledger::new("cpu=1GiB".parse().unwrap());
        let registry = Registry::with_residency(Arc::clone(&ledger), Duration::ZERO);
        let servable = Arc::new(Servable::dormant(plan, ledger, Duration::from_secs(60)));
        let model = ServingModel {
            versions: BTreeMap::from([(1, Arc::clone(&servable))]),
            labels: BTreeMap::new(),
        };
        registry.publish(ServingMap {
            models: HashMap::from([("m".to_string(), model)]),
        });
        (registry, servable)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_loaded_for_waiting_requests_is_not_evicted_before_they_take_it() {
        let (registry, servable) = on_demand_version();
        let lease = registry.acquire(&servable, None).await.unwrap();
        assert!(lease.cold_since.is_some());
        // The request that started the load has its answer; another that waited for the
        // same load has not taken its lease yet (it is queued for the flight).
        let waiters = &servable.on_demand.as_ref().unwrap().waiters;
        let waiting = Waiting::on(waiters);
        drop(lease);
        assert!(servable.take_if_idle(Duration::ZERO).is_none());
        drop(waiting);
        let evicted = servable.take_if_idle(Duration::ZERO).unwrap();
        let resident = Arc::into_inner(evicted).unwrap();
        tokio::task::spawn_blocking(move || resident.shut_down())
            .await
            .unwrap();
    }

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
