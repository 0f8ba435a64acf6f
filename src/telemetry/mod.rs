//! Telemetry: the Prometheus metrics (names, descriptions, buckets, the recorder) and the
//! log output (human text or one JSON object per line).
//!
//! Every metric name is a constant here, so the code that records a metric and docs/operations.md
//! that documents it cannot drift apart. Recording goes through the `metrics` facade: code
//! anywhere in the crate calls `metrics::counter!(telemetry::X, ...)`; without an installed
//! recorder (unit tests) those calls do nothing.

mod versions;

pub use versions::{
    render_versions, statistics, Answered, BatchPhases, BatchStatistics, Compute, Timed,
    VersionMetrics, VersionStatistics,
};

use crate::error::{code_label, Error};
use metrics::{describe_counter, describe_gauge, describe_histogram, SharedString, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

/// Requests answered, by `model`, `version`, `api`, `protocol` and `code` (gRPC code name).
pub const REQUESTS_TOTAL: &str = "modelgate_requests_total";
/// Request latency at the API edge, by `model`, `api` and `protocol`.
pub const REQUEST_DURATION_SECONDS: &str = "modelgate_request_duration_seconds";
/// Version loads attempted, by `model`, `outcome` (`success` or `failure`) and `reason`
/// (`config`: the config or a new version on storage; `on_demand`: a request for a version
/// not resident; `retry`: a load retried after a failure).
pub const MODEL_LOADS_TOTAL: &str = "modelgate_model_loads_total";
/// Bytes a resident version holds, by `model`, `version` and `device`; a per-version series
/// (see [`VersionMetrics`]), gone once the version is unloaded or evicted and freed.
pub const MODEL_RESIDENT_BYTES: &str = "modelgate_model_resident_bytes";
/// `--model_memory_budget`, by `device`.
pub const MODEL_MEMORY_BUDGET_BYTES: &str = "modelgate_model_memory_budget_bytes";
/// Versions evicted to make room for a load, by `model`.
pub const MODEL_EVICTIONS_TOTAL: &str = "modelgate_model_evictions_total";
/// From the arrival of a request that found its version not resident to its answer, by
/// `model`.
pub const MODEL_COLD_START_SECONDS: &str = "modelgate_model_cold_start_seconds";
/// Time to fetch, load and warm up a version, by `model`.
pub const MODEL_LOAD_DURATION_SECONDS: &str = "modelgate_model_load_duration_seconds";
/// Bytes fetched from model storage, by `model`.
pub const STORAGE_FETCH_BYTES_TOTAL: &str = "modelgate_storage_fetch_bytes_total";
/// Failed storage operations (listing or fetching), by `model`.
pub const STORAGE_ERRORS_TOTAL: &str = "modelgate_storage_errors_total";
/// Requests per executed batch, by `model` and `version`.
pub const BATCH_SIZE: &str = "modelgate_batch_size";
/// Time a request waited for a worker, by `model` and `version`: in the batching queue, or
/// without batching in the workers' own queue.
pub const QUEUE_DELAY_SECONDS: &str = "modelgate_queue_delay_seconds";
/// Time of one forward pass, by `model` and `version`.
pub const FORWARD_DURATION_SECONDS: &str = "modelgate_forward_duration_seconds";
/// Requests waiting in a version's queue, by `model` and `version`.
pub const QUEUE_DEPTH: &str = "modelgate_queue_depth";
/// Requests refused before running (e.g. a full queue), by `model`, `version` and `reason`.
pub const REJECTED_REQUESTS_TOTAL: &str = "modelgate_rejected_requests_total";

/// Request log records written, by `model`.
pub const PREDICTION_LOGS_WRITTEN_TOTAL: &str = "modelgate_prediction_logs_written_total";
/// Request log records dropped, by `model` and `reason` (`queue_full`: the collector's queue
/// was full; `write_failed`: the destination refused them; `too_large`: a TFRecord file's
/// record whose values were left out for size).
pub const PREDICTION_LOGS_DROPPED_TOTAL: &str = "modelgate_prediction_logs_dropped_total";

/// `outcome` label values of [`MODEL_LOADS_TOTAL`].
pub const OUTCOME_SUCCESS: &str = "success";
pub const OUTCOME_FAILURE: &str = "failure";

/// Latency buckets (seconds) shared by request and forward times: 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Queue waits are usually far below a forward pass: 100 µs to 1 s.
const QUEUE_DELAY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Loads include downloads and warm-up: 100 ms to 10 min.
const LOAD_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// A cold start is a request's wait for a whole load: from a small model's 10 ms on a CPU
/// to a large one's download and warm-up.
const COLD_START_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Installs the global Prometheus recorder and describes every metric. Call once, inside
/// the async runtime; the returned handle renders the scrape payload.
pub fn install_metrics() -> Result<PrometheusHandle, BuildError> {
    let histogram = |builder: PrometheusBuilder, name: &str, buckets: &[f64]| {
        builder.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
    };
    let mut builder = PrometheusBuilder::new();
    builder = histogram(builder, REQUEST_DURATION_SECONDS, LATENCY_BUCKETS)?;
    builder = histogram(builder, MODEL_LOAD_DURATION_SECONDS, LOAD_BUCKETS)?;
    builder = histogram(builder, MODEL_COLD_START_SECONDS, COLD_START_BUCKETS)?;
    let handle = builder.install_recorder()?;
    describe_metrics();
    Ok(handle)
}

fn describe_metrics() {
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Request latency at the API edge"
    );
    describe_counter!(
        PREDICTION_LOGS_WRITTEN_TOTAL,
        "Request log records written, by model"
    );
    describe_counter!(
        PREDICTION_LOGS_DROPPED_TOTAL,
        "Request log records dropped, by model and reason (queue_full, write_failed, too_large)"
    );
    describe_counter!(
        MODEL_LOADS_TOTAL,
        "Model version loads, by outcome (success or failure) and reason (config, on_demand, retry)"
    );
    describe_gauge!(
        MODEL_MEMORY_BUDGET_BYTES,
        Unit::Bytes,
        "The memory budget of resident models on a device (--model_memory_budget)"
    );
    describe_counter!(
        MODEL_EVICTIONS_TOTAL,
        "Model versions evicted to make room for a load"
    );
    describe_histogram!(
        MODEL_COLD_START_SECONDS,
        Unit::Seconds,
        "From the arrival of a request for a version not resident to its answer"
    );
    describe_histogram!(
        MODEL_LOAD_DURATION_SECONDS,
        Unit::Seconds,
        "Time to fetch, load and warm up a model version"
    );
    describe_counter!(
        STORAGE_FETCH_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes fetched from model storage"
    );
    describe_counter!(
        STORAGE_ERRORS_TOTAL,
        "Failed model storage operations (listing or fetching)"
    );
}

