//! How the servers treat each connection: the HTTP/2 settings, keepalive pings and maximum
//! age, and `--grpc_channel_arguments` (TF Serving's `key=value,key=value` gRPC channel
//! arguments), of which the ones with an HTTP/2 equivalent are applied.

use super::text_format::ConfigError;
use std::time::Duration;

/// Streams one HTTP/2 connection may have open at once, unless
/// `grpc.max_concurrent_streams` says otherwise. The RFC's recommended minimum: enough for a
/// client's whole pool of calls on a few connections, while a client that opens thousands of
/// streams on one connection waits for its own streams instead of crowding out others.
const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;

/// gRPC's server defaults: a keepalive ping every two hours, answered within 20 s.
const DEFAULT_KEEPALIVE_TIME: Duration = Duration::from_secs(2 * 60 * 60);
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What a connection gets, on either port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// A ping after this long without one; `None`: never.
    pub keepalive_time: Option<Duration>,
    /// How long an unanswered ping may wait before the connection is closed.
    pub keepalive_timeout: Duration,
    /// After this long a connection is asked to go away (GOAWAY), so that clients
    /// reconnect and load spreads over new replicas; `None`: never.
    pub max_connection_age: Option<Duration>,
    /// How long calls in flight may take once a connection was asked to go away;
    /// `None`: as long as they take.
    pub max_connection_age_grace: Option<Duration>,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_time: Some(DEFAULT_KEEPALIVE_TIME),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_connection_age: None,
            max_connection_age_grace: None,
        }
    }
}

impl ConnectionSettings {
    /// The gRPC port's settings from `--grpc_channel_arguments`, as TF Serving reads them:
    /// comma-separated `key=value` pairs. Keys with an HTTP/2 equivalent are applied, others
    /// are returned as warnings; a bad value for an applied key is an error.
    pub fn from_grpc_channel_arguments(
        text: &str,
    ) -> Result<(ConnectionSettings, Vec<String>), ConfigError> {
        let mut settings = ConnectionSettings::default();
        let mut warnings = Vec::new();
        for argument in text.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let Some((key, value)) = argument.split_once('=') else {
                return Err(invalid(argument, "expected key=value"));
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "grpc.max_concurrent_streams" => {
                    settings.max_concurrent_streams =
                        value
                            .parse()
                            .ok()
                            .filter(|&n: &u32| n > 0)
                            .ok_or_else(|| invalid(argument, "expected a positive integer"))?;
                }
                "grpc.keepalive_time_ms" => settings.keepalive_time = millis(argument, value)?,
                "grpc.keepalive_timeout_ms" => {
                    settings.keepalive_timeout = millis(argument, value)?
                        .ok_or_else(|| invalid(argument, "cannot be infinite"))?;
                }
                "grpc.max_connection_age_ms" => {
                    settings.max_connection_age = millis(argument, value)?
                }
                "grpc.max_connection_age_grace_ms" => {
                    settings.max_connection_age_grace = millis(argument, value)?
                }
                "grpc.max_receive_message_length" | "grpc.max_send_message_length" => warnings
                    .push(format!(
                        "ignoring gRPC channel argument {key}: use --grpc_max_message_bytes"
                    )),
                _ => warnings.push(format!(
                    "ignoring gRPC channel argument {key}: it has no equivalent in modelgate"
                )),
            }
        }
        Ok((settings, warnings))
    }
}

/// A gRPC duration argument in milliseconds: gRPC's INT_MAX (or more) means never.
fn millis(argument: &str, value: &str) -> Result<Option<Duration>, ConfigError> {
    match value.parse::<u64>() {
        Ok(ms) if ms >= i32::MAX as u64 => Ok(None),
        Ok(ms) if ms > 0 => Ok(Some(Duration::from_millis(ms))),
        _ => Err(invalid(
            argument,
            "expected a positive number of milliseconds",
        )),
    }
}

fn invalid(argument: &str, why: &str) -> ConfigError {
    ConfigError::Invalid(format!("--grpc_channel_arguments: '{argument}': {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_what_maps_onto_http2_and_warns_about_the_rest() {
        let (settings, warnings) = ConnectionSettings::from_grpc_channel_arguments(
            "grpc.max_concurrent_streams=8, grpc.keepalive_time_ms=1000,\
             grpc.keepalive_timeout_ms=500,grpc.max_connection_age_ms=2000,\
             grpc.max_connection_age_grace_ms=2147483647,grpc.http2.max_ping_strikes=0,\
             grpc.max_receive_message_length=10",
        )
        .unwrap();
        assert_eq!(
            settings,
            ConnectionSettings {
                max_concurrent_streams: 8,
                keepalive_time: Some(Duration::from_secs(1)),
                keepalive_timeout: Duration::from_millis(500),
                max_connection_age: Some(Duration::from_secs(2)),
                max_connection_age_grace: None,
            }
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("grpc.http2.max_ping_strikes"));
        assert!(warnings[1].contains("--grpc_max_message_bytes"));
    }

    #[test]
    fn empty_means_the_defaults() {
        let (settings, warnings) = ConnectionSettings::from_grpc_channel_arguments("").unwrap();
        assert_eq!(settings, ConnectionSettings::default());
        assert_eq!(settings.max_concurrent_streams, 100);
        assert!(warnings.is_empty());
    }

    #[test]
    fn bad_values_name_the_argument() {
        for text in [
            "grpc.max_concurrent_streams",
            "grpc.max_concurrent_streams=0",
            "grpc.keepalive_time_ms=soon",
            "grpc.max_connection_age_ms=-1",
            "grpc.keepalive_timeout_ms=2147483647",
        ] {
            let err = ConnectionSettings::from_grpc_channel_arguments(text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("--grpc_channel_arguments: '"), "{err}");
            assert!(err.contains(text), "{err}");
        }
    }
}
