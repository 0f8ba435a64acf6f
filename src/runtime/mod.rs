//! The runtime: the only module that imports `tch`. It loads models — TorchScript modules
//! and AOTInductor packages, behind one interface ([`model`]) — onto a device and runs
//! them on worker threads, never on the async executor.
//!
//! It speaks in [`Tensor`]s and method names; signatures, protocols and versions are the
//! business of the layers above.

mod aoti;
mod convert;
mod cuda;
mod model;
mod script;
mod staging;
mod worker;

pub use aoti::{read_metadata as read_package_metadata, remove_stale_unpack_dirs, torch_version};
pub use model::ModelFormat;
pub use worker::{
    padded_size, start_workers, Batch, BatchFormer, BatchSource, Job, JobResult, RunnerConfig,
    SyntheticWarmUp, Workers,
};

use crate::config::DeviceFlag;
use crate::tensor::{DType, Tensor};
use std::fmt;
use tch::Kind;

/// A device models run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    fn to_tch(self) -> tch::Device {
        match self {
            Device::Cpu => tch::Device::Cpu,
            Device::Cuda(n) => tch::Device::Cuda(n),
        }
    }
}

/// Resolves `--device`: `auto` takes every CUDA device when libtorch sees one, else the CPU.
pub fn resolve_devices(flag: DeviceFlag) -> Result<Vec<Device>, String> {
    let cuda_count = if tch::Cuda::is_available() {
        usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
    } else {
        0
    };
    match flag {
        DeviceFlag::Cpu => Ok(vec![Device::Cpu]),
        DeviceFlag::Auto if cuda_count == 0 => Ok(vec![Device::Cpu]),
        DeviceFlag::Auto => Ok((0..cuda_count).map(Device::Cuda).collect()),
        DeviceFlag::Cuda(_) if cuda_count == 0 => {
            Err("--device asks for CUDA but libtorch finds no CUDA device".into())
        }
        DeviceFlag::Cuda(None) => Ok(vec![Device::Cuda(0)]),
        DeviceFlag::Cuda(Some(n)) if n < cuda_count => Ok(vec![Device::Cuda(n)]),
        DeviceFlag::Cuda(Some(n)) => Err(format!(
            "--device=cuda:{n} but libtorch finds {cuda_count} CUDA device(s)"
        )),
    }
}

/// Gives the free pages of every malloc arena back to the kernel; called after a version's
/// weights were freed. glibc keeps what is freed in the arena of the thread that allocated
/// it (up to eight arenas per core), and once a freed block has raised its mmap threshold,
/// weight-sized tensors come from those arenas too: without this, what unloaded versions
/// held stays in the process's RSS until an allocation in that arena reuses it (measured in
/// the soak bench: about 25 MiB more RSS under constant load/evict churn). At most once a
/// second: under churn the next load would fault the pages straight back in, and what an
/// unload inside that second frees waits for the next unload's trim.
pub fn release_freed_memory() {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if last.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
        return;
    }
    *last = Some(std::time::Instant::now());
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sets libtorch's intra-op thread pool size (process-wide).
pub fn set_intra_op_threads(threads: usize) {
    tch::set_num_threads(i32::try_from(threads).unwrap_or(i32::MAX));
}

/// Gives the calling thread the intra-op thread count set at start-up. libtorch sets a
/// thread's OpenMP team size lazily, on the thread's first ATen parallel op, but an
/// AOTInductor package's kernels ask OpenMP directly: a worker whose first call ran one got
/// a team of one thread per core, so two workers ran four threads on two cores. Called
/// first thing in every worker thread.
pub(crate) fn adopt_intra_op_threads() {
    // get_num_threads initializes this thread's team size from the process-wide setting.
    tch::set_num_threads(tch::get_num_threads());
}

/// libtorch's executor settings for serving, set once at start-up (process-wide):
/// - The profiling executor is off. It profiles a method's first calls and specialises the
///   graph to the shapes it saw, so every new batch size re-profiles and re-optimises on a
///   request's time (measured on an H200: ResNet-50 at random batch sizes ran at 1.3k img/s
///   on the first pass and 6.0k on the second; with the profiling executor off, 6.0k from
///   the first). The legacy executor keys its optimised graph on rank and dtype, not sizes.
/// - cuDNN's benchmark mode stays off: it autotunes convolutions for every new input shape
///   (a stall on the first request of each batch size) and gained nothing for ResNet-50 on
///   that card.
pub fn configure_executor() {
    tch::jit::set_profiling_mode(false);
    tch::Cuda::cudnn_set_benchmark(false);
}

/// What a TorchScript method returned, before it is matched to a signature's outputs.
/// Cloning is cheap (tensor payloads are shared `Bytes`).
#[derive(Clone, Debug)]
pub enum ModelOutput {
    Tensor(Tensor),
    /// A tuple or list of tensors, in order.
    Sequence(Vec<Tensor>),
    /// A `Dict[str, Tensor]`.
    Dict(Vec<(String, Tensor)>),
}

/// Why a load failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("libtorch could not load {path}: {message}")]
    Torch { path: String, message: String },
    #[error("cannot start a worker thread: {0}")]
    Thread(String),
    #[error("cannot use {device}: {message}")]
    Device { device: String, message: String },
    #[error("warm-up of {call} failed: {message}")]
    WarmUp { call: String, message: String },
}

