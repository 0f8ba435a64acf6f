//! The manager: the one task that loads and unloads versions, for up to
//! `--num_load_threads` models at once (each model's work in a [`ModelWork`]; one model's
//! loads and unloads keep their policy's order). Its jobs, each in its own
//! place: TF Serving's Source (it polls each model's base path, with the backoff and the
//! settling rule of [`super::source`], and asks the model's version policy which versions
//! it aspires to), the load retries ([`super::retries`]), the
//! AspiredVersionPolicy that orders loads and unloads ([`super::policy`]; availability
//! preserving by default: a new version loads before the one it replaces unloads), and the
//! publisher of a new [`ServingMap`](super::ServingMap) after every change.
//!
//! Storage trouble (an unreachable S3, a failed download) never touches what serves: the
//! model's polling backs off exponentially, and the outage is logged when it starts and when
//! it ends. A version whose files are there but do not load (a transient GPU out-of-memory,
//! a mount not up yet) is tried again up to `--max_num_load_retries` times,
//! `--load_retry_interval_micros` apart, as TF Serving does; the manager does not wait for a
//! retry but schedules it, so other models keep loading and polling meanwhile. Once the
//! retries are spent the version stays failed, with its error, until its files change.
//!
//! A version that appears or changes after a model's first listing may be an upload in
//! progress (its warm-up records, or its signature, still to come): it is loaded only once
//! its files have stayed unchanged across two consecutive listings
//! (`source::settled_versions`), and meanwhile the versions it replaces stay as they are.
//! A `model.pt` whose signature is not known to be embedded waits so even at the first
//! listing; if it then turns out to have no signature at all, it fails to load with that
//! reason, and is retried when `signature.json` arrives (its fingerprint changes). With
//! polling off there is no second listing, so the one listing decides.

use super::loader::{plan_version, VersionLoadError};
use super::policy::{Action, ResourcePreserving, VersionPolicy, Versions};
use super::residency::{NoRoom, ResidencySettings};
use super::retries::{FailedLoad, LoadRetries};
use super::source::{settled_versions, Backoff};
use super::LoadSettings;
use super::{Registry, Servable, ServingMap, ServingModel, VersionState};
use crate::config::{ModelSpec, Platform};
use crate::error::Error;
use crate::storage::{BasePath, Storage, StorageError, VersionEntry};
use crate::telemetry::LoadReason;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How the manager runs.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub load: LoadSettings,
    /// How often to look for new and removed versions; `None` = only when the config changes.
    pub poll_interval: Option<Duration>,
    /// How many models list and load their versions at once (`--num_load_threads`; 0 or 1:
    /// one at a time, TF Serving's default).
    pub load_threads: usize,
    pub load_retries: LoadRetries,
    /// Which version to load or unload next (models named by
    /// `residency.unload_first` use [`ResourcePreserving`] instead).
    pub policy: Arc<dyn VersionPolicy>,
    /// On-demand, pinned and unload-first models.
    pub residency: ResidencySettings,
    /// Called with each model config before it is applied: an error refuses it whole.
    pub config_hook: Option<ConfigHook>,
}

/// What else a model config configures (the composition root hands request logging's
/// here), checked and applied before the manager applies the config, so that what the
/// hook refuses leaves everything as it was. The registry does not know what it configures.
#[derive(Clone)]
pub struct ConfigHook(pub Arc<HookFn>);

/// See [`ConfigHook`].
pub type HookFn = dyn Fn(&[ModelSpec]) -> Result<(), BoxError> + Send + Sync;

/// An error from outside the registry (a hook's, or a warm-up replay's).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl std::fmt::Debug for ConfigHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigHook")
    }
}

/// Why a new set of models was refused; the models in force stay as they were.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A model of the new config cannot be served (e.g. its base path is not supported).
    #[error("model '{model}': {source}")]
    BasePath {
        model: String,
        source: crate::storage::StorageError,
    },
    /// The config hook refused the config (e.g. a request log file cannot be created).
    #[error("{0}")]
    Refused(BoxError),
    #[error("the model manager has stopped")]
    Stopped,
    /// A change names a model that is not in the running config.
    #[error("model '{0}' is not in the running config")]
    NotConfigured(String),
}

