//! Request logging (`ModelConfig.logging_config`): sampled records of requests and their
//! answers, per model, to stdout, stderr, files or an HTTP collector.
//!
//! A sink, like the metrics: it imports nothing above config (and the metrics, to count
//! what it writes and drops), and the layers above write to it. Each request runs in a [`scope`] that both servers install.
//! The API edge names the request's method when its request timer starts ([`begin`]); the
//! inference core captures what the request carried and answered once it has resolved a
//! version ([`capture_predict`], [`capture_tasks`]), which is also where the request is
//! sampled; the edge's timer then [`end`]s the record with its outcome and latency and
//! hands it to the model's [`Collector`]. Warm-up runs outside any scope, so it is never
//! logged.

mod collector;
mod record;

pub use record::{Payload, Record};

use crate::config::{CollectorSpec, LoggingSpec, ModelSpec};
use crate::error::{code_label, Error};
use crate::proto::answers::TaskResult;
use crate::proto::serving::Input;
use crate::telemetry::{Api, Protocol};
use crate::tensor::Tensor;
use arc_swap::ArcSwap;
use collector::{Collector, StartError, Stopped};
use prost::Message;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

/// A record keeps tensor values (or tf.Examples and their results) up to this many bytes,
/// request and answer together; above it, only dtypes and shapes (`values_omitted`), and a
/// TFRecord file drops the record. With the queue's length this bounds what queued records
/// hold.
pub const MAX_LOGGED_VALUE_BYTES: usize = 64 << 10;

/// Server-wide request logging options (the flags).
#[derive(Clone, Copy, Debug)]
pub struct LogSettings {
    /// Records each collector queues before it drops (`--prediction_log_queue_records`).
    pub queue_records: usize,
    /// A log file is rotated once it would pass this size (`--prediction_log_file_rotate_bytes`).
    pub file_rotate_bytes: u64,
    /// Log every failed request of a logging model, sampled or not (`--log_all_errors`).
    pub log_all_errors: bool,
}

/// Every model's logging, swapped whole when the model config changes.
#[derive(Debug)]
pub struct RequestLogs {
    settings: LogSettings,
    models: ArcSwap<HashMap<String, Arc<ModelLog>>>,
    /// Destinations shared by the models that name the same one (one writer per file).
    collectors: Mutex<HashMap<CollectorSpec, Weak<Collector>>>,
    /// Resolve once each writer started so far has drained and stopped.
    stopped: Mutex<Vec<Stopped>>,
}

/// A model's request log destination could not be opened; the logging in force stays.
#[derive(Debug, thiserror::Error)]
#[error("model '{model}': {source}")]
pub struct ConfigureError {
    pub model: String,
    pub source: StartError,
}

/// One model's sampling and destination.
#[derive(Debug)]
struct ModelLog {
    spec: LoggingSpec,
    collector: Arc<Collector>,
}

impl RequestLogs {
    pub fn new(settings: LogSettings) -> Arc<RequestLogs> {
        Arc::new(RequestLogs {
            settings,
            models: ArcSwap::default(),
            collectors: Mutex::default(),
            stopped: Mutex::default(),
        })
    }

    /// Applies the logging of `specs`: every destination is opened (or kept) before
    /// anything changes, so a destination that cannot be opened refuses the whole config
    /// and the logging in force stays.
    pub fn configure(&self, specs: &[ModelSpec]) -> Result<(), ConfigureError> {
        let mut collectors = lock(&self.collectors);
        let mut models = HashMap::new();
        for spec in specs {
            let Some(logging) = &spec.logging else {
                continue;
            };
            let existing = collectors.get(&logging.collector).and_then(Weak::upgrade);
            let collector = match existing {
                Some(collector) => collector,
                None => {
                    let (collector, stopped) = Collector::start(&logging.collector, &self.settings)
                        .map_err(|source| ConfigureError {
                            model: spec.name.clone(),
                            source,
                        })?;
                    let collector = Arc::new(collector);
                    collectors.insert(logging.collector.clone(), Arc::downgrade(&collector));
                    lock(&self.stopped).push(stopped);
                    collector
                }
            };
            models.insert(
                spec.name.clone(),
                Arc::new(ModelLog {
                    spec: logging.clone(),
                    collector,
                }),
            );
        }
        self.models.store(Arc::new(models));
        // Destinations no model names any more close once their last record is queued.
        collectors.retain(|_, collector| collector.strong_count() > 0);
        Ok(())
    }

