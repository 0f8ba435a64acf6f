//! The composition root: builds the registry, the model manager and both servers from the
//! flags, and runs them until a signal. Nothing else imports it.

use crate::api;
use crate::api::admin::{AdminConfig, AdminToken, EndpointsSource, Reload};
use crate::batching::BatchingOptions;
use crate::config::S3Env;
use crate::config::{self, ConfigError, Flags, ModelSpec};
use crate::error::Error;
use crate::inference::Inference;
use crate::registry::{LoadSettings, Manager, ManagerConfig, ManagerHandle, Registry};
use crate::runtime::{self, Device, RunnerConfig};
use crate::storage::Storage;
use crate::telemetry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// Where Kubernetes mounts the pod's namespace with its service-account credentials.
const SERVICE_ACCOUNT_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Device(String),
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: String, message: String },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] api::grpc::ServeError),
    #[error("REST server failed: {0}")]
    Rest(std::io::Error),
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
}

/// The models the flags ask for: the config file (local or on S3), or single-model mode;
/// with the config file's text, against which later changes are measured.
pub async fn model_specs(
    flags: &Flags,
    storage: &Storage,
) -> Result<(Vec<ModelSpec>, Option<String>), ConfigError> {
    match (&flags.model_config_file, &flags.model_base_path) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(
            "--model_config_file and --model_base_path cannot be used together".into(),
        )),
        (Some(path), None) => {
            let text = storage
                .read_text(path)
                .await
                .map_err(|e| ConfigError::Invalid(format!("--model_config_file: {e}")))?;
            Ok((specs_from_text(path, &text)?, Some(text)))
        }
        (None, Some(base_path)) => Ok((
            vec![config::single_model_spec(&flags.model_name, base_path)?],
            None,
        )),
        (None, None) => Err(ConfigError::Invalid(
            "no models: give --model_config_file, or --model_name and --model_base_path".into(),
        )),
    }
}

fn specs_from_text(what: &str, text: &str) -> Result<Vec<ModelSpec>, ConfigError> {
    let config = config::parse_model_server_config(what, text)?;
    config::model_specs_from_config(&config)
}

/// Checks every base path before the server starts, so a bad one stops it with a clear error.
fn check_base_paths(storage: &Storage, specs: &[ModelSpec]) -> Result<(), ConfigError> {
    for spec in specs {
        storage
            .base_path(&spec.base_path)
            .map_err(|e| ConfigError::Invalid(format!("model '{}': {e}", spec.name)))?;
    }
    Ok(())
}

/// Re-reads the config file every `interval` and applies it when its text changed. A file
/// that cannot be read or parsed leaves the config in force; a problem is logged when it
/// starts (and a refused text once), not on every poll.
async fn poll_config_file(
    path: String,
    interval: Duration,
    storage: Storage,
    manager: ManagerHandle,
    mut applied_text: String,
) {
    #[derive(PartialEq)]
    enum Problem {
        Unreadable,
        /// The text that was refused.
        Refused(String),
    }
    let mut last_problem: Option<Problem> = None;
    loop {
        tokio::time::sleep(interval).await;
        let (problem, message) = match storage.read_text(&path).await {
            Err(e) => (
                Some(Problem::Unreadable),
                format!("cannot re-read the model config, keeping the one in force: {e}"),
            ),
            Ok(text) if text == applied_text => (None, String::new()),
            Ok(text) => {
                let applied = match specs_from_text(&path, &text) {
                    Err(e) => Err(e.to_string()),
                    Ok(specs) => {
                        tracing::info!("model config file {path} changed; applying it");
                        manager.set_models(specs).await.map_err(|e| e.to_string())
                    }
                };
                match applied {
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

/// The server-wide batching options (`--enable_batching`, `--batching_parameters_file`).
pub fn batching_options(flags: &Flags) -> Result<Option<BatchingOptions>, ConfigError> {
    if !flags.enable_batching {
        if flags.batching_parameters_file.is_some() {
            tracing::warn!("--batching_parameters_file has no effect without --enable_batching");
        }
        return Ok(None);
    }
    let options = match &flags.batching_parameters_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                what: path.clone(),
                message: e.to_string(),
            })?;
            BatchingOptions::parse(path, &text)?
        }
        None => BatchingOptions::parse("defaults", "")?,
    };
    tracing::info!(?options, "batching enabled (effective server-wide options)");
    Ok(Some(options))
}

/// Where and on how many threads models run, and libtorch's intra-op thread count, so
/// that CPU workers x intra-op threads does not oversubscribe the cores.
fn runner_config(flags: &Flags, devices: Vec<Device>) -> RunnerConfig {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let on_cpu = devices.contains(&Device::Cpu);
    let instances_per_device = match flags.instances_per_device {
        0 if on_cpu => cores,
        0 => 2,
        n => n,
    };
    let intra_op_threads = match flags.intra_op_threads {
        0 if on_cpu => (cores / instances_per_device).max(1),
        0 => cores,
        n => n,
    };
    runtime::set_intra_op_threads(intra_op_threads);
    tracing::info!(?devices, instances_per_device, intra_op_threads, "workers");
    RunnerConfig {
        devices,
        instances_per_device,
    }
}

/// The Prometheus path `--monitoring_config_file` asks for, if any.
pub fn monitoring_path(flags: &Flags) -> Result<Option<String>, ConfigError> {
    let Some(path) = &flags.monitoring_config_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        what: path.clone(),
        message: e.to_string(),
    })?;
    config::prometheus_path(path, &text)
}

