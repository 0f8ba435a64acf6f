//! Replaying a version's recorded warm-up requests (`assets.extra/tf_serving_warmup_requests`,
//! read and checked by the registry) through the same request path as clients' calls:
//! Predict through [`Inference::predict_on`], Classify, Regress and MultiInference through
//! [`tasks::run_on`], on the version being loaded, before it serves. The responses are
//! dropped; a record that fails fails the load, as in TF Serving.

use super::tasks::{self, Task, TaskKind};
use super::{Inference, PredictRequest};
use crate::error::Error;
use crate::proto::serving::prediction_log::LogType;
use crate::proto::serving::{Input, ModelSpec, PredictionLog};
use crate::proto::tensor::tensor_from_proto;
use crate::registry::{ReplayError, Servable, WarmUpReplay};
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;

/// The replay the loader calls: every record `iterations` times (0 means once, as TF
/// Serving's `--num_request_iterations_for_warmup`). It runs on the loading thread (a
/// blocking one), driving the async request path on `runtime`.
pub fn replay(
    inference: Inference,
    iterations: usize,
    runtime: tokio::runtime::Handle,
) -> WarmUpReplay {
    WarmUpReplay {
        replay: Arc::new(move |servable: Arc<Servable>, records: &[PredictionLog]| {
            for _ in 0..iterations.max(1) {
                for (i, record) in records.iter().enumerate() {
                    runtime
                        .block_on(replay_one(&inference, &servable, record))
                        .map_err(|source| ReplayError { record: i, source })?;
                }
            }
            Ok(())
        }),
    }
}

async fn replay_one(
    inference: &Inference,
    servable: &Arc<Servable>,
    record: &PredictionLog,
) -> Result<(), Error> {
    let missing = |what: &str| Error::InvalidArgument(format!("the {what} log has no request"));
    match &record.log_type {
        Some(LogType::PredictLog(log)) => {
            let request = log.request.as_ref().ok_or_else(|| missing("Predict"))?;
            let mut budget = inference.decode_budget(request.encoded_len());
            let mut inputs = HashMap::with_capacity(request.inputs.len());
            for (name, proto) in &request.inputs {
                inputs.insert(name.clone(), tensor_from_proto(name, proto, &mut budget)?);
            }
            let signature = request
                .model_spec
                .as_ref()
                .map(|s| s.signature_name.clone())
                .unwrap_or_default();
            inference
                .predict_on(
                    Arc::clone(servable),
                    PredictRequest {
                        signature,
                        inputs,
                        output_filter: request.output_filter.clone(),
                        deadline: None,
                    },
                )
                .await?;
        }
        Some(LogType::ClassifyLog(log)) => {
            let request = log.request.as_ref().ok_or_else(|| missing("Classify"))?;
            let (spec, input) = (request.model_spec.as_ref(), request.input.as_ref());
            one_task(
                inference,
                servable,
                spec,
                TaskKind::Classify,
                input,
                request.encoded_len(),
            )
            .await?;
        }
        Some(LogType::RegressLog(log)) => {
            let request = log.request.as_ref().ok_or_else(|| missing("Regress"))?;
            let (spec, input) = (request.model_spec.as_ref(), request.input.as_ref());
            one_task(
                inference,
                servable,
                spec,
                TaskKind::Regress,
                input,
                request.encoded_len(),
            )
            .await?;
        }
        Some(LogType::MultiInferenceLog(log)) => {
            let request = log
                .request
                .as_ref()
                .ok_or_else(|| missing("MultiInference"))?;
            let tasks = request
                .tasks
                .iter()
                .map(|task| {
                    Ok(Task {
                        signature: task
                            .model_spec
                            .as_ref()
                            .map_or("", |s| s.signature_name.as_str()),
                        kind: TaskKind::from_method_name(&task.method_name)?,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            let bytes = request.encoded_len();
            tasks::run_on(inference, servable, &tasks, request.input.as_ref(), bytes).await?;
        }
        None => {
            return Err(Error::InvalidArgument(
                "the record holds no request modelgate replays".into(),
            ))
        }
    }
    Ok(())
}

/// A Classify or Regress record: one task on the signature its spec names.
async fn one_task(
    inference: &Inference,
    servable: &Arc<Servable>,
    spec: Option<&ModelSpec>,
    kind: TaskKind,
    input: Option<&Input>,
    bytes: usize,
) -> Result<(), Error> {
    let task = Task {
        signature: spec.map_or("", |s| s.signature_name.as_str()),
        kind,
    };
    tasks::run_on(inference, servable, &[task], input, bytes).await?;
    Ok(())
}