/// A refused reload as the serving error: a bad config is the caller's, a stopped manager
/// is a server going away (retry elsewhere).
impl From<ApplyError> for Error {
    fn from(error: ApplyError) -> Self {
        match error {
            ApplyError::BasePath { .. } | ApplyError::Refused(_) => {
                Error::InvalidArgument(error.to_string())
            }
            ApplyError::Stopped => Error::Unavailable(error.to_string()),
            ApplyError::NotConfigured(_) => Error::NotFound(error.to_string()),
        }
    }
}

enum Command {
    SetModels(Vec<ModelSpec>, oneshot::Sender<Result<(), ApplyError>>),
    /// One model of the running config changed, the others kept as they are.
    Change(ModelChange, oneshot::Sender<Result<(), ApplyError>>),
}

/// A change to one model of the running config (V2's repository load and unload).
#[derive(Clone, Debug)]
pub enum ModelChange {
    /// Adds the model, or replaces its entry.
    Upsert(ModelSpec),
    /// Removes the model (its versions unload).
    Remove(String),
}

/// Sends the manager a new set of models.
#[derive(Clone)]
pub struct ManagerHandle {
    commands: mpsc::Sender<Command>,
}

impl ManagerHandle {
    /// Replaces the configured models and waits until the change has been applied: removed
    /// models unloaded, new and changed ones listed and their versions loaded (or failed).
    /// Models that did not change are left alone.
    pub async fn set_models(&self, models: Vec<ModelSpec>) -> Result<(), ApplyError> {
        let (done, applied) = oneshot::channel();
        self.commands
            .send(Command::SetModels(models, done))
            .await
            .map_err(|_| ApplyError::Stopped)?;
        applied.await.map_err(|_| ApplyError::Stopped)?
    }

    /// Changes one model of the running config and waits until it is applied, as
    /// [`ManagerHandle::set_models`]. The manager applies it to the config it runs, so
    /// concurrent changes do not overwrite each other.
    pub async fn change_model(&self, change: ModelChange) -> Result<(), ApplyError> {
        let (done, applied) = oneshot::channel();
        self.commands
            .send(Command::Change(change, done))
            .await
            .map_err(|_| ApplyError::Stopped)?;
        applied.await.map_err(|_| ApplyError::Stopped)?
    }
}

struct ManagedModel {
    spec: ModelSpec,
    base: BasePath,
    loaded: BTreeMap<i64, Arc<Servable>>,
    /// Versions loaded from the model's previous base path: they serve (where `loaded` has
    /// no version of the same number) until a version from the new one does, then unload,
    /// so that moving a model keeps it available, as a new version does.
    replaced: BTreeMap<i64, Arc<Servable>>,
    /// The versions its labels point at as last published: a label whose configured
    /// version does not serve (yet) keeps pointing where it did while that version serves.
    bound_labels: BTreeMap<String, i64>,
    /// The versions the policy wanted at the last listing.
    wanted: BTreeSet<i64>,
    /// Wanted versions that failed to load, and when each is tried again.
    failed: HashMap<i64, FailedLoad>,
    /// Fingerprints of the versions of the last listing (`None` before the first): a
    /// version new or changed since is loaded once the next listing finds it unchanged
    /// (see `source::settled_versions`).
    listed: Option<HashMap<i64, String>>,
    /// Storage errors: when to list again, and whether an outage is under way (logged once).
    backoff: Backoff,
}

impl ManagedModel {
    /// When the model is next due for a try: a failed version's retry time, or later while
    /// the storage backoff forbids listing (the try starts with a listing); or, with no
    /// failed version, the next listing of a base path that could not be listed, so that
    /// storage trouble is retried even when nothing polls (`--file_system_poll_wait_seconds=0`).
    fn next_retry(&self) -> Option<Instant> {
        let storage = self.backoff.retry_at.filter(|_| self.backoff.is_failing());
        match self.failed.values().filter_map(|f| f.retry_at).min() {
            Some(retry) => Some(storage.map_or(retry, |at| at.max(retry))),
            None => storage,
        }
    }
}

/// What became of one attempt to load a version.
/// Why a version did not start.
enum StartError {
    /// It failed to load: counted against its load retries.
    Failed(Error),
    /// The memory budget had no room for it within the wait, though it could hold it: tried
    /// again, not counted as a failure.
    NoRoomYet(Error),
}

