//! BatchingParameters (TF Serving's text format) resolved into effective options, with TF
//! Serving's defaults where a field is unset.

use crate::config::{parse_text_format, ConfigError};
use crate::proto::serving::BatchingParameters;
use std::time::Duration;

/// The per-model override read from a version directory with
/// `--enable_per_model_batching_parameters`.
pub const BATCHING_PARAMS_FILE: &str = "batching_params.pbtxt";

// TF Serving's defaults (BasicBatchScheduler::Options).
const DEFAULT_MAX_BATCH_SIZE: usize = 1000;
const DEFAULT_MAX_ENQUEUED_BATCHES: usize = 10;

/// Effective batching options of one model version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchingOptions {
    /// Most rows in one executed batch (without splitting, also the most rows a request
    /// may carry).
    pub max_batch_size: usize,
    /// A batch closes once its oldest request has waited this long.
    pub batch_timeout: Duration,
    /// Queue bound, in batches of `max_batch_size` rows; a full queue refuses requests.
    pub max_enqueued_batches: usize,
    /// Threads that run this model's batches, spread over the devices (TF's batch
    /// threads); `None` = the server's `--instances_per_device` on every device.
    pub num_batch_threads: Option<usize>,
    /// Ascending sizes a batch is padded up to; the last equals the execution batch size.
    pub allowed_batch_sizes: Vec<usize>,
    /// Split requests larger than the execution batch size across batches.
    pub enable_large_batch_splitting: bool,
    /// With splitting, the most rows in one executed batch (default `max_batch_size`).
    pub max_execution_batch_size: Option<usize>,
    /// The fewest rows a batch runs with; smaller ones (the tail of a split request) are
    /// padded up to it. Not a TF Serving option: set from an AOTInductor package's export
    /// range by [`BatchingOptions::clamp_to`]; 1 otherwise.
    pub min_batch_rows: usize,
}

impl BatchingOptions {
    /// The batch sizes every worker runs once before the version serves: the allowed sizes
    /// when they are set (no batch runs at any other), else the smallest and the largest
    /// batch. With the profiling executor off (see `runtime::configure_executor`) sizes in
    /// between need no set-up of their own.
    pub fn warm_up_batch_sizes(&self) -> Vec<usize> {
        if !self.allowed_batch_sizes.is_empty() {
            return self.allowed_batch_sizes.clone();
        }
        let largest = match (
            self.enable_large_batch_splitting,
            self.max_execution_batch_size,
        ) {
            (true, Some(execution)) => execution,
            _ => self.max_batch_size,
        };
        let mut sizes = vec![1, largest];
        sizes.dedup();
        sizes
    }

    /// Parses BatchingParameters text; `what` names the file in errors.
    pub fn parse(what: &str, text: &str) -> Result<BatchingOptions, ConfigError> {
        let params: BatchingParameters =
            parse_text_format("tensorflow.serving.BatchingParameters", what, text)?;
        BatchingOptions::from_params(&params)
            .map_err(|e| ConfigError::Invalid(format!("{what}: {e}")))
    }

