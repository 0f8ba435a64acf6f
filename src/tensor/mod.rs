//! A protocol-free tensor: dtype, shape and the raw little-endian element bytes.
//!
//! Both APIs decode into this type and the runtime converts it to and from libtorch, so
//! neither side knows about the other's representation.

pub mod limits;

use bytes::Bytes;
use std::fmt;

/// The element types modelgate serves: every dtype that both TF Serving's TensorProto and
/// libtorch can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::I8 | DType::U8 => 1,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// TensorFlow's name, as in `DataType` (`DT_FLOAT`, ...).
    pub fn tf_name(self) -> &'static str {
        match self {
            DType::F16 => "DT_HALF",
            DType::BF16 => "DT_BFLOAT16",
            DType::F32 => "DT_FLOAT",
            DType::F64 => "DT_DOUBLE",
            DType::I8 => "DT_INT8",
            DType::I16 => "DT_INT16",
            DType::I32 => "DT_INT32",
            DType::I64 => "DT_INT64",
            DType::U8 => "DT_UINT8",
            DType::Bool => "DT_BOOL",
        }
    }

    /// numpy's name (`float32`, ...).
    pub fn numpy_name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Parses a TF name (`DT_FLOAT`) or a numpy name (`float32`, also `half`, `float`, `double`).
    pub fn parse(name: &str) -> Option<DType> {
        let found = DType::ALL
            .into_iter()
            .find(|d| d.tf_name() == name || d.numpy_name() == name);
        found.or(match name {
            "half" => Some(DType::F16),
            "float" => Some(DType::F32),
            "double" => Some(DType::F64),
            _ => None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tf_name())
    }
}

/// A dense tensor in row-major order. `data.len() == num_elements(shape) * dtype.size()`
/// holds for every value built through [`Tensor::new`].
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub data: Bytes,
}

/// Why bytes and a shape do not make a tensor.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("shape {0:?} has a negative dimension")]
    NegativeDim(Vec<i64>),
    #[error("shape {0:?} has too many elements")]
    TooLarge(Vec<i64>),
    #[error("{dtype} tensor of shape {shape:?} needs {expected} bytes, got {actual}")]
    ByteLength {
        dtype: DType,
        shape: Vec<i64>,
        expected: usize,
        actual: usize,
    },
    /// libtorch reads any other byte as a bool that is neither true nor false (`x == True`
    /// and `x` disagree), so such bytes never reach a model.
    #[error("DT_BOOL element {index} is the byte {byte}; a bool is the byte 0 or 1")]
    NotABool { index: usize, byte: u8 },
}

/// The number of elements of a shape, checked for negative dims and overflow.
pub fn num_elements(shape: &[i64]) -> Result<usize, TensorError> {
    shape.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d).map_err(|_| TensorError::NegativeDim(shape.to_vec()))?;
        acc.checked_mul(d)
            .ok_or_else(|| TensorError::TooLarge(shape.to_vec()))
    })
}

/// The bytes of a `dtype` tensor of `shape`, checked for negative dims and overflow.
pub fn byte_size(dtype: DType, shape: &[i64]) -> Result<usize, TensorError> {
    num_elements(shape)?
        .checked_mul(dtype.size())
        .ok_or_else(|| TensorError::TooLarge(shape.to_vec()))
}

