//! Command-line flags. Names and defaults follow `tensorflow_model_server`, so a Deployment
//! written for `tensorflow/serving` runs unchanged.

use super::memory::MemoryBudget;
use clap::{ArgAction, Parser};
use std::str::FromStr;
use std::time::Duration;

/// The flags of `tensorflow_model_server` 2.x (`model_servers/main.cc`) that have no meaning
/// for modelgate, each with why. They are accepted and ignored with a warning, so existing
/// manifests keep working; any other unknown flag is still an error. Every other TF Serving
/// flag is one of `Flags` below.
const IGNORED_TF_SERVING_FLAGS: &[(&str, &str)] = &[
    (
        "allow_version_labels_for_unavailable_models",
        "a label binds once its version is AVAILABLE",
    ),
    (
        "enable_grpc_healthcheck_service",
        "grpc.health.v1 is always served",
    ),
    ("enable_profiler", "there is no TensorFlow profiler"),
    (
        "enable_signature_method_name_check",
        "method names are always checked",
    ),
    (
        "flush_filesystem_caches",
        "there are no TensorFlow file system caches",
    ),
    (
        "grpc_max_threads",
        "gRPC runs on the async runtime, not on a thread per call",
    ),
    ("grpc_socket_path", "gRPC listens on --port only"),
    ("mixed_precision", "a TensorFlow graph option"),
    (
        "num_tflite_interpreters_per_pool",
        "there is no TensorFlow Lite",
    ),
    ("num_tflite_pools", "there is no TensorFlow Lite"),
    (
        "num_unload_threads",
        "versions unload on blocking threads of their own",
    ),
    (
        "per_process_gpu_memory_fraction",
        "libtorch allocates GPU memory as it needs it",
    ),
    (
        "platform_config_file",
        "the platform is PyTorch, TorchScript or AOTInductor by each version's files",
    ),
    ("prefer_tflite_model", "there is no TensorFlow Lite"),
    (
        "remove_unused_fields_from_bundle_metagraph",
        "there is no SavedModel MetaGraph",
    ),
    ("rest_api_enable_cors_support", "CORS headers are not sent"),
    (
        "rest_api_num_threads",
        "REST runs on the async runtime, not on a thread pool of its own",
    ),
    ("saved_model_tags", "there is no SavedModel"),
    ("skip_initialize_tpu", "there is no TPU"),
    ("tensorflow_inter_op_parallelism", "see --intra_op_threads"),
    ("tensorflow_intra_op_parallelism", "see --intra_op_threads"),
    (
        "tensorflow_session_config_file",
        "there is no TensorFlow session",
    ),
    ("tensorflow_session_parallelism", "see --intra_op_threads"),
    (
        "thread_pool_factory_config_file",
        "there is no TensorFlow thread pool",
    ),
    ("use_tflite_model", "there is no TensorFlow Lite"),
    ("xla_cpu_compilation_enabled", "there is no XLA"),
    ("xla_gpu_compilation_enabled", "there is no XLA"),
];

/// Where models run: `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceFlag {
    Auto,
    Cpu,
    Cuda(Option<usize>),
}

impl FromStr for DeviceFlag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceFlag::Auto),
            "cpu" => Ok(DeviceFlag::Cpu),
            "cuda" | "gpu" => Ok(DeviceFlag::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| DeviceFlag::Cuda(Some(n)))
                .ok_or_else(|| format!("'{s}' is not one of auto, cpu, cuda, cuda:N")),
        }
    }
}

/// How log lines are written: `text` for people, `json` (one object per line) for shippers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every flag of the server. Booleans take TF Serving's forms: `--flag`, `--flag=true`,
/// `--flag=false`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "modelgate",
    version,
    about = "Serves TorchScript models over TensorFlow Serving's gRPC and REST APIs"
)]
pub struct Flags {
    /// gRPC port (PredictionService, ModelService, health, reflection); 0 picks a free port.
    #[arg(long = "port", default_value_t = 8500)]
    pub port: u16,