    /// Applies TF Serving's defaults and checks the values fit together.
    pub fn from_params(params: &BatchingParameters) -> Result<BatchingOptions, String> {
        let positive = |name: &str, value: Option<i64>, default: usize| -> Result<usize, String> {
            match value {
                None => Ok(default),
                Some(v) if v > 0 => usize::try_from(v).map_err(|_| format!("{name} is too large")),
                Some(v) => Err(format!("{name} must be positive, got {v}")),
            }
        };
        let max_batch_size = positive(
            "max_batch_size",
            params.max_batch_size,
            DEFAULT_MAX_BATCH_SIZE,
        )?;
        // Accepted, as TF Serving's files set them, but with no effect here: say so.
        if params.pad_variable_length_inputs {
            tracing::warn!(
                "batching: pad_variable_length_inputs is ignored: requests whose inputs differ \
                 in shape after the batch dimension run in separate batches"
            );
        }
        if params.thread_pool_name.is_some() {
            tracing::warn!(
                "batching: thread_pool_name is ignored: each model version has its own workers"
            );
        }
        let timeout_micros = params.batch_timeout_micros.unwrap_or(0);
        if timeout_micros < 0 {
            return Err(format!(
                "batch_timeout_micros must not be negative, got {timeout_micros}"
            ));
        }
        let max_enqueued_batches = positive(
            "max_enqueued_batches",
            params.max_enqueued_batches,
            DEFAULT_MAX_ENQUEUED_BATCHES,
        )?;
        let num_batch_threads = params
            .num_batch_threads
            .map(|n| positive("num_batch_threads", Some(n), 1))
            .transpose()?;
        let enable_large_batch_splitting = params.enable_large_batch_splitting.unwrap_or(false);
        let max_execution_batch_size = params
            .max_execution_batch_size
            .map(|n| positive("max_execution_batch_size", Some(n), 1))
            .transpose()?;
        if let Some(execution) = max_execution_batch_size.filter(|_| enable_large_batch_splitting) {
            if execution > max_batch_size {
                return Err(format!(
                    "with enable_large_batch_splitting, max_batch_size ({max_batch_size}) bounds \
                     a request and must be at least max_execution_batch_size ({execution}), as in \
                     TF Serving"
                ));
            }
        }
        let options = BatchingOptions {
            max_batch_size,
            batch_timeout: Duration::from_micros(timeout_micros as u64),
            max_enqueued_batches,
            num_batch_threads,
            allowed_batch_sizes: Vec::new(),
            enable_large_batch_splitting,
            max_execution_batch_size,
            min_batch_rows: 1,
        };
        let execution = options.execution_batch_size();
        let mut allowed = Vec::with_capacity(params.allowed_batch_sizes.len());
        for &size in &params.allowed_batch_sizes {
            let size = positive("allowed_batch_sizes entry", Some(size), 1)?;
            if allowed.last().is_some_and(|&last| size <= last) {
                return Err("allowed_batch_sizes must be strictly ascending".into());
            }
            allowed.push(size);
        }
        if allowed.last().is_some_and(|&last| last != execution) {
            return Err(format!(
                "the last of allowed_batch_sizes must equal the batch size ({execution}), as in TF Serving"
            ));
        }
        Ok(BatchingOptions {
            allowed_batch_sizes: allowed,
            ..options
        })
    }

    /// The most rows one executed batch holds.
    pub fn execution_batch_size(&self) -> usize {
        match self.max_execution_batch_size {
            Some(size) if self.enable_large_batch_splitting => size,
            _ => self.max_batch_size,
        }
    }

    /// The rows a batch of `rows` rows runs with, padding included.
    pub fn padded_size(&self, rows: usize) -> usize {
        crate::runtime::padded_size(&self.allowed_batch_sizes, rows)
    }

    /// How many rows may wait in the queue: `max_enqueued_batches` executed batches, as TF
    /// Serving counts it (with splitting, batches of `max_execution_batch_size`).
    pub fn queue_capacity_rows(&self) -> usize {
        self.max_enqueued_batches
            .saturating_mul(self.execution_batch_size())
    }

