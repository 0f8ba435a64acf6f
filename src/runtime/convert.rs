//! Conversions between [`Tensor`] and libtorch tensors.

use super::staging::Staging;
use super::{kind_of, torch_error, ModelOutput, RunError};
use crate::tensor::{DType, Tensor};
use tch::{IValue, Kind};

/// The inverse of [`kind_of`]; `None` for the kinds modelgate does not serve.
fn dtype_of(kind: Kind) -> Option<DType> {
    DType::ALL.into_iter().find(|&dtype| kind_of(dtype) == kind)
}

/// How a method's result is shaped: its tensors travel separately, in this order.
enum Form {
    Tensor,
    Sequence,
    /// A `Dict[str, Tensor]`: the keys, in the tensors' order.
    Dict(Vec<String>),
}

impl Form {
    /// Splits what a method returned into its form and its tensors (on the model's device).
    fn of(value: IValue) -> Result<(Form, Vec<tch::Tensor>), RunError> {
        Ok(match value {
            IValue::Tensor(t) => (Form::Tensor, vec![t]),
            IValue::TensorList(list) => (Form::Sequence, list),
            IValue::Tuple(items) | IValue::GenericList(items) => (
                Form::Sequence,
                items
                    .into_iter()
                    .map(|item| match item {
                        IValue::Tensor(t) => Ok(t),
                        other => Err(not_a_tensor("a tuple element", &other)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            IValue::GenericDict(entries) => {
                let (keys, tensors) = entries
                    .into_iter()
                    .map(|(key, value)| match (key, value) {
                        (IValue::String(key), IValue::Tensor(t)) => Ok((key, t)),
                        (IValue::String(key), other) => {
                            Err(not_a_tensor(&format!("dict entry '{key}'"), &other))
                        }
                        _ => Err(RunError::BadOutput(
                            "the model returned a dict whose keys are not strings".into(),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .unzip();
                (Form::Dict(keys), tensors)
            }
            other => return Err(not_a_tensor("the method's result", &other)),
        })
    }

    /// The result again, from its tensors brought to the host (in the same order).
    fn rebuild(self, mut tensors: Vec<Tensor>) -> Result<ModelOutput, RunError> {
        Ok(match self {
            Form::Tensor => ModelOutput::Tensor(
                tensors
                    .pop()
                    .ok_or_else(|| RunError::BadOutput("the result has no tensor".into()))?,
            ),
            Form::Sequence => ModelOutput::Sequence(tensors),
            Form::Dict(keys) => ModelOutput::Dict(keys.into_iter().zip(tensors).collect()),
        })
    }
}

fn servable_dtype(torch: &tch::Tensor) -> Result<DType, RunError> {
    let kind = torch.f_kind().map_err(torch_error)?;
    dtype_of(kind).ok_or_else(|| {
        RunError::BadOutput(format!(
            "the model returned a {kind:?} tensor, which modelgate cannot serve"
        ))
    })
}

/// Brings what a method returned back to the host as [`ModelOutput`], through the worker's
/// staging (one copy; on a GPU all outputs come back together, asynchronously). Every
/// output's dtype is checked before anything is copied.
pub(super) fn model_output(value: IValue, staging: &Staging) -> Result<ModelOutput, RunError> {
    let (form, on_device) = Form::of(value)?;
    let dtypes = on_device
        .iter()
        .map(servable_dtype)
        .collect::<Result<Vec<_>, _>>()?;
    let host = staging
        .finish_outputs(on_device)?
        .iter()
        .zip(dtypes)
        .map(|(torch, dtype)| {
            let (shape, data) = staging.output(torch)?;
            Tensor::new(dtype, shape, data).map_err(|e| RunError::BadOutput(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    form.rebuild(host)
}

fn not_a_tensor(what: &str, value: &IValue) -> RunError {
    let kind = match value {
        IValue::None => "None",
        IValue::Double(_) => "a float",
        IValue::Int(_) => "an int",
        IValue::Bool(_) => "a bool",
        IValue::String(_) => "a string",
        IValue::Tuple(_) | IValue::GenericList(_) => "a nested sequence",
        IValue::GenericDict(_) => "a nested dict",
        _ => "not a tensor",
    };
    RunError::BadOutput(format!(
        "{what} is {kind}; a method must return a tensor, a tuple of tensors or a Dict[str, Tensor]"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn round_trip(value: IValue) -> ModelOutput {
        model_output(value, &Staging::new(tch::Device::Cpu)).unwrap()
    }

    #[test]
    fn every_dtype_round_trips_through_libtorch() {
        let mut staging = Staging::new(tch::Device::Cpu);
        for dtype in DType::ALL {
            let data: Vec<u8> = (0..6 * dtype.size()).map(|i| (i % 2) as u8).collect();
            let tensor = Tensor::new(dtype, vec![2, 3], Bytes::from(data)).unwrap();
            let torch = staging.input(0, &[&tensor], 2).unwrap();
            assert_eq!(torch.size(), vec![2, 3]);
            let ModelOutput::Tensor(back) = round_trip(IValue::Tensor(torch)) else {
                panic!("one tensor in, one out");
            };
            assert_eq!(back, tensor, "{dtype}");
        }
    }

    #[test]
    fn a_batch_is_staged_in_order_and_padded_with_its_first_row() {
        let mut staging = Staging::new(tch::Device::Cpu);
        let a = Tensor::from_values(vec![1, 2], &[1i32, 2]).unwrap();
        let b = Tensor::from_values(vec![2, 2], &[3i32, 4, 5, 6]).unwrap();
        let torch = staging.input(0, &[&a, &b], 4).unwrap();
        let ModelOutput::Tensor(back) = round_trip(IValue::Tensor(torch)) else {
            panic!("one tensor in, one out");
        };
        assert_eq!(back.shape, vec![4, 2]);
        assert_eq!(
            back.to_values::<i32>().unwrap(),
            vec![1, 2, 3, 4, 5, 6, 1, 2]
        );
        // Without rows there is nothing to pad, whatever the other dims.
        let empty = Tensor::new(DType::F32, vec![0, 1 << 58], Bytes::new()).unwrap();
        assert_eq!(
            staging.input(0, &[&empty], 8).unwrap().size(),
            vec![0, 1 << 58]
        );
    }

    #[test]
    fn non_contiguous_results_are_copied_in_order() {
        let t = Tensor::from_values(vec![2, 3], &[1i64, 2, 3, 4, 5, 6]).unwrap();
        let transposed = Staging::new(tch::Device::Cpu)
            .input(0, &[&t], 2)
            .unwrap()
            .tr();
        let ModelOutput::Tensor(back) = round_trip(IValue::Tensor(transposed)) else {
            panic!("one tensor in, one out");
        };
        assert_eq!(back.shape, vec![3, 2]);
        assert_eq!(back.to_values::<i64>().unwrap(), vec![1, 4, 2, 5, 3, 6]);
    }

    /// A real allocation libtorch cannot make is RESOURCE_EXHAUSTED material, not a crash.
    #[test]
    fn a_failed_cpu_allocation_is_out_of_memory() {
        let error = tch::Tensor::f_empty([1i64 << 50], (Kind::Uint8, tch::Device::Cpu))
            .map(|_| ())
            .map_err(torch_error);
        assert!(matches!(error, Err(RunError::OutOfMemory(_))), "{error:?}");
    }

    #[test]
    fn results_that_are_not_tensors_are_refused() {
        let staging = Staging::new(tch::Device::Cpu);
        let error = model_output(IValue::Int(3), &staging).unwrap_err();
        assert!(error.to_string().contains("is an int"), "{error}");
        let complex = tch::Tensor::zeros([1], (Kind::ComplexFloat, tch::Device::Cpu));
        let error = model_output(IValue::Tuple(vec![IValue::Tensor(complex)]), &staging);
        assert!(error.unwrap_err().to_string().contains("cannot serve"));
    }
}