    /// REST port (TF Serving REST API, probes, metrics); 0 turns REST off.
    #[arg(long = "rest_api_port", default_value_t = 8501)]
    pub rest_api_port: u16,

    /// Address both servers bind to (modelgate's own flag).
    #[arg(long = "bind_address", default_value = "0.0.0.0")]
    pub bind_address: String,

    /// Name of the model in single-model mode.
    #[arg(long = "model_name", default_value = "default")]
    pub model_name: String,

    /// Base path of the model in single-model mode (local directory or s3://bucket/prefix).
    #[arg(long = "model_base_path")]
    pub model_base_path: Option<String>,

    /// ModelServerConfig in protobuf text format: a local path or s3://bucket/key.
    #[arg(long = "model_config_file")]
    pub model_config_file: Option<String>,

    /// Re-read the model config file this often; 0 or less = never (see
    /// [`Flags::config_poll_interval`]).
    #[arg(
        long = "model_config_file_poll_wait_seconds",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub model_config_file_poll_wait_seconds: i64,

    /// Look for new and removed versions under each base path this often; 0 or less = only
    /// at start (see [`Flags::file_system_poll_interval`]).
    #[arg(
        long = "file_system_poll_wait_seconds",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub file_system_poll_wait_seconds: i64,

    /// How many models list and load their versions at once; 0 (TF Serving's default) or 1:
    /// one at a time. Each model's own loads and unloads keep their order.
    #[arg(long = "num_load_threads", default_value_t = 0)]
    pub num_load_threads: usize,

    /// Server-side batching.
    #[arg(long = "enable_batching", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = ArgAction::Set)]
    pub enable_batching: bool,

    /// BatchingParameters in protobuf text format.
    #[arg(long = "batching_parameters_file")]
    pub batching_parameters_file: Option<String>,

    /// Replay `<version>/assets.extra/tf_serving_warmup_requests` before a version serves
    /// (TF Serving's flag); off, only the synthetic warm-up runs.
    #[arg(long = "enable_model_warmup", num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", action = ArgAction::Set)]
    pub enable_model_warmup: bool,

    /// How many times each warm-up record is replayed; 0 means once (TF Serving's default).
    #[arg(long = "num_request_iterations_for_warmup", default_value_t = 0)]
    pub num_request_iterations_for_warmup: usize,

    /// Read batching_params.pbtxt from each model version directory.
    #[arg(long = "enable_per_model_batching_parameters", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = ArgAction::Set)]
    pub enable_per_model_batching_parameters: bool,

    /// MonitoringConfig in protobuf text format (Prometheus path).
    #[arg(long = "monitoring_config_file")]
    pub monitoring_config_file: Option<String>,

    /// Answer with tensor_content instead of typed fields (float_val, ...).
    #[arg(long = "enable_serialization_as_tensor_content", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = ArgAction::Set)]
    pub enable_serialization_as_tensor_content: bool,

    /// Largest gRPC message accepted or sent (TF Serving's limit is INT32_MAX).
    #[arg(long = "grpc_max_message_bytes", default_value_t = i32::MAX as usize)]
    pub grpc_max_message_bytes: usize,

    /// SSLConfig in protobuf text format (server_key, server_cert, custom_ca, client_verify):
    /// TLS, and with client_verify mTLS, on both ports. A config that cannot be used stops
    /// the start.
    #[arg(long = "ssl_config_file")]
    pub ssl_config_file: Option<String>,

    /// Google's ALTS transport security, which modelgate does not have: true stops the start
    /// rather than serving without it (use --ssl_config_file).
    #[arg(long = "use_alts_credentials", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = ArgAction::Set)]
    pub use_alts_credentials: bool,

    /// gRPC channel arguments, `key=value,key=value`: max concurrent streams, keepalive and
    /// maximum connection age apply; others are warned about.
    #[arg(long = "grpc_channel_arguments", default_value = "")]
    pub grpc_channel_arguments: String,

