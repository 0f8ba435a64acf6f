//! The Open Inference Protocol (KServe V2, as Triton serves it) over the same registry,
//! versions, batching queues and workers as TF Serving's API: a V2 request and a TF
//! Serving request for the same model share one queue. This module is everything both V2
//! transports share: datatypes, versions, metadata, the model configuration, statistics,
//! the repository extension and running an infer call. The transports are
//! `api::grpc::v2` (`inference.GRPCInferenceService` on the gRPC port) and `api::rest::v2`
//! (the `/v2` paths on the REST port); they only decode and encode.

mod config;

pub use config::model_config;

use crate::api::admin::AdminToken;
use crate::config::ModelSpec;
use crate::error::Error;
use crate::inference::{self, find_signature, Inference, PredictResponse};
use crate::registry::{
    ManagerHandle, ModelChange, Registry, Servable, VersionSelector, VersionState,
};
use crate::signature::{canonical_name, TensorSpec, DEFAULT_SIGNATURE};
use crate::telemetry::VersionStatistics;
use crate::tensor::{byte_size, DType, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The V2 extensions served, as ServerMetadata lists them.
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "model_configuration",
    "statistics",
    "model_repository",
];

/// What modelgate reports as a model's platform (Triton's name for TorchScript models).
pub const PLATFORM: &str = "pytorch_libtorch";

/// The V2 name of a dtype.
pub fn datatype(dtype: DType) -> &'static str {
    match dtype {
        DType::Bool => "BOOL",
        DType::U8 => "UINT8",
        DType::I8 => "INT8",
        DType::I16 => "INT16",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::F32 => "FP32",
        DType::F64 => "FP64",
    }
}

/// The dtype of a V2 datatype name; the ones modelgate cannot serve are refused naming
/// the input.
pub fn parse_datatype(input: &str, name: &str) -> Result<DType, Error> {
    DType::ALL
        .into_iter()
        .find(|&dtype| datatype(dtype) == name)
        .ok_or_else(|| {
            let why = match name {
                "BYTES" => "BYTES (strings) is not served: modelgate's models take numeric tensors",
                "UINT16" | "UINT32" | "UINT64" => "libtorch has no such tensor type",
                _ => "it is not a V2 datatype",
            };
            Error::InvalidArgument(format!(
                "input '{input}' has datatype '{name}': {why} (served: {})",
                DType::ALL.map(datatype).join(", ")
            ))
        })
}

/// A V2 model version: empty means the policy's latest, a number that version, anything
/// else a version label.
pub fn version_selector(version: &str) -> VersionSelector {
    if version.is_empty() {
        VersionSelector::Latest
    } else if let Ok(number) = version.parse::<i64>() {
        VersionSelector::Number(number)
    } else {
        VersionSelector::Label(version.to_string())
    }
}

/// Resolves a V2 model name and version.
pub fn resolve(inference: &Inference, model: &str, version: &str) -> Result<Arc<Servable>, Error> {
    if model.is_empty() {
        return Err(Error::InvalidArgument("the request names no model".into()));
    }
    inference.resolve(model, &version_selector(version))
}

/// Resolves a V2 model name and version for an infer call, waiting for a version that is
/// loading (see [`Inference::resolve_for_run`]).
pub async fn resolve_for_run(
    inference: &Inference,
    model: &str,
    version: &str,
    deadline: Option<std::time::Instant>,
) -> Result<Arc<Servable>, Error> {
    if model.is_empty() {
        return Err(Error::InvalidArgument("the request names no model".into()));
    }
    inference
        .resolve_for_run(model, &version_selector(version), deadline)
        .await
}

/// The statistics of `model`'s serving versions (every model's when it is empty; one
/// version when `version` names it).
pub fn statistics(
    inference: &Inference,
    model: &str,
    version: &str,
) -> Result<Vec<VersionStatistics>, Error> {
    if model.is_empty() {
        return Ok(crate::telemetry::statistics(None));
    }
    if !inference.is_configured(model) {
        return Err(Error::NotFound(format!(
            "model '{model}' is not served here"
        )));
    }
    let only = match version {
        "" => None,
        version => Some(resolve(inference, model, version)?.version),
    };
    let mut stats = crate::telemetry::statistics(Some(model));
    stats.retain(|s| only.is_none_or(|v| s.version == v));
    Ok(stats)
}

/// One entry of RepositoryIndex: a version of a configured model and its state, in
/// Triton's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
}

