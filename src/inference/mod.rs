//! The inference core every protocol calls: resolve the model version and signature, check
//! the request against the signature before anything is decoded, run it, and name the
//! outputs. Also the domain that is no protocol's own: the Classify / Regress /
//! MultiInference tasks ([`tasks`]), tf.Examples as tensors ([`examples`]) and the replay of
//! recorded warm-up requests ([`replay`]). The four transports (TF Serving gRPC and REST,
//! V2 gRPC and REST) only decode and encode around this.

pub mod examples;
pub mod replay;
pub mod tasks;

use crate::batching::BatchingOptions;
use crate::error::Error;
use crate::registry::{Readiness, Registry, Servable, VersionSelector};
use crate::request_log;
use crate::runtime::{ModelOutput, RunError};
use crate::signature::{canonical_name, Signature, SignatureKind, TensorSpec};
use crate::tensor::limits::DecodeBudget;
use crate::tensor::{byte_size, DType, Tensor};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// A Predict call, decoded from any protocol, for a version already resolved.
#[derive(Debug)]
pub struct PredictRequest {
    /// Empty means `serving_default`.
    pub signature: String,
    pub inputs: HashMap<String, Tensor>,
    /// Output names to return; empty means all.
    pub output_filter: Vec<String>,
    /// When the client stops waiting (gRPC deadline): the request is answered
    /// DEADLINE_EXCEEDED then, and dropped before the forward if it has not run yet.
    pub deadline: Option<Instant>,
}

/// The answer to a Predict call: which version served it and the named outputs, in the
/// signature's order.
#[derive(Debug)]
pub struct PredictResponse {
    pub model: String,
    pub version: i64,
    pub signature: String,
    pub outputs: Vec<(String, Tensor)>,
}

/// Resolves, validates and runs requests. Cheap to clone; shared by every transport.
#[derive(Clone)]
pub struct Inference {
    registry: Arc<Registry>,
    /// `--max_request_tensor_bytes`: see [`DecodeBudget`].
    max_request_tensor_bytes: usize,
}

impl Inference {
    pub fn new(registry: Arc<Registry>, max_request_tensor_bytes: usize) -> Inference {
        Inference {
            registry,
            max_request_tensor_bytes,
        }
    }

    /// The version of `model` that `version` selects (latest, a number or a label), if it
    /// serves: NOT_FOUND otherwise.
    pub fn resolve(&self, model: &str, version: &VersionSelector) -> Result<Arc<Servable>, Error> {
        self.registry.resolve(model, version)
    }

    /// The version a request is to run on, as [`Inference::resolve`], waiting until
    /// `deadline` while the model has no version serving but one loading (an unload-first
    /// swap's gap).
    pub async fn resolve_for_run(
        &self,
        model: &str,
        version: &VersionSelector,
        deadline: Option<Instant>,
    ) -> Result<Arc<Servable>, Error> {
        let servable = self
            .registry
            .resolve_waiting(model, version, deadline)
            .await?;
        // From here on a failure is this version's, in its statistics.
        request_log::note_run_on(servable.version);
        Ok(servable)
    }

