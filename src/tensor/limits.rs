//! What one request may make the server allocate. Sizes computed from a client's numbers
//! (shapes, counts, the examples a context is copied into) are charged to a per-request
//! budget *before* anything is allocated, so a request of a hundred bytes cannot make the
//! server build gigabytes: the tensors of one request decode to at most
//! max(`--max_request_tensor_bytes`, 8 x the request's own size) bytes.

use crate::error::Error;

/// 1 GiB: far above any real request's tensors (a batch of 64 224x224 RGB float images is
/// 38 MiB), far below what would hurt a server.
pub const DEFAULT_MAX_REQUEST_TENSOR_BYTES: usize = 1 << 30;

/// What a value sent in full may grow by when decoded: a one-byte varint in `int64_val`
/// becomes an 8-byte int64.
pub const SENT_MULTIPLE: usize = 8;

/// The bytes the tensors of one request may still take.
#[derive(Debug)]
pub struct DecodeBudget {
    limit: usize,
    used: usize,
}

impl DecodeBudget {
    /// A request of `request_bytes` (as received) may decode to `max_tensor_bytes`, or to
    /// [`SENT_MULTIPLE`] times its own size when that is more: a client that sends every
    /// value (in `tensor_content` or the typed fields) never hits the bound, only broadcasts
    /// and contexts copied into many examples do.
    pub fn new(max_tensor_bytes: usize, request_bytes: usize) -> DecodeBudget {
        DecodeBudget {
            limit: max_tensor_bytes.max(request_bytes.saturating_mul(SENT_MULTIPLE)),
            used: 0,
        }
    }

    /// No bound: for tensors the server made itself (tests, answers it decodes).
    pub fn unlimited() -> DecodeBudget {
        DecodeBudget::new(usize::MAX, 0)
    }

    /// Takes `bytes` for `what` (e.g. "input 'x'"), or refuses with INVALID_ARGUMENT: the
    /// request asks for more than one request may have, and sending it again cannot help.
    pub fn charge(&mut self, what: &str, bytes: usize) -> Result<(), Error> {
        match self.used.checked_add(bytes) {
            Some(total) if total <= self.limit => {
                self.used = total;
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "{what} would decode to {bytes} bytes, which with the {} bytes before it is more \
                 than the {} bytes the tensors of one request may take \
                 (--max_request_tensor_bytes)",
                self.used, self.limit
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_adds_up_and_refuses_past_its_limit() {
        let mut budget = DecodeBudget::new(100, 10);
        budget.charge("input 'a'", 60).unwrap();
        let err = budget.charge("input 'b'", 41).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("input 'b' would decode to 41 bytes") && m.contains("60 bytes before")),
            "{err}"
        );
        budget.charge("input 'b'", 40).unwrap();
        assert!(budget.charge("x", usize::MAX).is_err());
        // A request that carried more than the limit may decode to 8 times its own size.
        let mut large = DecodeBudget::new(100, 1000);
        large.charge("input 'a'", 8000).unwrap();
        assert!(large.charge("input 'b'", 1).is_err());
    }
}
