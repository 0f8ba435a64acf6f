//! TensorProto <-> [`Tensor`]: how TensorFlow's protos carry tensors (requests of TF
//! Serving's gRPC API, warm-up records, request logs). No protocol logic: every path that
//! meets a TensorProto converts it here.

use crate::error::Error;
use crate::proto::tensorflow::{tensor_shape_proto, DataType, TensorProto, TensorShapeProto};
use crate::tensor::limits::DecodeBudget;
use crate::tensor::{byte_size, DType, ElementError, ElementWriter, Elements, Tensor};

pub fn dtype_to_proto(dtype: DType) -> DataType {
    match dtype {
        DType::F16 => DataType::DtHalf,
        DType::BF16 => DataType::DtBfloat16,
        DType::F32 => DataType::DtFloat,
        DType::F64 => DataType::DtDouble,
        DType::I8 => DataType::DtInt8,
        DType::I16 => DataType::DtInt16,
        DType::I32 => DataType::DtInt32,
        DType::I64 => DataType::DtInt64,
        DType::U8 => DataType::DtUint8,
        DType::Bool => DataType::DtBool,
    }
}

fn dtype_from_proto(input: &str, code: i32) -> Result<DType, Error> {
    let data_type = DataType::try_from(code)
        .map_err(|_| Error::InvalidArgument(format!("input '{input}' has unknown dtype {code}")))?;
    DType::ALL
        .into_iter()
        .find(|&d| dtype_to_proto(d) == data_type)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "input '{input}' has dtype {}, which modelgate does not serve (it serves {})",
                data_type.as_str_name(),
                DType::ALL.map(DType::tf_name).join(", ")
            ))
        })
}

/// The dtype and shape a request tensor declares, read without touching its values, so
/// that they can be checked against the signature before anything is decoded.
pub fn declared_type(input: &str, proto: &TensorProto) -> Result<(DType, Vec<i64>), Error> {
    let dtype = dtype_from_proto(input, proto.dtype)?;
    let shape = match &proto.tensor_shape {
        None => Vec::new(),
        Some(shape) if shape.unknown_rank => {
            return Err(Error::InvalidArgument(format!(
                "input '{input}': shape has unknown rank"
            )))
        }
        Some(shape) => dims(shape),
    };
    Ok((dtype, shape))
}

/// Decodes a request tensor: [`declared_type`], then [`tensor_values`].
pub fn tensor_from_proto(
    input: &str,
    proto: &TensorProto,
    budget: &mut DecodeBudget,
) -> Result<Tensor, Error> {
    let (dtype, shape) = declared_type(input, proto)?;
    tensor_values(input, proto, dtype, shape, budget)
}

/// Decodes the values of a request tensor whose declared type is `dtype` and `shape`.
/// Values come from `tensor_content` or from the typed field of the dtype; as in
/// TensorFlow, a single typed value is broadcast to the whole shape. The tensor's bytes are
/// charged to `budget` before they are allocated, so a tiny request cannot ask for a huge
/// broadcast.
pub fn tensor_values(
    input: &str,
    proto: &TensorProto,
    dtype: DType,
    shape: Vec<i64>,
    budget: &mut DecodeBudget,
) -> Result<Tensor, Error> {
    let invalid = |message: String| Error::InvalidArgument(format!("input '{input}': {message}"));
    let byte_len = byte_size(dtype, &shape).map_err(|e| invalid(e.to_string()))?;
    let count = byte_len / dtype.size();
    budget.charge(&format!("input '{input}' of shape {shape:?}"), byte_len)?;

    if !proto.tensor_content.is_empty() {
        if proto.tensor_content.len() != byte_len {
            return Err(invalid(format!(
                "tensor_content has {} bytes but a {dtype} tensor of shape {shape:?} needs {byte_len}",
                proto.tensor_content.len()
            )));
        }
        return Tensor::new(dtype, shape, proto.tensor_content.clone())
            .map_err(|e| invalid(e.to_string()));
    }

    let found = |n: usize| {
        invalid(format!(
            "{n} {} value(s) for shape {shape:?}, which needs {count} (or 1 to broadcast)",
            typed_field(dtype)
        ))
    };
    let checked = |e: ElementError| invalid(format!("{}: {e}", typed_field(dtype)));
    let mut out = ElementWriter::new(dtype, count);
    match dtype {
        // Every f32 is a DT_FLOAT element: its bits go in as they are (a NaN's payload too).
        DType::F32 => pack(&proto.float_val, count, &mut out, |w, v| {
            w.push_raw(&v.to_le_bytes());
            Ok(())
        }),
        DType::F64 => pack(
            &proto.double_val,
            count,
            &mut out,
            ElementWriter::push_float,
        ),
        DType::I64 => pack(&proto.int64_val, count, &mut out, |w, v| {
            w.push_int(v.into())
        }),
        // TensorFlow keeps the narrow integer types in int_val; a value the dtype cannot
        // hold is refused rather than wrapped.
        DType::I32 | DType::I16 | DType::I8 | DType::U8 => {
            pack(&proto.int_val, count, &mut out, |w, v| w.push_int(v.into()))
        }
        DType::Bool => pack(&proto.bool_val, count, &mut out, ElementWriter::push_bool),
        // half_val holds the 16-bit pattern of each half or bfloat16 value, unsigned or
        // sign-extended (as clients that read it as an int16 write it).
        DType::F16 | DType::BF16 => pack(&proto.half_val, count, &mut out, |w, v| {
            if !(-32768..=65535).contains(&v) {
                return Err(ElementError::OutOfRange(dtype));
            }
            w.push_raw(&(v as u16).to_le_bytes());
            Ok(())
        }),
    }
    .map_err(|e| match e {
        PackError::Count(n) => found(n),
        PackError::Element(e) => checked(e),
    })?;
    out.into_tensor(shape).map_err(|e| invalid(e.to_string()))
}

