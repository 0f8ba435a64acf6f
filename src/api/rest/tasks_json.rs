//! The JSON of `:classify` and `:regress` (TF Serving's `util/json_tensor.cc`): tf.Example
//! features written as JSON objects in `"examples"`, with an optional `"context"` example
//! and `"signature_name"`; the answer is `"results"`.
//!
//! A feature is a value or a list of values: numbers with a fraction or exponent make a
//! float_list, whole numbers (and true/false) an int64_list, strings and `{"b64": ...}` a
//! bytes_list. Unlike TF Serving, a list mixing whole and fractional numbers is taken as a
//! float_list (when every whole number is exact as a float) instead of being refused.

use super::json::{mark_nonfinite, nonfinite_value, parse_object, write_f32};
use crate::error::Error;
use crate::proto::serving::{
    input, ClassificationResult, ExampleList, ExampleListWithContext, Input, RegressionResult,
};
use crate::proto::tensorflow::{
    feature, BytesList, Example, Feature, Features, FloatList, Int64List,
};
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// A decoded `:classify` or `:regress` body.
#[derive(Debug)]
pub struct TasksRequest {
    /// Empty means `serving_default`.
    pub signature_name: String,
    pub input: Input,
}

/// The body with each example still as text: an example becomes a JSON tree only while it
/// is converted, so that a body of many small examples never holds a tree of them all (a
/// tree node costs tens of times the bytes of the text it parses).
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(default)]
    signature_name: Option<String>,
    #[serde(default)]
    context: Option<Value>,
    #[serde(default, borrow)]
    examples: Option<&'a RawValue>,
}

/// Decodes the body of a `:classify` or `:regress` call (`call` names it in errors).
pub fn parse_request(body: &[u8], call: &str) -> Result<TasksRequest, Error> {
    let marked = mark_nonfinite(body);
    let body: Body = parse_object(&marked)?;
    let invalid = |m: String| Error::InvalidArgument(m);
    let missing = || {
        invalid(format!(
            "When method is {call}, key 'examples' is expected and was not found"
        ))
    };
    let raw = body.examples.ok_or_else(missing)?;
    if raw.get() == "null" {
        return Err(missing());
    }
    let examples: Vec<&RawValue> = serde_json::from_str(raw.get())
        .map_err(|_| invalid("Expecting 'examples' value to be a list/array".into()))?;
    if examples.is_empty() {
        return Err(invalid("'examples' value is an empty array".into()));
    }
    let examples = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let path = format!("examples[{i}]");
            let tree: Value =
                serde_json::from_str(e.get()).map_err(|e| invalid(format!("{path}: {e}")))?;
            example(&path, &tree)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let kind = match body.context {
        None | Some(Value::Null) => input::Kind::ExampleList(ExampleList { examples }),
        Some(context) => input::Kind::ExampleListWithContext(ExampleListWithContext {
            examples,
            context: Some(example("context", &context)?),
        }),
    };
    Ok(TasksRequest {
        signature_name: body.signature_name.unwrap_or_default(),
        input: Input { kind: Some(kind) },
    })
}

fn example(path: &str, value: &Value) -> Result<Example, Error> {
    let Value::Object(features) = value else {
        return Err(Error::InvalidArgument(format!(
            "{path}: an example must be a JSON object of features"
        )));
    };
    let feature = features
        .iter()
        .map(|(name, value)| Ok((name.clone(), feature(&format!("{path}.{name}"), value)?)))
        .collect::<Result<_, Error>>()?;
    Ok(Example {
        features: Some(Features { feature }),
    })
}

/// The values of one feature as they accumulate.
enum Kind {
    None,
    Float(Vec<f32>),
    Int(Vec<i64>),
    Bytes(Vec<Vec<u8>>),
}

