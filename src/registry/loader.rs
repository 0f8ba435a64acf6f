//! Loading one version directory: find its module and signatures, load it onto the device
//! and warm it up. Blocking; the manager runs it on a blocking thread.

use super::Servable;
use crate::batching::{BatchingOptions, Scheduler, BATCHING_PARAMS_FILE};
use crate::config::ConfigError;
use crate::runtime::RunnerConfig;
use crate::signature::{SignatureError, SignatureMap};
use crate::storage::{
    embedded_signature, EmbeddedSignature, MODEL_FILE, SAVED_MODEL_FILES, SIGNATURE_FILE,
};
use crate::tensor::Tensor;
use std::path::Path;
use std::sync::Arc;

/// Why a version did not load. The message is what GetModelStatus reports.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VersionLoadError {
    #[error("{0}")]
    NotTorchScript(String),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::LoadError),
    #[error("warm-up of signature '{signature}' failed: {message}")]
    WarmUp { signature: String, message: String },
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    #[error(transparent)]
    Batching(#[from] ConfigError),
}

/// How every version is loaded: where it runs and how its requests are scheduled.
#[derive(Clone, Debug)]
pub struct LoadSettings {
    pub runner: RunnerConfig,
    /// `--enable_batching`: the server-wide options (`None` = run requests one by one).
    pub batching: Option<BatchingOptions>,
    /// `--enable_per_model_batching_parameters`: a version's batching_params.pbtxt wins.
    pub per_model_batching: bool,
    /// Without batching, requests that may wait for a worker before new ones are refused.
    pub direct_queue_capacity: usize,
}

/// Loads the version in `dir`: signatures from `signature.json` or, when that file is
/// absent, from `extra/signature.json` inside the TorchScript archive.
pub fn load_version(
    model: &str,
    version: i64,
    dir: &Path,
    settings: &LoadSettings,
) -> Result<Servable, VersionLoadError> {
    let model_path = dir.join(MODEL_FILE);
    if !model_path.is_file() {
        let found = SAVED_MODEL_FILES
            .iter()
            .find(|name| dir.join(name).is_file());
        return Err(VersionLoadError::NotTorchScript(match found {
            Some(name) => format!(
                "{} holds a TensorFlow SavedModel ({name}); modelgate serves TorchScript: \
                 save the model with torch.jit.save as {MODEL_FILE}",
                dir.display()
            ),
            None => format!("{} has no {MODEL_FILE}", dir.display()),
        }));
    }
    let signatures = read_signatures(dir, &model_path)?;
    let batching = batching_options(dir, settings)?;
    let mut runner_config = settings.runner.clone();
    if let Some(options) = &batching {
        if let Some(threads) = options.num_batch_threads {
            runner_config.instances_per_device = threads;
        }
        tracing::info!(model, version, ?options, "batching");
    }
    let scheduler = Scheduler::load(
        &model_path,
        model,
        version,
        &runner_config,
        batching,
        settings.direct_queue_capacity,
    )?;
    let servable = Servable {
        model: model.to_string(),
        version,
        signatures,
        scheduler,
    };
    warm_up(&servable)?;
    Ok(servable)
}

/// The version's own batching_params.pbtxt when per-model parameters are on and it has one,
/// else the server-wide options.
fn batching_options(
    dir: &Path,
    settings: &LoadSettings,
) -> Result<Option<BatchingOptions>, VersionLoadError> {
    let Some(global) = &settings.batching else {
        return Ok(None);
    };
    let path = dir.join(BATCHING_PARAMS_FILE);
    if !settings.per_model_batching || !path.is_file() {
        return Ok(Some(global.clone()));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| VersionLoadError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(Some(BatchingOptions::parse(
        &path.display().to_string(),
        &text,
    )?))
}

fn read_signatures(dir: &Path, model_path: &Path) -> Result<SignatureMap, VersionLoadError> {
    let io_error = |path: &Path, e: &dyn std::fmt::Display| VersionLoadError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let signature_path = dir.join(SIGNATURE_FILE);
    if signature_path.is_file() {
        let text =
            std::fs::read_to_string(&signature_path).map_err(|e| io_error(&signature_path, &e))?;
        return Ok(SignatureMap::from_json(&text)?);
    }
    match embedded_signature(model_path).map_err(|e| io_error(model_path, &e))? {
        EmbeddedSignature::Found(text) => Ok(SignatureMap::from_json(&text)?),
        EmbeddedSignature::Missing => Err(SignatureError(format!(
            "no {SIGNATURE_FILE} next to {MODEL_FILE} and none embedded in it \
             (torch.jit.save(..., _extra_files={{\"signature.json\": ...}}))"
        ))
        .into()),
        EmbeddedSignature::NotAnArchive(reason) => Err(VersionLoadError::NotTorchScript(format!(
            "{} is not a TorchScript archive ({reason})",
            model_path.display()
        ))),
    }
}

/// Runs every signature once on a zero batch built from its declared shapes (batch 1),
/// so that the first request does not pay for libtorch's lazy initialisation and a model
/// that cannot run its own signature is refused before it serves. Where the shape leaves
/// other dimensions free, the guess of 1 may not suit the model: that failure is only
/// logged.
fn warm_up(servable: &Servable) -> Result<(), VersionLoadError> {
    for (name, signature) in &servable.signatures.signatures {
        let mut guessed = false;
        let inputs: Option<Vec<Tensor>> = signature
            .inputs
            .iter()
            .map(|spec| {
                let shape = spec.shape.as_ref()?;
                let concrete = shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if d == -1 && i > 0 {
                            guessed = true;
                        }
                        d.max(1)
                    })
                    .collect();
                Tensor::zeros(spec.dtype, concrete).ok()
            })
            .collect();
        let Some(inputs) = inputs else {
            continue; // an input of unknown rank: nothing sensible to build
        };
        let result = servable
            .scheduler
            .run_blocking(Arc::clone(&signature.method), inputs);
        match result {
            Ok(_) => {}
            Err(e) if guessed => tracing::warn!(
                model = %servable.model,
                version = servable.version,
                signature = %name,
                "warm-up with free dimensions set to 1 failed: {e}"
            ),
            Err(e) => {
                return Err(VersionLoadError::WarmUp {
                    signature: name.clone(),
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(())
}