    /// Where models run: auto, cpu, cuda, cuda:N.
    #[arg(long = "device", default_value = "auto")]
    pub device: DeviceFlag,

    /// Worker threads per device for each model version; 0 = the number of CPU cores on
    /// the CPU, 2 per GPU. A model's batching num_batch_threads overrides it (modelgate's own).
    #[arg(long = "instances_per_device", default_value_t = 0)]
    pub instances_per_device: usize,

    /// TorchScript models to freeze (torch.jit.freeze) and optimize_for_inference at load:
    /// NAME[,NAME] or `*` for all. Faster on the CPU for convolutional models; off by
    /// default because freezing inlines attributes a model may change (modelgate's own).
    #[arg(long = "freeze_models", value_delimiter = ',')]
    pub freeze_models: Vec<String>,

    /// Most bytes resident models may hold per device: `DEVICE=SIZE[,DEVICE=SIZE]`, the
    /// device `cpu` or `cuda:N`, the size in bytes or with a unit (`512MiB`, `70GiB`, `2GB`).
    /// Loads that would go over evict on-demand versions or wait; default: no budget
    /// (modelgate's own).
    #[arg(long = "model_memory_budget", default_value = "")]
    pub model_memory_budget: MemoryBudget,

    /// Models loaded on their first request rather than at start, and evicted (least
    /// recently used first) when a load needs room in the budget: NAME[,NAME] or `*`
    /// (modelgate's own).
    #[arg(long = "on_demand_models", value_delimiter = ',')]
    pub on_demand_models: Vec<String>,

    /// Models loaded at start and never evicted, even when --on_demand_models names them
    /// (`*` for all): NAME[,NAME] (modelgate's own).
    #[arg(long = "pinned_models", value_delimiter = ',')]
    pub pinned_models: Vec<String>,

    /// An on-demand version loaded less than this long ago is not evicted (anti-churn: loads
    /// wait for room instead). Default 0: requests in flight already keep their version, and
    /// any wait longer than a load costs more than the load when the models in use do not
    /// fit (modelgate's own; see docs/memory.md).
    #[arg(long = "min_residency_seconds", default_value_t = 0.0)]
    pub min_residency_seconds: f64,

    /// Models whose old version unloads before the new one loads (TF Serving's
    /// ResourcePreservingPolicy), for versions too large to be resident two at a time:
    /// NAME[,NAME] or `*`. Requests in the gap wait for the new version within their
    /// deadline. Default: none, a new version loads first (modelgate's own).
    #[arg(long = "unload_first_models", value_delimiter = ',')]
    pub unload_first_models: Vec<String>,

    /// libtorch intra-op threads; 0 = cores / CPU workers, so that workers x threads does
    /// not oversubscribe the cores (modelgate's own).
    #[arg(long = "intra_op_threads", default_value_t = 0)]
    pub intra_op_threads: usize,

    /// Without batching, requests that may wait for a model's workers before new ones are
    /// answered UNAVAILABLE (modelgate's own).
    #[arg(long = "max_queued_requests", default_value_t = 1024)]
    pub max_queued_requests: usize,

    /// Times a version that failed to load is tried again, load_retry_interval_micros
    /// apart, before it stays failed until its files change (TF Serving's flag and default).
    #[arg(long = "max_num_load_retries", default_value_t = 5)]
    pub max_num_load_retries: u32,

    /// Wait between those tries, in microseconds (TF Serving's flag; default one minute).
    #[arg(long = "load_retry_interval_micros", default_value_t = 60_000_000)]
    pub load_retry_interval_micros: u64,

    /// Where versions fetched from S3 are kept (modelgate's own flag); default: a
    /// `modelgate-cache-<uid>` directory under the system temp dir, private to this user.
    /// One server per directory.
    #[arg(long = "model_cache_dir")]
    pub model_cache_dir: Option<std::path::PathBuf>,

    /// Turns the admin API on (reload, model status, fan-out to every pod): the bearer token
    /// every admin call must carry. Prefer --admin_token_file: a flag shows in `ps`.
    #[arg(long = "admin_token")]
    pub admin_token: Option<Redacted>,