fn feature(path: &str, value: &Value) -> Result<Feature, Error> {
    let (values, is_list) = match value {
        Value::Array(values) => (values.as_slice(), true),
        single => (std::slice::from_ref(single), false),
    };
    let mut kind = Kind::None;
    for (i, value) in values.iter().enumerate() {
        add_value(&mut kind, value).map_err(|m| {
            let at = if is_list {
                format!("{path}[{i}]")
            } else {
                path.to_string()
            };
            Error::InvalidArgument(format!("{at}: {m}"))
        })?;
    }
    Ok(Feature {
        kind: match kind {
            Kind::None => None,
            Kind::Float(value) => Some(feature::Kind::FloatList(FloatList { value })),
            Kind::Int(value) => Some(feature::Kind::Int64List(Int64List { value })),
            Kind::Bytes(value) => Some(feature::Kind::BytesList(BytesList { value })),
        },
    })
}

fn add_value(kind: &mut Kind, value: &Value) -> Result<(), String> {
    match value {
        Value::Null => Err("null is not a feature value".into()),
        Value::Array(_) => Err("a feature value cannot be a list (lists do not nest)".into()),
        Value::Bool(b) => add_int(kind, i64::from(*b)),
        Value::String(s) => match nonfinite_value(s) {
            Some(v) => add_float(kind, v as f32),
            None => add_bytes(kind, s.as_bytes().to_vec()),
        },
        Value::Object(map) => match map.get("b64") {
            Some(Value::String(text)) if map.len() == 1 => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| format!("invalid base64: {e}"))?;
                add_bytes(kind, bytes)
            }
            _ => Err("an object that is not {\"b64\": \"...\"} is not a feature value".into()),
        },
        Value::Number(n) if n.is_f64() => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if v.is_finite() && (v as f32).is_infinite() {
                return Err("a number out of the float range".to_string());
            }
            add_float(kind, v as f32)
        }
        Value::Number(n) => match n.as_i64() {
            Some(v) => add_int(kind, v),
            None => Err("an integer above the int64 range (features are int64)".to_string()),
        },
    }
}

fn exact_float(v: i64) -> Result<f32, String> {
    let f = v as f32;
    if f as i128 == i128::from(v) {
        Ok(f)
    } else {
        Err("an integer that a float cannot hold exactly, in a list of floats".into())
    }
}

fn add_float(kind: &mut Kind, v: f32) -> Result<(), String> {
    match kind {
        Kind::None => *kind = Kind::Float(vec![v]),
        Kind::Float(values) => values.push(v),
        Kind::Int(ints) => {
            let mut floats = ints
                .iter()
                .map(|&i| exact_float(i))
                .collect::<Result<Vec<_>, _>>()?;
            floats.push(v);
            *kind = Kind::Float(floats);
        }
        Kind::Bytes(_) => return Err("a number in a feature of bytes (strings)".into()),
    }
    Ok(())
}

fn add_int(kind: &mut Kind, v: i64) -> Result<(), String> {
    match kind {
        Kind::None => *kind = Kind::Int(vec![v]),
        Kind::Int(values) => values.push(v),
        Kind::Float(values) => values.push(exact_float(v)?),
        Kind::Bytes(_) => return Err("a number in a feature of bytes (strings)".into()),
    }
    Ok(())
}

fn add_bytes(kind: &mut Kind, v: Vec<u8>) -> Result<(), String> {
    match kind {
        Kind::None => *kind = Kind::Bytes(vec![v]),
        Kind::Bytes(values) => values.push(v),
        Kind::Float(_) | Kind::Int(_) => return Err("a string in a feature of numbers".into()),
    }
    Ok(())
}

/// `{"results": [[["label", score], ...], ...]}`: one list of (label, score) per example.
pub fn classification_json(result: &ClassificationResult) -> String {
    let mut out = String::from("{\"results\": [");
    for (i, classifications) in result.classifications.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('[');
        for (j, class) in classifications.classes.iter().enumerate() {
            if j > 0 {
                out.push_str(", ");
            }
            out.push('[');
            out.push_str(&serde_json::to_string(&class.label).unwrap_or_default());
            out.push_str(", ");
            let _ = write_f32(&mut out, class.score);
            out.push(']');
        }
        out.push(']');
    }
    out.push_str("]}");
    out
}

