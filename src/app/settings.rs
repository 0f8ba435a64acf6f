//! What the subsystems are configured with, read from the flags and the files they name:
//! batching, workers, the metrics path, TLS, and the servers' connection settings.

use crate::api::rest::RestOptions;
use crate::api::serve::PortTls;
use crate::batching::BatchingOptions;
use crate::config::{self, ConfigError, ConnectionSettings, Flags};
use crate::registry::ResidencySettings;
use crate::runtime::{self, Device, RunnerConfig};
use std::time::Duration;

/// The server-wide batching options (`--enable_batching`, `--batching_parameters_file`).
pub(super) fn batching_options(flags: &Flags) -> Result<Option<BatchingOptions>, ConfigError> {
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
pub(super) fn runner_config(flags: &Flags, devices: Vec<Device>) -> RunnerConfig {
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
    runtime::configure_executor();
    tracing::info!(?devices, instances_per_device, intra_op_threads, "workers");
    RunnerConfig {
        devices,
        instances_per_device,
        freeze: None,
    }
}

/// The Prometheus path `--monitoring_config_file` asks for, if any.
pub(super) fn monitoring_path(flags: &Flags) -> Result<Option<String>, ConfigError> {
    let Some(path) = &flags.monitoring_config_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        what: path.clone(),
        message: e.to_string(),
    })?;
    config::prometheus_path(path, &text)
}

/// The TLS config of both ports (`--ssl_config_file`); `None`: plaintext.
pub(super) fn tls(flags: &Flags) -> Result<Option<PortTls>, ConfigError> {
    if flags.use_alts_credentials {
        // A transport security that cannot be had must not become none at all.
        return Err(ConfigError::Invalid(
            "--use_alts_credentials: ALTS is not supported; use --ssl_config_file".into(),
        ));
    }
    let Some(path) = &flags.ssl_config_file else {
        return Ok(None);
    };
    let tls = config::tls_server_config(path)?;
    if let Some(warning) = &tls.warning {
        tracing::warn!("{warning}");
    }
    tracing::info!(client_verify = tls.client_verify, "TLS on");
    Ok(Some(PortTls {
        config: tls.server,
        certificate_required: tls.client_verify,
    }))
}

/// `--grpc_max_bytes_in_flight`, which must admit one message of the largest size.
pub(super) fn grpc_max_bytes_in_flight(flags: &Flags) -> Result<usize, ConfigError> {
    if flags.grpc_max_bytes_in_flight < flags.grpc_max_message_bytes {
        return Err(ConfigError::Invalid(format!(
            "--grpc_max_bytes_in_flight ({}) must be at least --grpc_max_message_bytes ({})",
            flags.grpc_max_bytes_in_flight, flags.grpc_max_message_bytes
        )));
    }
    Ok(flags.grpc_max_bytes_in_flight)
}

/// The gRPC port's connection settings (`--grpc_channel_arguments`).
pub(super) fn grpc_connections(flags: &Flags) -> Result<ConnectionSettings, ConfigError> {
    let (settings, warnings) =
        ConnectionSettings::from_grpc_channel_arguments(&flags.grpc_channel_arguments)?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    Ok(settings)
}

/// The REST API's options beyond its routes.
pub(super) fn rest_options(
    flags: &Flags,
    metrics_path: Option<String>,
) -> Result<RestOptions, ConfigError> {
    if flags.rest_api_max_bytes_in_flight < flags.rest_api_max_body_bytes {
        return Err(ConfigError::Invalid(format!(
            "--rest_api_max_bytes_in_flight ({}) must be at least --rest_api_max_body_bytes ({})",
            flags.rest_api_max_bytes_in_flight, flags.rest_api_max_body_bytes
        )));
    }
    Ok(RestOptions {
        max_body_bytes: flags.rest_api_max_body_bytes,
        max_bytes_in_flight: flags.rest_api_max_bytes_in_flight,
        // TF Serving's meaning: 0 or less is no limit.
        timeout: u64::try_from(flags.rest_api_timeout_in_ms)
            .ok()
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis),
        metrics_path,
    })
}

/// The residency flags: the memory budget (devices it names that serve nothing are
/// warned about), on-demand, pinned and unload-first models, the minimum residency.
pub(super) fn residency(
    flags: &Flags,
    devices: &[Device],
) -> Result<ResidencySettings, ConfigError> {
    let seconds = flags.min_residency_seconds;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(ConfigError::Invalid(format!(
            "--min_residency_seconds={seconds}: must be 0 or more"
        )));
    }
    for (device, _) in &flags.model_memory_budget.devices {
        if !devices.iter().any(|d| d.to_string() == *device) {
            tracing::warn!(
                device = %device,
                "--model_memory_budget names a device models do not run on here; it has no effect"
            );
        }
    }
    Ok(ResidencySettings {
        budget: flags.model_memory_budget.clone(),
        on_demand: flags.on_demand_models.clone(),
        pinned: flags.pinned_models.clone(),
        min_residency: Duration::from_secs_f64(seconds),
        unload_first: flags.unload_first_models.clone(),
    })
}
