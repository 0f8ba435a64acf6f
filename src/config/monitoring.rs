//! `--monitoring_config_file`: TF Serving's MonitoringConfig, which says whether and where
//! the REST port serves Prometheus metrics (in addition to modelgate's own `/metrics`).

use super::text_format::{parse_text_format, ConfigError};
use crate::proto::serving::MonitoringConfig;

/// TF Serving's Prometheus path when the config enables Prometheus without naming one.
pub const DEFAULT_PROMETHEUS_PATH: &str = "/monitoring/prometheus/metrics";

/// Paths of the REST port that the metrics path may not take over.
const RESERVED_PATHS: &[&str] = &["/healthz", "/readyz"];

/// The Prometheus path a MonitoringConfig (text format, read from `what`) asks for, or
/// `None` when it leaves Prometheus disabled.
pub fn prometheus_path(what: &str, text: &str) -> Result<Option<String>, ConfigError> {
    let config: MonitoringConfig =
        parse_text_format("tensorflow.serving.MonitoringConfig", what, text)?;
    let Some(prometheus) = config.prometheus_config.filter(|p| p.enable) else {
        return Ok(None);
    };
    let path = if prometheus.path.is_empty() {
        DEFAULT_PROMETHEUS_PATH.to_string()
    } else {
        prometheus.path
    };
    let invalid = |why: &str| {
        Err(ConfigError::Invalid(format!(
            "{what}: prometheus_config.path '{path}' {why}"
        )))
    };
    if !path.starts_with('/') {
        return invalid("must start with '/'");
    }
    if RESERVED_PATHS.contains(&path.as_str()) {
        return invalid("is taken by a probe");
    }
    if path.to_ascii_lowercase().starts_with("/v1/") {
        return invalid("is inside the TF Serving API (/v1/)");
    }
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_with_and_without_a_path() {
        let path = |text: &str| prometheus_path("monitoring.config", text);
        assert_eq!(
            path("prometheus_config { enable: true }")
                .unwrap()
                .as_deref(),
            Some(DEFAULT_PROMETHEUS_PATH)
        );
        assert_eq!(
            path("prometheus_config { enable: true, path: \"/m\" }")
                .unwrap()
                .as_deref(),
            Some("/m")
        );
        assert_eq!(path("prometheus_config { path: \"/m\" }").unwrap(), None);
        assert_eq!(path("").unwrap(), None);
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let err = |text: &str| {
            prometheus_path("monitoring.config", text)
                .unwrap_err()
                .to_string()
        };
        assert!(err("prometheus_config { enable: true, path: \"m\" }").contains("start with"));
        assert!(err("prometheus_config { enable: true, path: \"/readyz\" }").contains("probe"));
        assert!(err("prometheus_config { enable: true, path: \"/v1/x\" }").contains("/v1/"));
        assert!(err("prometheus_config { enabled: true }").starts_with("monitoring.config"));
    }
}
