//! Compressed request bodies (`Content-Encoding: gzip` or `deflate`). TF Serving's HTTP
//! server un-gzips request bodies, and Triton's clients send gzip or deflate
//! (`request_compression_algorithm`); both are decoded here, bounded like a plain body.

use crate::error::Error;
use axum::http::{header, HeaderMap};
use std::io::Read;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How a request body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyEncoding {
    Identity,
    Gzip,
    /// HTTP's `deflate`: zlib-wrapped (RFC 9110), as Triton's clients send it.
    Deflate,
}

impl BodyEncoding {
    /// The request's `Content-Encoding`; a coding that cannot be decoded is refused
    /// rather than parsed as if it were plain.
    pub(super) fn of(headers: &HeaderMap) -> Result<BodyEncoding, Error> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(BodyEncoding::Identity);
        };
        let coding = value.to_str().unwrap_or_default().trim();
        match coding.to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(BodyEncoding::Identity),
            "gzip" | "x-gzip" => Ok(BodyEncoding::Gzip),
            "deflate" => Ok(BodyEncoding::Deflate),
            _ => Err(Error::InvalidArgument(format!(
                "Content-Encoding '{}' is not supported: send gzip, deflate or an uncompressed body",
                String::from_utf8_lossy(value.as_bytes())
            ))),
        }
    }
}

/// Decodes `compressed` into at most `limit` bytes, counting what it holds (both copies)
/// in `in_flight` through `held`, as the plain body was counted. Blocking: CPU work of up
/// to `limit` bytes, for a blocking thread.
pub(super) fn decode(
    compressed: &[u8],
    encoding: BodyEncoding,
    limit: usize,
    in_flight: &Arc<Semaphore>,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<Vec<u8>, Error> {
    let (name, mut reader): (&str, Box<dyn Read + '_>) = match encoding {
        BodyEncoding::Identity => return Ok(compressed.to_vec()),
        BodyEncoding::Gzip => (
            "gzip",
            Box::new(flate2::read::MultiGzDecoder::new(compressed)),
        ),
        BodyEncoding::Deflate => (
            "deflate",
            Box::new(flate2::read::ZlibDecoder::new(compressed)),
        ),
    };
    let mut decoded = Vec::new();
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let read = reader.read(&mut buffer).map_err(|e| {
            Error::InvalidArgument(format!("cannot decompress the {name} request body: {e}"))
        })?;
        if read == 0 {
            return Ok(decoded);
        }
        let total = decoded.len().saturating_add(read);
        if total > limit {
            return Err(Error::PayloadTooLarge(format!(
                "the request body is larger than {limit} bytes once decompressed \
                 (--rest_api_max_body_bytes)"
            )));
        }
        if !super::routes::hold(in_flight, held, compressed.len().saturating_add(total)) {
            return Err(super::routes::no_room_error());
        }
        decoded.extend_from_slice(&buffer[..read]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn decodes_within_the_limit_and_counts_what_it_holds() {
        let in_flight = Arc::new(Semaphore::new(1 << 20));
        let body = b"{\"instances\": [[1.0]]}".repeat(100);
        let mut held = None;
        let decoded = decode(
            &gzip(&body),
            BodyEncoding::Gzip,
            1 << 20,
            &in_flight,
            &mut held,
        );
        assert_eq!(decoded.unwrap(), body);
        assert!(held.is_some_and(|p| p.num_permits() > body.len()));

        let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
        zlib.write_all(&body).unwrap();
        let mut held = None;
        let decoded = decode(
            &zlib.finish().unwrap(),
            BodyEncoding::Deflate,
            1 << 20,
            &in_flight,
            &mut held,
        );
        assert_eq!(decoded.unwrap(), body);
    }

    #[test]
    fn a_bomb_stops_at_the_limit_and_garbage_is_named() {
        let in_flight = Arc::new(Semaphore::new(1 << 30));
        // 64 MiB of zeros compress to about 64 KiB.
        let bomb = gzip(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 1 << 20);
        let mut held = None;
        let error = decode(&bomb, BodyEncoding::Gzip, 1 << 20, &in_flight, &mut held).unwrap_err();
        assert!(matches!(error, Error::PayloadTooLarge(_)), "{error}");
        assert!(held.is_none_or(|p| p.num_permits() <= (2 << 20) + bomb.len()));

        let mut held = None;
        let error = decode(
            b"not gzip",
            BodyEncoding::Gzip,
            1 << 20,
            &in_flight,
            &mut held,
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("cannot decompress the gzip request body"),
            "{error}"
        );
    }

    #[test]
    fn unknown_codings_are_refused() {
        let mut headers = HeaderMap::new();
        assert_eq!(BodyEncoding::of(&headers).unwrap(), BodyEncoding::Identity);
        headers.insert(header::CONTENT_ENCODING, "GZIP".parse().unwrap());
        assert_eq!(BodyEncoding::of(&headers).unwrap(), BodyEncoding::Gzip);
        headers.insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        let error = BodyEncoding::of(&headers).unwrap_err().to_string();
        assert!(
            error.contains("Content-Encoding 'br' is not supported"),
            "{error}"
        );
    }
}
