//! A model's request logging (`ModelConfig.logging_config`), validated: where sampled
//! request/response records go and how often a request is sampled.

use super::text_format::ConfigError;
use crate::proto::serving::LoggingConfig;

/// The request methods that are logged; `per_task_sampling_configs` names them in `dc`.
pub const LOGGED_METHODS: [&str; 4] = ["predict", "classify", "regress", "multi_inference"];

/// Where a model's records are written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CollectorSpec {
    /// One JSON object per line on the process's standard output.
    Stdout,
    /// The same on standard error (where the server's own log lines go too).
    Stderr,
    /// Files named from `prefix`, rotated by size; TFRecord of `PredictionLog` when the
    /// configured prefix ends in `.tfrecord`, else JSON lines.
    File { prefix: String, format: FileFormat },
    /// Batches of JSON lines POSTed to an `http://` URL.
    Http { url: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileFormat {
    JsonLines,
    TfRecord,
}

/// How often requests are logged: a probability per method (TF Serving's `sampling_rate`,
/// overridden per method by `per_task_sampling_configs`).
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// Indexed like [`LOGGED_METHODS`].
    pub rates: [f64; 4],
}

impl Sampling {
    /// The rate of `method` (one of [`LOGGED_METHODS`]); 0 for any other.
    pub fn rate(&self, method: &str) -> f64 {
        LOGGED_METHODS
            .iter()
            .position(|m| *m == method)
            .map_or(0.0, |i| self.rates[i])
    }
}

// Rates compare by bits, so that a config that did not change compares equal.
impl PartialEq for Sampling {
    fn eq(&self, other: &Self) -> bool {
        self.rates.map(f64::to_bits) == other.rates.map(f64::to_bits)
    }
}
impl Eq for Sampling {}

/// A model's validated `logging_config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggingSpec {
    pub collector: CollectorSpec,
    pub sampling: Sampling,
}

/// Validates `config` for model `model`. `None` when the config asks for no logging (no
/// collector type and no positive rate); an error names what is wrong, so a bad config is
/// refused rather than logging silently nowhere.
pub fn logging_spec(
    model: &str,
    config: &LoggingConfig,
) -> Result<Option<LoggingSpec>, ConfigError> {
    let invalid = |message: String| {
        ConfigError::Invalid(format!("model '{model}': logging_config: {message}"))
    };
    let collector_config = config.log_collector_config.clone().unwrap_or_default();
    let sampling_config = config.sampling_config.clone().unwrap_or_default();
    let kind = collector_config.r#type.trim();
    let prefix = collector_config.filename_prefix.trim();

    let check_rate = |what: &str, rate: f64| {
        if (0.0..=1.0).contains(&rate) {
            Ok(rate)
        } else {
            Err(invalid(format!("{what} is {rate}; it must be in [0, 1]")))
        }
    };
    let default_rate = check_rate("sampling_rate", sampling_config.sampling_rate)?;
    let mut rates = [default_rate; 4];
    for task in &sampling_config.per_task_sampling_configs {
        let method = task.dc.trim();
        let index = LOGGED_METHODS
            .iter()
            .position(|m| *m == method)
            .ok_or_else(|| {
                invalid(format!(
                    "per_task_sampling_configs names '{method}' in dc; modelgate's tasks are the \
                 request methods: {}",
                    LOGGED_METHODS.join(", ")
                ))
            })?;
        if task.task_index.is_some() {
            return Err(invalid(format!(
                "per_task_sampling_configs for '{method}' sets task_index, which has no meaning here"
            )));
        }
        rates[index] = check_rate(&format!("sampling_rate of '{method}'"), task.sampling_rate)?;
    }
    if kind.is_empty() {
        if rates.iter().any(|&r| r > 0.0) {
            return Err(invalid(
                "sampling is set but log_collector_config.type is empty; use stdout, stderr, file or http".into(),
            ));
        }
        return Ok(None);
    }

    let collector = match kind {
        "stdout" => CollectorSpec::Stdout,
        "stderr" => CollectorSpec::Stderr,
        "file" => {
            if prefix.is_empty() || prefix.ends_with('/') {
                return Err(invalid(format!(
                    "a file collector needs filename_prefix naming a file path (got '{prefix}')"
                )));
            }
            let format = if prefix.ends_with(".tfrecord") {
                FileFormat::TfRecord
            } else {
                FileFormat::JsonLines
            };
            CollectorSpec::File {
                prefix: prefix.to_string(),
                format,
            }
        }
        "http" => {
            let uri: hyper::Uri = prefix.parse().map_err(|e| {
                invalid(format!(
                    "an http collector takes its URL in filename_prefix: '{prefix}': {e}"
                ))
            })?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(invalid(format!(
                    "an http collector takes an http://host[:port]/path URL in filename_prefix (got '{prefix}')"
                )));
            }
            CollectorSpec::Http {
                url: prefix.to_string(),
            }
        }
        other => {
            return Err(invalid(format!(
                "log_collector_config.type '{other}' is not one of stdout, stderr, file, http"
            )))
        }
    };
    Ok(Some(LoggingSpec {
        collector,
        sampling: Sampling { rates },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_text_format;

    fn spec(text: &str) -> Result<Option<LoggingSpec>, ConfigError> {
        let config: LoggingConfig =
            parse_text_format("tensorflow.serving.LoggingConfig", "test", text).unwrap();
        logging_spec("m", &config)
    }

    #[test]
    fn collectors_and_rates() {
        let s = spec(
            r#"log_collector_config { type: "file" filename_prefix: "/logs/m.tfrecord" }
               sampling_config { sampling_rate: 0.1
                 per_task_sampling_configs { dc: "classify" sampling_rate: 1 } }"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s.collector,
            CollectorSpec::File {
                prefix: "/logs/m.tfrecord".into(),
                format: FileFormat::TfRecord
            }
        );
        assert_eq!(s.sampling.rate("predict"), 0.1);
        assert_eq!(s.sampling.rate("classify"), 1.0);
        assert_eq!(s.sampling.rate("get_model_metadata"), 0.0);
        let s = spec(r#"log_collector_config { type: "stdout" }"#)
            .unwrap()
            .unwrap();
        assert_eq!(s.collector, CollectorSpec::Stdout);
        assert_eq!(s.sampling.rate("predict"), 0.0);
        assert!(spec("").unwrap().is_none());
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (text, needle) in [
            (r#"log_collector_config { type: "kafka" }"#, "'kafka'"),
            (
                r#"log_collector_config { type: "file" }"#,
                "filename_prefix",
            ),
            (
                r#"log_collector_config { type: "http" filename_prefix: "https://x/y" }"#,
                "http://",
            ),
            (
                r#"log_collector_config { type: "stdout" } sampling_config { sampling_rate: 1.5 }"#,
                "[0, 1]",
            ),
            (r#"sampling_config { sampling_rate: 0.5 }"#, "type is empty"),
            (
                r#"log_collector_config { type: "stdout" } sampling_config { per_task_sampling_configs { dc: "eu" sampling_rate: 1 } }"#,
                "'eu'",
            ),
        ] {
            let err = spec(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }
}
