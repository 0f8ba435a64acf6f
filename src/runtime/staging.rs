//! A batch's way in and out of libtorch with one host copy each way.
//!
//! In: each request's bytes (slices of the gRPC frame or the decoded REST body) are written
//! once, straight into the memory the batch runs on. On the CPU that is a fresh libtorch
//! tensor, which the model reads as it is. On a GPU it is a page-locked host buffer per
//! input, kept by the worker and reused batch after batch, copied to the device
//! asynchronously on the worker's own stream.
//!
//! Out: on a GPU the outputs come back asynchronously into page-locked host tensors, which
//! then back the outputs' `Bytes` without another copy (each request's rows are slices of
//! them). On the CPU the outputs are copied once into `Bytes`: a model may return (a view
//! of) its own state, which a later forward could change under a response still being sent.

use super::{cuda, kind_of, torch_error, RunError};
use crate::tensor::{RowConcat, Tensor};
use bytes::Bytes;
use tch::Kind;

/// The host memory one worker stages its batches in.
pub(super) struct Staging {
    device: tch::Device,
    /// GPU only: one page-locked buffer (bytes) per input position, grown when a batch
    /// needs more and otherwise reused.
    pinned: Vec<tch::Tensor>,
}

impl Staging {
    pub fn new(device: tch::Device) -> Staging {
        Staging {
            device,
            pinned: Vec::new(),
        }
    }

    /// Call before staging a batch: on a GPU, waits for what this worker last queued on its
    /// stream, so the page-locked buffers are no longer being read by a copy. (A batch that
    /// finished normally has already waited; this covers one that failed half-way.)
    pub fn begin_batch(&self) -> Result<(), RunError> {
        match self.device {
            tch::Device::Cuda(gpu) => cuda::synchronize_thread_stream(gpu).map_err(RunError::Torch),
            _ => Ok(()),
        }
    }

    /// Input `position` of a batch, on the worker's device: `parts` (one per job, in order)
    /// concatenated along dim 0 and padded to `rows` rows.
    pub fn input(
        &mut self,
        position: usize,
        parts: &[&Tensor],
        rows: usize,
    ) -> Result<tch::Tensor, RunError> {
        let plan = RowConcat::plan(parts, rows).map_err(RunError::BadOutput)?;
        let kind = kind_of(plan.dtype);
        match self.device {
            tch::Device::Cuda(_) => {
                let buffer = self.pinned_buffer(position, plan.bytes)?;
                let staged = buffer
                    .f_narrow(0, 0, to_i64(plan.bytes)?)
                    .and_then(|bytes| bytes.f_view_dtype(kind))
                    .and_then(|typed| typed.f_view(plan.shape.as_slice()))
                    .map_err(torch_error)?;
                // SAFETY: `staged` views the first `plan.bytes` bytes of a contiguous
                // buffer of at least that size, which no copy is reading (begin_batch).
                unsafe { write_into(&staged, &plan) };
                staged
                    .f_to_device_(self.device, kind, true, false)
                    .map_err(torch_error)
            }
            _ => {
                let staged = tch::Tensor::f_empty(plan.shape.as_slice(), (kind, tch::Device::Cpu))
                    .map_err(torch_error)?;
                // SAFETY: a new contiguous tensor of exactly `plan.bytes` bytes.
                unsafe { write_into(&staged, &plan) };
                Ok(staged)
            }
        }
    }

    /// A page-locked buffer of at least `bytes` for `position`; a larger one replaces it
    /// when it is too small (sized to the next power of two, so growth is rare).
    fn pinned_buffer(&mut self, position: usize, bytes: usize) -> Result<&tch::Tensor, RunError> {
        while self.pinned.len() <= position {
            self.pinned.push(tch::Tensor::new());
        }
        if !self.pinned[position].defined() || self.pinned[position].numel() < bytes {
            let size = bytes.max(1).checked_next_power_of_two().unwrap_or(bytes);
            self.pinned[position] =
                tch::Tensor::f_empty([to_i64(size)?], (Kind::Uint8, tch::Device::Cpu))
                    .and_then(|pageable| pageable.f_pin_memory(self.device))
                    .map_err(torch_error)?;
        }
        Ok(&self.pinned[position])
    }