/// Why a run failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RunError {
    /// Every worker is busy and the queue in front of them is full.
    #[error("the model's queue is full")]
    QueueFull,
    /// libtorch threw; the message is trimmed to what a client can use.
    #[error("{0}")]
    Torch(String),
    /// The device (or the host) ran out of memory for this batch; nothing else is harmed
    /// and later requests may fit.
    #[error("{0}")]
    OutOfMemory(String),
    /// A CUDA error that leaves the device's context unusable (a device-side assert, an
    /// illegal memory access): every later call there fails until the process restarts.
    #[error("{0}")]
    DeviceFailed(String),
    /// The method returned something that is not tensors.
    #[error("{0}")]
    BadOutput(String),
    /// The workers stopped (the version is being unloaded) before answering.
    #[error("the model's workers stopped before answering")]
    Stopped,
    /// A request larger than `max_batch_size`: with large-batch splitting on, that bounds
    /// the requests that are split; without, the batches themselves.
    #[error("the request has {rows} rows, more than max_batch_size {limit}{}", if *splitting { " (the largest request that is split into batches)" } else { " (enable_large_batch_splitting splits requests larger than a batch)" })]
    BatchTooLarge {
        rows: usize,
        limit: usize,
        splitting: bool,
    },
    /// Running the batch panicked (a server bug): the batch is answered with this and the
    /// worker carries on.
    #[error("the server failed while running this request: {0}")]
    Crashed(String),
    /// A request with more rows than the batching queue can ever hold.
    #[error("the request has {rows} rows, more than the batching queue holds ({capacity} rows: max_enqueued_batches batches of the batch size)")]
    TooManyRows { rows: usize, capacity: usize },
    /// The job's deadline passed before a worker reached it; it did not run.
    #[error("the deadline passed before the model ran")]
    DeadlineExceeded,
}

/// Cuts libtorch's message down to what a client can use: TorchScript tracebacks keep
/// their last line (the exception), C++ backtraces are dropped, long texts are shortened.
fn trim_torch_message(message: &str) -> String {
    let message = message
        .split("Exception raised from")
        .next()
        .unwrap_or(message);
    let message = if message.contains("Traceback of TorchScript") {
        message
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .unwrap_or(message)
    } else {
        message.trim()
    };
    const LIMIT: usize = 512;
    match message.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}...", &message[..cut]),
        None => message.to_string(),
    }
}

/// The libtorch kind of a dtype.
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

/// A libtorch error as a run error, sorted by what it leaves behind.
fn torch_error(err: tch::TchError) -> RunError {
    classify_torch_error(&err.to_string())
}

/// CUDA errors after which the device's context is unusable ("sticky" errors).
const DEVICE_FAILURES: &[&str] = &[
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ECC error",
    "hardware stack error",
];

/// Sorts what libtorch threw: out of memory (CUDA's caching allocator or the CPU's), a
/// device that can no longer run anything, or the model's own failure.
fn classify_torch_error(message: &str) -> RunError {
    let trimmed = trim_torch_message(message);
    if message.contains("CUDA out of memory")
        || message.contains("DefaultCPUAllocator: can't allocate memory")
    {
        RunError::OutOfMemory(trimmed)
    } else if DEVICE_FAILURES
        .iter()
        .any(|failure| message.contains(failure))
    {
        RunError::DeviceFailed(trimmed)
    } else {
        RunError::Torch(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_messages_are_trimmed() {
        let scripted = "The following operation failed in the TorchScript interpreter.\n\
            Traceback of TorchScript (most recent call last):\n  File \"code/x.py\", line 3\n\
            builtins.RuntimeError: negative input\n";
        assert_eq!(
            trim_torch_message(scripted),
            "builtins.RuntimeError: negative input"
        );
        let cpp = "mat1 and mat2 shapes cannot be multiplied (1x3 and 4x5)\n\
            Exception raised from meta at /pytorch/aten/src/ATen/native/LinearAlgebra.cpp:1\nframe #0: ...";
        assert_eq!(
            trim_torch_message(cpp),
            "mat1 and mat2 shapes cannot be multiplied (1x3 and 4x5)"
        );
        assert_eq!(trim_torch_message(&"x".repeat(2000)).len(), 515);
    }

    #[test]
    fn torch_errors_are_sorted_by_what_they_leave_behind() {
        let oom = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)";
        assert!(
            matches!(classify_torch_error(oom), RunError::OutOfMemory(m) if m.starts_with("CUDA out of memory"))
        );
        let cpu = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.";
        assert!(matches!(
            classify_torch_error(cpu),
            RunError::OutOfMemory(_)
        ));
        let assert = "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`";
        assert!(matches!(
            classify_torch_error(assert),
            RunError::DeviceFailed(_)
        ));
        let shape = "mat1 and mat2 shapes cannot be multiplied (1x3 and 4x5)";
        assert_eq!(classify_torch_error(shape), RunError::Torch(shape.into()));
    }

    #[test]
    fn cpu_is_always_there() {
        assert_eq!(resolve_devices(DeviceFlag::Cpu).unwrap(), vec![Device::Cpu]);
        if !tch::Cuda::is_available() {
            assert_eq!(
                resolve_devices(DeviceFlag::Auto).unwrap(),
                vec![Device::Cpu]
            );
            assert!(resolve_devices(DeviceFlag::Cuda(None)).is_err());
        }
    }
}
