//! Warm-up from recorded requests, as TF Serving does it: the file
//! `<version>/assets.extra/tf_serving_warmup_requests` holds up to 1000 `PredictionLog`
//! records in TFRecord framing, and each is replayed through the normal request path before
//! the version serves. This module reads and checks the file; the replay itself belongs to
//! the API layer, which knows the requests (see [`WarmUpReplay`]).

use super::Servable;
use crate::proto::serving::{prediction_log, PredictionLog};
use crate::tfrecord;
use prost::Message;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Where a version keeps its warm-up requests, as in TF Serving.
pub const WARMUP_FILE: &str = "assets.extra/tf_serving_warmup_requests";

/// TF Serving's bound on the records of one warm-up file.
pub const MAX_WARMUP_RECORDS: usize = 1000;

/// Replays a version's warm-up records through the request path, `iterations` times each;
/// the error names the record that failed. Built by the composition root; called on the
/// loading (blocking) thread.
#[derive(Clone)]
pub struct WarmUpReplay {
    pub replay: Arc<ReplayFn>,
}

/// See [`WarmUpReplay`].
pub type ReplayFn =
    dyn Fn(Arc<Servable>, &[PredictionLog]) -> Result<(), ReplayError> + Send + Sync;

/// A warm-up record failed as a request would have: the version does not serve.
#[derive(Debug, thiserror::Error)]
#[error("record {record} failed: {source}")]
pub struct ReplayError {
    /// The record's index in the file.
    pub record: usize,
    pub source: crate::error::Error,
}

impl fmt::Debug for WarmUpReplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WarmUpReplay")
    }
}

/// The warm-up records of the version in `dir`: `None` without a warm-up file. A file that
/// cannot be read, is not TFRecord, fails a checksum, holds more than
/// [`MAX_WARMUP_RECORDS`] or a record that is not a Predict, Classify, Regress or
/// MultiInference log, is an error that names what is wrong.
pub fn read_warm_up(dir: &Path) -> Result<Option<Vec<PredictionLog>>, String> {
    let path = dir.join(WARMUP_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {WARMUP_FILE}: {e}"))?;
    let records = tfrecord::records(&bytes).map_err(|e| format!("{WARMUP_FILE}: {e}"))?;
    if records.len() > MAX_WARMUP_RECORDS {
        return Err(format!(
            "{WARMUP_FILE} holds {} records; at most {MAX_WARMUP_RECORDS} are allowed",
            records.len()
        ));
    }
    records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let log = PredictionLog::decode(*record)
                .map_err(|e| format!("{WARMUP_FILE}: record {i} is not a PredictionLog: {e}"))?;
            match log.log_type {
                Some(
                    prediction_log::LogType::PredictLog(_)
                    | prediction_log::LogType::ClassifyLog(_)
                    | prediction_log::LogType::RegressLog(_)
                    | prediction_log::LogType::MultiInferenceLog(_),
                ) => Ok(log),
                None => Err(format!(
                    "{WARMUP_FILE}: record {i} holds no Predict, Classify, Regress or MultiInference \
                     log (the only kinds modelgate replays)"
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}