impl From<VersionLoadError> for StartError {
    fn from(error: VersionLoadError) -> StartError {
        StartError::Failed(error.into())
    }
}

impl From<StorageError> for StartError {
    fn from(error: StorageError) -> StartError {
        StartError::Failed(error.into())
    }
}

enum LoadOutcome {
    Loaded,
    /// The files are there but did not load: retried as `LoadRetries` says.
    Failed,
    /// Storage could not deliver the files: retried with backoff.
    Storage(StorageError),
}

/// Owns every model's load state; see the module docs.
pub struct Manager {
    shared: Shared,
    storage: Storage,
    models: BTreeMap<String, ManagedModel>,
    /// Base paths of models removed from the config, whose cached versions may go.
    released: Vec<BasePath>,
    commands: mpsc::Receiver<Command>,
}

impl Manager {
    pub fn new(
        registry: Arc<Registry>,
        storage: Storage,
        config: ManagerConfig,
    ) -> (Manager, ManagerHandle) {
        let (commands_tx, commands) = mpsc::channel(8);
        let manager = Manager {
            shared: Shared {
                registry,
                config,
                serving: std::sync::Mutex::default(),
            },
            storage,
            models: BTreeMap::new(),
            released: Vec::new(),
            commands,
        };
        (
            manager,
            ManagerHandle {
                commands: commands_tx,
            },
        )
    }

    /// Serves `initial`, then follows storage and config changes until every handle is gone.
    /// The models are configured when this is called, before the future first runs, so
    /// readiness counts them from the start (a spawned task might run only after the ports
    /// answer).
    pub fn run(mut self, initial: Vec<ModelSpec>) -> impl std::future::Future<Output = ()> {
        let applied = self.set_models(initial);
        async move {
            // Before any download: what an earlier run cached for other models goes.
            let bases: Vec<&BasePath> = self.models.values().map(|m| &m.base).collect();
            self.storage.retain_cached_bases(&bases).await;
            match applied {
                Ok((changed, _)) => self.poll(&changed).await,
                Err(e) => tracing::error!("model config refused: {e}"),
            }
            self.follow().await;
        }
    }