/// How long unloading the models may take at shutdown before the process exits anyway.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub async fn run(flags: Flags) -> Result<(), AppError> {
    let storage = Storage::new(
        flags
            .model_cache_dir
            .clone()
            .unwrap_or_else(Storage::default_cache_dir),
        S3Env::from_env(),
    );
    let (specs, config_text) = model_specs(&flags, &storage).await?;
    check_base_paths(&storage, &specs)?;
    let batching = batching_options(&flags)?;
    let metrics_path = monitoring_path(&flags)?;
    let devices = runtime::resolve_devices(flags.device).map_err(AppError::Device)?;
    tracing::info!(models = specs.len(), "starting modelgate");
    let metrics = telemetry::install_metrics().map_err(|e| AppError::Metrics(e.to_string()))?;
    tokio::spawn(telemetry::run_metrics_upkeep(metrics.clone()));
    // Installed before the servers start, so that a signal during start-up drains too.
    let signals = Signals::install();

    let registry = Registry::new();
    let (manager, manager_handle) = Manager::new(
        Arc::clone(&registry),
        storage.clone(),
        ManagerConfig {
            load: LoadSettings {
                runner: runner_config(&flags, devices),
                batching,
                per_model_batching: flags.enable_per_model_batching_parameters,
                direct_queue_capacity: flags.max_queued_requests,
            },
            poll_interval: (flags.file_system_poll_wait_seconds > 0)
                .then(|| Duration::from_secs(flags.file_system_poll_wait_seconds)),
        },
    );

    let admin = admin_api(&flags, &storage, manager_handle.clone())?;
    if let Some((config, _)) = &admin {
        tracing::info!(endpoints = %config.peers.url(), "admin API on");
    }

    // Ports open before models load: readiness, not a closed port, says when to send traffic.
    let grpc_addr = socket_addr(&flags.bind_address, flags.port)?;
    let grpc_listener = TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| bind_error(grpc_addr, e))?;
    let grpc_local = grpc_listener
        .local_addr()
        .map_err(|e| bind_error(grpc_addr, e))?;
    tracing::info!("gRPC server listening on {grpc_local}");
    let rest_listener = if flags.rest_api_port == 0 {
        None
    } else {
        let addr = socket_addr(&flags.bind_address, flags.rest_api_port)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| bind_error(addr, e))?;
        let local = listener.local_addr().map_err(|e| bind_error(addr, e))?;
        tracing::info!("REST server listening on {local}");
        Some(listener)
    };

    tokio::spawn(manager.run(specs));
    if let (Some(path), Some(text), true) = (
        &flags.model_config_file,
        config_text,
        flags.model_config_file_poll_wait_seconds > 0,
    ) {
        tokio::spawn(poll_config_file(
            path.clone(),
            Duration::from_secs(flags.model_config_file_poll_wait_seconds),
            storage.clone(),
            manager_handle.clone(),
            text,
        ));
    }

    let (draining_tx, draining_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(shutdown_sequence(
        signals,
        Arc::clone(&registry),
        Duration::from_secs(flags.shutdown_grace_seconds),
        draining_tx,
        stop_tx,
    ));

    let inference = Inference::new(Arc::clone(&registry));
    let mut rest_router = api::rest::router(
        inference.clone(),
        Some(metrics),
        &api::rest::RestOptions {
            max_body_bytes: flags.rest_api_max_body_bytes,
            metrics_path,
        },
    );
    if let Some((config, reload)) = admin {
        rest_router = rest_router.merge(api::admin::router(config, Arc::clone(&registry), reload));
    }
    let grpc = api::grpc::serve(
        grpc_listener,
        inference,
        manager_handle.clone(),
        api::grpc::GrpcOptions {
            tensor_content: flags.enable_serialization_as_tensor_content,
            max_message_bytes: flags.grpc_max_message_bytes,
        },
        draining_rx,
        stopped(stop_rx.clone()),
    );
    let rest = async {
        match rest_listener {
            Some(listener) => api::rest::serve(listener, rest_router, stopped(stop_rx))
                .await
                .map_err(AppError::Rest),
            None => Ok(()),
        }
    };
    tokio::try_join!(async { grpc.await.map_err(AppError::Grpc) }, rest)?;

    tracing::info!("requests in flight finished; unloading models");
    match tokio::time::timeout(UNLOAD_TIMEOUT, manager_handle.set_models(Vec::new())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("unloading models: {e}"),
        Err(_) => tracing::warn!("models still unloading after {UNLOAD_TIMEOUT:?}; exiting"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// The admin API's config and its reload, when an admin token is given.
fn admin_api(
    flags: &Flags,
    storage: &Storage,
    manager: ManagerHandle,
) -> Result<Option<(AdminConfig, Reload)>, ConfigError> {
    let token = match (&flags.admin_token, &flags.admin_token_file) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ConfigError::Invalid(
                "give --admin_token or --admin_token_file, not both".into(),
            ))
        }
        (Some(token), None) => AdminToken::new(&token.0)
            .map_err(|e| ConfigError::Invalid(format!("--admin_token: {e}")))?,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                what: format!("--admin_token_file={path}"),
                message: e.to_string(),
            })?;
            AdminToken::new(&text)
                .map_err(|e| ConfigError::Invalid(format!("--admin_token_file={path}: {e}")))?
        }
    };
    if flags.fanout_timeout_seconds == 0 {
        return Err(ConfigError::Invalid(
            "--fanout_timeout_seconds must be at least 1".into(),
        ));
    }
    let namespace = match &flags.fanout_namespace {
        Some(namespace) => namespace.clone(),
        None => std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE)
            .map(|ns| ns.trim().to_string())
            .unwrap_or_else(|_| "default".to_string()),
    };
    let peers = EndpointsSource::new(&flags.kubernetes_api_url, &namespace, &flags.fanout_service)
        .map_err(ConfigError::Invalid)?;
    let config = AdminConfig {
        token,
        peers,
        fanout_timeout: Duration::from_secs(flags.fanout_timeout_seconds),
    };
    let (flags, storage) = (flags.clone(), storage.clone());
    let reload: Reload = Arc::new(move || {
        let (flags, storage, manager) = (flags.clone(), storage.clone(), manager.clone());
        Box::pin(async move {
            let (specs, _) = model_specs(&flags, &storage)
                .await
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            Ok(manager.set_models(specs).await?)
        })
    });
    Ok(Some((config, reload)))
}