impl Tensor {
    /// A tensor from raw little-endian bytes, checking that their length fits the shape
    /// (and that bools are 0 or 1).
    pub fn new(dtype: DType, shape: Vec<i64>, data: Bytes) -> Result<Tensor, TensorError> {
        let expected = byte_size(dtype, &shape)?;
        if expected != data.len() {
            return Err(TensorError::ByteLength {
                dtype,
                shape,
                expected,
                actual: data.len(),
            });
        }
        if dtype == DType::Bool {
            if let Some(index) = data.iter().position(|&byte| byte > 1) {
                let byte = data[index];
                return Err(TensorError::NotABool { index, byte });
            }
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// A tensor of zeros (all-zero bytes are zero, `false` or `+0.0` in every dtype).
    pub fn zeros(dtype: DType, shape: Vec<i64>) -> Result<Tensor, TensorError> {
        let len = byte_size(dtype, &shape)?;
        Tensor::new(dtype, shape, Bytes::from(vec![0u8; len]))
    }

    pub fn num_elements(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// Rows along dim 0 (a scalar has none).
    pub fn rows(&self) -> Option<usize> {
        self.shape.first().and_then(|&d| usize::try_from(d).ok())
    }

    /// Bytes per row along dim 0. Checked: with no rows, the other dims are free to
    /// multiply to more than memory (a `[0, 2^58]` tensor holds no bytes at all).
    pub fn row_bytes(&self) -> Result<usize, TensorError> {
        match self.rows() {
            Some(rows) if rows > 0 => Ok(self.data.len() / rows),
            _ => byte_size(self.dtype, self.shape.get(1..).unwrap_or_default()),
        }
    }

    /// Rows `start..start + len` along dim 0, sharing this tensor's bytes; `None` when
    /// they are not all there.
    pub fn slice_rows(&self, start: usize, len: usize) -> Option<Tensor> {
        let rows = self.rows()?;
        let end = start.checked_add(len).filter(|&end| end <= rows)?;
        if self.shape.is_empty() {
            return None;
        }
        let row = self.row_bytes().ok()?;
        let mut shape = self.shape.clone();
        shape[0] = i64::try_from(len).ok()?;
        Some(Tensor {
            dtype: self.dtype,
            shape,
            // In bounds: row * rows == data.len() and end <= rows.
            data: self.data.slice(start * row..end * row),
        })
    }

    /// Concatenates tensors along dim 0. All must share dtype and the other dims.
    pub fn concat_rows(parts: &[&Tensor]) -> Result<Tensor, String> {
        Tensor::concat_rows_padded(parts, 0)
    }

    /// Concatenates tensors along dim 0 and grows the result to `rows` rows (if it has
    /// fewer) by repeating its first row (see [`RowConcat`]). One copy of the data.
    pub fn concat_rows_padded(parts: &[&Tensor], rows: usize) -> Result<Tensor, String> {
        let plan = RowConcat::plan(parts, rows)?;
        let mut data = vec![0u8; plan.bytes];
        plan.write(&mut data);
        Ok(Tensor {
            dtype: plan.dtype,
            shape: plan.shape,
            data: Bytes::from(data),
        })
    }

    /// Builds a tensor from typed values (test and client helper).
    pub fn from_values<T: Element>(shape: Vec<i64>, values: &[T]) -> Result<Tensor, TensorError> {
        let mut data = Vec::with_capacity(values.len() * T::DTYPE.size());
        for v in values {
            v.write_le(&mut data);
        }
        Tensor::new(T::DTYPE, shape, Bytes::from(data))
    }

    /// Reads the elements back as `T`, or `None` when the dtype differs.
    pub fn to_values<T: Element>(&self) -> Option<Vec<T>> {
        (self.dtype == T::DTYPE).then(|| {
            Values::<T> {
                chunks: self.data.chunks_exact(T::DTYPE.size()),
                element: std::marker::PhantomData,
            }
            .collect()
        })
    }
}

/// Tensors concatenated along dim 0 and padded to a number of rows by repeating the first
/// row: a real input, so padding cannot make a model divide by zero where real data would
/// not. Parts without rows are not padded. Every size is checked, so no shape can make it
/// overflow; [`RowConcat::write`] then copies each part once, into whatever memory the
/// caller provides (a `Vec`, or the libtorch tensor a batch runs on).
pub struct RowConcat<'a> {
    parts: &'a [&'a Tensor],
    pub dtype: DType,
    /// The result's shape: the parts' rows (or the padded rows) and their other dims.
    pub shape: Vec<i64>,
    /// The result's bytes.
    pub bytes: usize,
    /// Bytes of one row (0 when there are no rows).
    row: usize,
    /// Bytes the parts hold together.
    joined: usize,
}

impl<'a> RowConcat<'a> {
    /// Checks that `parts` share dtype and trailing dims, and sizes their concatenation
    /// grown to `rows` rows.
    pub fn plan(parts: &'a [&'a Tensor], rows: usize) -> Result<RowConcat<'a>, String> {
        let first = parts.first().ok_or("nothing to concatenate")?;
        // The fields are public: a part whose bytes disagree with its shape would make the
        // staging buffer, sized from these, too small or left unwritten.
        for part in parts {
            if byte_size(part.dtype, &part.shape).ok() != Some(part.data.len()) {
                return Err(format!(
                    "a {} {:?} tensor holds {} bytes",
                    part.dtype,
                    part.shape,
                    part.data.len()
                ));
            }
        }
        if let ([scalar], true) = (parts, first.shape.is_empty()) {
            // A lone scalar (an unbatched input) is its own concatenation.
            return Ok(RowConcat {
                parts,
                dtype: scalar.dtype,
                shape: Vec::new(),
                bytes: scalar.data.len(),
                row: 0,
                joined: scalar.data.len(),
            });
        }
        if first.shape.is_empty() {
            return Err("cannot concatenate scalars".into());
        }
        let mut joined_rows = 0usize;
        let mut joined = 0usize;
        for part in parts {
            if part.dtype != first.dtype || part.shape.get(1..) != first.shape.get(1..) {
                return Err(format!(
                    "cannot concatenate {} {:?} with {} {:?}",
                    first.dtype, first.shape, part.dtype, part.shape
                ));
            }
            joined_rows = joined_rows
                .checked_add(part.rows().unwrap_or(0))
                .ok_or("too many rows to concatenate")?;
            joined = joined
                .checked_add(part.data.len())
                .ok_or("too many bytes to concatenate")?;
        }
        let (target, row) = match joined_rows {
            0 => (0, 0),
            n => (rows.max(n), joined / n),
        };
        let bytes = row
            .checked_mul(target)
            .ok_or_else(|| format!("{target} rows of {:?} overflow", first.shape))?;
        let mut shape = first.shape.clone();
        shape[0] = i64::try_from(target).map_err(|_| "too many rows to concatenate")?;
        Ok(RowConcat {
            parts,
            dtype: first.dtype,
            shape,
            bytes,
            row,
            joined,
        })
    }

    /// Writes the concatenation into `out`, which must be exactly [`RowConcat::bytes`] long.
    pub fn write(&self, out: &mut [u8]) {
        assert_eq!(
            out.len(),
            self.bytes,
            "a RowConcat writes exactly its bytes"
        );
        let mut at = 0;
        for part in self.parts {
            out[at..at + part.data.len()].copy_from_slice(&part.data);
            at += part.data.len();
        }
        let mut filled = self.joined;
        while filled < self.bytes {
            out.copy_within(..self.row, filled);
            filled += self.row;
        }
    }
}