    /// A file holding the admin token (e.g. a mounted Kubernetes Secret); surrounding
    /// whitespace is ignored.
    #[arg(long = "admin_token_file")]
    pub admin_token_file: Option<String>,

    /// Base URL of the Kubernetes API that lists this Deployment's pods for `?fanout=true`:
    /// the `kubectl proxy` sidecar by default.
    #[arg(long = "kubernetes_api_url", default_value = "http://localhost:8001")]
    pub kubernetes_api_url: String,

    /// Namespace of the Endpoints that list the pods to fan out to; defaults to the pod's own
    /// (downward API `POD_NAMESPACE`, else the service account's namespace file).
    #[arg(long = "fanout_namespace", env = "POD_NAMESPACE")]
    pub fanout_namespace: Option<String>,

    /// Name of the Service (and so of its Endpoints) whose pods a fan-out reaches.
    #[arg(long = "fanout_service", default_value = "modelgate")]
    pub fanout_service: String,

    /// How long a fan-out waits for each pod to answer before reporting it as failed.
    #[arg(long = "fanout_timeout_seconds", default_value_t = 60)]
    pub fanout_timeout_seconds: u64,

    /// The most bytes the tensors of one request may decode to (broadcast typed values,
    /// tf.Example contexts copied into every example, batch padding); a request that carried
    /// more than this in place may decode to its own size. Beyond it: INVALID_ARGUMENT
    /// (modelgate's own).
    #[arg(long = "max_request_tensor_bytes", default_value_t = crate::tensor::limits::DEFAULT_MAX_REQUEST_TENSOR_BYTES)]
    pub max_request_tensor_bytes: usize,

    /// Largest REST request body accepted; larger ones are answered 413 (modelgate's own).
    #[arg(long = "rest_api_max_body_bytes", default_value_t = DEFAULT_REST_MAX_BODY_BYTES)]
    pub rest_api_max_body_bytes: usize,

    /// How long a REST request may take, body included, before it is answered 504; 0 or
    /// less: no limit (TF Serving's meaning).
    #[arg(
        long = "rest_api_timeout_in_ms",
        default_value_t = 30_000,
        allow_negative_numbers = true
    )]
    pub rest_api_timeout_in_ms: i64,

    /// gRPC request bytes all calls together may hold while they arrive; a call that would
    /// go over is answered RESOURCE_EXHAUSTED (modelgate's own). At least
    /// --grpc_max_message_bytes.
    #[arg(long = "grpc_max_bytes_in_flight", default_value_t = DEFAULT_GRPC_MAX_BYTES_IN_FLIGHT)]
    pub grpc_max_bytes_in_flight: usize,

    /// REST request bodies all requests together may hold at once; a request that would go
    /// over is answered 503 (modelgate's own). At least --rest_api_max_body_bytes.
    #[arg(long = "rest_api_max_bytes_in_flight", default_value_t = DEFAULT_REST_MAX_BYTES_IN_FLIGHT)]
    pub rest_api_max_bytes_in_flight: usize,

    /// After SIGTERM/SIGINT, keep accepting this long while readiness reports draining, so
    /// that load balancers stop sending traffic first (modelgate's own).
    #[arg(long = "shutdown_grace_seconds", default_value_t = 5)]
    pub shutdown_grace_seconds: u64,

    /// After the grace period, how long requests in flight (and health watch streams) may
    /// take before their connections are closed and the process exits (modelgate's own).
    #[arg(long = "shutdown_drain_seconds", default_value_t = 10)]
    pub shutdown_drain_seconds: u64,

    /// Request logging (`logging_config`): log every failed request of a model that logs,
    /// whether or not it was sampled (modelgate's own).
    #[arg(long = "log_all_errors", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = ArgAction::Set)]
    pub log_all_errors: bool,

    /// Request logging: records each destination queues before it drops (and counts) new
    /// ones rather than slow a request (modelgate's own).
    #[arg(long = "prediction_log_queue_records", default_value_t = 1024)]
    pub prediction_log_queue_records: usize,

    /// Request logging: a file collector starts a new file once the current one would pass
    /// this many bytes (modelgate's own).
    #[arg(long = "prediction_log_file_rotate_bytes", default_value_t = 128 << 20)]
    pub prediction_log_file_rotate_bytes: u64,

    /// Log format: text or json (one JSON object per line).
    #[arg(
        long = "log_format",
        env = "MODELGATE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