/// Why typed values do not make the tensor.
enum PackError {
    /// This many values, neither the shape's count nor one to broadcast.
    Count(usize),
    Element(ElementError),
}

/// Writes `count` elements from typed values: all of them, or one value repeated. The
/// count is checked before anything is written; what is reserved is the output's size
/// (the caller charged it), not the wider protobuf field's.
fn pack<T: Copy>(
    values: &[T],
    count: usize,
    out: &mut ElementWriter,
    push: impl Fn(&mut ElementWriter, T) -> Result<(), ElementError>,
) -> Result<(), PackError> {
    if values.len() != count && values.len() != 1 {
        return Err(PackError::Count(values.len()));
    }
    match values {
        [single] if count != 1 => (0..count).try_for_each(|_| push(out, *single)),
        _ => values.iter().try_for_each(|&v| push(out, v)),
    }
    .map_err(PackError::Element)
}

fn typed_field(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float_val",
        DType::F64 => "double_val",
        DType::I64 => "int64_val",
        DType::I32 | DType::I16 | DType::I8 | DType::U8 => "int_val",
        DType::Bool => "bool_val",
        DType::F16 | DType::BF16 => "half_val",
    }
}

/// Encodes a response tensor: typed fields like TF Serving, or `tensor_content` when
/// `as_content` (`--enable_serialization_as_tensor_content`).
pub fn tensor_to_proto(tensor: &Tensor, as_content: bool) -> TensorProto {
    let mut proto = TensorProto {
        dtype: dtype_to_proto(tensor.dtype) as i32,
        tensor_shape: Some(shape_proto(Some(&tensor.shape))),
        ..Default::default()
    };
    if as_content {
        proto.tensor_content = tensor.data.clone();
        return proto;
    }
    // TensorFlow keeps the narrow integer types in int_val, and halves as their bits.
    match tensor.elements() {
        Elements::F32(values) => proto.float_val = values.collect(),
        Elements::F64(values) => proto.double_val = values.collect(),
        Elements::I64(values) => proto.int64_val = values.collect(),
        Elements::I32(values) => proto.int_val = values.collect(),
        Elements::I16(values) => proto.int_val = values.map(i32::from).collect(),
        Elements::I8(values) => proto.int_val = values.map(i32::from).collect(),
        Elements::U8(values) => proto.int_val = values.map(i32::from).collect(),
        Elements::Bool(values) => proto.bool_val = values.collect(),
        Elements::F16(values) => proto.half_val = values.map(|v| i32::from(v.to_bits())).collect(),
        Elements::BF16(values) => proto.half_val = values.map(|v| i32::from(v.to_bits())).collect(),
    }
    proto
}

/// The dimension sizes of a TensorShapeProto.
pub fn dims(shape: &TensorShapeProto) -> Vec<i64> {
    shape.dim.iter().map(|d| d.size).collect()
}

