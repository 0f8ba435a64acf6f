//! The composition root: builds the registry, the model manager and both servers from the
//! flags, and runs them until a signal. Nothing else imports it.
//!
//! Shutdown, on SIGTERM or SIGINT: readiness (`/readyz`, gRPC health) turns NOT_SERVING at
//! once while both servers keep accepting for `--shutdown_grace_seconds`, so that load
//! balancers stop sending traffic first; then the servers stop accepting and wait for the
//! requests in flight, the models are unloaded, and the process exits 0. A second signal
//! at any point exits at once.

use crate::api;
use crate::config::{self, ConfigError, Flags, ModelSpec};
use crate::inference::Inference;
use crate::registry::{Manager, ManagerConfig, Registry};
use crate::runtime::{self, RunnerConfig};
use crate::telemetry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

/// Jobs that may wait for a model's workers before new requests are refused (UNAVAILABLE).
const QUEUE_CAPACITY: usize = 1024;

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

/// The models the flags ask for: the config file, or single-model mode.
pub fn model_specs(flags: &Flags) -> Result<Vec<ModelSpec>, ConfigError> {
    match (&flags.model_config_file, &flags.model_base_path) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(
            "--model_config_file and --model_base_path cannot be used together".into(),
        )),
        (Some(path), None) => {
            if path.contains("://") {
                return Err(ConfigError::Invalid(format!(
                    "--model_config_file={path}: remote config files are not supported by this build"
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                what: path.clone(),
                message: e.to_string(),
            })?;
            let config = config::parse_model_server_config(path, &text)?;
            config::model_specs_from_config(&config)
        }
        (None, Some(base_path)) => Ok(vec![config::single_model_spec(
            &flags.model_name,
            base_path,
        )?]),
        (None, None) => Err(ConfigError::Invalid(
            "no models: give --model_config_file, or --model_name and --model_base_path".into(),
        )),
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
    let specs = model_specs(&flags)?;
    let metrics_path = monitoring_path(&flags)?;
    let devices = runtime::resolve_devices(flags.device).map_err(AppError::Device)?;
    let device = devices[0];
    tracing::info!(%device, models = specs.len(), "starting modelgate");
    let metrics = telemetry::install_metrics().map_err(|e| AppError::Metrics(e.to_string()))?;
    tokio::spawn(telemetry::run_metrics_upkeep(metrics.clone()));
    // Installed before the servers start, so that a signal during start-up drains too.
    let signals = Signals::install();

    let registry = Registry::new();
    let (manager, manager_handle) = Manager::new(
        Arc::clone(&registry),
        ManagerConfig {
            runner: RunnerConfig {
                device,
                instances: 1,
                queue_capacity: QUEUE_CAPACITY,
            },
            poll_interval: (flags.file_system_poll_wait_seconds > 0)
                .then(|| Duration::from_secs(flags.file_system_poll_wait_seconds)),
        },
    );

    // Ports open before models load: readiness, not a closed port, says when to send traffic.
    let grpc_addr = socket_addr(&flags.bind_address, flags.port)?;
    let grpc_incoming = TcpIncoming::bind(grpc_addr)
        .map_err(|e| bind_error(grpc_addr, e))?
        .with_nodelay(Some(true));
    let grpc_local = grpc_incoming
        .local_addr()
        .map_err(|e| bind_error(grpc_addr, e))?;
    tracing::info!("gRPC server listening on {grpc_local}");
    let rest_listener = if flags.rest_api_port == 0 {
        None
    } else {
        let addr = socket_addr(&flags.bind_address, flags.rest_api_port)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| bind_error(addr, e))?;
        let local = listener.local_addr().map_err(|e| bind_error(addr, e))?;
        tracing::info!("REST server listening on {local}");
        Some(listener)
    };

    tokio::spawn(manager.run(specs));

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
    let rest_router = api::rest::router(
        inference.clone(),
        Some(metrics),
        &api::rest::RestOptions {
            max_body_bytes: flags.rest_api_max_body_bytes,
            metrics_path,
        },
    );
    let grpc = api::grpc::serve(
        grpc_incoming,
        inference,
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
    tracing::info!(
        signal = first,
        grace_seconds = grace.as_secs_f64(),
        "shutting down: not ready any more; still accepting during the grace period"
    );
    registry.start_draining();
    let _ = draining.send(true);
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
