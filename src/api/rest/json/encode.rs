//! Encoding: the outputs of `:predict` as JSON in the request's format.

use super::{Format, BYTES_SUFFIX};
use crate::error::Error;
use crate::tensor::{DType, Element, Elements, Tensor, Values};
use base64::Engine;
use std::fmt::{self, Write};

/// The answer to `:predict` in the request's format.
pub fn encode_predict(format: Format, outputs: &[(String, Tensor)]) -> Result<String, Error> {
    if outputs.is_empty() {
        return Err(Error::Internal("the model returned no outputs".into()));
    }
    let elements: usize = outputs.iter().map(|(_, t)| t.num_elements()).sum();
    let mut out = String::with_capacity(32 + elements * 12);
    match format {
        Format::Row => {
            let mut batch = None;
            for (name, tensor) in outputs {
                let Some(&size) = tensor.shape.first() else {
                    return Err(Error::InvalidArgument(format!(
                        "output '{name}' is a scalar, which the row format cannot split into \
                         predictions; send 'inputs' (columnar format) instead"
                    )));
                };
                match batch {
                    Some(first) if first != size => {
                        return Err(Error::InvalidArgument(format!(
                            "output '{name}' has batch size {size} but the outputs before it \
                             have {first}; send 'inputs' (columnar format) instead"
                        )))
                    }
                    _ => batch = Some(size),
                }
            }
            // One element writer per output, advancing a row each time round.
            let mut writers: Vec<WriteNext<'_>> =
                outputs.iter().map(|(_, t)| element_writer(t)).collect();
            out.push_str("{\"predictions\": [");
            for row in 0..batch.unwrap_or(0) as usize {
                if row > 0 {
                    out.push_str(", ");
                }
                if outputs.len() > 1 {
                    out.push('{');
                }
                for (i, ((name, tensor), next)) in outputs.iter().zip(&mut writers).enumerate() {
                    if outputs.len() > 1 {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        write_key(&mut out, name);
                    }
                    let inner = &tensor.shape[1..];
                    let stride = tensor.data.len() / tensor.shape[0].max(1) as usize;
                    let data = &tensor.data[row * stride..(row + 1) * stride];
                    write_values(&mut out, inner, data, is_bytes_output(name, tensor), next);
                }
                if outputs.len() > 1 {
                    out.push('}');
                }
            }
            out.push_str("]}");
        }
        Format::Columnar => {
            out.push_str("{\"outputs\": ");
            if let [(name, tensor)] = outputs {
                write_tensor(&mut out, name, tensor);
            } else {
                out.push('{');
                for (i, (name, tensor)) in outputs.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_key(&mut out, name);
                    write_tensor(&mut out, name, tensor);
                }
                out.push('}');
            }
            out.push('}');
        }
    }
    Ok(out)
}

fn is_bytes_output(name: &str, tensor: &Tensor) -> bool {
    tensor.dtype == DType::U8 && name.ends_with(BYTES_SUFFIX)
}

fn write_key(out: &mut String, key: &str) {
    write_string(out, key);
    out.push_str(": ");
}

fn write_string(out: &mut String, text: &str) {
    // serde_json's escaping; a &str always serializes.
    out.push_str(&serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into()));
}

fn write_tensor(out: &mut String, name: &str, tensor: &Tensor) {
    let bytes = is_bytes_output(name, tensor);
    let mut next = element_writer(tensor);
    write_values(out, &tensor.shape, &tensor.data, bytes, &mut next);
}

/// Writes the next element of a tensor, in row-major order.
type WriteNext<'a> = Box<dyn FnMut(&mut String) + 'a>;

/// Writes a tensor's elements one by one, as they are read by the tensor codec.
fn element_writer(tensor: &Tensor) -> WriteNext<'_> {
    fn each<'a, T: Element + 'a>(
        mut values: Values<'a, T>,
        write: impl Fn(&mut String, T) -> fmt::Result + 'a,
    ) -> WriteNext<'a> {
        Box::new(move |out| {
            if let Some(value) = values.next() {
                let _ = write(out, value);
            }
        })
    }
    let int = |out: &mut String, v: i64| write!(out, "{v}");
    match tensor.elements() {
        Elements::F32(values) => each(values, write_f32),
        Elements::F64(values) => each(values, write_f64),
        Elements::F16(values) => each(values, |out, v| write_f32(out, v.to_f32())),
        Elements::BF16(values) => each(values, |out, v| write_f32(out, v.to_f32())),
        Elements::I64(values) => each(values, int),
        Elements::I32(values) => each(values, move |out, v| int(out, v.into())),
        Elements::I16(values) => each(values, move |out, v| int(out, v.into())),
        Elements::I8(values) => each(values, move |out, v| int(out, v.into())),
        Elements::U8(values) => each(values, move |out, v| int(out, v.into())),
        Elements::Bool(values) => each(values, |out, v| write!(out, "{v}")),
    }
}

