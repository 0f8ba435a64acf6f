//! The composition root: builds the registry, the model manager and both servers from the
//! flags, and runs them until a signal. Nothing else imports it.

use crate::api;
use crate::api::admin::{AdminConfig, AdminToken, EndpointsSource, Reload};
use crate::config::{self, ConfigError, Flags, ModelSpec};
use crate::error::Error;
use crate::inference::Inference;
use crate::registry::{Manager, ManagerConfig, ManagerHandle, Registry};
use crate::runtime::{self, RunnerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

/// Jobs that may wait for a model's workers before new requests are refused (UNAVAILABLE).
const QUEUE_CAPACITY: usize = 1024;

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

    let admin = admin_api(&flags, manager_handle)?;
    if let Some((config, _)) = &admin {
        tracing::info!(endpoints = %config.peers.url(), "admin API on");
    }

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
            Some(listener) => {
                let admin = admin.map(|(config, reload)| {
                    api::admin::router(config, Arc::clone(&registry), reload)
                });
                api::rest::serve(listener, Arc::clone(&registry), admin, stopped(stop_rx))
                    .await
                    .map_err(AppError::Rest)
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(async { grpc.await.map_err(AppError::Grpc) }, rest)?;
    tracing::info!("stopped");
    Ok(())
}

/// The admin API's config and its reload, when an admin token is given.
fn admin_api(
    flags: &Flags,
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
    let flags = flags.clone();
    let reload: Reload = Arc::new(move || {
        let (flags, manager) = (flags.clone(), manager.clone());
        Box::pin(async move {
            // Reading a config file is blocking I/O: off the async threads.
            let specs = tokio::task::spawn_blocking(move || model_specs(&flags))
                .await
                .map_err(|e| Error::Internal(format!("config reload task failed: {e}")))?
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            manager
                .set_models(specs)
                .await
                .map_err(Error::FailedPrecondition)
        })
    });
    Ok(Some((config, reload)))
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