/// Keeps the recorder's memory bounded between scrapes; runs until the process ends.
pub async fn run_metrics_upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Sets up logging on stderr: `MODELGATE_LOG` (or `RUST_LOG`) filters, default `info`.
/// `json` writes one JSON object per line with the event's fields at the top level, which
/// is what log shippers expect; otherwise a human format.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MODELGATE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        // Colour only for a person at a terminal: kubectl logs and log shippers read a
        // pipe or a file, where escape codes are noise.
        let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        builder.with_ansi(ansi).init();
    }
}

/// Which API a request called, as the `api` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Predict,
    Classify,
    Regress,
    MultiInference,
    GetModelMetadata,
    GetModelStatus,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Predict => "predict",
            Api::Classify => "classify",
            Api::Regress => "regress",
            Api::MultiInference => "multi_inference",
            Api::GetModelMetadata => "get_model_metadata",
            Api::GetModelStatus => "get_model_status",
        }
    }

    /// Whether the call runs a model (and so counts in a version's inference statistics).
    pub fn runs_model(self) -> bool {
        matches!(
            self,
            Api::Predict | Api::Classify | Api::Regress | Api::MultiInference
        )
    }
}

/// Which protocol a request came in on, as the `protocol` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Rest,
    /// The Open Inference Protocol (KServe V2) on the gRPC port.
    V2Grpc,
    /// The Open Inference Protocol under `/v2` on the REST port.
    V2Rest,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Rest => "rest",
            Protocol::V2Grpc => "v2-grpc",
            Protocol::V2Rest => "v2-rest",
        }
    }
}