/// A Rust type whose values are elements of a [`Tensor`] of one dtype.
pub trait Element: Copy {
    const DTYPE: DType;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($t:ty, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(bytes);
                <$t>::from_le_bytes(raw)
            }
        }
    };
}

element!(f32, DType::F32);
element!(f64, DType::F64);
element!(i8, DType::I8);
element!(i16, DType::I16);
element!(i32, DType::I32);
element!(i64, DType::I64);
element!(u8, DType::U8);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
    fn read_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(bytes: &[u8]) -> Self {
        half::f16::from_le_bytes([bytes[0], bytes[1]])
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(bytes: &[u8]) -> Self {
        half::bf16::from_le_bytes([bytes[0], bytes[1]])
    }
}

/// The elements of one dtype, read from a tensor's little-endian bytes as they are
/// iterated (nothing is copied first).
#[derive(Clone, Debug)]
pub struct Values<'a, T> {
    chunks: std::slice::ChunksExact<'a, u8>,
    element: std::marker::PhantomData<T>,
}

impl<T: Element> Iterator for Values<'_, T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        self.chunks.next().map(T::read_le)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.chunks.size_hint()
    }
}

impl<T: Element> ExactSizeIterator for Values<'_, T> {}

/// A tensor's elements, typed by its dtype: the one reader of tensor bytes that every
/// encoder (TensorProto, both JSON APIs, request logs, task results) goes through, so that
/// each dtype is read one way everywhere.
#[derive(Clone, Debug)]
pub enum Elements<'a> {
    Bool(Values<'a, bool>),
    U8(Values<'a, u8>),
    I8(Values<'a, i8>),
    I16(Values<'a, i16>),
    I32(Values<'a, i32>),
    I64(Values<'a, i64>),
    F16(Values<'a, half::f16>),
    BF16(Values<'a, half::bf16>),
    F32(Values<'a, f32>),
    F64(Values<'a, f64>),
}

impl<'a> Elements<'a> {
    /// The elements of a float dtype as f32 (halves widen exactly; f64 rounds), or `None`
    /// for the other dtypes.
    pub fn to_f32(self) -> Option<Vec<f32>> {
        Some(match self {
            Elements::F32(values) => values.collect(),
            Elements::F64(values) => values.map(|v| v as f32).collect(),
            Elements::F16(values) => values.map(half::f16::to_f32).collect(),
            Elements::BF16(values) => values.map(half::bf16::to_f32).collect(),
            _ => return None,
        })
    }

    /// The elements of an integer dtype as i64, or `None` for the other dtypes.
    pub fn to_i64(self) -> Option<Vec<i64>> {
        Some(match self {
            Elements::U8(values) => values.map(i64::from).collect(),
            Elements::I8(values) => values.map(i64::from).collect(),
            Elements::I16(values) => values.map(i64::from).collect(),
            Elements::I32(values) => values.map(i64::from).collect(),
            Elements::I64(values) => values.collect(),
            _ => return None,
        })
    }
}

impl Tensor {
    /// The tensor's elements in row-major order. Built through [`Tensor::new`] its bytes
    /// hold exactly its elements; a trailing partial element, which only a tensor built
    /// around that check could have, is not read.
    pub fn elements(&self) -> Elements<'_> {
        fn values<T: Element>(data: &[u8]) -> Values<'_, T> {
            Values {
                chunks: data.chunks_exact(T::DTYPE.size()),
                element: std::marker::PhantomData,
            }
        }
        let data = &self.data[..];
        match self.dtype {
            DType::Bool => Elements::Bool(values(data)),
            DType::U8 => Elements::U8(values(data)),
            DType::I8 => Elements::I8(values(data)),
            DType::I16 => Elements::I16(values(data)),
            DType::I32 => Elements::I32(values(data)),
            DType::I64 => Elements::I64(values(data)),
            DType::F16 => Elements::F16(values(data)),
            DType::BF16 => Elements::BF16(values(data)),
            DType::F32 => Elements::F32(values(data)),
            DType::F64 => Elements::F64(values(data)),
        }
    }
}

/// Why a value a client sent cannot be an element of a dtype.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ElementError {
    #[error("a number out of range for {0}")]
    OutOfRange(DType),
    #[error("an integer that {0} cannot hold exactly")]
    Inexact(DType),
    #[error("{value}, which {dtype} cannot take")]
    NotFinite { value: f64, dtype: DType },
    #[error("a fractional number, which {0} cannot take")]
    Fractional(DType),
    #[error("a number, which a {0} input cannot take (true or false)")]
    NumberForBool(DType),
    #[error("a boolean, which an input of {0} cannot take")]
    BoolForNumber(DType),
}

/// Writes the elements of one dtype from the numbers a client sent (JSON, tf.Examples,
/// typed proto fields), checking each: an integer must fit the dtype exactly (a float
/// dtype included: 2^24 + 1 is no DT_FLOAT), a float must be in range for a float dtype
/// (or whole, for an integer one), booleans only for DT_BOOL. The one checked writer of
/// every decoder, so that every protocol accepts and refuses the same values.
#[derive(Debug)]
pub struct ElementWriter {
    dtype: DType,
    data: Vec<u8>,
}

impl ElementWriter {
    /// A writer for `count` elements, whose bytes the caller has already charged against
    /// the request's budget (see [`limits`]).
    pub fn new(dtype: DType, count: usize) -> ElementWriter {
        ElementWriter {
            dtype,
            data: Vec::with_capacity(count.saturating_mul(dtype.size())),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Elements written so far.
    pub fn len(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn push_int(&mut self, v: i128) -> Result<(), ElementError> {
        let dtype = self.dtype;
        let out_of_range = |_| ElementError::OutOfRange(dtype);
        let data = &mut self.data;
        match dtype {
            DType::I64 => {
                data.extend_from_slice(&i64::try_from(v).map_err(out_of_range)?.to_le_bytes())
            }
            DType::I32 => {
                data.extend_from_slice(&i32::try_from(v).map_err(out_of_range)?.to_le_bytes())
            }
            DType::I16 => {
                data.extend_from_slice(&i16::try_from(v).map_err(out_of_range)?.to_le_bytes())
            }
            DType::I8 => {
                data.extend_from_slice(&i8::try_from(v).map_err(out_of_range)?.to_le_bytes())
            }
            DType::U8 => data.push(u8::try_from(v).map_err(out_of_range)?),
            DType::Bool => return Err(ElementError::NumberForBool(dtype)),
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 => {
                // Compared as i128, so that a cast that saturates cannot look exact.
                let f = v as f64;
                let exact = match dtype {
                    DType::F64 => f as i128 == v,
                    DType::F16 => half::f16::from_f64(f).to_f64() as i128 == v,
                    DType::BF16 => half::bf16::from_f64(f).to_f64() as i128 == v,
                    _ => (f as f32) as i128 == v,
                };
                if !exact {
                    return Err(ElementError::Inexact(dtype));
                }
                self.push_float_unchecked(f);
            }
        }
        Ok(())
    }

    pub fn push_float(&mut self, v: f64) -> Result<(), ElementError> {
        let dtype = self.dtype;
        match dtype {
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 => {
                // Out of range means rounding to infinity: the text of the largest finite
                // value (3.4028235e38) is itself a little above it and must still read back.
                let overflows = match dtype {
                    DType::F64 => false,
                    DType::F16 => half::f16::from_f64(v).is_infinite(),
                    DType::BF16 => half::bf16::from_f64(v).is_infinite(),
                    _ => (v as f32).is_infinite(),
                };
                if v.is_finite() && overflows {
                    return Err(ElementError::OutOfRange(dtype));
                }
                self.push_float_unchecked(v);
                Ok(())
            }
            DType::Bool => Err(ElementError::NumberForBool(dtype)),
            _ if !v.is_finite() => Err(ElementError::NotFinite { value: v, dtype }),
            // A whole number written with a fraction or exponent (2.0, 1e3) is still exact.
            _ if v.fract() == 0.0 && v.abs() < 1.8e19 => self.push_int(v as i128),
            // Whole, but beyond every integer dtype (1e20 for DT_INT64).
            _ if v.fract() == 0.0 => Err(ElementError::OutOfRange(dtype)),
            _ => Err(ElementError::Fractional(dtype)),
        }
    }

    pub fn push_bool(&mut self, v: bool) -> Result<(), ElementError> {
        match self.dtype {
            DType::Bool => {
                self.data.push(u8::from(v));
                Ok(())
            }
            dtype => Err(ElementError::BoolForNumber(dtype)),
        }
    }

    /// Appends raw little-endian element bytes (`{"b64": ...}` values, a tf.Example's
    /// bytes for a DT_UINT8 input); the caller checks the dtype takes them.
    pub fn push_raw(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
    }

    fn push_float_unchecked(&mut self, v: f64) {
        let data = &mut self.data;
        match self.dtype {
            DType::F64 => data.extend_from_slice(&v.to_le_bytes()),
            DType::F16 => data.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            DType::BF16 => data.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            _ => data.extend_from_slice(&(v as f32).to_le_bytes()),
        }
    }

    /// The elements written, as a tensor of `shape` (checked against their number).
    pub fn into_tensor(self, shape: Vec<i64>) -> Result<Tensor, TensorError> {
        Tensor::new(self.dtype, shape, Bytes::from(self.data))
    }
}

/// A tensor's elements as one flat JSON array (serde), in strict JSON: numbers and
/// booleans, halves widened to f32, and `null` for a non-finite float, which JSON cannot
/// hold (serde_json's rule). The encoding of request logs; the REST APIs instead write
/// `NaN` and `Infinity` tokens, as TF Serving and Triton do.
pub struct JsonValues<'a>(pub &'a Tensor);

impl serde::Serialize for JsonValues<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.elements() {
            Elements::Bool(values) => serializer.collect_seq(values),
            Elements::U8(values) => serializer.collect_seq(values),
            Elements::I8(values) => serializer.collect_seq(values),
            Elements::I16(values) => serializer.collect_seq(values),
            Elements::I32(values) => serializer.collect_seq(values),
            Elements::I64(values) => serializer.collect_seq(values),
            Elements::F16(values) => serializer.collect_seq(values.map(half::f16::to_f32)),
            Elements::BF16(values) => serializer.collect_seq(values.map(half::bf16::to_f32)),
            Elements::F32(values) => serializer.collect_seq(values),
            Elements::F64(values) => serializer.collect_seq(values),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_parse_both_ways() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.tf_name()), Some(d));
            assert_eq!(DType::parse(d.numpy_name()), Some(d));
        }
        assert_eq!(DType::parse("DT_STRING"), None);
        assert_eq!(DType::parse("float"), Some(DType::F32));
    }

    #[test]
    fn new_checks_byte_length() {
        let err = Tensor::new(DType::F32, vec![2, 2], Bytes::from(vec![0u8; 12])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "DT_FLOAT tensor of shape [2, 2] needs 16 bytes, got 12"
        );
        assert!(Tensor::new(DType::F32, vec![0, 5], Bytes::new()).is_ok());
        assert!(Tensor::new(DType::Bool, vec![2], Bytes::from_static(&[1, 0])).is_ok());
        assert_eq!(
            Tensor::new(DType::Bool, vec![3], Bytes::from_static(&[1, 0, 2]))
                .unwrap_err()
                .to_string(),
            "DT_BOOL element 2 is the byte 2; a bool is the byte 0 or 1"
        );
        assert!(matches!(
            Tensor::new(DType::F32, vec![-1, 2], Bytes::new()),
            Err(TensorError::NegativeDim(_))
        ));
        assert!(matches!(
            num_elements(&[i64::MAX, i64::MAX]),
            Err(TensorError::TooLarge(_))
        ));
    }

    #[test]
    fn rows_concat_pad_and_slice() {
        let a = Tensor::from_values(vec![2, 2], &[1i32, 2, 3, 4]).unwrap();
        let b = Tensor::from_values(vec![1, 2], &[5i32, 6]).unwrap();
        let ab = Tensor::concat_rows(&[&a, &b]).unwrap();
        assert_eq!(ab.shape, vec![3, 2]);
        assert_eq!(ab.to_values::<i32>().unwrap(), vec![1, 2, 3, 4, 5, 6]);
        let padded = Tensor::concat_rows_padded(&[&a, &b], 5).unwrap();
        assert_eq!(padded.shape, vec![5, 2]);
        assert_eq!(
            padded.to_values::<i32>().unwrap(),
            vec![1, 2, 3, 4, 5, 6, 1, 2, 1, 2]
        );
        assert_eq!(padded.slice_rows(2, 1), Some(b.clone()));
        assert_eq!(padded.slice_rows(0, 2), Some(a.clone()));
        assert_eq!(padded.slice_rows(4, 2), None);
        assert_eq!(padded.slice_rows(usize::MAX, 2), None);
        let other = Tensor::from_values(vec![1, 3], &[0i32, 0, 0]).unwrap();
        assert!(Tensor::concat_rows(&[&a, &other]).is_err());
        let empty = Tensor::from_values(vec![0, 2], &[] as &[i32]).unwrap();
        assert_eq!(Tensor::concat_rows(&[&empty, &b]).unwrap(), b);
        assert_eq!(empty.slice_rows(0, 0).unwrap().shape, vec![0, 2]);
    }

    #[test]
    fn rows_without_bytes_never_overflow() {
        // Zero rows of a huge free dimension: no bytes, and padding must not ask for
        // 2^58 x 4 bytes per row (issue 10, bug 1).
        let huge = (1i64 << 58) - 1;
        let empty = Tensor::new(DType::F32, vec![0, huge], Bytes::new()).unwrap();
        let padded = Tensor::concat_rows_padded(&[&empty, &empty], 16).unwrap();
        assert_eq!(padded.shape, vec![0, huge]);
        assert!(padded.data.is_empty());
        let wider = Tensor::new(DType::F64, vec![0, i64::MAX], Bytes::new()).unwrap();
        assert!(matches!(wider.row_bytes(), Err(TensorError::TooLarge(_))));
        assert_eq!(wider.slice_rows(0, 0), None);
        // Padding that would overflow is refused, not attempted.
        let row = Tensor::from_values(vec![1, 2], &[1i32, 2]).unwrap();
        assert!(Tensor::concat_rows_padded(&[&row], usize::MAX).is_err());
    }

    #[test]
    fn values_round_trip() {
        let t = Tensor::from_values(vec![3], &[1.5f32, -2.0, 0.25]).unwrap();
        assert_eq!(t.to_values::<f32>().unwrap(), vec![1.5, -2.0, 0.25]);
        assert!(t.to_values::<i32>().is_none());
        let b = Tensor::from_values(vec![2], &[true, false]).unwrap();
        assert_eq!(b.to_values::<bool>().unwrap(), vec![true, false]);
    }

    #[test]
    fn a_concatenation_refuses_parts_whose_bytes_disagree_with_their_shape() {
        let good = Tensor::from_values(vec![1, 1], &[1.0f32]).unwrap();
        // The fields are public: nothing stops a caller building these.
        let long = Tensor {
            dtype: DType::F32,
            shape: vec![1, 1],
            data: Bytes::from(vec![0u8; 100]),
        };
        let hollow = Tensor {
            dtype: DType::F32,
            shape: vec![4, 3],
            data: Bytes::new(),
        };
        for bad in [&long, &hollow] {
            let parts = [&good, bad];
            let error = RowConcat::plan(&parts, 0).err().unwrap();
            assert!(error.contains("tensor holds"), "{error}");
        }
        let scalar = Tensor {
            dtype: DType::F32,
            shape: vec![],
            data: Bytes::from(vec![0u8; 8]),
        };
        assert!(RowConcat::plan(&[&scalar], 0).is_err());
        assert_eq!(RowConcat::plan(&[&good, &good], 4).unwrap().bytes, 16);
    }

    #[test]
    fn the_writer_keeps_every_value_exact_or_refuses_it() {
        let write = |dtype, push: &dyn Fn(&mut ElementWriter) -> Result<(), ElementError>| {
            let mut writer = ElementWriter::new(dtype, 1);
            push(&mut writer).map(|()| writer.into_tensor(vec![1]).unwrap())
        };
        let f32_of = |t: Tensor| t.to_values::<f32>().unwrap()[0];
        assert_eq!(
            f32_of(write(DType::F32, &|w| w.push_int(16_777_216)).unwrap()),
            16_777_216.0
        );
        assert_eq!(
            write(DType::F32, &|w| w.push_int(16_777_217)),
            Err(ElementError::Inexact(DType::F32))
        );
        assert_eq!(
            write(DType::F32, &|w| w.push_float(1e39)),
            Err(ElementError::OutOfRange(DType::F32))
        );
        assert!(f32_of(write(DType::F32, &|w| w.push_float(f64::NAN)).unwrap()).is_nan());
        assert_eq!(
            write(DType::U8, &|w| w.push_int(256)),
            Err(ElementError::OutOfRange(DType::U8))
        );
        let i64_of = |t: Tensor| t.to_values::<i64>().unwrap()[0];
        assert_eq!(
            i64_of(write(DType::I64, &|w| w.push_float(1e3)).unwrap()),
            1000
        );
        assert_eq!(
            write(DType::I64, &|w| w.push_float(0.5)),
            Err(ElementError::Fractional(DType::I64))
        );
        assert_eq!(
            write(DType::I64, &|w| w.push_float(1e20)),
            Err(ElementError::OutOfRange(DType::I64)),
            "whole, only too large"
        );
        let nan = write(DType::I64, &|w| w.push_float(f64::NAN)).unwrap_err();
        assert_eq!(nan.to_string(), "NaN, which DT_INT64 cannot take");
        assert_eq!(
            write(DType::Bool, &|w| w.push_int(1)),
            Err(ElementError::NumberForBool(DType::Bool))
        );
        assert_eq!(
            write(DType::I8, &|w| w.push_bool(true)),
            Err(ElementError::BoolForNumber(DType::I8))
        );
        let half = write(DType::BF16, &|w| w.push_int(256)).unwrap();
        assert_eq!(half.to_values::<half::bf16>().unwrap()[0].to_f32(), 256.0);
    }
}
