//! The admin API's set-up: its token, the pods a fan-out reaches, and its reload.

use super::models::ModelSource;
use crate::api::admin::{AdminConfig, AdminToken, EndpointsSource, Reload};
use crate::config::{ConfigError, Flags};
use crate::registry::ManagerHandle;
use std::sync::Arc;
use std::time::Duration;

/// Where Kubernetes mounts the pod's namespace with its service-account credentials.
const SERVICE_ACCOUNT_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The admin API's config and its reload, when an admin token is given.
pub(super) fn admin_api(
    flags: &Flags,
    models: &ModelSource,
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
        peers_speak_tls: flags.ssl_config_file.is_some(),
    };
    let models = models.clone();
    let reload: Reload = Arc::new(move || {
        let (models, manager) = (models.clone(), manager.clone());
        Box::pin(async move { models.reload(&manager).await })
    });
    Ok(Some((config, reload)))
}
