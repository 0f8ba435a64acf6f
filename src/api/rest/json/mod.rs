//! TF Serving's JSON tensor format (`util/json_tensor.cc`): the body of `:predict` and the
//! answer to it.
//!
//! Requests come in the row format (`"instances"`: one entry per batch element, each an
//! object of named inputs or, for a single input, the value itself) or the columnar format
//! (`"inputs"`: the tensors themselves, an object of named inputs or, for a single input,
//! the value itself), with an optional `"signature_name"`. The answer mirrors the format:
//! `"predictions"` (one entry per batch element; an object per element when there are
//! several outputs) or `"outputs"` (the tensor, or an object of named tensors).
//!
//! Decoding runs in two passes without building a JSON tree: the first reads the top-level
//! keys and keeps the tensors as raw text (checking the syntax of the whole body, so syntax
//! errors carry a line and column); once the signature is known, the second streams each
//! value straight into the little-endian bytes of its input's dtype, checking the shape on
//! the way. Errors name where they broke as a path such as `instances[3].images[0][2]`.
//!
//! Numbers stay exact: an integer is refused where the dtype cannot hold it exactly, and
//! a float is printed as the shortest text that reads back as the same value of its own
//! width (a float32 is not widened to float64 first). NaN and infinities are written as
//! `NaN`, `Infinity` and `-Infinity`, as TF Serving writes them, and read back the same way
//! (see `nonfinite`).
//!
//! Bytes: there are no string tensors in modelgate, so `{"b64": "..."}` stands for the
//! bytes of a DT_UINT8 (or DT_INT8) input along its innermost dimension, and a DT_UINT8
//! output whose name ends in `_bytes` is written back the same way (TF Serving's naming
//! convention for binary outputs).

mod decode;
mod encode;
mod nonfinite;

pub use decode::{decode_tensors, parse_object, PredictBody};
pub use encode::{encode_predict, write_f32, write_f64};
pub use nonfinite::{mark_nonfinite, nonfinite_value};

/// The key of a base64 value.
const B64: &str = "b64";
/// Suffix of the outputs written as base64 (TF Serving's `_bytes` convention).
const BYTES_SUFFIX: &str = "_bytes";

/// Which of the two JSON layouts a request used; the answer uses the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `"instances"` in, `"predictions"` out.
    Row,
    /// `"inputs"` in, `"outputs"` out.
    Columnar,
}