impl Flags {
    /// How often base paths are listed after the first listing at start; `None` for 0 or
    /// less. TF Serving never lists at all for a negative value (its flag reserves that for
    /// tests): a server that never loads a model serves nobody, so modelgate lists once.
    pub fn file_system_poll_interval(&self) -> Option<Duration> {
        positive_seconds(self.file_system_poll_wait_seconds)
    }

    /// How often the model config file is read again; `None` (never) for 0 or less.
    pub fn config_poll_interval(&self) -> Option<Duration> {
        positive_seconds(self.model_config_file_poll_wait_seconds)
    }
}

fn positive_seconds(seconds: i64) -> Option<Duration> {
    u64::try_from(seconds)
        .ok()
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
}

/// A flag value that must never reach a log: its `Debug` prints `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl FromStr for Redacted {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Redacted(s.to_string()))
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// 256 MiB: JSON takes several times the bytes of the tensors it carries, so this admits
/// requests of tens of MiB of tensor data while bounding what one request can buffer.
pub const DEFAULT_REST_MAX_BODY_BYTES: usize = 256 << 20;

/// 2 GiB: one message of the largest size (--grpc_max_message_bytes' default, 2 GiB - 1),
/// or many small ones.
const DEFAULT_GRPC_MAX_BYTES_IN_FLIGHT: usize = 2 << 30;

/// 1 GiB: four bodies of the largest size at once, or many small ones; past it a request is
/// turned away (503) rather than buffered.
const DEFAULT_REST_MAX_BYTES_IN_FLIGHT: usize = 1 << 30;

