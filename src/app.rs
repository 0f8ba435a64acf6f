//! The composition root: builds the registry, the model manager and both servers from the
//! flags, and runs them until a signal. Nothing else imports it.

use crate::api;
use crate::config::{self, ConfigError, Flags, ModelSpec};
use crate::inference::Inference;
use crate::registry::{Manager, ManagerConfig, Registry};
use crate::runtime::{self, RunnerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
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

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub async fn run(flags: Flags) -> Result<(), AppError> {
    let specs = model_specs(&flags)?;
    let devices = runtime::resolve_devices(flags.device).map_err(AppError::Device)?;
    let device = devices[0];
    tracing::info!(%device, models = specs.len(), "starting modelgate");

    let registry = Registry::new();
    let (manager, _manager_handle) = Manager::new(
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

    let (stop_tx, stop_rx) = watch::channel(false);
    let signals_registry = Arc::clone(&registry);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: draining");
        signals_registry.start_draining();
        let _ = stop_tx.send(true);
    });

    let inference = Inference::new(Arc::clone(&registry));
    let grpc = api::grpc::serve(
        grpc_incoming,
        inference,
        api::grpc::GrpcOptions {
            tensor_content: flags.enable_serialization_as_tensor_content,
            max_message_bytes: flags.grpc_max_message_bytes,
        },
        stopped(stop_rx.clone()),
    );
    let rest = async {
        match rest_listener {
            Some(listener) => api::rest::serve(listener, Arc::clone(&registry), stopped(stop_rx))
                .await
                .map_err(AppError::Rest),
            None => Ok(()),
        }
    };
    tokio::try_join!(async { grpc.await.map_err(AppError::Grpc) }, rest)?;
    tracing::info!("stopped");
    Ok(())
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

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
