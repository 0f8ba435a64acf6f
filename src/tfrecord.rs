//! TFRecord framing, as TensorFlow writes it: warm-up files are read in it and request logs
//! written in it. Each record is its length (u64, little-endian), the masked CRC-32C of
//! those 8 bytes, the data, and the masked CRC-32C of the data.

/// Why bytes are not TFRecord; `at` is the offset of the record that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TfRecordError {
    #[error("the record at byte {at} is cut short in its {part} (the file is not TFRecord, or truncated)")]
    CutShort { at: usize, part: &'static str },
    #[error("the record at byte {at} fails its {part} checksum")]
    Checksum { at: usize, part: &'static str },
}

/// The records of a TFRecord file, every length and checksum checked.
pub fn records(bytes: &[u8]) -> Result<Vec<&[u8]>, TfRecordError> {
    let mut records = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let at = bytes.len() - rest.len();
        let (length_bytes, tail) = split(rest, 8, at, "record length")?;
        let (length_crc, tail) = split(tail, 4, at, "length checksum")?;
        if masked_crc32c(length_bytes) != le_u32(length_crc) {
            return Err(TfRecordError::Checksum { at, part: "length" });
        }
        let mut length = [0u8; 8];
        length.copy_from_slice(length_bytes);
        let length = usize::try_from(u64::from_le_bytes(length)).unwrap_or(usize::MAX);
        let (data, tail) = split(tail, length, at, "record data")?;
        let (data_crc, tail) = split(tail, 4, at, "data checksum")?;
        if masked_crc32c(data) != le_u32(data_crc) {
            return Err(TfRecordError::Checksum { at, part: "data" });
        }
        records.push(data);
        rest = tail;
    }
    Ok(records)
}

/// The first `n` bytes and the rest, or how the record at `at` is cut short.
fn split<'a>(
    bytes: &'a [u8],
    n: usize,
    at: usize,
    part: &'static str,
) -> Result<(&'a [u8], &'a [u8]), TfRecordError> {
    if bytes.len() < n {
        return Err(TfRecordError::CutShort { at, part });
    }
    Ok(bytes.split_at(n))
}

/// Appends `data` to `out` as one record.
pub fn frame_into(out: &mut Vec<u8>, data: &[u8]) {
    let length = (data.len() as u64).to_le_bytes();
    out.reserve(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

/// `data` as one record.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame_into(&mut out, data);
    out
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    u32::from_le_bytes(word)
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of CRCs stays useful.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32;
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(records: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for record in records {
            frame_into(&mut out, record);
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
    fn a_record_is_its_length_its_checksum_the_data_and_its_checksum() {
        let framed = frame(b"abc");
        assert_eq!(&framed[..8], &3u64.to_le_bytes());
        assert_eq!(
            &framed[8..12],
            &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&framed[12..15], b"abc");
        assert_eq!(&framed[15..], &masked_crc32c(b"abc").to_le_bytes());
    }

    #[test]
    fn records_round_trip_and_every_lie_is_caught() {
        let file = framed(&[b"one", b"", b"three"]);
        assert_eq!(records(&file).unwrap(), vec![&b"one"[..], b"", b"three"]);
        assert_eq!(records(&[]).unwrap(), Vec::<&[u8]>::new());
        assert_eq!(frame(b"one"), framed(&[b"one"]));

        let error = |bytes: &[u8]| records(bytes).unwrap_err().to_string();
        let mut bad_data = file.clone();
        bad_data[12] ^= 1;
        assert!(error(&bad_data).contains("data checksum"));
        let mut bad_length = file.clone();
        bad_length[0] = 200;
        assert!(error(&bad_length).contains("length checksum"));
        assert!(error(&file[..file.len() - 2]).contains("cut short"));
        // A length that claims more than the file, with a valid checksum of its own.
        let huge = u64::MAX.to_le_bytes();
        let mut lying = huge.to_vec();
        lying.extend_from_slice(&masked_crc32c(&huge).to_le_bytes());
        assert!(error(&lying).contains("cut short in its record data"));
    }
}