    /// Stops logging and waits (up to `timeout`) for every writer to write what is queued.
    pub async fn close(&self, timeout: Duration) {
        self.models.store(Arc::default());
        lock(&self.collectors).clear();
        let stopped = std::mem::take(&mut *lock(&self.stopped));
        let all = futures_util::future::join_all(stopped);
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!("request log writers did not finish within {timeout:?}");
        }
    }

    fn model(&self, name: &str) -> Option<Arc<ModelLog>> {
        self.models.load().get(name).cloned()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere while holding it; the data stays usable.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// What one request has told its scope so far.
struct Scope {
    logs: Arc<RequestLogs>,
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    method: Option<Api>,
    protocol: Option<Protocol>,
    /// Set once the request resolved a version of a model that logs: whether it was
    /// sampled, at which rate, and where it goes.
    decision: Option<Decision>,
    version: Option<i64>,
    /// The version the request resolved to run on, logged or not (see [`note_run_on`]).
    ran_on: Option<i64>,
    signature: String,
    payload: Payload,
}

struct Decision {
    log: Arc<ModelLog>,
    sampled: bool,
    rate: f64,
}

/// Runs `request` (one HTTP or gRPC call) in a logging scope.
pub async fn scope<F: Future>(logs: Arc<RequestLogs>, request: F) -> F::Output {
    let scope = Scope {
        logs,
        state: RefCell::default(),
    };
    SCOPE.scope(scope, request).await
}

/// The API edge names the request's method and protocol (from its RequestTimer).
pub fn begin(method: Api, protocol: Protocol) {
    let _ = SCOPE.try_with(|scope| {
        let mut state = scope.state.borrow_mut();
        state.method = Some(method);
        state.protocol = Some(protocol);
    });
}

/// Decides, once per request, whether it is logged: sampled at its method's rate, or kept
/// for the case it fails under `--log_all_errors`. Returns whether values are to be kept.
fn decide(scope: &Scope, model: &str) -> bool {
    let mut state = scope.state.borrow_mut();
    if state.decision.is_none() {
        let Some(method) = state.method.filter(|m| is_logged(*m)) else {
            return false;
        };
        let Some(log) = scope.logs.model(model) else {
            return false;
        };
        let rate = log.spec.sampling.rate(method.as_str());
        let sampled = rate > 0.0 && fastrand::f64() < rate;
        state.decision = Some(Decision { log, sampled, rate });
    }
    let keep = state
        .decision
        .as_ref()
        .is_some_and(|d| d.sampled || scope.logs.settings.log_all_errors);
    keep
}

fn is_logged(method: Api) -> bool {
    method.runs_model()
}

/// Where a request resolved `version` of `model` (and its `signature`, when known): if it
/// may be logged, keeps what `payload` makes of the request.
fn capture_request(model: &str, version: i64, signature: &str, payload: impl FnOnce() -> Payload) {
    let _ = SCOPE.try_with(|scope| {
        if !decide(scope, model) {
            return;
        }
        let payload = payload();
        let mut state = scope.state.borrow_mut();
        state.version = Some(version);
        state.signature = signature.to_string();
        state.payload = payload;
    });
}

/// The facade resolved `version` for this request to run on.
pub fn note_run_on(version: i64) {
    let _ = SCOPE.try_with(|scope| scope.state.borrow_mut().ran_on = Some(version));
}

/// The version this request's inference resolved to run on, once it has: what a failure
/// after that point counts against in the version's statistics.
pub fn ran_on() -> Option<i64> {
    SCOPE
        .try_with(|scope| scope.state.borrow().ran_on)
        .ok()
        .flatten()
}

/// Where a request answered: `fill` completes its payload with the answer, only if it was
/// sampled (a record of a failure has no answer, so an unsampled one needs none).
fn capture_answer(fill: impl FnOnce(&mut State)) {
    let _ = SCOPE.try_with(|scope| {
        let mut state = scope.state.borrow_mut();
        if state.decision.as_ref().is_some_and(|d| d.sampled) {
            fill(&mut state);
        }
    });
}

/// The facade's Predict, once it resolved `version` and `signature`: keeps the inputs
/// (values only within [`MAX_LOGGED_VALUE_BYTES`]) if the request may be logged.
pub fn capture_predict(
    model: &str,
    version: i64,
    signature: &str,
    inputs: &HashMap<String, Tensor>,
) {
    capture_request(model, version, signature, || {
        let size: usize = inputs.values().map(|t| t.data.len()).sum();
        let omit = size > MAX_LOGGED_VALUE_BYTES;
        let mut inputs: Vec<(String, Tensor)> = inputs
            .iter()
            .map(|(name, tensor)| (name.clone(), kept(tensor, omit)))
            .collect();
        inputs.sort_by(|a, b| a.0.cmp(&b.0));
        Payload::Predict {
            inputs,
            outputs: Vec::new(),
            values_omitted: omit,
        }
    });
}

/// The facade's Predict answered: keeps the outputs within what the inputs left of
/// [`MAX_LOGGED_VALUE_BYTES`].
pub fn capture_predict_outputs(outputs: &[(String, Tensor)]) {
    capture_answer(|state| {
        if let Payload::Predict {
            inputs,
            outputs: logged,
            values_omitted,
        } = &mut state.payload
        {
            let size: usize = inputs
                .iter()
                .chain(outputs)
                .map(|(_, t)| t.data.len())
                .sum();
            if size > MAX_LOGGED_VALUE_BYTES && !*values_omitted {
                *values_omitted = true;
                for (_, tensor) in inputs.iter_mut() {
                    *tensor = kept(tensor, true);
                }
            }
            let omit = *values_omitted;
            *logged = outputs
                .iter()
                .map(|(name, tensor)| (name.clone(), kept(tensor, omit)))
                .collect();
        }
    });
}

/// A tensor as a record keeps it: its own copy of the values, so that a queued record does
/// not pin the request's buffers, or none.
fn kept(tensor: &Tensor, omit_values: bool) -> Tensor {
    Tensor {
        dtype: tensor.dtype,
        shape: tensor.shape.clone(),
        data: if omit_values {
            bytes::Bytes::new()
        } else {
            bytes::Bytes::copy_from_slice(&tensor.data)
        },
    }
}

/// Classify, Regress or MultiInference, once they resolved `version`: keeps the examples
/// (within [`MAX_LOGGED_VALUE_BYTES`]) if the request may be logged.
pub fn capture_tasks(model: &str, version: i64, input: Option<&Input>) {
    // The signatures are known once the tasks ran (see capture_task_results).
    capture_request(model, version, "", || {
        let omit = input.is_some_and(|i| i.encoded_len() > MAX_LOGGED_VALUE_BYTES);
        Payload::Tasks {
            input: if omit { None } else { input.cloned() },
            results: Vec::new(),
            values_omitted: omit,
        }
    });
}

/// The tasks answered, each with the signature it ran: keeps the results within what the
/// examples left of [`MAX_LOGGED_VALUE_BYTES`].
pub fn capture_task_results(results: &[(String, TaskResult)]) {
    capture_answer(|state| {
        if let Payload::Tasks {
            input,
            results: logged,
            values_omitted,
        } = &mut state.payload
        {
            *logged = kept_results(input, values_omitted, results);
        }
        if let [(signature, _)] = results {
            state.signature = signature.clone();
        }
    });
}

/// The results as a record keeps them: copies while the examples and results together stay
/// within [`MAX_LOGGED_VALUE_BYTES`]; past it, the examples are dropped too and each result
/// is an empty one of its kind, so that the record still says which task gave what.
fn kept_results(
    input: &mut Option<Input>,
    values_omitted: &mut bool,
    results: &[(String, TaskResult)],
) -> Vec<(String, TaskResult)> {
    if !*values_omitted {
        let size = input.as_ref().map_or(0, Message::encoded_len)
            + results
                .iter()
                .map(|(_, result)| match result {
                    TaskResult::Classification(c) => c.encoded_len(),
                    TaskResult::Regression(r) => r.encoded_len(),
                })
                .sum::<usize>();
        if size > MAX_LOGGED_VALUE_BYTES {
            *values_omitted = true;
            *input = None;
        }
    }
    if !*values_omitted {
        return results.to_vec();
    }
    results
        .iter()
        .map(|(signature, result)| {
            let empty = match result {
                TaskResult::Classification(_) => TaskResult::Classification(Default::default()),
                TaskResult::Regression(_) => TaskResult::Regression(Default::default()),
            };
            (signature.clone(), empty)
        })
        .collect()
}

/// The API edge's timer finished the request: `model` is the configured model it named
/// ("" if none), `outcome` how it ended. Logs it if it was sampled, or failed under
/// `--log_all_errors`; the record is queued, never written here.
pub fn end(model: &str, latency: Duration, outcome: Result<(), &Error>) {
    let _ = SCOPE.try_with(|scope| {
        if model.is_empty() {
            return;
        }
        // A request that failed before the facade saw it is decided here.
        decide(scope, model);
        let mut state = scope.state.borrow_mut();
        let Some(decision) = &state.decision else {
            return;
        };
        let failed = outcome.is_err();
        if !(decision.sampled || failed && scope.logs.settings.log_all_errors) {
            return;
        }
        let log = Arc::clone(&decision.log);
        let rate = decision.rate;
        let (code, message) = match outcome {
            Ok(()) => (code_label(tonic::Code::Ok), String::new()),
            Err(e) => (code_label(e.code()), e.to_string()),
        };
        let record = Record {
            timestamp: SystemTime::now(),
            model: model.to_string(),
            version: state.version,
            signature: std::mem::take(&mut state.signature),
            method: state.method.map_or("", Api::as_str),
            protocol: state.protocol.map_or("", Protocol::as_str),
            latency,
            code,
            message,
            sampling_rate: rate,
            payload: std::mem::take(&mut state.payload),
        };
        log.collector.submit(record);
    });
}
