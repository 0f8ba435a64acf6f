//! Classify, Regress and MultiInference: tf.Example inputs run through signatures whose
//! `method_name` is classify or regress. Shared by the gRPC and REST APIs (REST turns its
//! JSON examples into the same tf.Example protos first, as TF Serving does).
//!
//! Tasks that call the same TorchScript method on the same inputs share one forward pass,
//! so a MultiInference over a model's classify and regress heads runs the model once.

use super::examples::Examples;
use super::{bad_output, find_signature, name_outputs, Inference};
use crate::error::Error;
use crate::proto::answers::TaskResult;
use crate::proto::serving::{
    Class, ClassificationResult, Classifications, Input, Regression, RegressionResult,
};
use crate::registry::{Servable, VersionSelector};
use crate::request_log;
use crate::runtime::ModelOutput;
use crate::signature::{
    Signature, SignatureKind, CLASSIFY_METHOD_NAME, DEFAULT_SIGNATURE, REGRESS_METHOD_NAME,
};
use crate::tensor::limits::DecodeBudget;
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

pub use crate::signature::{REGRESS_OUTPUT, SCORES_OUTPUT};
/// An optional integer output of a classify signature that gives class ids as labels.
pub const CLASSES_OUTPUT: &str = "classes";

/// What a task asks of its signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    Classify,
    Regress,
}

impl TaskKind {
    /// The kind a MultiInference task's `method_name` names.
    pub fn from_method_name(method_name: &str) -> Result<TaskKind, Error> {
        match method_name {
            CLASSIFY_METHOD_NAME => Ok(TaskKind::Classify),
            REGRESS_METHOD_NAME => Ok(TaskKind::Regress),
            // UNIMPLEMENTED, as TF Serving's MultiInference answers it.
            other => Err(Error::Unimplemented(format!(
                "unsupported method_name '{other}': MultiInference runs {CLASSIFY_METHOD_NAME} \
                 and {REGRESS_METHOD_NAME} tasks"
            ))),
        }
    }
}

/// One task: a signature (empty = `serving_default`) and what to get from it.
#[derive(Clone, Copy, Debug)]
pub struct Task<'a> {
    pub signature: &'a str,
    pub kind: TaskKind,
}

/// The answer to a set of tasks: the version that ran them and one result per task, in
/// order, with the signature name each one resolved to.
#[derive(Debug)]
pub struct TasksAnswer {
    pub model: String,
    pub version: i64,
    pub results: Vec<(String, TaskResult)>,
}