    /// Follows storage and config changes until every handle is gone.
    async fn follow(mut self) {
        // A deadline rather than a fresh sleep per turn, so that frequent retries do not
        // keep postponing the poll of every other model.
        let mut next_poll = self.shared.config.poll_interval.map(|i| Instant::now() + i);
        loop {
            let tick = async move {
                match next_poll {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let next_retry = self
                .models
                .values()
                .filter_map(ManagedModel::next_retry)
                .min();
            let retry = async move {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
                () = tick => {
                    let due: Vec<String> = self.models.keys().cloned().collect();
                    self.poll(&due).await;
                    next_poll = self.shared.config.poll_interval.map(|i| Instant::now() + i);
                }
                () = retry => {
                    let now = Instant::now();
                    let due: Vec<String> = self
                        .models
                        .iter()
                        .filter(|(_, m)| m.next_retry().is_some_and(|at| at <= now))
                        .map(|(name, _)| name.clone())
                        .collect();
                    self.poll(&due).await;
                }
            }
        }
    }

    /// Applies a command: the models it changes are listed and loaded (a load of one model,
    /// V2's repository load, lists it even when its entry did not change, and tries its
    /// failed versions again at once), and it is answered once the versions it removed are
    /// freed, without holding up the manager while their last requests finish.
    async fn handle(&mut self, command: Command) {
        let reloaded = match &command {
            Command::Change(ModelChange::Upsert(spec), _) => Some(spec.name.clone()),
            _ => None,
        };
        let (models, done) = self.specs_of(command);
        let (mut changed, unloads) = match models.and_then(|models| self.set_models(models)) {
            Ok(applied) => applied,
            Err(e) => {
                let _ = done.send(Err(e));
                return;
            }
        };
        if let Some(name) = reloaded {
            if let Some(model) = self.models.get_mut(&name) {
                model.failed.clear();
                model.backoff = Backoff::default();
            }
            if !changed.contains(&name) {
                changed.push(name);
            }
        }
        self.poll(&changed).await;
        for base in std::mem::take(&mut self.released) {
            self.retain_cached(&base).await;
        }
        tokio::spawn(async move {
            for unload in unloads {
                let _ = unload.await;
            }
            let _ = done.send(Ok(()));
        });
    }

    /// The whole model list a command asks for, and where to answer it.
    #[allow(clippy::type_complexity)]
    fn specs_of(
        &self,
        command: Command,
    ) -> (
        Result<Vec<ModelSpec>, ApplyError>,
        oneshot::Sender<Result<(), ApplyError>>,
    ) {
        match command {
            Command::SetModels(models, done) => (Ok(models), done),
            Command::Change(change, done) => {
                let mut specs: Vec<ModelSpec> =
                    self.models.values().map(|m| m.spec.clone()).collect();
                let specs = match change {
                    ModelChange::Upsert(spec) => {
                        specs.retain(|s| s.name != spec.name);
                        specs.push(spec);
                        Ok(specs)
                    }
                    ModelChange::Remove(name) if specs.iter().any(|s| s.name == name) => {
                        specs.retain(|s| s.name != name);
                        Ok(specs)
                    }
                    ModelChange::Remove(name) => Err(ApplyError::NotConfigured(name)),
                };
                (specs, done)
            }
        }
    }

    /// Applies a new model list and returns the names of the models to list now (new ones
    /// and those whose policy changed). Removed models unload; a model whose base path
    /// changed lists its new one afresh, serving what it had loaded until a version from
    /// there serves (see [`ManagedModel::replaced`]); one whose policy or labels changed
    /// keeps what it has loaded.
    /// Checked whole before anything changes, so a refused list leaves the old one in force.
    /// Also returns the unloads it started, which resolve once those versions are freed.
    fn set_models(
        &mut self,
        specs: Vec<ModelSpec>,
    ) -> Result<(Vec<String>, Vec<JoinHandle<()>>), ApplyError> {
        let mut bases = Vec::with_capacity(specs.len());
        for spec in &specs {
            let base =
                self.storage
                    .base_path(&spec.base_path)
                    .map_err(|source| ApplyError::BasePath {
                        model: spec.name.clone(),
                        source,
                    })?;
            bases.push(base);
        }
        if let Some(hook) = &self.shared.config.config_hook {
            (hook.0)(&specs).map_err(ApplyError::Refused)?;
        }
        let wanted: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let mut unloads = Vec::new();
        let removed: Vec<String> = self
            .models
            .keys()
            .filter(|name| !wanted.contains(name.as_str()))
            .cloned()
            .collect();
        for name in removed {
            if let Some(model) = self.models.remove(&name) {
                tracing::info!(model = %name, "model removed from the config; unloading");
                for servable in model.replaced.into_values() {
                    unloads.push(self.retire(servable, false));
                }
                for (_, servable) in model.loaded {
                    unloads.push(self.retire(servable, true));
                }
                self.released.push(model.base);
            }
        }
        let mut changed = Vec::new();
        for (spec, base) in specs.into_iter().zip(bases) {
            if spec.platform == Platform::TensorflowName {
                tracing::warn!(
                    model = %spec.name,
                    "model_platform is 'tensorflow'; serving its TorchScript model.pt as 'pytorch'"
                );
            }
            match self.models.get_mut(&spec.name) {
                Some(model) if model.base == base => {
                    if model.spec != spec {
                        tracing::info!(model = %spec.name, "model config changed");
                        if model.spec.policy != spec.policy {
                            changed.push(spec.name.clone());
                        }
                        model.spec = spec;
                    }
                }
                _ => {
                    let mut replaced = BTreeMap::new();
                    if let Some(old) = self.models.remove(&spec.name) {
                        // Moved to another base path: what serves goes on serving until a
                        // version from the new path does; not for models that swap
                        // unload-first, nor for on-demand ones, which load from files
                        // (the old path's may leave the cache now).
                        let keep = !self.shared.config.residency.is_unload_first(&spec.name)
                            && !self.shared.config.residency.is_on_demand(&spec.name);
                        let serving = old.replaced.into_iter().chain(old.loaded);
                        for (version, servable) in serving {
                            if keep {
                                if let Some(older) = replaced.insert(version, servable) {
                                    unloads.push(self.retire(older, false));
                                }
                            } else {
                                unloads.push(self.retire(servable, true));
                            }
                        }
                        self.released.push(old.base);
                    }
                    tracing::info!(model = %spec.name, base_path = %base, "model added");
                    changed.push(spec.name.clone());
                    self.models.insert(
                        spec.name.clone(),
                        ManagedModel {
                            spec,
                            base,
                            loaded: BTreeMap::new(),
                            replaced,
                            bound_labels: BTreeMap::new(),
                            wanted: BTreeSet::new(),
                            failed: HashMap::new(),
                            listed: None,
                            backoff: Backoff::default(),
                        },
                    );
                }
            }
        }
        let names: Vec<String> = self.models.keys().cloned().collect();
        self.shared.registry.configure_models(&names);
        self.publish();
        Ok((changed, unloads))
    }

    /// Polls the named models whose backoff allows it, up to `load_threads` models at once
    /// (each model's own loads and unloads stay in its policy's order), then drops from the
    /// S3 cache what none of them serves or wants any more.
    async fn poll(&mut self, names: &[String]) {
        use futures_util::StreamExt;
        let now = Instant::now();
        let shared = &self.shared;
        let mut bases = Vec::new();
        let due: Vec<Polling<'_>> = self
            .models
            .iter_mut()
            .filter(|(name, model)| names.contains(name) && model.backoff.ready(now))
            .map(|(name, model)| {
                // Models may share a base path: its cache is pruned once.
                if !bases.contains(&model.base) {
                    bases.push(model.base.clone());
                }
                let work = ModelWork {
                    shared,
                    name,
                    model,
                };
                Box::pin(work.poll()) as Polling<'_>
            })
            .collect();
        let at_once = shared.config.load_threads.max(1);
        futures_util::stream::iter(due)
            .buffer_unordered(at_once)
            .for_each(|()| async {})
            .await;
        for base in bases {
            self.retain_cached(&base).await;
        }
    }

    /// Drops from the S3 cache the versions of `base` that no model reading it serves or
    /// wants. Runs on this task, between polls, so no download of them is under way.
    async fn retain_cached(&self, base: &BasePath) {
        let keep: BTreeSet<i64> = self
            .models
            .values()
            .filter(|m| m.base == *base)
            .flat_map(|m| m.loaded.keys().chain(&m.wanted))
            .copied()
            .collect();
        base.retain_cached(&keep).await;
    }

    /// Takes a removed model's versions out of service; see [`Shared::retire`].
    fn retire(&self, servable: Arc<Servable>, report: bool) -> JoinHandle<()> {
        self.shared.retire(servable, report)
    }

    /// Publishes what every model serves (after the model list changed).
    fn publish(&mut self) {
        let models = self
            .models
            .iter_mut()
            .map(|(name, model)| (name.clone(), model.serving()))
            .collect();
        self.shared.publish_all(models);
    }
}

/// One model's poll, boxed: the compiler cannot yet prove a stream of these borrowing
/// futures `Send` otherwise.
type Polling<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// What the manager's work on different models shares.
struct Shared {
    registry: Arc<Registry>,
    config: ManagerConfig,
    /// What each model serves as last published: a model publishes its own entry, the
    /// registry gets the whole map.
    serving: std::sync::Mutex<HashMap<String, ServingModel>>,
}

impl Shared {
    /// Publishes `name`'s entry beside the others as they were last published.
    fn publish(&self, name: &str, model: &mut ManagedModel) {
        let entry = model.serving();
        let mut serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        serving.insert(name.to_string(), entry);
        self.registry.publish(ServingMap {
            models: serving.clone(),
        });
    }

    /// Publishes `models` as the whole of what serves.
    fn publish_all(&self, models: HashMap<String, ServingModel>) {
        let mut serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        *serving = models;
        self.registry.publish(ServingMap {
            models: serving.clone(),
        });
    }

    /// Takes a version out of service: UNLOADING while requests still hold it, END once the
    /// last one has answered and its workers have exited, freeing the module. The handle
    /// resolves then. Without `report`, its status is left to the version of the same
    /// number that replaced it.
    fn retire(&self, servable: Arc<Servable>, report: bool) -> JoinHandle<()> {
        let registry = Arc::clone(&self.registry);
        let (model, version) = (servable.model.clone(), servable.version);
        if report {
            registry.set_status(&model, version, VersionState::Unloading, None);
        }
        tracing::info!(model = %model, version, "unloading");
        tokio::spawn(async move {
            while Arc::strong_count(&servable) > 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The last holder closes the queue and waits for the workers (blocking, so on a
            // blocking thread); a request that resolved it meanwhile drops it instead.
            let resident = Arc::into_inner(servable)
                .and_then(|servable| servable.slot().take())
                .and_then(Arc::into_inner);
            if let Some(resident) = resident {
                let shut_down = tokio::task::spawn_blocking(move || resident.shut_down());
                if shut_down.await.is_err() {
                    tracing::error!(model = %model, version, "a worker panicked while unloading");
                }
            }
            if report {
                registry.finish_unload(&model, version);
            }
            tracing::info!(model = %model, version, "unloaded");
        })
    }
}

impl ManagedModel {
    /// What the model serves, to publish. A label binds to its configured version once that
    /// version serves; until then it keeps pointing at the version it pointed at, while
    /// that one serves (a config that moves `canary` from 2 to 3 keeps `canary` answering
    /// from 2 while 3 loads, or if it fails), as TF Serving never points a label at a
    /// version that is not AVAILABLE.
    fn serving(&mut self) -> ServingModel {
        let versions: BTreeMap<i64, Arc<Servable>> = self
            .replaced
            .iter()
            .chain(&self.loaded)
            .map(|(&version, servable)| (version, Arc::clone(servable)))
            .collect();
        let labels: BTreeMap<String, i64> = self
            .spec
            .labels
            .iter()
            .map(|(label, &version)| {
                let before = self.bound_labels.get(label).copied();
                let bound = match before {
                    Some(old)
                        if !versions.contains_key(&version) && versions.contains_key(&old) =>
                    {
                        old
                    }
                    _ => version,
                };
                (label.clone(), bound)
            })
            .collect();
        self.bound_labels.clone_from(&labels);
        ServingModel { versions, labels }
    }
}

/// The manager's work on one model: its listing, loads and unloads. Models are worked on
/// concurrently (`--num_load_threads`), each through its own `ModelWork`.
struct ModelWork<'a> {
    shared: &'a Shared,
    name: &'a str,
    model: &'a mut ManagedModel,
}

impl ModelWork<'_> {
    async fn poll(mut self) {
        let storage_error = self.sync().await.err();
        self.retire_replaced();
        let base_interval = self
            .shared
            .config
            .poll_interval
            .unwrap_or(Duration::from_secs(1));
        let (name, model) = (self.name, &mut *self.model);
        match storage_error {
            None => {
                if model.backoff.is_failing() {
                    tracing::info!(model = %name, base_path = %model.base, "storage is reachable again");
                }
                model.backoff.reset();
            }
            Some(e) => {
                crate::telemetry::record_storage_error(name);
                if !model.backoff.is_failing() {
                    tracing::warn!(
                        model = %name,
                        base_path = %model.base,
                        "storage unavailable, keeping what serves and retrying with backoff: {e}"
                    );
                }
                let delay = model.backoff.failed(Instant::now(), base_interval);
                tracing::debug!(model = %name, "next attempt in {delay:?}: {e}");
            }
        }
    }

    fn publish(&mut self) {
        self.shared.publish(self.name, self.model);
    }

    /// Lists the model's base path, loads the versions its policy wants and unloads the
    /// ones it no longer wants. Stops at the first storage error.
    async fn sync(&mut self) -> Result<(), StorageError> {
        let (name, shared) = (self.name, self.shared);
        let listing = self.model.base.list_versions().await?;
        let polling = shared.config.poll_interval.is_some();
        let settled = settled_versions(name, &listing, &mut self.model.listed, polling);
        let present: BTreeSet<i64> = listing.keys().copied().collect();
        let aspired = self.model.spec.policy.aspired(&present);
        self.model.wanted.clone_from(&aspired);
        // A failure counts for the files that failed, and only while the version is wanted:
        // rewritten or wanted again, it starts afresh.
        self.model.failed.retain(|v, failed| {
            aspired.contains(v)
                && listing
                    .get(v)
                    .is_some_and(|e| e.fingerprint == failed.fingerprint)
        });
        let now = Instant::now();
        let mut loadable: BTreeSet<i64> = aspired
            .iter()
            .filter(|v| {
                settled.contains(v)
                    && !self.model.loaded.contains_key(v)
                    && !self.model.failed.get(v).is_some_and(|f| f.waiting(now))
            })
            .copied()
            .collect();
        for &version in &loadable {
            shared
                .registry
                .set_status(name, version, VersionState::Start, None);
        }
        // The policy orders the loads and unloads; each version is tried once a pass.
        let mut result = Ok(());
        let unload_first = shared.config.residency.is_unload_first(name);
        let policy: Arc<dyn VersionPolicy> = if unload_first {
            Arc::new(ResourcePreserving)
        } else {
            Arc::clone(&shared.config.policy)
        };
        loop {
            let loaded: BTreeSet<i64> = self.model.loaded.keys().copied().collect();
            let versions = Versions {
                aspired: &aspired,
                loaded: &loaded,
                loadable: &loadable,
            };
            let action = policy.next_action(versions);
            match action {
                Some(Action::Load(version)) if loadable.remove(&version) => {
                    let Some(entry) = listing.get(&version) else {
                        continue;
                    };
                    if let LoadOutcome::Storage(e) = self.load(version, entry).await {
                        // Storage is failing: no more loads this pass (the next listing
                        // backs off), but versions already replaced still unload.
                        result = Err(e);
                        loadable.clear();
                    }
                }
                Some(Action::Unload(version)) if loaded.contains(&version) => {
                    let unloaded = self.unload(version);
                    if unload_first {
                        // Freed (its last request answered, its workers stopped) before
                        // anything else loads.
                        if let Some(unloaded) = unloaded {
                            let _ = unloaded.await;
                        }
                    }
                }
                None => break,
                Some(action) => {
                    // A policy that names a version it was not offered would loop for ever.
                    tracing::error!(model = %name, ?action, "the version policy chose an action it was not offered (server bug)");
                    break;
                }
            }
        }
        result
    }

    async fn load(&mut self, version: i64, entry: &VersionEntry) -> LoadOutcome {
        let (name, shared) = (self.name, self.shared);
        shared
            .registry
            .set_status(name, version, VersionState::Loading, None);
        tracing::info!(model = %name, version, "loading");
        let started = std::time::Instant::now();
        let dir = match self.model.base.localize(version, entry).await {
            Ok((dir, fetched_bytes)) => {
                if fetched_bytes > 0 {
                    crate::telemetry::record_storage_fetch(name, fetched_bytes);
                }
                Ok(dir)
            }
            // One object refused for good: this version fails to load (and is retried as
            // a failed load), the model's storage is not backed off.
            Err(e @ (StorageError::Refused { .. } | StorageError::Cache { .. })) => {
                crate::telemetry::record_storage_error(name);
                Err(StartError::from(e))
            }
            Err(e) => {
                crate::telemetry::record_storage_error(name);
                shared.registry.set_status(
                    name,
                    version,
                    VersionState::End,
                    Some(Error::from(e.clone()).noted("retrying")),
                );
                // Requests waiting for a version of this model look again (and stop waiting).
                self.publish();
                return LoadOutcome::Storage(e);
            }
        };
        let reason = if self.model.failed.contains_key(&version) {
            LoadReason::Retry
        } else {
            LoadReason::Config
        };
        let on_demand = shared.config.residency.is_on_demand(name);
        let result = match dir {
            Ok(dir) => self.start(version, dir, on_demand).await,
            Err(refused) => Err(refused),
        };
        if !on_demand {
            crate::telemetry::record_model_load(name, reason, started.elapsed(), result.is_ok());
        }
        match result {
            Ok(servable) => {
                if on_demand {
                    tracing::info!(model = %name, version, "available on demand (loads on its first request)");
                } else {
                    tracing::info!(model = %name, version, seconds = started.elapsed().as_secs_f64(), "available");
                }
                self.model.failed.remove(&version);
                self.model.loaded.insert(version, servable);
                shared
                    .registry
                    .set_status(name, version, VersionState::Available, None);
                self.publish();
                LoadOutcome::Loaded
            }
            Err(failure) => {
                let retries = shared.config.load_retries;
                let previous = self.model.failed.remove(&version);
                let (error, failed, note) = match failure {
                    StartError::NoRoomYet(error) => {
                        let waiting =
                            retries.after_no_room(previous, &entry.fingerprint, Instant::now());
                        (
                            error,
                            waiting,
                            format!("tried again in {:?}", retries.interval),
                        )
                    }
                    StartError::Failed(error) => {
                        let failed =
                            retries.after_failure(previous, &entry.fingerprint, Instant::now());
                        let note = retries.note(&failed);
                        (error, failed, note)
                    }
                };
                tracing::warn!(model = %name, version, "failed to load ({note}): {error}");
                self.model.failed.insert(version, failed);
                shared.registry.set_status(
                    name,
                    version,
                    VersionState::End,
                    Some(error.noted(&note)),
                );
                // Requests waiting through an unload-first gap look again and are told at
                // once that no version serves, instead of waiting out their deadline.
                self.publish();
                LoadOutcome::Failed
            }
        }
    }

    /// Reads the version in `dir` and, unless it is on demand, loads it within the memory
    /// budget (evicting idle on-demand versions for room, waiting for it at most
    /// `residency::ROOM_WAIT`). The error is the version's status.
    async fn start(
        &self,
        version: i64,
        dir: std::path::PathBuf,
        on_demand: bool,
    ) -> Result<Arc<Servable>, StartError> {
        let (name, shared) = (self.name, self.shared);
        let failed = |e: tokio::task::JoinError| VersionLoadError::Io {
            path: String::new(),
            message: format!("load task failed: {e}"),
        };
        let (model_name, settings) = (name.to_string(), shared.config.load.clone());
        let plan = tokio::task::spawn_blocking(move || {
            plan_version(&model_name, version, &dir, &settings)
        })
        .await
        .unwrap_or_else(|e| Err(failed(e)))?;
        let ledger = Arc::clone(shared.registry.ledger());
        if on_demand {
            let retry_after = shared.config.load_retries.interval;
            return Ok(Arc::new(Servable::dormant(plan, ledger, retry_after)));
        }
        let what = format!("model '{name}' version {version}");
        let registry = Arc::clone(&shared.registry);
        let estimate = plan.estimate();
        let no_room = |no_room: NoRoom| {
            if ledger.could_ever_fit(&estimate) {
                StartError::NoRoomYet(no_room.into())
            } else {
                StartError::Failed(no_room.into())
            }
        };
        let charge = ledger
            .reserve(&what, &estimate, None, |missing| registry.evict(missing))
            .await
            .map_err(no_room)?;
        let make_room = shared.registry.make_room();
        tokio::task::spawn_blocking(move || {
            let resident = plan.start(charge, make_room)?;
            Ok(Arc::new(plan.servable(Some(resident))))
        })
        .await
        .unwrap_or_else(|e| Err(failed(e)))
        .map_err(|e| match e {
            // It gave way to another load that outgrew its estimate: room is coming.
            VersionLoadError::NoRoom(gave_way @ NoRoom::GaveWay(_)) => no_room(gave_way),
            other => StartError::from(other),
        })
    }

    /// Takes `version` out of the serving map and retires it (the policy's unload); the
    /// handle resolves once it is freed.
    fn unload(&mut self, version: i64) -> Option<JoinHandle<()>> {
        let servable = self.model.loaded.remove(&version)?;
        self.publish();
        Some(self.shared.retire(servable, true))
    }

    /// Once a version from the model's new base path serves, unloads the versions loaded
    /// from its previous one (see [`ManagedModel::replaced`]).
    fn retire_replaced(&mut self) {
        if self.model.replaced.is_empty() || self.model.loaded.is_empty() {
            return;
        }
        let replaced = std::mem::take(&mut self.model.replaced);
        let taken_over: BTreeSet<i64> = self.model.loaded.keys().copied().collect();
        tracing::info!(model = %self.name, "serving from its new base path; unloading the versions of the old one");
        self.publish();
        for (version, servable) in replaced {
            // A version number the new path also has keeps the new version's status.
            drop(self.shared.retire(servable, !taken_over.contains(&version)));
        }
    }
}