    /// The metrics label of a request that named `model`: the name when it is configured,
    /// else "" (metric labels must not take arbitrary client text).
    pub fn metrics_label<'a>(&self, model: &'a str) -> &'a str {
        self.registry.metrics_label(model)
    }

    /// Whether `model` is configured here (served or not).
    pub fn is_configured(&self, model: &str) -> bool {
        self.registry.is_configured(model)
    }

    /// Whether every configured model serves and the server is not draining.
    pub fn readiness(&self) -> Readiness {
        self.registry.readiness()
    }

    /// The versions whose workers died (liveness fails while there are any).
    pub fn lost_workers(&self) -> Vec<String> {
        self.registry.lost_workers()
    }

    /// The batching that applies to calls of `signature` on `servable`: its version's
    /// options when batching is on and every input of the signature is batched.
    pub fn batching<'a>(
        &self,
        servable: &'a Servable,
        signature: &Signature,
    ) -> Option<&'a BatchingOptions> {
        servable
            .batching
            .as_ref()
            .filter(|_| signature.inputs.iter().all(|spec| spec.is_batched()))
    }

    /// Checks the inputs a request declares against `signature` of `servable` before any
    /// value is decoded: each name once and in the signature, its dtype and shape, its
    /// byte size, and what padding to an allowed batch size would add. Every transport
    /// runs this one check; decoding follows only if it passes.
    pub fn check_declared<'s>(
        &self,
        servable: &Servable,
        signature: &str,
        inputs: impl IntoIterator<Item = (&'s str, DType, &'s [i64])> + Clone,
    ) -> Result<(), Error> {
        let (signature_name, signature) = find_signature(servable, signature)?;
        let mut seen: Vec<&str> = Vec::new();
        for (name, dtype, shape) in inputs.clone() {
            if seen.contains(&name) {
                return Err(Error::InvalidArgument(format!(
                    "input '{name}' is given more than once"
                )));
            }
            seen.push(name);
            check_input(signature_name, signature, name, dtype, shape)?;
            byte_size(dtype, shape)
                .map_err(|e| Error::InvalidArgument(format!("input '{name}': {e}")))?;
        }
        if signature.inputs.iter().all(|spec| spec.is_batched()) {
            let shapes = inputs
                .clone()
                .into_iter()
                .map(|(_, dtype, shape)| (dtype, shape));
            self.check_padding(servable, shapes)?;
        }
        let declared = inputs.into_iter().filter_map(|(name, _, shape)| {
            let spec = signature.inputs.iter().find(|spec| spec.name == name)?;
            Some((spec, shape))
        });
        check_batch_range(servable, declared)
    }

    /// What the tensors of a request of `request_bytes` (as received) may decode to.
    pub fn decode_budget(&self, request_bytes: usize) -> DecodeBudget {
        DecodeBudget::new(self.max_request_tensor_bytes, request_bytes)
    }

    /// Runs a Predict call (TF Serving's, or V2's infer) on a version already resolved: the
    /// transports read its signature to check or decode the inputs, and must run on the
    /// version they read.
    pub async fn predict_on(
        &self,
        servable: Arc<Servable>,
        request: PredictRequest,
    ) -> Result<PredictResponse, Error> {
        let (signature_name, signature) = find_signature(&servable, &request.signature)?;
        if signature.kind != SignatureKind::Predict {
            tracing::debug!(
                signature = signature_name,
                "predict on a non-predict signature"
            );
        }
        for (i, name) in request.output_filter.iter().enumerate() {
            if request.output_filter[..i].contains(name) {
                return Err(Error::InvalidArgument(format!(
                    "output_filter names '{name}' more than once"
                )));
            }
            if !signature.outputs.iter().any(|o| &o.name == name) {
                return Err(Error::InvalidArgument(format!(
                    "output_filter names '{name}', which is not an output of signature '{signature_name}' (outputs: {})",
                    names(signature.outputs.iter().map(|o| o.name.as_str()))
                )));
            }
        }
        request_log::capture_predict(
            &servable.model,
            servable.version,
            signature_name,
            &request.inputs,
        );
        let inputs = order_inputs(signature_name, signature, request.inputs)?;
        let output = self
            .run_method(&servable, signature, inputs, request.deadline)
            .await?;
        let mut outputs = name_outputs(servable.id(), signature_name, signature, output)?;
        if !request.output_filter.is_empty() {
            outputs.retain(|(name, _)| request.output_filter.contains(name));
        }
        request_log::capture_predict_outputs(&outputs);
        Ok(PredictResponse {
            model: servable.model.clone(),
            version: servable.version,
            signature: signature_name.to_string(),
            outputs,
        })
    }
}

impl Inference {
    /// Runs a signature's method on a resolved version, with inputs already in its
    /// positional order (see [`order_inputs`]). Every API's forward pass goes through here:
    /// alone or batched with others, and answered DEADLINE_EXCEEDED once `deadline` passes
    /// (the request is then dropped before it reaches the model if it has not run yet).
    pub async fn run_method(
        &self,
        servable: &Arc<Servable>,
        signature: &Signature,
        inputs: Vec<Tensor>,
        deadline: Option<Instant>,
    ) -> Result<ModelOutput, Error> {
        let shapes = inputs.iter().map(|t| t.shape.as_slice());
        check_batch_range(servable, signature.inputs.iter().zip(shapes))?;
        let batchable = signature.inputs.iter().all(|spec| spec.is_batched());
        if batchable {
            self.check_padding(
                servable,
                inputs.iter().map(|t| (t.dtype, t.shape.as_slice())),
            )?;
        }
        let lease = self.registry.acquire(servable, deadline).await?;
        let run = lease
            .scheduler()
            .run(Arc::clone(&signature.method), inputs, batchable, deadline);
        let result = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), run)
                .await
                .unwrap_or(Err(RunError::DeadlineExceeded)),
            None => run.await,
        };
        if let Some(since) = lease.cold_since {
            crate::telemetry::record_cold_start(&servable.model, since.elapsed());
        }
        result.map_err(|e| run_error(servable, e))
    }
}