/// Runs `tasks` on the examples of `input`, all on the one version `version` selects.
/// `request_bytes` is the request's size as received: what its tensors may decode to
/// depends on it (see [`crate::tensor::limits`]).
pub async fn run(
    inference: &Inference,
    model: &str,
    version: &VersionSelector,
    tasks: &[Task<'_>],
    input: Option<&Input>,
    request_bytes: usize,
) -> Result<TasksAnswer, Error> {
    let servable = inference.resolve_for_run(model, version, None).await?;
    run_on(inference, &servable, tasks, input, request_bytes).await
}

/// [`run`] on a version already resolved (warm-up replays records on a version that does
/// not serve yet).
pub async fn run_on(
    inference: &Inference,
    servable: &Arc<Servable>,
    tasks: &[Task<'_>],
    input: Option<&Input>,
    request_bytes: usize,
) -> Result<TasksAnswer, Error> {
    request_log::capture_tasks(&servable.model, servable.version, input);
    let examples = Examples::from_input(input)?;
    let mut budget = inference.decode_budget(request_bytes);
    let mut resolved = Vec::with_capacity(tasks.len());
    for task in tasks {
        // TF Serving's Classify and Regress answer an unknown signature INVALID_ARGUMENT
        // (Predict answers FAILED_PRECONDITION).
        let (name, signature) = find_signature(servable, task.signature).map_err(|e| match e {
            Error::FailedPrecondition(message) => Error::InvalidArgument(message),
            other => other,
        })?;
        check_kind(name, signature, task.kind)?;
        resolved.push((name, signature, task.kind));
    }

    // One forward per distinct (method, inputs): tasks over heads of one method share it.
    let mut outputs: Vec<Option<ModelOutput>> = vec![None; resolved.len()];
    for i in 0..resolved.len() {
        if outputs[i].is_some() {
            continue;
        }
        let (name, signature, _) = resolved[i];
        let tensors = examples.tensors_for(name, &signature.inputs, &mut budget)?;
        let output = inference
            .run_method(servable, signature, tensors, None)
            .await?;
        for j in i..resolved.len() {
            let other = resolved[j].1;
            if other.method == signature.method && other.inputs == signature.inputs {
                outputs[j] = Some(output.clone());
            }
        }
    }

    let mut results = Vec::with_capacity(resolved.len());
    for ((name, signature, kind), output) in resolved.into_iter().zip(outputs) {
        let output = output.ok_or_else(|| {
            Error::Internal(format!("signature '{name}' was not run (server bug)"))
        })?;
        let named = name_outputs(servable.id(), name, signature, output)?;
        let result = match kind {
            TaskKind::Classify => {
                charge_classes(&mut budget, name, signature, &named)?;
                classification(name, signature, &named, examples.len())
                    .map(TaskResult::Classification)
            }
            TaskKind::Regress => {
                regression(name, signature, &named, examples.len()).map(TaskResult::Regression)
            }
        }
        .map_err(|message| bad_output(servable.id(), message))?;
        results.push((name.to_string(), result));
    }
    request_log::capture_task_results(&results);
    Ok(TasksAnswer {
        model: servable.model.clone(),
        version: servable.version,
        results,
    })
}

/// A Classify call must use a classify signature and a Regress call a regress one, as in
/// TF Serving (INVALID_ARGUMENT otherwise).
fn check_kind(name: &str, signature: &Signature, kind: TaskKind) -> Result<(), Error> {
    let (wanted, what) = match kind {
        TaskKind::Classify => (SignatureKind::Classify, CLASSIFY_METHOD_NAME),
        TaskKind::Regress => (SignatureKind::Regress, REGRESS_METHOD_NAME),
    };
    if signature.kind == wanted {
        return Ok(());
    }
    let hint = if name == DEFAULT_SIGNATURE {
        " (name the signature to use in model_spec.signature_name)"
    } else {
        ""
    };
    Err(Error::InvalidArgument(format!(
        "signature '{name}' has method_name '{}' but this call needs {what}{hint}",
        signature.method_name
    )))
}

/// The output `preferred`, or the signature's only output.
fn pick_output<'a>(
    name: &str,
    named: &'a [(String, Tensor)],
    preferred: &str,
) -> Result<&'a Tensor, String> {
    match named.iter().find(|(n, _)| n == preferred) {
        Some((_, t)) => Ok(t),
        None if named.len() == 1 => Ok(&named[0].1),
        None => Err(format!(
            "signature '{name}' has no output '{preferred}' and more than one output"
        )),
    }
}

/// The digits of an integer class id, the label of a class without a listed name.
const ID_LABEL_BYTES: usize = 20;

/// A classification answer holds a `Class` and its label for every score: many times the
/// score's 4 bytes, for examples that may cost a client 2 bytes each (a context gives
/// them their features). Charged to the request's budget before it is built, as the
/// tensors it came from were.
fn charge_classes(
    budget: &mut DecodeBudget,
    name: &str,
    signature: &Signature,
    named: &[(String, Tensor)],
) -> Result<(), Error> {
    // An answer without scores is refused when it is built, saying why.
    let Ok(scores) = pick_output(name, named, SCORES_OUTPUT) else {
        return Ok(());
    };
    let label = signature
        .classes
        .iter()
        .flatten()
        .map(String::len)
        .max()
        .unwrap_or(ID_LABEL_BYTES);
    let per_class = std::mem::size_of::<Class>().saturating_add(label);
    let classes = scores.data.len() / scores.dtype.size().max(1);
    budget.charge(
        &format!("the classes of signature '{name}'"),
        classes.saturating_mul(per_class),
    )
}

