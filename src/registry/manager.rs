//! The manager: the one task that loads and unloads versions. It polls each model's base
//! path, asks the model's version policy which versions should serve, loads new versions
//! before it unloads the ones they replace (availability preserving), and publishes a new
//! [`ServingMap`](super::ServingMap) after every change.

use super::loader::load_version;
use super::{Registry, Servable, ServingMap, ServingModel, VersionState};
use crate::config::{ModelSpec, Platform};
use crate::runtime::RunnerConfig;
use crate::storage::BasePath;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How the manager runs.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub runner: RunnerConfig,
    /// How often to look for new and removed versions; `None` = only when the config changes.
    pub poll_interval: Option<Duration>,
}

enum Command {
    SetModels(Vec<ModelSpec>, oneshot::Sender<Result<(), String>>),
}

/// Sends the manager a new set of models.
#[derive(Clone)]
pub struct ManagerHandle {
    commands: mpsc::Sender<Command>,
}

impl ManagerHandle {
    /// Replaces the configured models and waits until the change has been applied (new
    /// models loaded or failed, removed models unloaded).
    pub async fn set_models(&self, models: Vec<ModelSpec>) -> Result<(), String> {
        let (done, applied) = oneshot::channel();
        self.commands
            .send(Command::SetModels(models, done))
            .await
            .map_err(|_| "the model manager has stopped".to_string())?;
        applied
            .await
            .map_err(|_| "the model manager has stopped".to_string())?
    }
}

struct ManagedModel {
    spec: ModelSpec,
    base: BasePath,
    loaded: BTreeMap<i64, Arc<Servable>>,
    /// Versions that failed to load, with the fingerprint they failed with: retried only
    /// once their files change.
    failed: HashMap<i64, String>,
    /// Whether the last listing failed, so that an outage is logged once, not every poll.
    storage_down: bool,
}

/// Owns every model's load state; see the module docs.
pub struct Manager {
    registry: Arc<Registry>,
    config: ManagerConfig,
    models: BTreeMap<String, ManagedModel>,
    commands: mpsc::Receiver<Command>,
}

impl Manager {
    pub fn new(registry: Arc<Registry>, config: ManagerConfig) -> (Manager, ManagerHandle) {
        let (commands_tx, commands) = mpsc::channel(8);
        let manager = Manager {
            registry,
            config,
            models: BTreeMap::new(),
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
    pub async fn run(mut self, initial: Vec<ModelSpec>) {
        if let Err(e) = self.set_models(initial) {
            tracing::error!("model config refused: {e}");
        }
        self.poll_all().await;
        loop {
            let tick = async {
                match self.config.poll_interval {
                    Some(interval) => tokio::time::sleep(interval).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::SetModels(models, done)) => {
                        let result = self.set_models(models);
                        if result.is_ok() {
                            self.poll_all().await;
                        }
                        let _ = done.send(result);
                    }
                    None => break,
                },
                () = tick => self.poll_all().await,
            }
        }
    }

    /// Applies a new model list: removed models unload, new ones are polled next, changed
    /// ones keep what they have loaded when only their policy or labels changed.
    fn set_models(&mut self, specs: Vec<ModelSpec>) -> Result<(), String> {
        let mut bases = Vec::with_capacity(specs.len());
        for spec in &specs {
            let base = BasePath::parse(&spec.base_path)
                .map_err(|e| format!("model '{}': {e}", spec.name))?;
            bases.push(base);
        }
        let wanted: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let removed: Vec<String> = self
            .models
            .keys()
            .filter(|name| !wanted.contains(name.as_str()))
            .cloned()
            .collect();
        for name in removed {
            if let Some(model) = self.models.remove(&name) {
                tracing::info!(model = %name, "model removed from the config; unloading");
                for (_, servable) in model.loaded {
                    self.retire(servable);
                }
            }
        }
        for (spec, base) in specs.into_iter().zip(bases) {
            if spec.platform == Platform::TensorflowName {
                tracing::warn!(
                    model = %spec.name,
                    "model_platform is 'tensorflow'; serving its TorchScript model.pt as 'pytorch'"
                );
            }
            match self.models.get_mut(&spec.name) {
                Some(model) if model.base == base => model.spec = spec,
                _ => {
                    if let Some(old) = self.models.remove(&spec.name) {
                        for (_, servable) in old.loaded {
                            self.retire(servable);
                        }
                    }
                    self.models.insert(
                        spec.name.clone(),
                        ManagedModel {
                            spec,
                            base,
                            loaded: BTreeMap::new(),
                            failed: HashMap::new(),
                            storage_down: false,
                        },
                    );
                }
            }
        }
        let names: Vec<String> = self.models.keys().cloned().collect();
        self.registry.configure_models(&names);
        self.publish();
        Ok(())
    }

    async fn poll_all(&mut self) {
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            self.poll_model(&name).await;
        }
    }