/// Refuses a request whose batched inputs (each with its spec) have more or fewer rows
/// than the model allows: an AOTInductor package runs whatever it is given, and its answer
/// outside its export's range is not defined.
fn check_batch_range<'s>(
    servable: &Servable,
    inputs: impl IntoIterator<Item = (&'s TensorSpec, &'s [i64])>,
) -> Result<(), Error> {
    let Some(range) = &servable.batch_range else {
        return Ok(());
    };
    for (spec, shape) in inputs {
        let Some(&rows) = shape.first().filter(|_| spec.is_batched()) else {
            continue;
        };
        if !usize::try_from(rows).is_ok_and(|rows| range.contains(&rows)) {
            return Err(Error::InvalidArgument(format!(
                "input '{}' has {rows} rows; version {} of model '{}' runs batches of {} to {} \
                 rows (the range it was exported with)",
                spec.name,
                servable.version,
                servable.model,
                range.start(),
                range.end()
            )));
        }
    }
    Ok(())
}

impl Inference {
    /// A batched request is padded up to an allowed batch size (`allowed_batch_sizes`):
    /// its rows are copied up to that many times, so its padded size must fit what one
    /// request may take, like its decoded size. Checked here, before it is queued, so that
    /// a request of huge rows cannot make a worker build a huge batch.
    /// `inputs`: the dtype and shape of each input, decoded or only declared, so that the
    /// gRPC API can check before it decodes.
    pub fn check_padding<'s>(
        &self,
        servable: &Servable,
        inputs: impl IntoIterator<Item = (DType, &'s [i64])>,
    ) -> Result<(), Error> {
        let Some(options) = &servable.batching else {
            return Ok(());
        };
        let mut budget = self.decode_budget(0);
        for (position, (dtype, shape)) in inputs.into_iter().enumerate() {
            // Batched inputs agree on their rows (checked with the signature).
            let Some((&rows, row)) = shape.split_first() else {
                return Ok(());
            };
            let rows = usize::try_from(rows).unwrap_or(0);
            let padded = options.padded_size(rows);
            if padded <= rows {
                return Ok(());
            }
            let bytes = byte_size(dtype, row)
                .ok()
                .and_then(|row| row.checked_mul(padded));
            budget.charge(
                &format!("input {position} padded to the allowed batch size {padded}"),
                bytes.unwrap_or(usize::MAX),
            )?;
        }
        Ok(())
    }
}

/// Checks an input a request declares against its signature, before any of its values is
/// decoded: the name, the dtype and the shape. Returns the input's spec.
pub fn check_input<'s>(
    signature_name: &str,
    signature: &'s Signature,
    name: &str,
    dtype: DType,
    shape: &[i64],
) -> Result<&'s TensorSpec, Error> {
    let spec = signature
        .inputs
        .iter()
        .find(|spec| spec.name == name)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "input '{name}' is not an input of signature '{signature_name}' (inputs: {})",
                names(signature.inputs.iter().map(|i| i.name.as_str()))
            ))
        })?;
    if dtype != spec.dtype {
        return Err(Error::InvalidArgument(format!(
            "input '{name}' has dtype {dtype} but signature '{signature_name}' expects {}",
            spec.dtype
        )));
    }
    spec.check_shape(shape).map_err(Error::InvalidArgument)?;
    Ok(spec)
}

/// Looks up a signature; an unknown one is FAILED_PRECONDITION, as in TF Serving.
pub fn find_signature<'a>(
    servable: &'a Servable,
    name: &str,
) -> Result<(&'a str, &'a Signature), Error> {
    servable.signatures.get(name).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "model '{}' version {} has no signature '{}' (signatures: {})",
            servable.model,
            servable.version,
            canonical_name(name),
            names(servable.signatures.signatures.keys().map(String::as_str))
        ))
    })
}

