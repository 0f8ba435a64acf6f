//! Conversions between [`Tensor`] and libtorch tensors.

use super::{ModelOutput, RunError};
use crate::tensor::{DType, Tensor};
use bytes::Bytes;
use tch::{IValue, Kind};

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::I8 => Kind::Int8,
        DType::I16 => Kind::Int16,
        DType::I32 => Kind::Int,
        DType::I64 => Kind::Int64,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

/// The inverse of [`kind_of`]; `None` for the kinds modelgate does not serve.
fn dtype_of(kind: Kind) -> Option<DType> {
    DType::ALL.into_iter().find(|&dtype| kind_of(dtype) == kind)
}

/// Copies a tensor into libtorch, on `device`.
pub(super) fn to_torch(tensor: &Tensor, device: tch::Device) -> Result<tch::Tensor, RunError> {
    let torch = tch::Tensor::f_from_data_size(&tensor.data, &tensor.shape, kind_of(tensor.dtype))
        .map_err(torch_error)?;
    if device == tch::Device::Cpu {
        Ok(torch)
    } else {
        torch.f_to_device(device).map_err(torch_error)
    }
}

/// Copies a libtorch tensor (on any device, any layout) back into a [`Tensor`].
pub(super) fn from_torch(torch: &tch::Tensor) -> Result<Tensor, RunError> {
    let dtype = dtype_of(torch.f_kind().map_err(torch_error)?).ok_or_else(|| {
        RunError::BadOutput(format!(
            "the model returned a {:?} tensor, which modelgate cannot serve",
            torch.kind()
        ))
    })?;
    let cpu = torch
        .f_to_device(tch::Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(torch_error)?;
    let numel = cpu.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    cpu.f_copy_data_u8(&mut data, numel).map_err(torch_error)?;
    Tensor::new(dtype, cpu.size(), Bytes::from(data))
        .map_err(|e| RunError::BadOutput(e.to_string()))
}

/// Maps what a method returned onto [`ModelOutput`].
pub(super) fn model_output(value: IValue) -> Result<ModelOutput, RunError> {
    match value {
        IValue::Tensor(t) => Ok(ModelOutput::Tensor(from_torch(&t)?)),
        IValue::TensorList(list) => Ok(ModelOutput::Sequence(
            list.iter().map(from_torch).collect::<Result<_, _>>()?,
        )),
        IValue::Tuple(items) | IValue::GenericList(items) => Ok(ModelOutput::Sequence(
            items
                .into_iter()
                .map(|item| match item {
                    IValue::Tensor(t) => from_torch(&t),
                    other => Err(not_a_tensor("a tuple element", &other)),
                })
                .collect::<Result<_, _>>()?,
        )),
        IValue::GenericDict(entries) => Ok(ModelOutput::Dict(
            entries
                .into_iter()
                .map(|(key, value)| match (key, value) {
                    (IValue::String(key), IValue::Tensor(t)) => Ok((key, from_torch(&t)?)),
                    (IValue::String(key), other) => {
                        Err(not_a_tensor(&format!("dict entry '{key}'"), &other))
                    }
                    _ => Err(RunError::BadOutput(
                        "the model returned a dict whose keys are not strings".into(),
                    )),
                })
                .collect::<Result<_, _>>()?,
        )),
        other => Err(not_a_tensor("the method's result", &other)),
    }
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

pub(super) fn torch_error(err: tch::TchError) -> RunError {
    RunError::Torch(super::trim_torch_message(&err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips_through_libtorch() {
        for dtype in DType::ALL {
            let data: Vec<u8> = (0..6 * dtype.size()).map(|i| (i % 2) as u8).collect();
            let tensor = Tensor::new(dtype, vec![2, 3], Bytes::from(data)).unwrap();
            let torch = to_torch(&tensor, tch::Device::Cpu).unwrap();
            assert_eq!(torch.size(), vec![2, 3]);
            assert_eq!(from_torch(&torch).unwrap(), tensor, "{dtype}");
        }
    }

    #[test]
    fn non_contiguous_results_are_copied_in_order() {
        let t = Tensor::from_values(vec![2, 3], &[1i64, 2, 3, 4, 5, 6]).unwrap();
        let transposed = to_torch(&t, tch::Device::Cpu).unwrap().tr();
        let back = from_torch(&transposed).unwrap();
        assert_eq!(back.shape, vec![3, 2]);
        assert_eq!(back.to_values::<i64>().unwrap(), vec![1, 4, 2, 5, 3, 6]);
    }
}