/// Parses the command line, first setting aside (with a warning each) the TF Serving flags
/// that do not apply. Returns the flags and the warnings to log once logging is up.
pub fn parse_args<I>(args: I) -> Result<(Flags, Vec<String>), clap::Error>
where
    I: IntoIterator<Item = String>,
{
    let mut kept = Vec::new();
    let mut warnings = Vec::new();
    let mut args = args.into_iter().peekable();
    if let Some(program) = args.next() {
        kept.push(program);
    }
    while let Some(arg) = args.next() {
        let name = arg
            .strip_prefix("--")
            .map(|rest| rest.split('=').next().unwrap_or(rest));
        let ignored = name.and_then(|name| {
            IGNORED_TF_SERVING_FLAGS
                .iter()
                .find(|(flag, _)| *flag == name)
        });
        match ignored {
            Some((name, why)) => {
                // `--flag value`: the value goes too (modelgate takes no positional arguments).
                if !arg.contains('=') && args.peek().is_some_and(|next| !next.starts_with("--")) {
                    args.next();
                }
                warnings.push(format!("ignoring TF Serving flag --{name}: {why}"));
            }
            None => kept.push(arg),
        }
    }
    let flags = Flags::try_parse_from(kept)?;
    if flags.file_system_poll_wait_seconds < 0 {
        warnings.push(format!(
            "--file_system_poll_wait_seconds={}: TF Serving reserves negative values for tests \
             and never polls; modelgate lists each base path once at start, as with 0",
            flags.file_system_poll_wait_seconds
        ));
    }
    Ok((flags, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> (Flags, Vec<String>) {
        let mut all = vec!["modelgate".to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        parse_args(all).unwrap()
    }

    #[test]
    fn poll_intervals_take_tf_servings_values() {
        let (flags, warnings) = parse(&[]);
        assert_eq!(
            flags.file_system_poll_interval(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(flags.config_poll_interval(), None);
        assert!(warnings.is_empty());

        let (flags, warnings) = parse(&[
            "--file_system_poll_wait_seconds",
            "-1",
            "--model_config_file_poll_wait_seconds=-5",
        ]);
        assert_eq!(flags.file_system_poll_interval(), None);
        assert_eq!(flags.config_poll_interval(), None);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("lists each base path once at start"));

        let (flags, _) = parse(&["--model_config_file_poll_wait_seconds=30"]);
        assert_eq!(flags.config_poll_interval(), Some(Duration::from_secs(30)));
    }

    #[test]
    fn defaults_match_tf_serving() {
        let (flags, warnings) = parse(&[]);
        assert_eq!(flags.port, 8500);
        assert_eq!(flags.rest_api_port, 8501);
        assert_eq!(flags.model_name, "default");
        assert_eq!(flags.file_system_poll_wait_seconds, 1);
        assert_eq!(flags.model_config_file_poll_wait_seconds, 0);
        assert!(!flags.enable_batching);
        assert_eq!(flags.grpc_max_message_bytes, 2_147_483_647);
        assert_eq!(flags.device, DeviceFlag::Auto);
        assert!(flags.admin_token.is_none() && flags.admin_token_file.is_none());
        assert_eq!(flags.kubernetes_api_url, "http://localhost:8001");
        assert_eq!(flags.rest_api_max_body_bytes, 256 << 20);
        assert_eq!(flags.shutdown_grace_seconds, 5);
        assert_eq!(flags.shutdown_drain_seconds, 10);
        assert_eq!(flags.rest_api_timeout_in_ms, 30_000);
        assert_eq!(flags.rest_api_max_bytes_in_flight, 1 << 30);
        assert_eq!(flags.grpc_max_bytes_in_flight, 2 << 30);
        assert!(flags.ssl_config_file.is_none());
        assert_eq!(flags.grpc_channel_arguments, "");
        assert!(warnings.is_empty());
    }

    #[test]
    fn both_value_forms_and_bare_booleans() {
        let (flags, _) = parse(&[
            "--port=9000",
            "--rest_api_port",
            "9001",
            "--enable_batching",
            "--enable_serialization_as_tensor_content=false",
            "--device=cuda:1",
        ]);
        assert_eq!((flags.port, flags.rest_api_port), (9000, 9001));
        assert!(flags.enable_batching);
        assert!(!flags.enable_serialization_as_tensor_content);
        assert_eq!(flags.device, DeviceFlag::Cuda(Some(1)));
        let (flags, _) = parse(&["--enable_batching=true", "--device", "cpu"]);
        assert!(flags.enable_batching);
        assert_eq!(flags.device, DeviceFlag::Cpu);
    }

    #[test]
    fn modelgate_flags() {
        let (flags, _) = parse(&[
            "--rest_api_max_body_bytes=1024",
            "--shutdown_grace_seconds",
            "0",
            "--log_format=json",
            "--log_all_errors",
            "--prediction_log_queue_records=8",
        ]);
        assert!(flags.log_all_errors);
        assert_eq!(flags.prediction_log_queue_records, 8);
        assert_eq!(flags.prediction_log_file_rotate_bytes, 128 << 20);
        assert_eq!(flags.rest_api_max_body_bytes, 1024);
        assert_eq!(flags.shutdown_grace_seconds, 0);
        assert_eq!(flags.log_format, LogFormat::Json);
        let args = ["modelgate", "--log_format=xml"].map(String::from);
        assert!(parse_args(args).is_err());
    }

    #[test]
    fn inapplicable_tf_serving_flags_warn() {
        let (flags, warnings) = parse(&[
            "--tensorflow_intra_op_parallelism=4",
            "--grpc_max_threads",
            "16",
            "--enable_profiler",
            "--port=1234",
        ]);
        assert_eq!(flags.port, 1234);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].contains("tensorflow_intra_op_parallelism"));
        assert!(warnings[1].contains("--grpc_max_threads: gRPC runs on the async runtime"));
    }

    /// Every flag of `tensorflow_model_server` 2.0 to 2.20 (`model_servers/main.cc`) is
    /// accepted: applied, or ignored with a warning.
    #[test]
    fn every_tf_serving_flag_is_accepted() {
        const TF_SERVING_FLAGS: &[&str] = &[
            "allow_version_labels_for_unavailable_models=true",
            "batching_parameters_file=b.config",
            "enable_batching=true",
            "enable_grpc_healthcheck_service=true",
            "enable_model_warmup=true",
            "enable_per_model_batching_parameters=true",
            "enable_profiler=true",
            "enable_serialization_as_tensor_content=true",
            "enable_signature_method_name_check=true",
            "file_system_poll_wait_seconds=1",
            "flush_filesystem_caches=true",
            "grpc_channel_arguments=grpc.max_connection_age_ms=1000",
            "grpc_max_threads=8",
            "grpc_socket_path=/tmp/s",
            "load_retry_interval_micros=1",
            "max_num_load_retries=1",
            "mixed_precision=bfloat16",
            "model_base_path=/m",
            "model_config_file_poll_wait_seconds=1",
            "model_name=m",
            "monitoring_config_file=m.config",
            "num_load_threads=1",
            "num_request_iterations_for_warmup=1",
            "num_tflite_interpreters_per_pool=1",
            "num_tflite_pools=1",
            "num_unload_threads=1",
            "per_process_gpu_memory_fraction=0.5",
            "platform_config_file=p.config",
            "port=1",
            "prefer_tflite_model=true",
            "remove_unused_fields_from_bundle_metagraph=true",
            "rest_api_enable_cors_support=true",
            "rest_api_num_threads=4",
            "rest_api_port=2",
            "rest_api_timeout_in_ms=-1",
            "saved_model_tags=serve",
            "skip_initialize_tpu=true",
            "ssl_config_file=s.config",
            "tensorflow_inter_op_parallelism=1",
            "tensorflow_intra_op_parallelism=1",
            "tensorflow_session_config_file=t.config",
            "tensorflow_session_parallelism=1",
            "thread_pool_factory_config_file=t.config",
            "use_alts_credentials=false",
            "use_tflite_model=false",
            "xla_cpu_compilation_enabled=false",
            "xla_gpu_compilation_enabled=false",
        ];
        let args: Vec<String> = TF_SERVING_FLAGS.iter().map(|f| format!("--{f}")).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (flags, warnings) = parse(&args);
        assert_eq!(
            warnings.len(),
            IGNORED_TF_SERVING_FLAGS.len(),
            "{warnings:?}"
        );
        assert_eq!(flags.rest_api_timeout_in_ms, -1);
        assert_eq!(flags.ssl_config_file.as_deref(), Some("s.config"));
        // `--version` is clap's: it prints the version and exits.
        let args = ["modelgate", "--version"].map(String::from);
        assert_eq!(
            parse_args(args).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayVersion
        );
    }

    #[test]
    fn admin_token_never_prints() {
        let (flags, _) = parse(&["--admin_token=s3cr3t"]);
        assert_eq!(flags.admin_token, Some(Redacted("s3cr3t".into())));
        assert!(!format!("{flags:?}").contains("s3cr3t"));
    }

    #[test]
    fn load_retries_default_to_tf_serving() {
        let (flags, _) = parse(&[]);
        assert_eq!(flags.max_num_load_retries, 5);
        assert_eq!(flags.load_retry_interval_micros, 60_000_000);
        let (flags, warnings) = parse(&[
            "--max_num_load_retries=0",
            "--load_retry_interval_micros",
            "1000",
        ]);
        assert_eq!(flags.max_num_load_retries, 0);
        assert_eq!(flags.load_retry_interval_micros, 1000);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn typos_are_still_errors() {
        let args = ["modelgate", "--prot=1"].map(String::from);
        assert!(parse_args(args).is_err());
        let args = ["modelgate", "--device=tpu"].map(String::from);
        assert!(parse_args(args).is_err());
    }
}
