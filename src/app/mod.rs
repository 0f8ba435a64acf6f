//! The composition root: builds the registry, the model manager and both servers from the
//! flags, and runs them until a signal. Nothing else imports it.
//!
//! `models`: where the models come from and how a config reaches the manager; `settings`:
//! the subsystems' options from the flags; `admin`: the admin API's set-up; `shutdown`:
//! signals, the grace period and unloading.

mod admin;
mod models;
mod settings;
mod shutdown;

use crate::api;
use crate::api::serve::Port;
use crate::config::{ConfigError, ConnectionSettings, Flags, S3Env};
use crate::inference::Inference;
use crate::registry::{
    AvailabilityPreserving, ConfigHook, Ledger, LoadRetries, LoadSettings, Manager, ManagerConfig,
    Registry,
};
use crate::request_log::{LogSettings, RequestLogs};
use crate::runtime;
use crate::storage::Storage;
use crate::telemetry;
use models::ModelSource;
use shutdown::Signals;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Device(String),
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: String, message: String },
    #[error("cannot build the gRPC services: {0}")]
    Grpc(#[from] api::grpc::BuildError),
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
    #[error(transparent)]
    Cache(crate::storage::StorageError),
}

/// How long the request log writers may take, at exit, to write what is queued.
const REQUEST_LOG_FLUSH: Duration = Duration::from_secs(10);

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub async fn run(flags: Flags) -> Result<(), AppError> {
    let cache_dir = match &flags.model_cache_dir {
        Some(dir) => dir.clone(),
        None => Storage::default_cache_dir().map_err(AppError::Cache)?,
    };
    let storage = Storage::new(cache_dir, S3Env::from_env());
    let models = ModelSource::from_flags(&flags, storage.clone())?;
    let (specs, config_text) = models.initial().await?;
    let batching = settings::batching_options(&flags)?;
    let rest_options = settings::rest_options(&flags, settings::monitoring_path(&flags)?)?;
    let tls = settings::tls(&flags)?;
    let grpc_connections = settings::grpc_connections(&flags)?;
    let devices = runtime::resolve_devices(flags.device).map_err(AppError::Device)?;
    // A server that was killed leaves its CUDA packages' unpacked directories in /tmp.
    let stale = tokio::task::spawn_blocking(runtime::remove_stale_unpack_dirs)
        .await
        .unwrap_or(0);
    if stale > 0 {
        tracing::info!(
            removed = stale,
            "removed package directories left in /tmp by servers no longer running"
        );
    }
    tracing::info!(models = specs.len(), "starting modelgate");
    let metrics = telemetry::install_metrics().map_err(|e| AppError::Metrics(e.to_string()))?;
    tokio::spawn(telemetry::run_metrics_upkeep(metrics.clone()));
    // Installed before the servers start, so that a signal during start-up drains too.
    let signals = Signals::install();

    let request_logs = RequestLogs::new(LogSettings {
        queue_records: flags.prediction_log_queue_records,
        file_rotate_bytes: flags.prediction_log_file_rotate_bytes,
        log_all_errors: flags.log_all_errors,
    });
    // Opened before the ports, so that a destination that cannot be written stops the
    // start; the manager applies the same config again and keeps what is open.
    request_logs
        .configure(&specs)
        .map_err(|e| AppError::Config(ConfigError::Invalid(e.to_string())))?;
    let residency = settings::residency(&flags, &devices)?;
    let registry = Registry::with_residency(
        Ledger::new(residency.budget.clone()),
        residency.min_residency,
    );
    let inference = Inference::new(Arc::clone(&registry), flags.max_request_tensor_bytes);
    let warm_up = flags.enable_model_warmup.then(|| {
        crate::inference::replay::replay(
            inference.clone(),
            flags.num_request_iterations_for_warmup,
            tokio::runtime::Handle::current(),
        )
    });
    let (manager, manager_handle) = Manager::new(
        Arc::clone(&registry),
        storage,
        ManagerConfig {
            load: LoadSettings {
                runner: settings::runner_config(&flags, devices),
                batching,
                per_model_batching: flags.enable_per_model_batching_parameters,
                direct_queue_capacity: flags.max_queued_requests,
                warm_up,
                freeze_models: flags.freeze_models.clone(),
            },
            poll_interval: flags.file_system_poll_interval(),
            load_threads: flags.num_load_threads,
            load_retries: LoadRetries {
                max_retries: flags.max_num_load_retries,
                interval: Duration::from_micros(flags.load_retry_interval_micros),
            },
            policy: Arc::new(AvailabilityPreserving),
            residency,
            config_hook: Some(request_log_hook(&request_logs)),
        },
    );

    let admin = admin::admin_api(&flags, &models, manager_handle.clone())?;
    if let Some((config, _)) = &admin {
        tracing::info!(endpoints = %config.peers.url(), "admin API on");
    }

    // Ports open before models load: readiness, not a closed port, says when to send traffic.
    let grpc_listener = listen("gRPC", &flags.bind_address, flags.port).await?;
    let rest_listener = match flags.rest_api_port {
        0 => None,
        port => Some(listen("REST", &flags.bind_address, port).await?),
    };

    tokio::spawn(manager.run(specs));
    if let Some(interval) = flags.config_poll_interval() {
        tokio::spawn(
            models
                .clone()
                .poll(interval, manager_handle.clone(), config_text),
        );
    }

    let (draining_tx, draining_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(shutdown::sequence(
        signals,
        Arc::clone(&registry),
        Duration::from_secs(flags.shutdown_grace_seconds),
        draining_tx,
        stop_tx,
    ));

    let source = models.clone();
    let repository = api::v2::RepositoryControl::new(
        Arc::new(move |name| {
            let source = source.clone();
            Box::pin(async move { source.entry(&name).await })
        }),
        manager_handle.clone(),
        Arc::clone(&registry),
        admin.as_ref().map(|(config, _)| config.token.clone()),
    );
    let mut rest_router = api::rest::router(
        inference.clone(),
        Arc::clone(&registry),
        repository.clone(),
        Some(metrics),
        &rest_options,
    );
    if let Some((config, reload)) = admin {
        rest_router = rest_router.merge(api::admin::router(config, Arc::clone(&registry), reload));
    }
    let grpc_router = api::grpc::router(
        inference,
        Arc::clone(&registry),
        manager_handle.clone(),
        repository,
        api::grpc::GrpcOptions {
            tensor_content: flags.enable_serialization_as_tensor_content,
            max_message_bytes: flags.grpc_max_message_bytes,
            max_bytes_in_flight: settings::grpc_max_bytes_in_flight(&flags)?,
        },
        draining_rx,
        stop_rx.clone(),
    )
    .await?;

    let rest_router = api::serve::with_request_log(rest_router, Arc::clone(&request_logs));
    let grpc_router = api::serve::with_request_log(grpc_router, Arc::clone(&request_logs));

    let drain = Duration::from_secs(flags.shutdown_drain_seconds);
    let grpc = api::serve::serve(
        Port {
            name: "gRPC",
            listener: grpc_listener,
            router: grpc_router,
            tls: tls.clone(),
            // Kubelets' gRPC probes speak no TLS: nothing here is for the anonymous.
            anonymous: api::serve::Anonymous {
                paths: &[],
                refuse: api::grpc::unauthenticated,
            },
            settings: grpc_connections,
        },
        stop_rx.clone(),
        drain,
    );
    let rest = async {
        if let Some(listener) = rest_listener {
            let port = Port {
                name: "REST",
                listener,
                router: rest_router,
                tls,
                anonymous: api::serve::Anonymous {
                    paths: &["/healthz", "/readyz"],
                    refuse: api::rest::unauthenticated,
                },
                settings: ConnectionSettings::default(),
            };
            api::serve::serve(port, stop_rx, drain).await;
        }
    };
    tokio::join!(grpc, rest);

    shutdown::unload(&manager_handle).await;
    request_logs.close(REQUEST_LOG_FLUSH).await;
    Ok(())
}

/// Binds `host:port` and logs the address (the port may have been 0).
async fn listen(name: &str, host: &str, port: u16) -> Result<TcpListener, AppError> {
    let addr = socket_addr(host, port)?;
    let bind_error = |e: std::io::Error| AppError::Bind {
        addr: addr.to_string(),
        message: e.to_string(),
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    tracing::info!("{name} server listening on {local}");
    Ok(listener)
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

/// Request logging is configured with each model config the manager applies, and can
/// refuse it (a destination that cannot be opened).
fn request_log_hook(request_logs: &Arc<RequestLogs>) -> ConfigHook {
    let request_logs = Arc::clone(request_logs);
    ConfigHook(Arc::new(move |specs| {
        request_logs.configure(specs).map_err(Into::into)
    }))
}