    /// A host tensor (on a GPU, one of [`Staging::finish_outputs`]) as its shape and
    /// `Bytes`, with the one copy this direction takes (see the module's comment).
    pub fn output(&self, host: &tch::Tensor) -> Result<(Vec<i64>, Bytes), RunError> {
        // A model on a CPU worker may still answer with a tensor elsewhere (one traced on a
        // GPU keeps its device): its memory is not the host's to read. Copied here; a
        // tensor with no data at all (`meta`) fails the copy instead of being read.
        let host = match host.device() {
            tch::Device::Cpu => host.f_contiguous(),
            _ => host.f_to_device_(tch::Device::Cpu, host.kind(), false, true),
        }
        .map_err(torch_error)?;
        let shape = host.size();
        let bytes = host_bytes(host)?;
        if self.device == tch::Device::Cpu {
            return Ok((shape, Bytes::copy_from_slice(bytes.as_ref())));
        }
        Ok((shape, Bytes::from_owner(bytes)))
    }

    /// GPU only: starts the asynchronous copies of `outputs` to page-locked host memory and
    /// waits for them (and everything before them on this worker's stream). Returns the
    /// host tensors, which [`Staging::output`] then wraps without copying.
    pub fn finish_outputs(&self, outputs: Vec<tch::Tensor>) -> Result<Vec<tch::Tensor>, RunError> {
        let tch::Device::Cuda(gpu) = self.device else {
            return Ok(outputs);
        };
        let host = outputs
            .iter()
            .map(|t| match t.device() {
                // This worker's stream: copied asynchronously, waited for below.
                device if device == self.device => {
                    t.f_to_device_(tch::Device::Cpu, t.kind(), true, false)
                }
                // Already on the host: copied all the same, since `output` hands it out
                // without a copy and it may be the module's own tensor, which a later
                // forward changes.
                tch::Device::Cpu => t.f_to_device_(tch::Device::Cpu, t.kind(), false, true),
                // Another device's stream, which the wait below does not cover.
                _ => t.f_to_device_(tch::Device::Cpu, t.kind(), false, false),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(torch_error)?;
        cuda::synchronize_thread_stream(gpu).map_err(RunError::Torch)?;
        Ok(host)
    }
}

fn to_i64(n: usize) -> Result<i64, RunError> {
    i64::try_from(n).map_err(|_| RunError::BadOutput(format!("{n} bytes do not fit a tensor")))
}

/// Writes `plan` into the memory of `tensor`.
///
/// # Safety
/// `tensor` must be a contiguous host tensor of exactly `plan.bytes` bytes that nothing
/// else reads or writes while this runs.
unsafe fn write_into(tensor: &tch::Tensor, plan: &RowConcat) {
    if plan.bytes == 0 {
        return; // libtorch may give an empty tensor no memory at all
    }
    let memory = std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<u8>(), plan.bytes);
    plan.write(memory);
}

/// A contiguous host tensor as a byte slice that keeps it alive.
struct HostBytes {
    _tensor: tch::Tensor,
    start: *const u8,
    len: usize,
}

// SAFETY: the tensor's memory is owned by the libtorch tensor held here and is never
// written through this value; tch::Tensor is Send.
unsafe impl Send for HostBytes {}

impl AsRef<[u8]> for HostBytes {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `start..start + len` is the memory of `_tensor`, alive as long as self.
        unsafe { std::slice::from_raw_parts(self.start, self.len) }
    }
}

fn host_bytes(host: tch::Tensor) -> Result<HostBytes, RunError> {
    let element = host.f_kind().map_err(torch_error)?.elt_size_in_bytes();
    let len = host.numel().checked_mul(element).ok_or_else(|| {
        RunError::BadOutput(format!("an output of shape {:?} is too large", host.size()))
    })?;
    if host.device() != tch::Device::Cpu || host.is_sparse() {
        return Err(RunError::BadOutput(format!(
            "an output is a {:?} tensor, not dense host memory",
            host.device()
        )));
    }
    let start = host.data_ptr().cast::<u8>().cast_const();
    if len > 0 && start.is_null() {
        return Err(RunError::BadOutput(format!(
            "an output of shape {:?} has no memory",
            host.size()
        )));
    }
    Ok(HostBytes {
        start,
        len,
        _tensor: host,
    })
}