/// Every configured model's versions (a model with none yet has one entry without a
/// version), then the models unloaded through the repository API and not configured since
/// (UNAVAILABLE, "unloaded", as Triton lists them, so that a tool can load them back);
/// with `ready_only`, the versions that serve.
fn repository_index(
    registry: &Registry,
    unloaded: &BTreeSet<String>,
    ready_only: bool,
) -> Vec<IndexEntry> {
    let mut entries = Vec::new();
    let configured = registry.model_names();
    for name in &configured {
        let versions = registry.model_status(name, None).unwrap_or_default();
        if versions.is_empty() && !ready_only {
            entries.push(IndexEntry {
                name: name.clone(),
                version: String::new(),
                state: "UNAVAILABLE",
                reason: "no version found yet".into(),
            });
        }
        for (version, status) in versions {
            let state = match status.state {
                VersionState::Start | VersionState::Loading => "LOADING",
                VersionState::Available => "READY",
                VersionState::Unloading => "UNLOADING",
                VersionState::End => "UNAVAILABLE",
            };
            if ready_only && state != "READY" {
                continue;
            }
            // A READY version's reason says what it holds (Triton leaves it empty there).
            let reason = match status.error {
                Some(error) => error.to_string(),
                None if state == "READY" => registry
                    .resolve(name, &VersionSelector::Number(version))
                    .map(|servable| servable.residency())
                    .unwrap_or_default(),
                None => String::new(),
            };
            entries.push(IndexEntry {
                name: name.clone(),
                version: version.to_string(),
                state,
                reason,
            });
        }
    }
    if !ready_only {
        entries.extend(
            unloaded
                .iter()
                .filter(|name| !configured.contains(name))
                .map(|name| IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "UNAVAILABLE",
                    reason: "unloaded".into(),
                }),
        );
    }
    entries
}

/// Reads a model's entry from the model config source (the file is read anew), or
/// NOT_FOUND.
pub type EntryLookup = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<ModelSpec, Error>> + Send>> + Send + Sync,
>;

/// The repository extension's load and unload (authorized, then applied to the model
/// config the server runs): load (re)adds a model's entry from the model config file (so a model unloaded
/// before, or added to the file since, comes back), unload removes the model from the
/// running config and its versions unload. Both last until the config file changes or
/// `/admin/reload` applies it again. Both need the admin token (`authorization: Bearer
/// <token>`, gRPC metadata or HTTP header); without one they are off, as in Triton's
/// default model control mode: nobody who can reach the port can unload a model.
#[derive(Clone)]
pub struct RepositoryControl {
    entry: EntryLookup,
    manager: ManagerHandle,
    registry: Arc<Registry>,
    token: Option<AdminToken>,
    /// Models unloaded through the repository API, for the index.
    unloaded: Arc<Mutex<BTreeSet<String>>>,
}

impl RepositoryControl {
    pub fn new(
        entry: EntryLookup,
        manager: ManagerHandle,
        registry: Arc<Registry>,
        token: Option<AdminToken>,
    ) -> RepositoryControl {
        RepositoryControl {
            entry,
            manager,
            registry,
            token,
            unloaded: Arc::default(),
        }
    }

    /// The admin token, which guards TF Serving's HandleReloadConfigRequest too when set.
    pub fn admin_token(&self) -> Option<AdminToken> {
        self.token.clone()
    }

    fn unloaded(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.unloaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The repository index: see [`repository_index`].
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let unloaded = self.unloaded().clone();
        repository_index(&self.registry, &unloaded, ready_only)
    }

