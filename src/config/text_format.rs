//! Protobuf text format, parsed with a real parser (prost-reflect) against the descriptors
//! compiled into the binary.

use miette::Diagnostic;
use prost_reflect::{DescriptorPool, DynamicMessage};

/// Why a config file was refused. Names the file (or flag) and, for syntax errors, the line.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{what}: {message}")]
    Parse { what: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read {what}: {message}")]
    Read { what: String, message: String },
}

fn pool() -> &'static DescriptorPool {
    crate::proto::descriptor_pool()
}

/// Parses `text` as the text format of message `T`, whose full proto name is `name`
/// (e.g. `tensorflow.serving.ModelServerConfig`). `what` names the source in errors.
pub fn parse_text_format<T>(name: &str, what: &str, text: &str) -> Result<T, ConfigError>
where
    T: prost::Message + Default,
{
    let descriptor = pool()
        .get_message_by_name(name)
        .ok_or_else(|| ConfigError::Invalid(format!("no descriptor for {name}")))?;
    let message =
        DynamicMessage::parse_text_format(descriptor, text).map_err(|e| ConfigError::Parse {
            what: what.to_string(),
            message: with_position(text, &e),
        })?;
    message.transcode_to::<T>().map_err(|e| ConfigError::Parse {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// The parser's message prefixed with `line L, column C` where it points at a place.
fn with_position(text: &str, err: &prost_reflect::text_format::ParseError) -> String {
    let offset = err
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    match offset {
        Some(offset) => {
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {err}")
        }
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::serving::ModelServerConfig;

    #[test]
    fn syntax_errors_name_the_line() {
        let text = "model_config_list {\n  config { name: \"a\" bogus: 1 }\n}";
        let err = parse_text_format::<ModelServerConfig>(
            "tensorflow.serving.ModelServerConfig",
            "models.config",
            text,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("models.config: line 2"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
    }
}
