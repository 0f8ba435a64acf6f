//! Loading one version directory: find its module and signatures, load it onto the device
//! and warm it up. Blocking; the manager runs it on a blocking thread.

use super::package::{self, Host};
use super::residency::{Charge, DeviceBytes, MakeRoom, NoRoom, Resident};
use super::warmup_records::{read_warm_up, WarmUpReplay};
use super::Servable;
use crate::batching::{BatchingOptions, Scheduler, BATCHING_PARAMS_FILE};
use crate::config::ConfigError;
use crate::error::Error;
use crate::runtime::{LoadError, RunnerConfig, SyntheticWarmUp};
use crate::signature::{Signature, SignatureError, SignatureMap};
use crate::storage::{
    embedded_signature, EmbeddedSignature, MODEL_FILE, MODEL_FILES, PACKAGE_FILE,
    SAVED_MODEL_FILES, SIGNATURE_FILE,
};
use crate::tensor::Tensor;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a version did not load. The message is what GetModelStatus reports.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VersionLoadError {
    /// The directory holds no model file modelgate serves.
    #[error("{0}")]
    NoModel(String),
    /// The directory holds two models, or a file that is not what its name says.
    #[error("{0}")]
    NotAModel(String),
    /// An AOTInductor package this server cannot run (see `registry::package`).
    #[error("{path}: {message}")]
    Package { path: String, message: String },
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Runtime(#[from] LoadError),
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    #[error(transparent)]
    Batching(#[from] ConfigError),
    /// The warm-up file is malformed, or a recorded request failed, as TF Serving refuses.
    #[error("warm-up: {0}")]
    WarmUp(String),
    /// The version found no room in the memory budget.
    #[error(transparent)]
    NoRoom(#[from] NoRoom),
}

impl From<VersionLoadError> for Error {
    /// The code GetModelStatus reports for a version that failed to load: the files are
    /// missing (NOT_FOUND) or wrong (INVALID_ARGUMENT), the server cannot run them here
    /// (FAILED_PRECONDITION), there is no room (RESOURCE_EXHAUSTED), or the server failed.
    fn from(e: VersionLoadError) -> Error {
        let message = e.to_string();
        match e {
            VersionLoadError::NoModel(_) => Error::NotFound(message),
            VersionLoadError::NotAModel(_)
            | VersionLoadError::Signature(_)
            | VersionLoadError::Batching(_)
            | VersionLoadError::WarmUp(_)
            | VersionLoadError::Runtime(LoadError::Torch { .. }) => Error::InvalidArgument(message),
            VersionLoadError::Package { .. }
            | VersionLoadError::Runtime(LoadError::Device { .. }) => {
                Error::FailedPrecondition(message)
            }
            VersionLoadError::NoRoom(no_room) => no_room.into(),
            VersionLoadError::Io { .. }
            | VersionLoadError::Runtime(LoadError::Thread(_) | LoadError::WarmUp { .. }) => {
                Error::Internal(message)
            }
        }
    }
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
    /// `--freeze_models`: TorchScript models frozen and optimized at load (`*`: all).
    pub freeze_models: Vec<String>,
}

/// Everything needed to start a version, read from its directory without loading it: its
/// model file, signatures, batch range, batching and warm-up. An on-demand version keeps
/// its plan until a request starts it.
pub struct VersionPlan {
    pub model: String,
    pub version: i64,
    dir: PathBuf,
    model_path: PathBuf,
    /// The model file's size and modification time when it was read: what the checks and
    /// signatures above are about.
    model_stamp: Option<FileStamp>,
    pub signatures: SignatureMap,
    pub batch_range: Option<RangeInclusive<usize>>,
    pub batching: Option<BatchingOptions>,
    runner: RunnerConfig,
    direct_capacity: usize,
    warm_up: Vec<SyntheticWarmUp>,
    replay: Option<WarmUpReplay>,
}

/// A file's size and modification time, to tell whether it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// Reads the version in `dir`, a TorchScript module (`model.pt`) or an AOTInductor package
/// (`model.pt2`), without loading it. Signatures come from `signature.json` or, when that
/// file is absent, from the model file (`extra/signature.json` inside the TorchScript
/// archive; the package's metadata). A package is first checked against this host (device,
/// CPU, torch) and its export's batch range bounds the batching options. Blocking (it
/// reads files).
pub fn plan_version(
    model: &str,
    version: i64,
    dir: &Path,
    settings: &LoadSettings,
) -> Result<VersionPlan, VersionLoadError> {
    let model_path = model_file(dir)?;
    let model_stamp = FileStamp::of(&model_path);
    let (signatures, batch_range) = if model_path.ends_with(PACKAGE_FILE) {
        read_package(dir, &model_path, &settings.runner.devices)?
    } else {
        (read_signatures(dir, &model_path)?, None)
    };
    let mut batching = batching_options(dir, settings)?;
    let mut runner = settings.runner.clone();
    let freeze = settings
        .freeze_models
        .iter()
        .any(|name| name == "*" || name == model);
    if freeze && model_path.ends_with(MODEL_FILE) {
        let mut methods: Vec<String> = signatures
            .signatures
            .values()
            .map(|signature| signature.method.to_string())
            .collect();
        methods.sort();
        methods.dedup();
        tracing::info!(
            model,
            version,
            ?methods,
            "freezing and optimizing the module for inference"
        );
        runner.freeze = Some(methods);
    }
    if let Some(options) = &mut batching {
        if let Some(range) = &batch_range {
            if let Some(clamped) = options.clamp_to(range) {
                tracing::warn!(model, version, "batching options {clamped}");
            }
        }
        if let Some(threads) = options.num_batch_threads {
            runner = runner.with_batch_threads(threads);
        }
        tracing::info!(model, version, ?options, "batching");
    }
    let warm_up = synthetic_warm_ups(&signatures, batching.as_ref(), batch_range.as_ref());
    Ok(VersionPlan {
        model: model.to_string(),
        version,
        dir: dir.to_path_buf(),
        model_path,
        model_stamp,
        signatures,
        batch_range,
        batching,
        runner,
        direct_capacity: settings.direct_queue_capacity,
        warm_up,
        replay: settings.warm_up.clone(),
    })
}

impl VersionPlan {
    /// What loading it will hold before it is measured: its model file's size on each of
    /// its devices (a module's or package's weights are most of its file).
    pub fn estimate(&self) -> DeviceBytes {
        let size = std::fs::metadata(&self.model_path).map_or(0, |m| m.len());
        self.runner
            .devices
            .iter()
            .map(|device| (device.to_string(), size))
            .collect()
    }

    /// The version as the registry lists it, running on `resident` or not resident yet.
    pub fn servable(&self, resident: Option<Arc<Resident>>) -> Servable {
        Servable::new(
            &self.model,
            self.version,
            self.signatures.clone(),
            self.batch_range.clone(),
            self.batching.clone(),
            resident,
        )
    }

    /// Loads the model onto its devices against `charge` (grown by `make_room` where it
    /// measures more, then settled to what it measures), starts its workers (each runs the
    /// synthetic warm-up), then, with `--enable_model_warmup`, replays the version's
    /// recorded warm-up requests (a bad file or a failing record fails the load).
    /// Blocking: call it from a blocking thread.
    pub fn start(
        &self,
        charge: Charge,
        make_room: MakeRoom,
    ) -> Result<Arc<Resident>, VersionLoadError> {
        let (model, version) = (self.model.as_str(), self.version);
        // An on-demand version starts long after it was read, and again after each
        // eviction: a file rewritten in place since would run unchecked against a stale
        // signature (for a package, reads past its tensors).
        if FileStamp::of(&self.model_path) != self.model_stamp {
            return Err(VersionLoadError::Io {
                path: self.model_path.display().to_string(),
                message: "the file changed after the version was read; publish a changed \
                          model as a new version directory instead of rewriting a served one"
                    .into(),
            });
        }
        let scheduler = Scheduler::load(
            &self.model_path,
            model,
            version,
            &self.runner,
            self.batching.clone(),
            self.direct_capacity,
            &self.warm_up,
        )?;
        let resident = Arc::new(Resident::new(scheduler, charge, make_room)?);
        if let Err(e) = self.replay_warm_up(&resident) {
            // The workers stop and free the model before its bytes go back to the budget.
            if let Some(resident) = Arc::into_inner(resident) {
                resident.shut_down();
            }
            return Err(e);
        }
        Ok(resident)
    }

    /// With `--enable_model_warmup`, replays the version's recorded warm-up requests on
    /// `resident`. Read after the workers start, as TF Serving does: a bad file fails the
    /// load all the same. The replay runs on a servable of its own, so that no client
    /// request reaches the version first.
    fn replay_warm_up(&self, resident: &Arc<Resident>) -> Result<(), VersionLoadError> {
        let (model, version) = (self.model.as_str(), self.version);
        let Some(warm_up) = &self.replay else {
            return Ok(());
        };
        let Some(records) = read_warm_up(&self.dir).map_err(VersionLoadError::WarmUp)? else {
            return Ok(());
        };
        tracing::info!(
            model,
            version,
            records = records.len(),
            "replaying the warm-up requests"
        );
        let started = std::time::Instant::now();
        let warming = Arc::new(self.servable(Some(Arc::clone(resident))));
        (warm_up.replay)(warming, &records).map_err(|e| VersionLoadError::WarmUp(e.to_string()))?;
        tracing::info!(
            model,
            version,
            records = records.len(),
            seconds = started.elapsed().as_secs_f64(),
            "replayed the warm-up requests"
        );
        Ok(())
    }
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

/// The version's model file: exactly one of `model.pt` and `model.pt2`.
fn model_file(dir: &Path) -> Result<PathBuf, VersionLoadError> {
    let found: Vec<&str> = MODEL_FILES
        .iter()
        .copied()
        .filter(|name| dir.join(name).is_file())
        .collect();
    match found.as_slice() {
        [name] => Ok(dir.join(name)),
        [] => {
            let saved_model = SAVED_MODEL_FILES
                .iter()
                .find(|name| dir.join(name).is_file());
            Err(VersionLoadError::NoModel(match saved_model {
                Some(name) => format!(
                    "{} holds a TensorFlow SavedModel ({name}); modelgate serves PyTorch: \
                     export the model as {PACKAGE_FILE} (torch.export + AOTInductor) or save \
                     it with torch.jit.save as {MODEL_FILE}",
                    dir.display()
                ),
                None => format!("{} has no {MODEL_FILE} or {PACKAGE_FILE}", dir.display()),
            }))
        }
        _ => Err(VersionLoadError::NotAModel(format!(
            "{} holds both {MODEL_FILE} and {PACKAGE_FILE}; a version is one model: put \
             each in a version directory of its own",
            dir.display()
        ))),
    }
}

/// An AOTInductor package's signatures and batch range, once its metadata shows it can run
/// here. Its signatures must call `forward` (a package's only method) and give every
/// input's shape: the package checks nothing it is given, so the server must.
fn read_package(
    dir: &Path,
    package_path: &Path,
    devices: &[crate::runtime::Device],
) -> Result<(SignatureMap, Option<RangeInclusive<usize>>), VersionLoadError> {
    let refused = |message: String| VersionLoadError::Package {
        path: package_path.display().to_string(),
        message,
    };
    let metadata = crate::runtime::read_package_metadata(package_path)
        .map_err(|e| refused(format!("not an AOTInductor package: {e}")))?;
    let host = Host::this(devices);
    let facts = package::check(&metadata, &host).map_err(refused)?;
    package::check_libraries(package_path, &host.arch).map_err(refused)?;
    if let Some(warning) = &facts.warning {
        tracing::warn!(path = %package_path.display(), "{warning}");
    }
    let signature_path = dir.join(SIGNATURE_FILE);
    let signatures = if signature_path.is_file() {
        let text = std::fs::read_to_string(&signature_path).map_err(|e| VersionLoadError::Io {
            path: signature_path.display().to_string(),
            message: e.to_string(),
        })?;
        let given = SignatureMap::from_json(&text)?;
        match &facts.signature {
            Some(recorded) => {
                let recorded = SignatureMap::from_json(recorded).map_err(|e| {
                    refused(format!("its recorded {}: {e}", package::SIGNATURE_KEY))
                })?;
                package::check_signatures_match(&given, &recorded)
                    .map_err(|e| SignatureError(format!("{SIGNATURE_FILE}: {e}")))?;
            }
            None => tracing::warn!(
                path = %package_path.display(),
                "the package records no signature to check {SIGNATURE_FILE} against; \
                 requests are checked against {SIGNATURE_FILE} alone, so it must match \
                 what the package was compiled for"
            ),
        }
        given
    } else if let Some(text) = &facts.signature {
        SignatureMap::from_json(text)?
    } else {
        return Err(SignatureError(format!(
            "no {SIGNATURE_FILE} next to {PACKAGE_FILE} and none in its metadata: write one \
             beside it, or export with `python -m modelgate_export` (tools/), which records \
             it in the package as {}",
            package::SIGNATURE_KEY
        ))
        .into());
    };
    for (name, signature) in &signatures.signatures {
        if &*signature.method != "forward" {
            return Err(SignatureError(format!(
                "{name}: method '{}', but an AOTInductor package has one method, forward",
                signature.method
            ))
            .into());
        }
        if let Some(spec) = signature.inputs.iter().find(|spec| spec.shape.is_none()) {
            return Err(SignatureError(format!(
                "{name}: input '{}' has no shape; a {PACKAGE_FILE}'s inputs need their \
                 shapes (-1 for the batch) because the package checks none",
                spec.name
            ))
            .into());
        }
    }
    Ok((signatures, facts.batch_range))
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
        EmbeddedSignature::NotAnArchive(reason) => Err(VersionLoadError::NotAModel(format!(
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
/// that is not batched), within the model's batch range when it has one. Where the shapes
/// leave other dimensions free, they are set to 1, a guess that may not suit the model:
/// such calls may fail without failing the load.
fn synthetic_warm_ups(
    signatures: &SignatureMap,
    batching: Option<&BatchingOptions>,
    batch_range: Option<&RangeInclusive<usize>>,
) -> Vec<SyntheticWarmUp> {
    let mut calls = Vec::new();
    for (name, signature) in &signatures.signatures {
        let batched = signature.inputs.iter().all(|spec| spec.is_batched());
        let mut sizes = match batching {
            Some(options) if batched => options.warm_up_batch_sizes(),
            _ => vec![1],
        };
        if let Some(range) = batch_range.filter(|_| batched) {
            sizes = sizes
                .into_iter()
                .map(|size| size.clamp(*range.start(), *range.end()))
                .collect();
            sizes.dedup();
        }
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