/// Records one finished request: the request counter, the latency histogram, a debug log
/// line, and a warn line when it failed. `model` is the metrics label (a served or
/// configured model name, or "" for a name this server does not know: labels must not take
/// arbitrary client text); `requested` is the name the client sent, for the log line only.
pub fn record_request(request: RequestRecord<'_>, outcome: Result<(), &Error>) {
    let RequestRecord {
        api,
        protocol,
        model,
        requested,
        version,
        ran_on,
        elapsed,
    } = request;
    let code = match outcome {
        Ok(()) => tonic::Code::Ok,
        Err(e) => e.code(),
    };
    let (api, protocol, code) = (api.as_str(), protocol.as_str(), code_label(code));
    let model_label = interned_model(model);
    let ran = ran_on.map(|ran_on| (ran_on, elapsed, outcome.is_ok()));
    versions::count_request(&model_label, version, (api, protocol, code), ran);
    metrics::histogram!(
        REQUEST_DURATION_SECONDS,
        "model" => model_label,
        "api" => api,
        "protocol" => protocol,
    )
    .record(elapsed.as_secs_f64());
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    match outcome {
        Ok(()) => tracing::debug!(
            model = requested,
            version,
            api,
            protocol,
            code,
            latency_ms,
            "request"
        ),
        Err(error) => tracing::warn!(
            model = requested,
            version,
            api,
            protocol,
            code,
            latency_ms,
            %error,
            "request failed"
        ),
    }
}

/// One request as [`record_request`] records it.
#[derive(Clone, Copy, Debug)]
pub struct RequestRecord<'a> {
    pub api: Api,
    pub protocol: Protocol,
    /// The metrics label: see [`record_request`].
    pub model: &'a str,
    /// The model name the client sent.
    pub requested: &'a str,
    /// The version that answered, if one did.
    pub version: Option<i64>,
    /// The version an inference ran on, or was to run on when it failed: V2's statistics
    /// count its success or failure there. `None` for calls that run no model.
    pub ran_on: Option<i64>,
    pub elapsed: Duration,
}

/// Why a version was loaded: the `reason` label of [`MODEL_LOADS_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadReason {
    Config,
    OnDemand,
    Retry,
}

impl LoadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadReason::Config => "config",
            LoadReason::OnDemand => "on_demand",
            LoadReason::Retry => "retry",
        }
    }
}

/// Records a version load attempt.
pub fn record_model_load(model: &str, reason: LoadReason, elapsed: Duration, success: bool) {
    let model = interned_model(model);
    let outcome = if success {
        OUTCOME_SUCCESS
    } else {
        OUTCOME_FAILURE
    };
    metrics::counter!(MODEL_LOADS_TOTAL, "model" => model.clone(), "outcome" => outcome, "reason" => reason.as_str())
        .increment(1);
    metrics::histogram!(MODEL_LOAD_DURATION_SECONDS, "model" => model)
        .record(elapsed.as_secs_f64());
}

/// Publishes the memory budget of `device`.
pub fn set_memory_budget(device: &str, bytes: u64) {
    metrics::gauge!(MODEL_MEMORY_BUDGET_BYTES, "device" => device.to_string()).set(bytes as f64);
}

/// Counts a version evicted to make room.
pub fn record_eviction(model: &str) {
    metrics::counter!(MODEL_EVICTIONS_TOTAL, "model" => interned_model(model)).increment(1);
}