    async fn poll_model(&mut self, name: &str) {
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        let listing = match model.base.list_versions().await {
            Ok(listing) => {
                if model.storage_down {
                    tracing::info!(model = %name, "base path is reachable again");
                    model.storage_down = false;
                }
                listing
            }
            Err(e) => {
                crate::telemetry::record_storage_error(name);
                if !model.storage_down {
                    tracing::warn!(model = %name, "cannot list versions, keeping what serves: {e}");
                    model.storage_down = true;
                }
                return;
            }
        };
        model.failed.retain(|v, fingerprint| {
            listing
                .get(v)
                .is_some_and(|e| &e.fingerprint == fingerprint)
        });
        let present: BTreeSet<i64> = listing.keys().copied().collect();
        let aspired = model.spec.policy.aspired(&present);
        let to_load: Vec<i64> = aspired
            .iter()
            .rev()
            .filter(|v| !model.loaded.contains_key(v) && !model.failed.contains_key(v))
            .copied()
            .collect();
        for &version in &to_load {
            self.registry
                .set_status(name, version, VersionState::Start, None);
        }
        for version in to_load {
            let fingerprint = listing[&version].fingerprint.clone();
            self.load(name, version, fingerprint).await;
        }
        self.unload_unaspired(name, &aspired);
    }

    async fn load(&mut self, name: &str, version: i64, fingerprint: String) {
        let Some(model) = self.models.get(name) else {
            return;
        };
        self.registry
            .set_status(name, version, VersionState::Loading, None);
        tracing::info!(model = %name, version, "loading");
        let started = std::time::Instant::now();
        let result = match model.base.localize(version).await {
            Ok(dir) => {
                let (model_name, runner) = (name.to_string(), self.config.runner);
                tokio::task::spawn_blocking(move || {
                    load_version(&model_name, version, &dir, runner)
                })
                .await
                .unwrap_or_else(|e| {
                    Err(super::VersionLoadError::Io {
                        path: String::new(),
                        message: format!("load task failed: {e}"),
                    })
                })
                .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        crate::telemetry::record_model_load(name, started.elapsed(), result.is_ok());
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        match result {
            Ok(servable) => {
                tracing::info!(model = %name, version, seconds = started.elapsed().as_secs_f64(), "available");
                model.loaded.insert(version, Arc::new(servable));
                self.registry
                    .set_status(name, version, VersionState::Available, None);
                self.publish();
            }
            Err(message) => {
                tracing::warn!(model = %name, version, "failed to load: {message}");
                model.failed.insert(version, fingerprint);
                self.registry
                    .set_status(name, version, VersionState::End, Some(message));
            }
        }
    }

    /// Unloads loaded versions the policy no longer wants, but never the last one serving
    /// while no wanted version is available.
    fn unload_unaspired(&mut self, name: &str, aspired: &BTreeSet<i64>) {
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        if !model.loaded.keys().any(|v| aspired.contains(v)) {
            return;
        }
        let stale: Vec<i64> = model
            .loaded
            .keys()
            .filter(|v| !aspired.contains(v))
            .copied()
            .collect();
        if stale.is_empty() {
            return;
        }
        let retired: Vec<Arc<Servable>> = stale
            .iter()
            .filter_map(|v| model.loaded.remove(v))
            .collect();
        self.publish();
        for servable in retired {
            self.retire(servable);
        }
    }

    /// Takes a version out of service: UNLOADING while requests still hold it, END once the
    /// last one has answered and it is freed.
    fn retire(&self, servable: Arc<Servable>) {
        let registry = Arc::clone(&self.registry);
        let (model, version) = (servable.model.clone(), servable.version);
        registry.set_status(&model, version, VersionState::Unloading, None);
        tracing::info!(model = %model, version, "unloading");
        tokio::spawn(async move {
            while Arc::strong_count(&servable) > 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(servable);
            registry.set_status(&model, version, VersionState::End, None);
            tracing::info!(model = %model, version, "unloaded");
        });
    }

    fn publish(&self) {
        let models = self
            .models
            .iter()
            .map(|(name, model)| {
                (
                    name.clone(),
                    ServingModel {
                        versions: model.loaded.clone(),
                        labels: model.spec.labels.clone(),
                    },
                )
            })
            .collect();
        self.registry.publish(ServingMap { models });
    }
}
