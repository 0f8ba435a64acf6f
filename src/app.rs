//! The composition root: builds the registry, the model manager and both servers from the
//! flags, and runs them until a signal. Nothing else imports it.

use crate::api;
use crate::batching::BatchingOptions;
use crate::config::{self, ConfigError, Flags, ModelSpec};
use crate::inference::Inference;
use crate::registry::{LoadSettings, Manager, ManagerConfig, Registry};
use crate::runtime::{self, Device, RunnerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
        queue_capacity: 1,
    }
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub async fn run(flags: Flags) -> Result<(), AppError> {
    let specs = model_specs(&flags)?;
    let batching = batching_options(&flags)?;
    let devices = runtime::resolve_devices(flags.device).map_err(AppError::Device)?;
    tracing::info!(models = specs.len(), "starting modelgate");

    let registry = Registry::new();
    let (manager, _manager_handle) = Manager::new(
        Arc::clone(&registry),
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
        grpc_listener,
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
