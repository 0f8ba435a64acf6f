//! Configuration: command-line flags (TF Serving's names), environment, and the protobuf
//! text-format config files.

mod connection;
pub mod env;
mod flags;
mod logging;
mod memory;
mod model_config;
mod monitoring;
mod ssl;
mod text_format;

pub use connection::ConnectionSettings;
pub use env::S3Env;
pub use flags::{parse_args, DeviceFlag, Flags, LogFormat, Redacted, DEFAULT_REST_MAX_BODY_BYTES};
pub use logging::{CollectorSpec, FileFormat, LoggingSpec, Sampling, LOGGED_METHODS};
pub use memory::{parse_size, MemoryBudget};
pub use model_config::{ModelSpec, Platform, VersionPolicy};
pub use monitoring::{prometheus_path, DEFAULT_PROMETHEUS_PATH};
pub use ssl::{tls_server_config, Tls};
pub use text_format::{parse_text_format, ConfigError};

pub use model_config::{model_specs_from_config, parse_model_server_config, single_model_spec};
