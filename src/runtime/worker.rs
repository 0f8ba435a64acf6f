//! Worker threads: each owns a share of one loaded module and runs jobs from a bounded
//! queue, so a busy device pushes back instead of piling work up in memory.

use super::convert::{model_output, to_torch, torch_error};
use super::{Device, LoadError, ModelOutput, RunError};
use crate::tensor::Tensor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use tch::{CModule, IValue};
use tokio::sync::oneshot;

/// How a model runs: where, on how many threads, behind how long a queue.
#[derive(Clone, Copy, Debug)]
pub struct RunnerConfig {
    pub device: Device,
    /// Worker threads sharing the module (libtorch modules are safe to run concurrently).
    pub instances: usize,
    /// Jobs that may wait for a worker before new ones are refused.
    pub queue_capacity: usize,
}

struct Job {
    method: Arc<str>,
    inputs: Vec<Tensor>,
    reply: oneshot::Sender<Result<ModelOutput, RunError>>,
}

/// A loaded TorchScript module and the worker threads that run it. Dropping it lets the
/// workers finish the jobs already queued, then stop and free the module.
pub struct ModelRunner {
    jobs: flume::Sender<Job>,
    device: Device,
}

impl ModelRunner {
    /// Loads `path` onto the device and starts the workers. Blocking: call it from a
    /// blocking thread, never from the async executor.
    pub fn load(path: &Path, label: &str, config: RunnerConfig) -> Result<ModelRunner, LoadError> {
        let device = config.device.to_tch();
        let mut module = CModule::load_on_device(path, device).map_err(|e| LoadError::Torch {
            path: path.display().to_string(),
            message: super::trim_torch_message(&e.to_string()),
        })?;
        module.f_set_eval().map_err(|e| LoadError::Torch {
            path: path.display().to_string(),
            message: super::trim_torch_message(&e.to_string()),
        })?;
        let module = Arc::new(module);
        let (jobs, queue) = flume::bounded(config.queue_capacity.max(1));
        for instance in 0..config.instances.max(1) {
            let module = Arc::clone(&module);
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("{label}@{}#{instance}", config.device))
                .spawn(move || work(&module, device, &queue))
                .map_err(|e| LoadError::Thread(e.to_string()))?;
        }
        Ok(ModelRunner {
            jobs,
            device: config.device,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Queues a call of `method` and waits for its result. Refuses at once with
    /// [`RunError::QueueFull`] when the queue is full.
    pub async fn run(
        &self,
        method: Arc<str>,
        inputs: Vec<Tensor>,
    ) -> Result<ModelOutput, RunError> {
        self.submit(method, inputs)?
            .await
            .map_err(|_| RunError::Stopped)?
    }

    /// Like [`run`](Self::run) but blocks the calling thread (for warm-up while loading).
    pub fn run_blocking(
        &self,
        method: Arc<str>,
        inputs: Vec<Tensor>,
    ) -> Result<ModelOutput, RunError> {
        self.submit(method, inputs)?
            .blocking_recv()
            .map_err(|_| RunError::Stopped)?
    }

    fn submit(
        &self,
        method: Arc<str>,
        inputs: Vec<Tensor>,
    ) -> Result<oneshot::Receiver<Result<ModelOutput, RunError>>, RunError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job {
                method,
                inputs,
                reply,
            })
            .map_err(|e| match e {
                flume::TrySendError::Full(_) => RunError::QueueFull,
                flume::TrySendError::Disconnected(_) => RunError::Stopped,
            })?;
        Ok(answer)
    }
}

fn work(module: &CModule, device: tch::Device, queue: &flume::Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        // The caller went away (cancelled or timed out): skip the forward.
        if job.reply.is_closed() {
            continue;
        }
        // A panic inside the binding must cost one request, not the worker.
        let result = catch_unwind(AssertUnwindSafe(|| {
            forward(module, device, &job.method, &job.inputs)
        }))
        .unwrap_or_else(|_| Err(RunError::Torch("libtorch call panicked".into())));
        let _ = job.reply.send(result);
    }
}

fn forward(
    module: &CModule,
    device: tch::Device,
    method: &str,
    inputs: &[Tensor],
) -> Result<ModelOutput, RunError> {
    let _no_grad = tch::no_grad_guard();
    let args = inputs
        .iter()
        .map(|t| to_torch(t, device).map(IValue::Tensor))
        .collect::<Result<Vec<_>, _>>()?;
    let result = module.method_is(method, &args).map_err(torch_error)?;
    model_output(result)
}