/// Splits `tensor` into `batch` rows of equal width: shape `[batch]` or `[batch, width]`.
fn rows(name: &str, what: &str, tensor: &Tensor, batch: usize) -> Result<usize, String> {
    let width = match tensor.shape.as_slice() {
        [n] if *n as usize == batch => 1,
        [n, w] if *n as usize == batch => *w as usize,
        shape => {
            return Err(format!(
                "signature '{name}': {what} of shape {shape:?} for {batch} example(s); \
                 expected [{batch}] or [{batch}, N]"
            ))
        }
    };
    Ok(width)
}

fn to_f32(name: &str, what: &str, tensor: &Tensor) -> Result<Vec<f32>, String> {
    tensor.elements().to_f32().ok_or_else(|| {
        format!(
            "signature '{name}': {what} are {}; expected a float dtype",
            tensor.dtype
        )
    })
}

/// Class labels from an integer `classes` output (int32 or int64): the ids as text.
fn class_ids(tensor: &Tensor) -> Option<Vec<String>> {
    matches!(tensor.dtype, DType::I32 | DType::I64)
        .then(|| tensor.elements().to_i64())
        .flatten()
        .map(|ids| ids.iter().map(i64::to_string).collect())
}

fn classification(
    name: &str,
    signature: &Signature,
    named: &[(String, Tensor)],
    batch: usize,
) -> Result<ClassificationResult, String> {
    let scores = pick_output(name, named, SCORES_OUTPUT)?;
    let width = rows(name, "scores", scores, batch)?;
    let values = to_f32(name, "scores", scores)?;
    // Labels: the signature's class list, else an integer `classes` output, else none.
    let ids = named
        .iter()
        .find(|(n, t)| n == CLASSES_OUTPUT && t.shape == scores.shape && !std::ptr::eq(t, scores))
        .and_then(|(_, t)| class_ids(t));
    if let Some(classes) = &signature.classes {
        if classes.len() != width {
            return Err(format!(
                "signature '{name}' lists {} classes but the model returned {width} score(s) \
                 per example",
                classes.len()
            ));
        }
    }
    let label = |row: usize, col: usize| match (&signature.classes, &ids) {
        (Some(classes), _) => classes[col].clone(),
        (None, Some(ids)) => ids[row * width + col].clone(),
        (None, None) => String::new(),
    };
    let classifications = (0..batch)
        .map(|row| Classifications {
            classes: (0..width)
                .map(|col| Class {
                    label: label(row, col),
                    score: values[row * width + col],
                })
                .collect(),
        })
        .collect();
    Ok(ClassificationResult { classifications })
}