    fn authorize(&self, authorization: Option<&[u8]>) -> Result<(), Error> {
        match &self.token {
            None => Err(Error::FailedPrecondition(
                "repository load and unload are off: start the server with --admin_token or \
                 --admin_token_file, and send 'authorization: Bearer <admin token>'"
                    .into(),
            )),
            Some(token) if !token.authorizes(authorization) => Err(Error::Unauthenticated(
                "repository load and unload need 'authorization: Bearer <admin token>'".into(),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Loads (or reloads) `model` from its entry in the model config file and waits until
    /// its versions are loaded or have failed.
    pub async fn load(&self, authorization: Option<&[u8]>, model: &str) -> Result<(), Error> {
        self.authorize(authorization)?;
        let spec = (self.entry)(model.to_string()).await?;
        tracing::info!(model, "repository load");
        self.manager.change_model(ModelChange::Upsert(spec)).await?;
        self.unloaded().remove(model);
        // A load that leaves nothing serving failed, as Triton answers it; the versions'
        // own errors say why.
        if !self.registry.serving_versions(model).is_empty() {
            return Ok(());
        }
        let versions = self.registry.model_status(model, None).unwrap_or_default();
        let why: Vec<String> = versions
            .iter()
            .map(|(version, status)| {
                let error = status
                    .error
                    .as_ref()
                    .map_or_else(|| "not loaded".to_string(), Error::to_string);
                format!("version {version}: {error}")
            })
            .collect();
        Err(Error::Unavailable(format!(
            "model '{model}' has no version that serves after its load: {}",
            if why.is_empty() {
                "no versions found under its base path".to_string()
            } else {
                why.join("; ")
            }
        )))
    }

    /// Removes `model` from the running config and waits until its versions are freed.
    pub async fn unload(&self, authorization: Option<&[u8]>, model: &str) -> Result<(), Error> {
        self.authorize(authorization)?;
        tracing::info!(model, "repository unload");
        self.manager
            .change_model(ModelChange::Remove(model.to_string()))
            .await?;
        self.unloaded().insert(model.to_string());
        Ok(())
    }
}

/// A tensor's name, datatype and shape, as V2 metadata lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    /// `-1` for a free dimension; empty for an unknown rank.
    pub shape: Vec<i64>,
}

impl TensorMetadata {
    fn of(spec: &TensorSpec) -> TensorMetadata {
        TensorMetadata {
            name: spec.name.clone(),
            datatype: datatype(spec.dtype),
            shape: spec.shape.clone().unwrap_or_default(),
        }
    }
}

/// What ModelMetadata answers for a version: the serving versions of its model, and the
/// inputs and outputs of the signature V2 requests run (`serving_default`).
#[derive(Clone, Debug)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

pub fn model_metadata(registry: &Registry, servable: &Servable) -> Result<ModelMetadata, Error> {
    let (_, signature) = find_signature(servable, DEFAULT_SIGNATURE)?;
    Ok(ModelMetadata {
        name: servable.model.clone(),
        versions: registry
            .serving_versions(&servable.model)
            .iter()
            .map(i64::to_string)
            .collect(),
        inputs: signature.inputs.iter().map(TensorMetadata::of).collect(),
        outputs: signature.outputs.iter().map(TensorMetadata::of).collect(),
    })
}

/// An input as the client declared it, before any of its values is read.
#[derive(Clone, Debug)]
pub struct DeclaredInput {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
}

impl DeclaredInput {
    /// Parses a V2 input's datatype and checks its shape's dims.
    pub fn new(name: &str, datatype: &str, shape: &[i64]) -> Result<DeclaredInput, Error> {
        let dtype = parse_datatype(name, datatype)?;
        if let Some(d) = shape.iter().find(|&&d| d < 0) {
            return Err(Error::InvalidArgument(format!(
                "input '{name}' has shape {shape:?}: dimension {d} is negative"
            )));
        }
        Ok(DeclaredInput {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// The bytes its values take (checked: a shape's dims may multiply past memory).
    pub fn byte_size(&self) -> Result<usize, Error> {
        byte_size(self.dtype, &self.shape)
            .map_err(|e| Error::InvalidArgument(format!("input '{}': {e}", self.name)))
    }

    /// The input as [`Inference::check_declared`] takes it.
    pub fn checked(&self) -> (&str, DType, &[i64]) {
        (&self.name, self.dtype, &self.shape)
    }

    pub fn num_elements(&self) -> Result<usize, Error> {
        crate::tensor::num_elements(&self.shape)
            .map_err(|e| Error::InvalidArgument(format!("input '{}': {e}", self.name)))
    }
}

/// The request parameter that picks a signature other than `serving_default` (modelgate's
/// own: V2 knows one entry point per model, a TF Serving model may have several).
pub const SIGNATURE_PARAMETER: &str = "signature_name";

/// The signature a V2 request runs: its `signature_name` parameter, else `serving_default`.
pub fn signature_or_default(parameter: Option<&str>) -> &str {
    canonical_name(parameter.unwrap_or_default())
}

/// Runs a V2 infer call on a resolved version: `signature` with the named inputs,
/// returning the `requested` outputs (all when empty).
pub async fn infer(
    inference: &Inference,
    servable: Arc<Servable>,
    signature: &str,
    inputs: HashMap<String, Tensor>,
    requested: Vec<String>,
    deadline: Option<Instant>,
) -> Result<PredictResponse, Error> {
    inference
        .predict_on(
            servable,
            inference::PredictRequest {
                signature: signature.to_string(),
                inputs,
                output_filter: requested,
                deadline,
            },
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_dtype_has_a_v2_name_and_back() {
        for dtype in DType::ALL {
            assert_eq!(parse_datatype("x", datatype(dtype)), Ok(dtype));
        }
        let bytes = parse_datatype("text", "BYTES").unwrap_err().to_string();
        assert!(
            bytes.contains("input 'text'") && bytes.contains("BYTES"),
            "{bytes}"
        );
        assert!(parse_datatype("x", "UINT32").is_err());
        assert!(parse_datatype("x", "fp32").is_err());
    }

    #[test]
    fn versions_are_latest_numbers_or_labels() {
        assert_eq!(version_selector(""), VersionSelector::Latest);
        assert_eq!(version_selector("3"), VersionSelector::Number(3));
        assert_eq!(
            version_selector("stable"),
            VersionSelector::Label("stable".into())
        );
    }

    #[test]
    fn declared_shapes_are_checked() {
        assert!(DeclaredInput::new("x", "FP32", &[-1, 2]).is_err());
        let huge = DeclaredInput::new("x", "FP32", &[1 << 40, 1 << 40]).unwrap();
        assert!(huge.byte_size().is_err());
    }
}