/// The first signal starts draining; after the grace period the servers stop accepting.
/// A second signal exits at once.
async fn shutdown_sequence(
    mut signals: Signals,
    registry: Arc<Registry>,
    grace: Duration,
    draining: watch::Sender<bool>,
    stop: watch::Sender<bool>,
) {
    let first = signals.next().await;
    registry.start_draining();
    let _ = draining.send(true);
    // Logged once it is true: not ready any more.
    tracing::info!(
        signal = first,
        grace_seconds = grace.as_secs_f64(),
        "shutting down: not ready any more; still accepting during the grace period"
    );
    tokio::select! {
        () = tokio::time::sleep(grace) => {}
        second = signals.next() => exit_now(second),
    }
    tracing::info!("grace period over: refusing new connections, finishing requests in flight");
    let _ = stop.send(true);
    let second = signals.next().await;
    exit_now(second);
}

fn exit_now(signal: &'static str) -> ! {
    tracing::warn!(signal, "second signal: exiting without draining");
    let code = match signal {
        "SIGINT" => 130,
        _ => 143,
    };
    std::process::exit(code)
}

/// SIGTERM and SIGINT, as one stream.
struct Signals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl Signals {
    fn install() -> Signals {
        let install = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot handle {name} ({e}); it will not drain the server");
                None
            }
        };
        Signals {
            term: install(SignalKind::terminate(), "SIGTERM"),
            int: install(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// The next signal's name; never resolves when neither could be installed.
    async fn next(&mut self) -> &'static str {
        async fn recv(signal: &mut Option<Signal>) {
            match signal {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.term) => "SIGTERM",
            () = recv(&mut self.int) => "SIGINT",
        }
    }
}

fn socket_addr(host: &str, port: u16) -> Result<SocketAddr, AppError> {
    let text = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    text.parse().map_err(|e| AppError::Bind {
        addr: text,
        message: format!("--bind_address: {e}"),
    })
}

fn bind_error(addr: SocketAddr, e: impl std::fmt::Display) -> AppError {
    AppError::Bind {
        addr: addr.to_string(),
        message: e.to_string(),
    }
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|&stop| stop).await;
}