fn regression(
    name: &str,
    _signature: &Signature,
    named: &[(String, Tensor)],
    batch: usize,
) -> Result<RegressionResult, String> {
    let outputs = pick_output(name, named, REGRESS_OUTPUT)?;
    let width = rows(name, "regression outputs", outputs, batch)?;
    if width != 1 {
        return Err(format!(
            "signature '{name}': {width} values per example; a regression returns one \
             (shape [N] or [N, 1])"
        ));
    }
    let values = to_f32(name, "regression outputs", outputs)?;
    Ok(RegressionResult {
        regressions: values
            .into_iter()
            .map(|value| Regression { value })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::SignatureMap;

    fn signature(json: &str) -> Signature {
        SignatureMap::from_json(json)
            .unwrap()
            .signatures
            .remove("s")
            .unwrap()
    }

    /// A classify signature whose scores are of the classes "a" and "b".
    fn classify_a_or_b() -> Signature {
        signature(
            r#"{"signatures": {"s": {"method_name": "tensorflow/serving/classify",
                "inputs": [{"name": "x", "dtype": "DT_FLOAT"}],
                "outputs": [{"name": "scores", "dtype": "DT_FLOAT"}], "classes": ["a", "b"]}}}"#,
        )
    }

    #[test]
    fn the_classes_of_an_answer_are_charged_before_they_are_built() {
        let sig = classify_a_or_b();
        let scores = Tensor::from_values(vec![1000, 2], &[0.5f32; 2000]).unwrap();
        let named = [("scores".to_string(), scores)];
        let per_class = std::mem::size_of::<Class>() + 1;
        let mut roomy = DecodeBudget::new(2000 * per_class, 0);
        charge_classes(&mut roomy, "s", &sig, &named).unwrap();
        let mut tight = DecodeBudget::new(2000 * per_class - 1, 0);
        let err = charge_classes(&mut tight, "s", &sig, &named).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("classes")),
            "{err}"
        );
    }

    #[test]
    fn classification_uses_listed_classes_or_id_outputs() {
        let sig = classify_a_or_b();
        let scores = Tensor::from_values(vec![2, 2], &[0.25f32, 0.75, 1.0, 0.0]).unwrap();
        let result = classification("s", &sig, &[("scores".into(), scores.clone())], 2).unwrap();
        let got: Vec<Vec<(String, f32)>> = result
            .classifications
            .iter()
            .map(|c| {
                c.classes
                    .iter()
                    .map(|c| (c.label.clone(), c.score))
                    .collect()
            })
            .collect();
        assert_eq!(
            got,
            vec![
                vec![("a".into(), 0.25), ("b".into(), 0.75)],
                vec![("a".into(), 1.0), ("b".into(), 0.0)]
            ]
        );

        let mut no_classes = sig.clone();
        no_classes.classes = None;
        let ids = Tensor::from_values(vec![2, 2], &[7i64, 8, 9, 10]).unwrap();
        let result = classification(
            "s",
            &no_classes,
            &[("scores".into(), scores.clone()), ("classes".into(), ids)],
            2,
        )
        .unwrap();
        assert_eq!(result.classifications[1].classes[1].label, "10");

        let three = Tensor::from_values(vec![1, 3], &[0f32, 0., 1.]).unwrap();
        let err = classification("s", &sig, &[("scores".into(), three)], 1).unwrap_err();
        assert!(err.to_string().contains("lists 2 classes"), "{err}");
        let err = classification("s", &sig, &[("scores".into(), scores)], 3).unwrap_err();
        assert!(err.to_string().contains("shape [2, 2]"), "{err}");
    }

    #[test]
    fn regression_takes_one_value_per_example() {
        let sig = signature(
            r#"{"signatures": {"s": {"method_name": "tensorflow/serving/regress",
                "inputs": [{"name": "x", "dtype": "DT_FLOAT"}],
                "outputs": [{"name": "y", "dtype": "DT_DOUBLE"}]}}}"#,
        );
        for shape in [vec![2], vec![2, 1]] {
            let y = Tensor::from_values(shape, &[1.5f64, -2.0]).unwrap();
            let result = regression("s", &sig, &[("y".into(), y)], 2).unwrap();
            let values: Vec<f32> = result.regressions.iter().map(|r| r.value).collect();
            assert_eq!(values, vec![1.5, -2.0]);
        }
        let wide = Tensor::from_values(vec![1, 2], &[1f32, 2.]).unwrap();
        assert!(regression("s", &sig, &[("y".into(), wide)], 1).is_err());
        let ints = Tensor::from_values(vec![1], &[1i64]).unwrap();
        assert!(regression("s", &sig, &[("y".into(), ints)], 1).is_err());
    }

    #[test]
    fn kinds_must_match() {
        let sig = signature(
            r#"{"signatures": {"s": {"inputs": [{"name": "x", "dtype": "DT_FLOAT"}],
                "outputs": [{"name": "y", "dtype": "DT_FLOAT"}]}}}"#,
        );
        let err = check_kind("s", &sig, TaskKind::Classify).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("tensorflow/serving/predict"))
        );
        assert!(TaskKind::from_method_name("tensorflow/serving/predict").is_err());
        assert_eq!(
            TaskKind::from_method_name(REGRESS_METHOD_NAME).unwrap(),
            TaskKind::Regress
        );
    }
}