/// `{"results": [value, ...]}`: one value per example.
pub fn regression_json(result: &RegressionResult) -> String {
    let mut out = String::from("{\"results\": [");
    for (i, regression) in result.regressions.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write_f32(&mut out, regression.value);
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::serving::{Class, Classifications, Regression};

    fn features(example: &Example) -> &std::collections::HashMap<String, Feature> {
        &example.features.as_ref().unwrap().feature
    }

    #[test]
    fn features_take_the_kind_of_their_values() {
        let request = parse_request(
            br#"{"signature_name": "s", "context": {"c": "text"},
                 "examples": [{"f": [1.5, 2], "i": [1, true], "b": {"b64": "AAE="}, "one": 3.25}]}"#,
            "classify",
        )
        .unwrap();
        assert_eq!(request.signature_name, "s");
        let Some(input::Kind::ExampleListWithContext(list)) = &request.input.kind else {
            panic!("{:?}", request.input)
        };
        let f = features(&list.examples[0]);
        assert_eq!(
            f["f"].kind,
            Some(feature::Kind::FloatList(FloatList {
                value: vec![1.5, 2.0]
            }))
        );
        assert_eq!(
            f["i"].kind,
            Some(feature::Kind::Int64List(Int64List { value: vec![1, 1] }))
        );
        assert_eq!(
            f["b"].kind,
            Some(feature::Kind::BytesList(BytesList {
                value: vec![vec![0, 1]]
            }))
        );
        assert_eq!(
            f["one"].kind,
            Some(feature::Kind::FloatList(FloatList { value: vec![3.25] }))
        );
        let c = features(list.context.as_ref().unwrap());
        assert_eq!(
            c["c"].kind,
            Some(feature::Kind::BytesList(BytesList {
                value: vec![b"text".to_vec()]
            }))
        );
    }

    #[test]
    fn bad_bodies_say_where() {
        for (body, needle) in [
            (r#"{}"#, "key 'examples' is expected"),
            (r#"{"examples": []}"#, "empty array"),
            (r#"{"examples": {}}"#, "list/array"),
            (r#"{"examples": [1]}"#, "examples[0]: an example must be"),
            (
                r#"{"examples": [{"x": [1, "a"]}]}"#,
                "examples[0].x[1]: a string",
            ),
            (r#"{"examples": [{"x": null}]}"#, "examples[0].x: null"),
            (r#"{"examples": [{"x": [[1]]}]}"#, "lists do not nest"),
            (
                r#"{"examples": [{"x": 18446744073709551615}]}"#,
                "int64 range",
            ),
            (
                r#"{"examples": [{"x": [16777217, 0.5]}]}"#,
                "cannot hold exactly",
            ),
            (r#"{"examples": [{"x": 1e39}]}"#, "float range"),
            (r#"{"examples": [{"x": {"b64": "!"}}]}"#, "invalid base64"),
            (
                r#"{"examples": [{}], "context": 3}"#,
                "context: an example must be",
            ),
            (r#"{"examples": [{}],"#, "JSON parse error"),
        ] {
            let err = parse_request(body.as_bytes(), "classify").unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains(needle)),
                "{body}: {err} should contain {needle}"
            );
        }
    }

    #[test]
    fn results_as_tf_serving_writes_them() {
        let result = ClassificationResult {
            classifications: vec![Classifications {
                classes: vec![
                    Class {
                        label: "a\"b".into(),
                        score: 0.1,
                    },
                    Class {
                        label: String::new(),
                        score: 2.0,
                    },
                ],
            }],
        };
        assert_eq!(
            classification_json(&result),
            r#"{"results": [[["a\"b", 0.1], ["", 2.0]]]}"#
        );
        let result = RegressionResult {
            regressions: vec![Regression { value: 1.5 }, Regression { value: -3.0 }],
        };
        assert_eq!(regression_json(&result), r#"{"results": [1.5, -3.0]}"#);
    }
}