/// Records a cold start: a request's wait for its version to load, plus its run.
pub fn record_cold_start(model: &str, elapsed: Duration) {
    metrics::histogram!(MODEL_COLD_START_SECONDS, "model" => interned_model(model))
        .record(elapsed.as_secs_f64());
}

/// Records a failed storage operation for a model (listing or fetching its versions).
pub fn record_storage_error(model: &str) {
    metrics::counter!(STORAGE_ERRORS_TOTAL, "model" => interned_model(model)).increment(1);
}

/// Records bytes fetched from storage for a model.
pub fn record_storage_fetch(model: &str, bytes: u64) {
    metrics::counter!(STORAGE_FETCH_BYTES_TOTAL, "model" => interned_model(model)).increment(bytes);
}

// Label values are interned so that a request costs no String allocation for them. Both
// sets stay small: model names come from the config, versions from storage.
static MODEL_LABELS: LazyLock<RwLock<HashSet<Arc<str>>>> = LazyLock::new(Default::default);
static VERSION_LABELS: LazyLock<RwLock<HashMap<i64, Arc<str>>>> = LazyLock::new(Default::default);

fn interned_model(model: &str) -> SharedString {
    if model.is_empty() {
        return SharedString::const_str("");
    }
    // A poisoned lock only means a panic elsewhere while holding it; the set stays usable.
    if let Some(found) = MODEL_LABELS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(model)
    {
        return SharedString::from(Arc::clone(found));
    }
    let mut labels = MODEL_LABELS.write().unwrap_or_else(|e| e.into_inner());
    let label = labels.get(model).cloned().unwrap_or_else(|| {
        let label: Arc<str> = Arc::from(model);
        labels.insert(Arc::clone(&label));
        label
    });
    SharedString::from(label)
}

fn interned_version(version: Option<i64>) -> SharedString {
    let Some(version) = version else {
        return SharedString::const_str("");
    };
    if let Some(found) = VERSION_LABELS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&version)
    {
        return SharedString::from(Arc::clone(found));
    }
    let label = Arc::clone(
        VERSION_LABELS
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(version)
            .or_insert_with(|| Arc::from(version.to_string())),
    );
    SharedString::from(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_interned() {
        let a = interned_model("mlp");
        let b = interned_model("mlp");
        assert_eq!(a, b);
        assert_eq!(&*interned_version(Some(12)), "12");
        assert_eq!(&*interned_version(None), "");
        assert_eq!(&*interned_model(""), "");
    }

    #[test]
    fn requests_are_counted_with_their_labels() {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION_SECONDS.into()),
                LATENCY_BUCKETS,
            )
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let request = |api, protocol, model, requested, version| RequestRecord {
                api,
                protocol,
                model,
                requested,
                version,
                ran_on: version,
                elapsed: Duration::from_millis(2),
            };
            record_request(
                request(Api::Predict, Protocol::Rest, "mlp", "mlp", Some(2)),
                Ok(()),
            );
            let err = Error::NotFound("nope".into());
            record_request(
                request(Api::Classify, Protocol::Grpc, "", "zzz", None),
                Err(&err),
            );
            record_model_load("mlp", LoadReason::Config, Duration::from_millis(30), true);
        });
        // Request counts are rendered beside the recorder's metrics (see `versions`).
        let mut text = handle.render();
        render_versions(&mut text);
        assert!(
            text.contains(
                r#"modelgate_requests_total{model="mlp",version="2",api="predict",protocol="rest",code="ok"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"modelgate_requests_total{model="",version="",api="classify",protocol="grpc",code="not_found"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"modelgate_request_duration_seconds_count{model="mlp",api="predict",protocol="rest"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("modelgate_request_duration_seconds_bucket{"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"modelgate_model_loads_total{model="mlp",outcome="success",reason="config"} 1"#
            ),
            "{text}"
        );
    }
}
