//! The answers of Classify, Regress and MultiInference as TF Serving's protos carry them:
//! shared by the protocols that send them and the request logs that record them.

use crate::proto::serving::{
    inference_result, model_spec, ClassificationResult, InferenceResult, ModelSpec,
    RegressionResult,
};
use crate::proto::{CLASSIFY_METHOD_NAME, REGRESS_METHOD_NAME};

/// The result of one task.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskResult {
    Classification(ClassificationResult),
    Regression(RegressionResult),
}

impl TaskResult {
    /// The `method_name` of the task that gave this result.
    pub fn method_name(&self) -> &'static str {
        match self {
            TaskResult::Classification(_) => CLASSIFY_METHOD_NAME,
            TaskResult::Regression(_) => REGRESS_METHOD_NAME,
        }
    }

    /// The result as one of MultiInference's, run on `version` of `model` with `signature`.
    pub fn into_inference_result(
        self,
        model: &str,
        version: i64,
        signature: &str,
    ) -> InferenceResult {
        InferenceResult {
            model_spec: Some(served_spec(model, version, signature)),
            result: Some(match self {
                TaskResult::Classification(r) => inference_result::Result::ClassificationResult(r),
                TaskResult::Regression(r) => inference_result::Result::RegressionResult(r),
            }),
        }
    }
}

/// The ModelSpec of an answer: the version that actually served, and the signature.
pub fn served_spec(model: &str, version: i64, signature: &str) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        version_choice: Some(model_spec::VersionChoice::Version(version)),
        signature_name: signature.to_string(),
    }
}