/// Puts the named inputs in the signature's positional order, checking names, dtypes,
/// shapes and that batched inputs agree on the batch size.
pub fn order_inputs(
    signature_name: &str,
    signature: &Signature,
    mut inputs: HashMap<String, Tensor>,
) -> Result<Vec<Tensor>, Error> {
    let mut ordered = Vec::with_capacity(signature.inputs.len());
    let mut batch: Option<(&str, i64)> = None;
    for spec in &signature.inputs {
        let tensor = inputs.remove(&spec.name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "input '{}' is missing; signature '{signature_name}' expects inputs: {}",
                spec.name,
                names(signature.inputs.iter().map(|i| i.name.as_str()))
            ))
        })?;
        check_input(
            signature_name,
            signature,
            &spec.name,
            tensor.dtype,
            &tensor.shape,
        )?;
        if spec.is_batched() {
            let size = tensor.shape[0];
            match batch {
                Some((first, first_size)) if first_size != size => {
                    return Err(Error::InvalidArgument(format!(
                        "inputs '{first}' and '{}' have different batch sizes ({first_size} and {size})",
                        spec.name
                    )))
                }
                None => batch = Some((&spec.name, size)),
                _ => {}
            }
        }
        ordered.push(tensor);
    }
    if let Some(extra) = inputs.keys().min() {
        return Err(Error::InvalidArgument(format!(
            "input '{extra}' is not an input of signature '{signature_name}' (inputs: {})",
            names(signature.inputs.iter().map(|i| i.name.as_str()))
        )));
    }
    Ok(ordered)
}

/// The model answered with outputs its signature does not describe. INTERNAL whatever the
/// way they are wrong (the count, a name, a shape, a dtype): the fault is the model's or
/// its signature file's, never the client's, and a retry will not help.
pub fn bad_output(version: (&str, i64), message: impl std::fmt::Display) -> Error {
    let (model, version) = version;
    Error::Internal(format!(
        "model '{model}' version {version} returned outputs its signature does not describe: \
         {message}"
    ))
}

/// Names what `version` (model, version) returned after the signature's outputs.
pub fn name_outputs(
    version: (&str, i64),
    signature_name: &str,
    signature: &Signature,
    output: ModelOutput,
) -> Result<Vec<(String, Tensor)>, Error> {
    let expected = signature.outputs.len();
    let mismatch = |got: String| {
        bad_output(
            version,
            format_args!("signature '{signature_name}' lists {expected} output(s) but the model returned {got}"),
        )
    };
    match output {
        ModelOutput::Tensor(t) if expected == 1 => Ok(vec![(signature.outputs[0].name.clone(), t)]),
        ModelOutput::Tensor(_) => Err(mismatch("one tensor".into())),
        ModelOutput::Sequence(tensors) if tensors.len() == expected => Ok(signature
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .zip(tensors)
            .collect()),
        ModelOutput::Sequence(tensors) => Err(mismatch(format!("{} tensors", tensors.len()))),
        ModelOutput::Dict(mut entries) => signature
            .outputs
            .iter()
            .map(|spec| {
                let at = entries
                    .iter()
                    .position(|(key, _)| *key == spec.name)
                    .ok_or_else(|| {
                        bad_output(
                            version,
                            format_args!(
                                "the result has no entry '{}' (signature '{signature_name}')",
                                spec.name
                            ),
                        )
                    })?;
                Ok(entries.swap_remove(at))
            })
            .collect(),
    }
}

fn run_error(servable: &Servable, err: RunError) -> Error {
    match &err {
        RunError::QueueFull => Error::Unavailable(format!(
            "model '{}' version {} is at capacity; retry later",
            servable.model, servable.version
        )),
        RunError::Stopped => Error::Unavailable(format!(
            "model '{}' version {} was unloaded before answering; retry",
            servable.model, servable.version
        )),
        RunError::Torch(message) => {
            tracing::warn!(model = %servable.model, version = servable.version, "model failed: {message}");
            Error::Internal(format!("model '{}' failed: {message}", servable.model))
        }
        RunError::OutOfMemory(message) => {
            tracing::warn!(model = %servable.model, version = servable.version, "out of memory: {message}");
            Error::ResourceExhausted(format!(
                "model '{}' ran out of memory: {message}",
                servable.model
            ))
        }
        RunError::DeviceFailed(message) => Error::Internal(format!(
            "model '{}' failed its device: {message}",
            servable.model
        )),
        RunError::BadOutput(message) => bad_output(servable.id(), message),
        RunError::Crashed(_) => Error::Internal(format!("model '{}': {err}", servable.model)),
        RunError::DeadlineExceeded => Error::DeadlineExceeded(format!(
            "the deadline passed before model '{}' answered",
            servable.model
        )),
        RunError::BatchTooLarge { .. } | RunError::TooManyRows { .. } => {
            Error::InvalidArgument(err.to_string())
        }
    }
}

