//! Where the served models come from (the model config file, local or on S3, or
//! single-model mode), and the one path from that source to the manager, taken at start,
//! by an admin reload and by polling the config file.

use crate::config::{self, ConfigError, Flags, ModelSpec};
use crate::error::Error;
use crate::registry::ManagerHandle;
use crate::storage::Storage;
use std::time::Duration;

/// The models the flags ask for.
#[derive(Clone)]
pub(super) struct ModelSource {
    kind: SourceKind,
    storage: Storage,
}

#[derive(Clone)]
enum SourceKind {
    /// `--model_config_file`: a local path or `s3://bucket/key`.
    ConfigFile(String),
    /// `--model_name` and `--model_base_path`.
    Single { name: String, base_path: String },
}

impl ModelSource {
    pub(super) fn from_flags(flags: &Flags, storage: Storage) -> Result<Self, ConfigError> {
        let kind =
            match (&flags.model_config_file, &flags.model_base_path) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::Invalid(
                        "--model_config_file and --model_base_path cannot be used together".into(),
                    ))
                }
                (Some(path), None) => SourceKind::ConfigFile(path.clone()),
                (None, Some(base_path)) => SourceKind::Single {
                    name: flags.model_name.clone(),
                    base_path: base_path.clone(),
                },
                (None, None) => return Err(ConfigError::Invalid(
                    "no models: give --model_config_file, or --model_name and --model_base_path"
                        .into(),
                )),
            };
        Ok(ModelSource { kind, storage })
    }

    /// The models at start, each base path checked so that a bad one stops the start with a
    /// clear error; with the config file's text, against which later changes are measured.
    pub(super) async fn initial(&self) -> Result<(Vec<ModelSpec>, String), ConfigError> {
        let text = self.read().await?;
        // A config that sets no list serves nothing at start.
        let specs = self.specs(&text)?.unwrap_or_default();
        for spec in &specs {
            self.storage
                .base_path(&spec.base_path)
                .map_err(|e| ConfigError::Invalid(format!("model '{}': {e}", spec.name)))?;
        }
        Ok((specs, text))
    }

    /// Re-reads the source and applies it (the admin API's reload).
    pub(super) async fn reload(&self, manager: &ManagerHandle) -> Result<(), Error> {
        let text = self
            .read()
            .await
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.apply(&text, manager).await
    }

    /// `name`'s entry in the source as it reads now (V2's repository load), or NOT_FOUND.
    pub(super) async fn entry(&self, name: &str) -> Result<ModelSpec, Error> {
        let text = self
            .read()
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        self.specs(&text)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?
            .unwrap_or_default()
            .into_iter()
            .find(|spec| spec.name == name)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "model '{name}' is not in the model config, so there is nothing to load"
                ))
            })
    }

    /// The config file's text; empty in single-model mode, whose model is in the flags.
    async fn read(&self) -> Result<String, ConfigError> {
        match &self.kind {
            SourceKind::ConfigFile(path) => self
                .storage
                .read_text(path)
                .await
                .map_err(|e| ConfigError::Invalid(format!("--model_config_file: {e}"))),
            SourceKind::Single { .. } => Ok(String::new()),
        }
    }

    /// The models `text` (as `read` gave it) asks for; `None` when it is a config that sets
    /// no `model_config_list` at all (an empty file, or only comments).
    fn specs(&self, text: &str) -> Result<Option<Vec<ModelSpec>>, ConfigError> {
        match &self.kind {
            SourceKind::ConfigFile(path) => {
                let config = config::parse_model_server_config(path, text)?;
                if config.config.is_none() {
                    return Ok(None);
                }
                config::model_specs_from_config(&config).map(Some)
            }
            SourceKind::Single { name, base_path } => {
                Ok(Some(vec![config::single_model_spec(name, base_path)?]))
            }
        }
    }

    /// Hands the models `text` asks for to the manager, resolving once applied.
    /// A config that sets no list is refused, as TF Serving takes no action for it: a file
    /// caught empty while it is rewritten must not unload every model.
    async fn apply(&self, text: &str, manager: &ManagerHandle) -> Result<(), Error> {
        let specs = self
            .specs(text)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "the model config sets no model_config_list (an empty file?), so it is \
                     not applied; to unload every model, write `model_config_list {}`"
                        .into(),
                )
            })?;
        Ok(manager.set_models(specs).await?)
    }

    /// Re-reads the config file every `interval` and applies it when its text changed. A
    /// file that cannot be read or parsed leaves the config in force; a problem is logged
    /// when it starts (and a refused text once), not on every poll. Single-model mode has
    /// nothing to poll.
    pub(super) async fn poll(
        self,
        interval: Duration,
        manager: ManagerHandle,
        mut applied_text: String,
    ) {
        #[derive(PartialEq)]
        enum Problem {
            Unreadable,
            /// The text that was refused.
            Refused(String),
        }
        let SourceKind::ConfigFile(path) = &self.kind else {
            return;
        };
        let mut last_problem: Option<Problem> = None;
        loop {
            tokio::time::sleep(interval).await;
            let (problem, message) = match self.read().await {
                Err(e) => (
                    Some(Problem::Unreadable),
                    format!("cannot re-read the model config, keeping the one in force: {e}"),
                ),
                Ok(text) if text == applied_text => (None, String::new()),
                // Refused already: said once, not tried again until the text changes.
                Ok(text) if matches!(&last_problem, Some(Problem::Refused(r)) if *r == text) => {
                    (last_problem.take(), String::new())
                }
                Ok(text) => {
                    tracing::info!("model config file {path} changed; applying it");
                    match self.apply(&text, &manager).await {
                        Ok(()) => {
                            tracing::info!("model config applied");
                            applied_text = text;
                            (None, String::new())
                        }
                        Err(e) => (
                            Some(Problem::Refused(text)),
                            format!("model config refused, keeping the one in force: {e}"),
                        ),
                    }
                }
            };
            if problem.is_some() && problem != last_problem {
                tracing::error!("{message}");
            } else if problem.is_none() && last_problem == Some(Problem::Unreadable) {
                tracing::info!("model config file {path} is readable again");
            }
            last_problem = problem;
        }
    }
}
