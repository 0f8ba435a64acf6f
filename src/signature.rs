//! Model signatures: how named tensors map onto a TorchScript method (`signature.json`).

use crate::tensor::DType;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// TF Serving's signature name when a request names none.
pub const DEFAULT_SIGNATURE: &str = "serving_default";
/// The output a classify signature's scores come from (else its only output).
pub const SCORES_OUTPUT: &str = "scores";
/// The output a regress signature's values come from (else its only output).
pub const REGRESS_OUTPUT: &str = "outputs";

/// The signature a request runs when it names none: an empty name is `serving_default`, as
/// in TF Serving (and V2, which names none unless its `signature_name` parameter does).
pub fn canonical_name(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_SIGNATURE
    } else {
        name
    }
}

pub use crate::proto::{CLASSIFY_METHOD_NAME, PREDICT_METHOD_NAME, REGRESS_METHOD_NAME};

/// One named tensor of a signature. `shape: None` is an unknown rank; `-1` is a free dim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Option<Vec<i64>>,
}

impl TensorSpec {
    /// Whether the first dimension is the batch (a free `-1`).
    pub fn is_batched(&self) -> bool {
        matches!(self.shape.as_deref(), Some([-1, ..]))
    }

    /// Checks a concrete shape against this spec; the error names what differs.
    pub fn check_shape(&self, shape: &[i64]) -> Result<(), String> {
        let Some(expected) = &self.shape else {
            return Ok(());
        };
        let fits = expected.len() == shape.len()
            && expected.iter().zip(shape).all(|(&e, &s)| e == -1 || e == s);
        if fits {
            Ok(())
        } else {
            Err(format!(
                "input '{}' has shape {shape:?} but the signature expects {expected:?} (-1 = any size)",
                self.name
            ))
        }
    }
}

/// What a signature serves, from TF's `method_name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureKind {
    Predict,
    Classify,
    Regress,
}

/// One signature: inputs are passed to `method` positionally in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// TF's method name, e.g. `tensorflow/serving/predict`; returned in metadata.
    pub method_name: String,
    pub kind: SignatureKind,
    /// The TorchScript method to call (shared with every job that calls it).
    pub method: Arc<str>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Class labels of a classify signature.
    pub classes: Option<Vec<String>>,
}

/// Every signature of one model version, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SignatureMap {
    pub signatures: BTreeMap<String, Signature>,
}