fn names<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::SignatureMap;

    fn signature() -> Signature {
        SignatureMap::from_json(
            r#"{"signatures": {"serving_default": {
                "inputs": [{"name": "a", "dtype": "DT_FLOAT", "shape": [-1, 2]},
                           {"name": "b", "dtype": "DT_INT64", "shape": [-1]}],
                "outputs": [{"name": "y", "dtype": "DT_FLOAT"}, {"name": "z", "dtype": "DT_FLOAT"}]}}}"#,
        )
        .unwrap()
        .signatures
        .remove("serving_default")
        .unwrap()
    }

    fn inputs(pairs: Vec<(&str, Tensor)>) -> HashMap<String, Tensor> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn inputs_are_ordered_and_checked() {
        let sig = signature();
        let a = Tensor::from_values(vec![2, 2], &[1f32, 2., 3., 4.]).unwrap();
        let b = Tensor::from_values(vec![2], &[5i64, 6]).unwrap();
        let ordered =
            order_inputs("s", &sig, inputs(vec![("b", b.clone()), ("a", a.clone())])).unwrap();
        assert_eq!(ordered, vec![a.clone(), b.clone()]);

        let err = |pairs| order_inputs("s", &sig, inputs(pairs)).unwrap_err();
        let missing = err(vec![("a", a.clone())]);
        assert!(
            matches!(&missing, Error::InvalidArgument(m) if m.contains("'b' is missing")),
            "{missing}"
        );
        let extra = err(vec![("a", a.clone()), ("b", b.clone()), ("c", b.clone())]);
        assert!(
            matches!(&extra, Error::InvalidArgument(m) if m.contains("'c' is not an input")),
            "{extra}"
        );
        let dtype = err(vec![("a", b.clone()), ("b", b.clone())]);
        assert!(
            matches!(&dtype, Error::InvalidArgument(m) if m.contains("'a' has dtype DT_INT64")),
            "{dtype}"
        );
        let short_b = Tensor::from_values(vec![1], &[5i64]).unwrap();
        let ragged = err(vec![("a", a.clone()), ("b", short_b)]);
        assert!(
            matches!(&ragged, Error::InvalidArgument(m) if m.contains("batch sizes")),
            "{ragged}"
        );
        let wide = Tensor::from_values(vec![1, 3], &[1f32, 2., 3.]).unwrap();
        let shape = err(vec![("a", wide), ("b", b)]);
        assert!(
            matches!(&shape, Error::InvalidArgument(m) if m.contains("'a' has shape [1, 3]")),
            "{shape}"
        );
    }

    #[test]
    fn outputs_are_named_from_every_result_form() {
        let sig = signature();
        let t = |v: f32| Tensor::from_values(vec![1], &[v]).unwrap();
        let seq = name_outputs(
            ("m", 1),
            "s",
            &sig,
            ModelOutput::Sequence(vec![t(1.), t(2.)]),
        )
        .unwrap();
        assert_eq!(seq, vec![("y".into(), t(1.)), ("z".into(), t(2.))]);
        let dict = ModelOutput::Dict(vec![
            ("z".into(), t(2.)),
            ("y".into(), t(1.)),
            ("extra".into(), t(3.)),
        ]);
        assert_eq!(name_outputs(("m", 1), "s", &sig, dict).unwrap(), seq);
        assert!(matches!(
            name_outputs(("m", 1), "s", &sig, ModelOutput::Tensor(t(1.))),
            Err(Error::Internal(_))
        ));
        let missing = ModelOutput::Dict(vec![("y".into(), t(1.))]);
        assert!(
            matches!(name_outputs(("m", 1), "s", &sig, missing), Err(Error::Internal(m)) if m.contains("'z'") && m.contains("model 'm' version 1"))
        );
    }
}