/// Writes the elements of `shape` as nested lists (a scalar as a bare value), each from
/// `next`; with `bytes`, each innermost row is instead its `data` in `{"b64": ...}`.
fn write_values(
    out: &mut String,
    shape: &[i64],
    data: &[u8],
    bytes: bool,
    next: &mut WriteNext<'_>,
) {
    match shape {
        [] => next(out),
        [_] if bytes => {
            out.push_str("{\"b64\": \"");
            base64::engine::general_purpose::STANDARD.encode_string(data, out);
            out.push_str("\"}");
        }
        [len, inner @ ..] => {
            out.push('[');
            let len = (*len).max(0) as usize;
            let stride = data.len().checked_div(len).unwrap_or(0);
            for i in 0..len {
                if i > 0 {
                    out.push_str(", ");
                }
                write_values(out, inner, &data[i * stride..(i + 1) * stride], bytes, next);
            }
            out.push(']');
        }
    }
}

/// The shortest text that reads back as the same f32 (Rust's `{:?}` for floats), with
/// TF Serving's spellings of NaN and the infinities.
pub fn write_f32(out: &mut String, v: f32) -> fmt::Result {
    if v.is_finite() {
        write!(out, "{v:?}")
    } else {
        out.push_str(non_finite(v.is_nan(), v.is_sign_negative()));
        Ok(())
    }
}

pub fn write_f64(out: &mut String, v: f64) -> fmt::Result {
    if v.is_finite() {
        write!(out, "{v:?}")
    } else {
        out.push_str(non_finite(v.is_nan(), v.is_sign_negative()));
        Ok(())
    }
}

fn non_finite(nan: bool, negative: bool) -> &'static str {
    match (nan, negative) {
        (true, _) => "NaN",
        (false, true) => "-Infinity",
        (false, false) => "Infinity",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn tensor<T: crate::tensor::Element>(shape: Vec<i64>, values: &[T]) -> Tensor {
        Tensor::from_values(shape, values).unwrap()
    }

    #[test]
    fn row_answers_split_the_batch() {
        let y = tensor(vec![2, 2], &[1f32, 0.1, -0.0, 3e-7]);
        let text = encode_predict(Format::Row, &[("y".into(), y.clone())]).unwrap();
        assert_eq!(text, r#"{"predictions": [[1.0, 0.1], [-0.0, 3e-7]]}"#);
        let n = tensor(vec![2], &[7i64, -8]);
        let text = encode_predict(Format::Row, &[("y".into(), y), ("n".into(), n)]).unwrap();
        assert_eq!(
            text,
            r#"{"predictions": [{"y": [1.0, 0.1], "n": 7}, {"y": [-0.0, 3e-7], "n": -8}]}"#
        );
        let ragged = [
            ("a".into(), tensor(vec![2], &[1i32, 2])),
            ("b".into(), tensor(vec![3], &[1i32, 2, 3])),
        ];
        assert!(encode_predict(Format::Row, &ragged).is_err());
        let scalar = [("a".into(), tensor(vec![], &[1i32]))];
        assert!(encode_predict(Format::Row, &scalar).is_err());
    }

    #[test]
    fn columnar_answers_and_special_values() {
        let y = tensor(vec![3], &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        let text = encode_predict(Format::Columnar, &[("y".into(), y)]).unwrap();
        assert_eq!(text, r#"{"outputs": [NaN, Infinity, -Infinity]}"#);
        let outputs = [
            ("flag".to_string(), tensor(vec![], &[true])),
            ("img_bytes".to_string(), tensor(vec![1, 2], &[255u8, 0])),
            ("d".to_string(), tensor(vec![1], &[0.1f64])),
        ];
        let text = encode_predict(Format::Columnar, &outputs).unwrap();
        assert_eq!(
            text,
            r#"{"outputs": {"flag": true, "img_bytes": [{"b64": "/wA="}], "d": [0.1]}}"#
        );
        let half = Tensor::new(DType::F16, vec![1], Bytes::from_static(&[0x00, 0x3e])).unwrap();
        let text = encode_predict(Format::Columnar, &[("h".into(), half)]).unwrap();
        assert_eq!(text, r#"{"outputs": [1.5]}"#);
    }

    #[test]
    fn float32_text_round_trips() {
        for v in [
            0.1f32,
            1.0 / 3.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
            16777217.0,
            -2.5e-8,
        ] {
            let mut s = String::new();
            write_f32(&mut s, v).unwrap();
            let back: f64 = serde_json::from_str(&s).unwrap();
            assert_eq!(back as f32, v, "{s}");
        }
    }
}
