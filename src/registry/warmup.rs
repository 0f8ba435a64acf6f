//! Warm-up from recorded requests, as TF Serving does it: the file
//! `<version>/assets.extra/tf_serving_warmup_requests` holds up to 1000 `PredictionLog`
//! records in TFRecord framing, and each is replayed through the normal request path before
//! the version serves. This module reads and checks the file; the replay itself belongs to
//! the API layer, which knows the requests (see [`WarmUpReplay`]).

use super::Servable;
use crate::proto::serving::{prediction_log, PredictionLog};
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
pub type ReplayFn = dyn Fn(Arc<Servable>, &[PredictionLog]) -> Result<(), String> + Send + Sync;

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
    let records = tfrecords(&bytes).map_err(|e| format!("{WARMUP_FILE}: {e}"))?;
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

/// The records of a TFRecord file. Each is framed as its length (u64, little-endian), the
/// masked CRC-32C of those 8 bytes, the data, and the masked CRC-32C of the data; every
/// length and checksum is checked.
pub fn tfrecords(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut records = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let at = bytes.len() - rest.len();
        let (length_bytes, tail) = split(rest, 8, at, "record length")?;
        let (length_crc, tail) = split(tail, 4, at, "length checksum")?;
        if masked_crc32c(length_bytes) != le_u32(length_crc) {
            return Err(format!("the record at byte {at} fails its length checksum"));
        }
        let mut length = [0u8; 8];
        length.copy_from_slice(length_bytes);
        let length = usize::try_from(u64::from_le_bytes(length)).unwrap_or(usize::MAX);
        let (data, tail) = split(tail, length, at, "record data")?;
        let (data_crc, tail) = split(tail, 4, at, "data checksum")?;
        if masked_crc32c(data) != le_u32(data_crc) {
            return Err(format!("the record at byte {at} fails its data checksum"));
        }
        records.push(data);
        rest = tail;
    }
    Ok(records)
}

fn split<'a>(
    bytes: &'a [u8],
    n: usize,
    at: usize,
    what: &str,
) -> Result<(&'a [u8], &'a [u8]), String> {
    if bytes.len() < n {
        return Err(format!(
            "the record at byte {at} is cut short in its {what} (the file is not TFRecord, or truncated)"
        ));
    }
    Ok(bytes.split_at(n))
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    u32::from_le_bytes(word)
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of CRCs stays useful.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32;
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames `records` as TFRecord.
    pub fn framed(records: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for record in records {
            let length = (record.len() as u64).to_le_bytes();
            out.extend_from_slice(&length);
            out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
            out.extend_from_slice(record);
            out.extend_from_slice(&masked_crc32c(record).to_le_bytes());
        }
        out
    }

    #[test]
    fn crc32c_is_the_castagnoli_polynomial() {
        // The check value of CRC-32C ("123456789" -> 0xE3069283), masked as TFRecord does.
        let crc: u32 = 0xE306_9283;
        assert_eq!(
            masked_crc32c(b"123456789"),
            crc.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn records_round_trip_and_every_lie_is_caught() {
        let file = framed(&[b"one", b"", b"three"]);
        assert_eq!(tfrecords(&file).unwrap(), vec![&b"one"[..], b"", b"three"]);
        assert_eq!(tfrecords(&[]).unwrap(), Vec::<&[u8]>::new());

        let mut bad_data = file.clone();
        bad_data[12] ^= 1;
        assert!(tfrecords(&bad_data).unwrap_err().contains("data checksum"));
        let mut bad_length = file.clone();
        bad_length[0] = 200;
        assert!(tfrecords(&bad_length)
            .unwrap_err()
            .contains("length checksum"));
        assert!(tfrecords(&file[..file.len() - 2])
            .unwrap_err()
            .contains("cut short"));
        // A length that claims more than the file, with a valid checksum of its own.
        let huge = u64::MAX.to_le_bytes();
        let mut lying = huge.to_vec();
        lying.extend_from_slice(&masked_crc32c(&huge).to_le_bytes());
        assert!(tfrecords(&lying)
            .unwrap_err()
            .contains("cut short in its record data"));
    }
}
