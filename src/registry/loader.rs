//! Loading one version directory: find its module and signatures, load it onto the device
//! and warm it up. Blocking; the manager runs it on a blocking thread.

use super::warmup_records::{read_warm_up, WarmUpReplay};
use super::Servable;
use crate::batching::{BatchingOptions, Scheduler, BATCHING_PARAMS_FILE};
use crate::config::ConfigError;
use crate::runtime::{RunnerConfig, SyntheticWarmUp};
use crate::signature::{Signature, SignatureError, SignatureMap};
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
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    #[error(transparent)]
    Batching(#[from] ConfigError),
    /// The warm-up file is malformed, or a recorded request failed, as TF Serving refuses.
    #[error("warm-up: {0}")]
    WarmUp(String),
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
    /// `--enable_model_warmup`: how a version's recorded warm-up requests are replayed
    /// (`None`: not at all; the synthetic warm-up on every worker always runs).
    pub warm_up: Option<WarmUpReplay>,
}

/// Loads the version in `dir`: signatures from `signature.json` or, when that file is
/// absent, from `extra/signature.json` inside the TorchScript archive. Every worker runs
/// the synthetic warm-up; then, with `--enable_model_warmup`, the version's recorded
/// warm-up requests are replayed (a bad file or a failing record fails the load).
pub fn load_version(
    model: &str,
    version: i64,
    dir: &Path,
    settings: &LoadSettings,
) -> Result<Arc<Servable>, VersionLoadError> {
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
            runner_config = runner_config.with_batch_threads(threads);
        }
        tracing::info!(model, version, ?options, "batching");
    }
    let warm_up = synthetic_warm_ups(&signatures, batching.as_ref());
    let scheduler = Scheduler::load(
        &model_path,
        model,
        version,
        &runner_config,
        batching,
        settings.direct_queue_capacity,
        &warm_up,
    )?;
    let servable = Arc::new(Servable {
        model: model.to_string(),
        version,
        signatures,
        scheduler,
    });
    if let Some(warm_up) = &settings.warm_up {
        // Read after the workers start, as TF Serving does: a bad file fails the load all
        // the same, and the workers (dropped with the servable) stop.
        if let Some(records) = read_warm_up(dir).map_err(VersionLoadError::WarmUp)? {
            let started = std::time::Instant::now();
            (warm_up.replay)(Arc::clone(&servable), &records)
                .map_err(|e| VersionLoadError::WarmUp(e.to_string()))?;
            tracing::info!(
                model,
                version,
                records = records.len(),
                seconds = started.elapsed().as_secs_f64(),
                "replayed the warm-up requests"
            );
        }
    }
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

/// Warm-up inputs larger than this are not built (a signature may declare shapes no
/// request will ever fill); such calls are skipped with a warning.
const WARM_UP_MAX_BYTES: usize = 1 << 30;

/// What every worker runs before the version serves: each signature on zeros of its
/// declared shapes, at every batch size a batch may run at (see
/// [`BatchingOptions::warm_up_batch_sizes`]; batch 1 without batching or for a signature
/// that is not batched). Where the shapes leave other dimensions free, they are set to 1,
/// a guess that may not suit the model: such calls may fail without failing the load.
fn synthetic_warm_ups(
    signatures: &SignatureMap,
    batching: Option<&BatchingOptions>,
) -> Vec<SyntheticWarmUp> {
    let mut calls = Vec::new();
    for (name, signature) in &signatures.signatures {
        let batched = signature.inputs.iter().all(|spec| spec.is_batched());
        let sizes = match batching {
            Some(options) if batched => options.warm_up_batch_sizes(),
            _ => vec![1],
        };
        for size in sizes {
            let label = format!("signature '{name}' at batch size {size}");
            match warm_up_call(signature, size, label) {
                Ok(Some(call)) => calls.push(call),
                Ok(None) => {} // an input of unknown rank: nothing sensible to build
                Err(label) => tracing::warn!(
                    "no warm-up of {label}: its inputs would take over {WARM_UP_MAX_BYTES} bytes"
                ),
            }
        }
    }
    calls
}

fn warm_up_call(
    signature: &Signature,
    batch: usize,
    label: String,
) -> Result<Option<SyntheticWarmUp>, String> {
    let mut guessed = false;
    let mut bytes = 0usize;
    let mut inputs = Vec::with_capacity(signature.inputs.len());
    for spec in &signature.inputs {
        let Some(shape) = &spec.shape else {
            return Ok(None);
        };
        let concrete: Vec<i64> = shape
            .iter()
            .enumerate()
            .map(|(i, &d)| match (i, d) {
                (0, -1) => i64::try_from(batch).unwrap_or(i64::MAX),
                (_, -1) => {
                    guessed = true;
                    1
                }
                (_, d) => d,
            })
            .collect();
        let size = crate::tensor::byte_size(spec.dtype, &concrete).ok();
        bytes = match size.and_then(|size| bytes.checked_add(size)) {
            Some(total) if total <= WARM_UP_MAX_BYTES => total,
            _ => return Err(label),
        };
        inputs.push(Tensor::zeros(spec.dtype, concrete).map_err(|_| label.clone())?);
    }
    Ok(Some(SyntheticWarmUp {
        label,
        method: Arc::clone(&signature.method),
        inputs,
        required: !guessed,
    }))
}