/// A TensorShapeProto; `None` is an unknown rank, `-1` an unknown dimension.
pub fn shape_proto(shape: Option<&[i64]>) -> TensorShapeProto {
    match shape {
        None => TensorShapeProto {
            unknown_rank: true,
            ..Default::default()
        },
        Some(dims) => TensorShapeProto {
            dim: dims
                .iter()
                .map(|&size| tensor_shape_proto::Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const LIMIT: usize = 1 << 20;

    fn tensor_from_proto(input: &str, proto: &TensorProto, limit: usize) -> Result<Tensor, Error> {
        super::tensor_from_proto(input, proto, &mut DecodeBudget::new(limit, 0))
    }

    fn proto(dtype: DataType, shape: &[i64]) -> TensorProto {
        TensorProto {
            dtype: dtype as i32,
            tensor_shape: Some(shape_proto(Some(shape))),
            ..Default::default()
        }
    }

    #[test]
    fn every_dtype_round_trips_through_typed_fields_and_content() {
        for dtype in DType::ALL {
            let data: Vec<u8> = (0..6 * dtype.size())
                .map(|i| (i * 37 % 2) as u8 + (i % 3 == 0) as u8)
                .collect();
            let data = if dtype == DType::Bool {
                data.iter().map(|b| b % 2).collect()
            } else {
                data
            };
            let tensor = Tensor::new(dtype, vec![2, 3], Bytes::from(data)).unwrap();
            for as_content in [false, true] {
                let encoded = tensor_to_proto(&tensor, as_content);
                assert_eq!(encoded.tensor_content.is_empty(), !as_content);
                assert_eq!(
                    tensor_from_proto("x", &encoded, LIMIT).unwrap(),
                    tensor,
                    "{dtype} content={as_content}"
                );
            }
        }
    }

    #[test]
    fn narrow_integers_and_halves_use_tf_fields() {
        let t = Tensor::from_values(vec![3], &[-1i8, 0, 127]).unwrap();
        assert_eq!(tensor_to_proto(&t, false).int_val, vec![-1, 0, 127]);
        let u = Tensor::from_values(vec![2], &[255u8, 1]).unwrap();
        assert_eq!(tensor_to_proto(&u, false).int_val, vec![255, 1]);
        let mut half = proto(DataType::DtHalf, &[2]);
        half.half_val = vec![0x3c00, 0xc000]; // 1.0, -2.0
        let decoded = tensor_from_proto("h", &half, LIMIT).unwrap();
        assert_eq!(&decoded.data[..], &[0x00, 0x3c, 0x00, 0xc0]);
        // The same bits sign-extended, as clients that read half_val as int16 send them.
        half.half_val = vec![0x3c00, -16384];
        let decoded = tensor_from_proto("h", &half, LIMIT).unwrap();
        assert_eq!(&decoded.data[..], &[0x00, 0x3c, 0x00, 0xc0]);
        half.half_val = vec![0x3c00, 65536];
        assert!(tensor_from_proto("h", &half, LIMIT).is_err());
    }

    #[test]
    fn a_single_value_broadcasts() {
        let mut p = proto(DataType::DtFloat, &[2, 2]);
        p.float_val = vec![7.0];
        let t = tensor_from_proto("x", &p, LIMIT).unwrap();
        assert_eq!(t.to_values::<f32>().unwrap(), vec![7.0; 4]);
        let mut scalar = proto(DataType::DtInt64, &[]);
        scalar.int64_val = vec![3];
        assert_eq!(
            tensor_from_proto("s", &scalar, LIMIT).unwrap().shape,
            Vec::<i64>::new()
        );
    }

    #[test]
    fn bad_tensors_name_the_input() {
        let check = |p: TensorProto, needle: &str| {
            let err = tensor_from_proto("pixels", &p, LIMIT).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains("'pixels'") && m.contains(needle)),
                "{err}"
            );
        };
        let mut few = proto(DataType::DtFloat, &[3]);
        few.float_val = vec![1.0, 2.0];
        check(few, "2 float_val value(s)");
        let mut wrong_field = proto(DataType::DtFloat, &[1]);
        wrong_field.int_val = vec![1];
        check(wrong_field, "0 float_val");
        let mut content = proto(DataType::DtFloat, &[2, 2]);
        content.tensor_content = Bytes::from_static(&[0; 12]);
        check(content, "tensor_content has 12 bytes");
        check(proto(DataType::DtString, &[1]), "DT_STRING");
        check(
            TensorProto {
                dtype: 999,
                ..Default::default()
            },
            "unknown dtype 999",
        );
        check(proto(DataType::DtFloat, &[-1, 2]), "negative");
        let mut huge = proto(DataType::DtFloat, &[1 << 20, 1 << 20]);
        huge.float_val = vec![1.0];
        check(huge, "max_request_tensor_bytes");
        // Narrow types are charged their own size: 2^20 int8 values fit a 1 MiB budget,
        // 2^20 + 1 do not (nothing is reserved at the int_val width before refusing).
        let mut bytes = proto(DataType::DtInt8, &[1 << 20]);
        bytes.int_val = vec![3];
        assert_eq!(
            tensor_from_proto("b", &bytes, LIMIT).unwrap().data.len(),
            LIMIT
        );
        let mut over = proto(DataType::DtInt8, &[(1 << 20) + 1]);
        over.int_val = vec![3];
        check(over, "max_request_tensor_bytes");
        let unknown = TensorProto {
            dtype: DataType::DtFloat as i32,
            tensor_shape: Some(shape_proto(None)),
            ..Default::default()
        };
        check(unknown, "unknown rank");
    }
}