    /// These options for a model that runs batches of `rows` rows (an AOTInductor
    /// package's export range): a larger execution batch size is clamped to its end,
    /// allowed sizes above it are dropped and it becomes the last; smaller batches are
    /// padded up to its start. Returns what was clamped, for the log, or `None` when the
    /// options already fit.
    pub fn clamp_to(&mut self, rows: &std::ops::RangeInclusive<usize>) -> Option<String> {
        self.min_batch_rows = *rows.start();
        let max_rows = *rows.end();
        let execution = self.execution_batch_size();
        if execution <= max_rows {
            return None;
        }
        let was = format!(
            "max_batch_size {}, max_execution_batch_size {:?}, allowed_batch_sizes {:?}",
            self.max_batch_size, self.max_execution_batch_size, self.allowed_batch_sizes
        );
        match self.max_execution_batch_size {
            Some(_) if self.enable_large_batch_splitting => {
                self.max_execution_batch_size = Some(max_rows)
            }
            _ => self.max_batch_size = max_rows,
        }
        if !self.allowed_batch_sizes.is_empty() {
            self.allowed_batch_sizes.retain(|&size| size < max_rows);
            self.allowed_batch_sizes.push(max_rows);
        }
        Some(format!(
            "{was} clamped to max_batch_size {}, max_execution_batch_size {:?}, \
             allowed_batch_sizes {:?}: the model runs batches of at most {max_rows}",
            self.max_batch_size, self.max_execution_batch_size, self.allowed_batch_sizes
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_take_tf_serving_defaults() {
        let options = BatchingOptions::parse("b", "").unwrap();
        assert_eq!(options.max_batch_size, 1000);
        assert_eq!(options.batch_timeout, Duration::ZERO);
        assert_eq!(options.max_enqueued_batches, 10);
        assert_eq!(options.num_batch_threads, None);
        assert!(!options.enable_large_batch_splitting);
        assert_eq!(options.queue_capacity_rows(), 10_000);
    }

    #[test]
    fn clamping_keeps_tf_servings_rules() {
        let text = "max_batch_size { value: 2048 } allowed_batch_sizes: 8 \
                    allowed_batch_sizes: 1500 allowed_batch_sizes: 2048";
        let mut options = BatchingOptions::parse("t", text).unwrap();
        assert!(options.clamp_to(&(1..=1024)).unwrap().contains("clamped"));
        assert_eq!(options.max_batch_size, 1024);
        assert_eq!(options.allowed_batch_sizes, vec![8, 1024]);
        assert_eq!(options.clamp_to(&(1..=1024)), None);
        let text = "max_batch_size { value: 4096 } enable_large_batch_splitting { value: true } \
                    max_execution_batch_size { value: 2048 }";
        let mut split = BatchingOptions::parse("t", text).unwrap();
        split.clamp_to(&(1..=64)).unwrap();
        assert_eq!(
            (split.max_batch_size, split.execution_batch_size()),
            (4096, 64)
        );
        // The queue holds max_enqueued_batches executed batches, as in TF Serving.
        assert_eq!(split.queue_capacity_rows(), 10 * 64);
    }

    #[test]
    fn parses_tf_serving_text() {
        let text = "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 2000 }\n\
                    max_enqueued_batches { value: 4 }\nnum_batch_threads { value: 2 }\n\
                    allowed_batch_sizes: 2\nallowed_batch_sizes: 4\nallowed_batch_sizes: 8\n\
                    enable_large_batch_splitting { value: true }";
        let options = BatchingOptions::parse("b", text).unwrap();
        assert_eq!(options.max_batch_size, 8);
        assert_eq!(options.batch_timeout, Duration::from_micros(2000));
        assert_eq!(options.num_batch_threads, Some(2));
        assert_eq!(options.allowed_batch_sizes, vec![2, 4, 8]);
        assert!(options.enable_large_batch_splitting);
        assert_eq!(options.execution_batch_size(), 8);
    }

    #[test]
    fn refuses_inconsistent_values() {
        for (text, needle) in [
            ("max_batch_size { value: 0 }", "max_batch_size must be positive"),
            ("max_batch_size { value: 8 } allowed_batch_sizes: 4", "must equal the batch size (8)"),
            ("max_batch_size { value: 8 } allowed_batch_sizes: 4 allowed_batch_sizes: 2 allowed_batch_sizes: 8", "ascending"),
            ("batch_timeout_micros { value: -1 }", "negative"),
            ("max_batch_sise { value: 1 }", "max_batch_sise"),
            ("max_batch_size { value: 8 } enable_large_batch_splitting { value: true } max_execution_batch_size { value: 16 }", "must be at least max_execution_batch_size (16)"),
        ] {
            let err = BatchingOptions::parse("batching.config", text).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("batching.config"), "{err}");
        }
    }
}
