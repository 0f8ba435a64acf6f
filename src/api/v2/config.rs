//! Triton's model configuration extension (`ModelConfig`), the same for both V2 transports:
//! gRPC answers the proto, REST its JSON mapping.

use super::PLATFORM;
use crate::error::Error;
use crate::inference::{find_signature, Inference};
use crate::proto::inference as pb;
use crate::registry::Servable;
use crate::signature::DEFAULT_SIGNATURE;
use crate::tensor::DType;

/// Triton's ModelConfig for a version: its `serving_default` inputs and outputs and, with
/// batching, `max_batch_size` (dims then leave out the batch dimension, as in Triton) and
/// `dynamic_batching`.
pub fn model_config(inference: &Inference, servable: &Servable) -> Result<pb::ModelConfig, Error> {
    let (_, signature) = find_signature(servable, DEFAULT_SIGNATURE)?;
    let batching = inference.batching(servable, signature);
    let dims = |shape: &Option<Vec<i64>>| -> Vec<i64> {
        let shape = shape.clone().unwrap_or_default();
        match batching {
            Some(_) => shape.get(1..).unwrap_or_default().to_vec(),
            None => shape,
        }
    };
    Ok(pb::ModelConfig {
        name: servable.model.clone(),
        platform: PLATFORM.into(),
        max_batch_size: batching.map_or(0, |b| i32::try_from(b.max_batch_size).unwrap_or(i32::MAX)),
        input: signature
            .inputs
            .iter()
            .map(|spec| pb::ModelInput {
                name: spec.name.clone(),
                data_type: config_type(spec.dtype) as i32,
                dims: dims(&spec.shape),
                ..Default::default()
            })
            .collect(),
        output: signature
            .outputs
            .iter()
            .map(|spec| pb::ModelOutput {
                name: spec.name.clone(),
                data_type: config_type(spec.dtype) as i32,
                dims: dims(&spec.shape),
                ..Default::default()
            })
            .collect(),
        scheduling_choice: batching.map(|b| {
            pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
                preferred_batch_size: b
                    .allowed_batch_sizes
                    .iter()
                    .map(|&s| i32::try_from(s).unwrap_or(i32::MAX))
                    .collect(),
                max_queue_delay_microseconds: u64::try_from(b.batch_timeout.as_micros())
                    .unwrap_or(u64::MAX),
                ..Default::default()
            })
        }),
        ..Default::default()
    })
}

/// Triton's model-config data type of a dtype.
fn config_type(dtype: DType) -> pb::DataType {
    match dtype {
        DType::Bool => pb::DataType::TypeBool,
        DType::U8 => pb::DataType::TypeUint8,
        DType::I8 => pb::DataType::TypeInt8,
        DType::I16 => pb::DataType::TypeInt16,
        DType::I32 => pb::DataType::TypeInt32,
        DType::I64 => pb::DataType::TypeInt64,
        DType::F16 => pb::DataType::TypeFp16,
        DType::BF16 => pb::DataType::TypeBf16,
        DType::F32 => pb::DataType::TypeFp32,
        DType::F64 => pb::DataType::TypeFp64,
    }
}