/// Why a signature file was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid signature.json: {0}")]
pub struct SignatureError(pub String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJson {
    signatures: BTreeMap<String, SignatureJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureJson {
    #[serde(default)]
    method_name: Option<String>,
    #[serde(default)]
    method: Option<String>,
    inputs: Vec<TensorSpecJson>,
    outputs: Vec<TensorSpecJson>,
    #[serde(default)]
    classes: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorSpecJson {
    name: String,
    dtype: String,
    #[serde(default)]
    shape: Option<Vec<i64>>,
}

impl SignatureMap {
    /// Parses and validates the text of a `signature.json`.
    pub fn from_json(text: &str) -> Result<SignatureMap, SignatureError> {
        let file: FileJson =
            serde_json::from_str(text).map_err(|e| SignatureError(e.to_string()))?;
        if file.signatures.is_empty() {
            return Err(SignatureError("no signatures".into()));
        }
        let mut signatures = BTreeMap::new();
        for (name, sig) in file.signatures {
            let sig = parse_signature(sig).map_err(|e| SignatureError(format!("{name}: {e}")))?;
            signatures.insert(name, sig);
        }
        Ok(SignatureMap { signatures })
    }

    /// Looks a signature up by name, `serving_default` when the name is empty.
    pub fn get(&self, name: &str) -> Option<(&str, &Signature)> {
        self.signatures
            .get_key_value(canonical_name(name))
            .map(|(k, v)| (k.as_str(), v))
    }
}

fn parse_signature(sig: SignatureJson) -> Result<Signature, String> {
    let method_name = sig
        .method_name
        .unwrap_or_else(|| PREDICT_METHOD_NAME.to_string());
    let kind = match method_name.as_str() {
        PREDICT_METHOD_NAME => SignatureKind::Predict,
        CLASSIFY_METHOD_NAME => SignatureKind::Classify,
        REGRESS_METHOD_NAME => SignatureKind::Regress,
        other => return Err(format!("unknown method_name '{other}'")),
    };
    if sig.inputs.is_empty() {
        return Err("no inputs".into());
    }
    if sig.outputs.is_empty() {
        return Err("no outputs".into());
    }
    let inputs = parse_specs(sig.inputs, "input")?;
    let outputs = parse_specs(sig.outputs, "output")?;
    if sig.classes.is_some() && kind != SignatureKind::Classify {
        return Err("'classes' is only for classify signatures".into());
    }
    // Classify and Regress read one output: by its name, or the only one. Without it every
    // such request would fail; say so at load instead.
    let read = match kind {
        SignatureKind::Classify => Some(SCORES_OUTPUT),
        SignatureKind::Regress => Some(REGRESS_OUTPUT),
        SignatureKind::Predict => None,
    };
    if let Some(read) = read {
        if outputs.len() > 1 && !outputs.iter().any(|o| o.name == read) {
            return Err(format!(
                "a {method_name} signature with more than one output must have one named '{read}'"
            ));
        }
    }
    Ok(Signature {
        method_name,
        kind,
        method: Arc::from(sig.method.as_deref().unwrap_or("forward")),
        inputs,
        outputs,
        classes: sig.classes,
    })
}

fn parse_specs(specs: Vec<TensorSpecJson>, what: &str) -> Result<Vec<TensorSpec>, String> {
    let mut seen = HashSet::new();
    specs
        .into_iter()
        .map(|s| {
            if s.name.is_empty() {
                return Err(format!("an {what} has an empty name"));
            }
            if !seen.insert(s.name.clone()) {
                return Err(format!("{what} '{}' is listed twice", s.name));
            }
            let dtype = DType::parse(&s.dtype).ok_or_else(|| {
                format!(
                    "{what} '{}' has dtype '{}', which modelgate does not serve",
                    s.name, s.dtype
                )
            })?;
            if let Some(dim) = s.shape.iter().flatten().find(|&&d| d < -1) {
                return Err(format!("{what} '{}' has invalid dimension {dim}", s.name));
            }
            Ok(TensorSpec {
                name: s.name,
                dtype,
                shape: s.shape,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MLP: &str = r#"{"signatures": {"serving_default": {
        "method_name": "tensorflow/serving/predict", "method": "forward",
        "inputs": [{"name": "x", "dtype": "DT_FLOAT", "shape": [-1, 784]}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [-1, 10]}]}}}"#;

    #[test]
    fn parses_the_documented_example() {
        let map = SignatureMap::from_json(MLP).unwrap();
        let (name, sig) = map.get("").unwrap();
        assert_eq!(name, "serving_default");
        assert_eq!(sig.kind, SignatureKind::Predict);
        assert_eq!(sig.inputs[0].dtype, DType::F32);
        assert!(sig.inputs[0].is_batched());
        assert_eq!(sig.outputs[0].shape, Some(vec![-1, 10]));
    }

    #[test]
    fn shape_check_names_the_input() {
        let map = SignatureMap::from_json(MLP).unwrap();
        let spec = &map.get("").unwrap().1.inputs[0];
        assert!(spec.check_shape(&[3, 784]).is_ok());
        let err = spec.check_shape(&[3, 783]).unwrap_err();
        assert!(err.contains("'x'") && err.contains("[3, 783]"), "{err}");
        assert!(spec.check_shape(&[784]).is_err());
    }

    #[test]
    fn rejects_bad_files() {
        for (text, needle) in [
            ("{", "EOF"),
            (r#"{"signatures": {}}"#, "no signatures"),
            (
                r#"{"signatures": {"s": {"inputs": [{"name": "x", "dtype": "DT_STRING"}], "outputs": [{"name": "y", "dtype": "DT_FLOAT"}]}}}"#,
                "DT_STRING",
            ),
            (
                r#"{"signatures": {"s": {"inputs": [{"name": "x", "dtype": "DT_FLOAT"}, {"name": "x", "dtype": "DT_FLOAT"}], "outputs": [{"name": "y", "dtype": "DT_FLOAT"}]}}}"#,
                "twice",
            ),
            (
                r#"{"signatures": {"s": {"method_name": "nope", "inputs": [{"name": "x", "dtype": "DT_FLOAT"}], "outputs": [{"name": "y", "dtype": "DT_FLOAT"}]}}}"#,
                "unknown method_name",
            ),
            (
                r#"{"signatures": {"s": {"method_name": "tensorflow/serving/classify", "inputs": [{"name": "x", "dtype": "DT_FLOAT"}], "outputs": [{"name": "a", "dtype": "DT_FLOAT"}, {"name": "b", "dtype": "DT_FLOAT"}]}}}"#,
                "must have one named 'scores'",
            ),
            (
                r#"{"signatures": {"s": {"method_name": "tensorflow/serving/regress", "inputs": [{"name": "x", "dtype": "DT_FLOAT"}], "outputs": [{"name": "a", "dtype": "DT_FLOAT"}, {"name": "b", "dtype": "DT_FLOAT"}]}}}"#,
                "must have one named 'outputs'",
            ),
        ] {
            let err = SignatureMap::from_json(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }
}
