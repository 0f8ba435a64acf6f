//! What a worker thread on a GPU needs beyond tch: its GPU as the thread's current device
//! (a model with `cuda` constants otherwise runs on GPU 0 from every worker), a CUDA stream
//! of its own (workers on one GPU then overlap one batch's copies with another's kernels),
//! and a wait on that stream alone. Calls into `cuda_shim.cpp`; on a machine without a GPU
//! each answers libtorch's error.

use std::ffi::{c_char, c_int, CStr};

extern "C" {
    fn modelgate_cuda_bind_thread(index: c_int) -> *mut c_char;
    fn modelgate_cuda_synchronize_thread_stream(index: c_int) -> *mut c_char;
    fn modelgate_cuda_allocated_bytes(
        index: c_int,
        reset_peak: c_int,
        current: *mut i64,
        peak: *mut i64,
    ) -> *mut c_char;
    fn modelgate_cuda_free_message(message: *mut c_char);
}

/// Turns the shim's answer (null, or a message it allocated) into a result.
fn answer(message: *mut c_char) -> Result<(), String> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null answer is a NUL-terminated string the shim malloc'd for us; it is
    // read once and freed once, by the shim's own free.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { modelgate_cuda_free_message(message) };
    Err(super::trim_torch_message(&text))
}

fn index_of(gpu: usize) -> Result<c_int, String> {
    c_int::try_from(gpu).map_err(|_| format!("no CUDA device {gpu}"))
}

/// Makes `gpu` the calling thread's current device and gives the thread a stream of its
/// own from libtorch's pool, for the rest of the thread's life.
pub(super) fn bind_thread(gpu: usize) -> Result<(), String> {
    let index = index_of(gpu)?;
    // SAFETY: the shim catches every C++ exception and only reads its argument.
    answer(unsafe { modelgate_cuda_bind_thread(index) })
}

/// Blocks until the work the calling thread queued on `gpu` has finished.
pub(super) fn synchronize_thread_stream(gpu: usize) -> Result<(), String> {
    let index = index_of(gpu)?;
    // SAFETY: as above.
    answer(unsafe { modelgate_cuda_synchronize_thread_stream(index) })
}

/// The CUDA caching allocator's allocated bytes on `gpu`: now, and the most since the last
/// reset (`reset_peak` resets it to now first). Process-wide: what every thread allocated.
pub(super) fn allocated_bytes(gpu: usize, reset_peak: bool) -> Result<(u64, u64), String> {
    let index = index_of(gpu)?;
    let (mut current, mut peak) = (0i64, 0i64);
    // SAFETY: the shim catches every C++ exception and writes the two counts on success.
    answer(unsafe {
        modelgate_cuda_allocated_bytes(index, c_int::from(reset_peak), &mut current, &mut peak)
    })?;
    let bytes = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok((bytes(current), bytes(peak)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CUDA code runs on the CPU machines too, as far as it can: without a GPU every
    /// call is an error with libtorch's message, never a crash.
    #[test]
    fn without_a_gpu_the_calls_answer_errors() {
        if tch::Cuda::is_available() {
            assert_eq!(bind_thread(0), Ok(()));
            assert_eq!(synchronize_thread_stream(0), Ok(()));
            assert!(allocated_bytes(0, true).is_ok());
            return;
        }
        let bound = bind_thread(0).unwrap_err();
        assert!(!bound.is_empty());
        assert!(allocated_bytes(0, true).is_err());
        assert!(synchronize_thread_stream(0).is_err());
        assert!(bind_thread(usize::MAX)
            .unwrap_err()
            .contains("no CUDA device"));
    }
}
