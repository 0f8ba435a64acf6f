//! Worker threads: each runs batches of jobs on one device, from a bounded queue shared by
//! every worker of a model version, so a busy device pushes back instead of piling work up
//! in memory.

use super::convert::{model_output, to_torch, torch_error};
use super::{Device, LoadError, ModelOutput, RunError};
use crate::tensor::Tensor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tch::{CModule, IValue};
use tokio::sync::oneshot;

/// How a model runs: where, and on how many threads.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Every device gets its own copy of the module and its own workers.
    pub devices: Vec<Device>,
    /// Worker threads per device sharing that device's module (libtorch modules are safe
    /// to run concurrently).
    pub instances_per_device: usize,
}

/// One call of a method, waiting to run alone or as part of a batch.
pub struct Job {
    pub method: Arc<str>,
    /// In the method's positional order.
    pub inputs: Vec<Tensor>,
    /// Past this instant the job is answered DEADLINE_EXCEEDED instead of run.
    pub deadline: Option<Instant>,
    reply: oneshot::Sender<Result<ModelOutput, RunError>>,
}

/// Waits for a job's result.
pub type JobResult = oneshot::Receiver<Result<ModelOutput, RunError>>;

impl Job {
    pub fn new(
        method: Arc<str>,
        inputs: Vec<Tensor>,
        deadline: Option<Instant>,
    ) -> (Job, JobResult) {
        let (reply, result) = oneshot::channel();
        let job = Job {
            method,
            inputs,
            deadline,
            reply,
        };
        (job, result)
    }

    /// Whether the caller stopped waiting (cancelled, timed out): then the job need not run.
    pub fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    /// Rows along dim 0 of the first input (the batch size this job adds).
    pub fn rows(&self) -> usize {
        self.inputs.first().and_then(Tensor::rows).unwrap_or(0)
    }

    pub fn answer(self, result: Result<ModelOutput, RunError>) {
        let _ = self.reply.send(result);
    }
}

/// Jobs that run in one forward: their inputs are concatenated along dim 0 (and padded up
/// to an allowed size), and each gets its own rows of the outputs back. A batch of one job
/// runs on its inputs as they are.
pub struct Batch {
    pub jobs: Vec<Job>,
    /// Batch sizes a batch is padded up to (ascending; empty = no padding).
    pub allowed_sizes: Arc<[usize]>,
}

impl Batch {
    pub fn single(job: Job) -> Batch {
        Batch {
            jobs: vec![job],
            allowed_sizes: Arc::from([]),
        }
    }
}

/// Per-version metric handles, created once so the hot path does not build labels.
#[derive(Clone)]
struct WorkerMetrics {
    batch_size: metrics::Histogram,
    forward_seconds: metrics::Histogram,
    deadline_dropped: metrics::Counter,
    cancelled_dropped: metrics::Counter,
}

impl WorkerMetrics {
    fn new(model: &str, version: i64) -> WorkerMetrics {
        let labels = [
            ("model", model.to_string()),
            ("version", version.to_string()),
        ];
        let rejected = |reason: &'static str| {
            let mut labels = labels.to_vec();
            labels.push(("reason", reason.to_string()));
            metrics::counter!(crate::telemetry::REJECTED_REQUESTS_TOTAL, &labels)
        };
        WorkerMetrics {
            batch_size: metrics::histogram!(crate::telemetry::BATCH_SIZE, &labels),
            forward_seconds: metrics::histogram!(
                crate::telemetry::FORWARD_DURATION_SECONDS,
                &labels
            ),
            deadline_dropped: rejected("deadline"),
            cancelled_dropped: rejected("cancelled"),
        }
    }
}

/// Forms batches on demand: with server-side batching, each free worker asks it for the
/// next batch, so a batch closes the moment a worker can run it and grows while every
/// worker is busy.
pub trait BatchFormer: Send + Sync {
    /// Blocks until a batch is ready; `None` once no more will come (the version unloads).
    fn next_batch(&self) -> Option<Batch>;
}

/// Where a version's workers take their batches from.
#[derive(Clone)]
pub enum BatchSource {
    /// Whole batches in a bounded queue (no server-side batching): a busy device pushes
    /// back on the senders.
    Queue(flume::Receiver<Batch>),
    Former(Arc<dyn BatchFormer>),
}

impl BatchSource {
    fn next(&self) -> Option<Batch> {
        match self {
            BatchSource::Queue(queue) => queue.recv().ok(),
            BatchSource::Former(former) => former.next_batch(),
        }
    }
}

/// Loads the TorchScript module at `path` onto every device (one copy per device) and
/// starts its workers, which run what `source` gives them until it closes, then free the
/// module. Blocking: call it from a blocking thread, never from the async executor.
pub fn start_workers(
    path: &Path,
    model: &str,
    version: i64,
    config: &RunnerConfig,
    source: &BatchSource,
) -> Result<(), LoadError> {
    let metrics = WorkerMetrics::new(model, version);
    for &device in &config.devices {
        let module = Arc::new(load_module(path, device)?);
        for instance in 0..config.instances_per_device.max(1) {
            let (module, source, metrics) = (Arc::clone(&module), source.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("{model}/{version}@{device}#{instance}"))
                .spawn(move || {
                    while let Some(batch) = source.next() {
                        execute(&module, device.to_tch(), batch, &metrics);
                    }
                })
                .map_err(|e| LoadError::Thread(e.to_string()))?;
        }
    }
    Ok(())
}

fn load_module(path: &Path, device: Device) -> Result<CModule, LoadError> {
    let torch_error = |e: tch::TchError| LoadError::Torch {
        path: path.display().to_string(),
        message: super::trim_torch_message(&e.to_string()),
    };
    let mut module = CModule::load_on_device(path, device.to_tch()).map_err(torch_error)?;
    module.f_set_eval().map_err(torch_error)?;
    Ok(module)
}

/// Runs one batch: drops jobs whose caller left or whose deadline passed, runs the rest in
/// one forward, and answers each job with its own rows.
fn execute(module: &CModule, device: tch::Device, batch: Batch, metrics: &WorkerMetrics) {
    let now = Instant::now();
    let mut jobs = Vec::with_capacity(batch.jobs.len());
    for job in batch.jobs {
        if job.is_abandoned() {
            metrics.cancelled_dropped.increment(1);
        } else if job.is_expired(now) {
            metrics.deadline_dropped.increment(1);
            job.answer(Err(RunError::DeadlineExceeded));
        } else {
            jobs.push(job);
        }
    }
    if jobs.is_empty() {
        return;
    }
    let rows: usize = jobs.iter().map(Job::rows).sum();
    let padded = batch
        .allowed_sizes
        .iter()
        .copied()
        .find(|&size| size >= rows)
        .unwrap_or(rows);
    metrics.batch_size.record(padded as f64);
    let started = Instant::now();

    if jobs.len() == 1 && padded == rows {
        let job = jobs.pop().expect("one job");
        let result = guarded_forward(module, device, &job.method, &job.inputs);
        metrics
            .forward_seconds
            .record(started.elapsed().as_secs_f64());
        job.answer(result);
        return;
    }

    let inputs = match concat_inputs(&jobs, padded) {
        Ok(inputs) => inputs,
        Err(e) => return fail_all(jobs, e),
    };
    let result = guarded_forward(module, device, &jobs[0].method, &inputs);
    metrics
        .forward_seconds
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(output) => {
            let mut start = 0;
            for job in jobs {
                let rows = job.rows();
                let own = split_output(&output, start, rows, padded);
                start += rows;
                job.answer(own);
            }
        }
        Err(e) => fail_all(jobs, e),
    }
}

fn fail_all(jobs: Vec<Job>, error: RunError) {
    for job in jobs {
        job.answer(Err(error.clone()));
    }
}

/// One tensor per input position: the jobs' rows concatenated, padded to `padded` rows.
fn concat_inputs(jobs: &[Job], padded: usize) -> Result<Vec<Tensor>, RunError> {
    (0..jobs[0].inputs.len())
        .map(|position| {
            let parts: Vec<&Tensor> = jobs.iter().map(|job| &job.inputs[position]).collect();
            Tensor::concat_rows_padded(&parts, padded).map_err(RunError::BadOutput)
        })
        .collect()
}

/// Rows `start..start + rows` of every output tensor; each must have `padded` rows.
fn split_output(
    output: &ModelOutput,
    start: usize,
    rows: usize,
    padded: usize,
) -> Result<ModelOutput, RunError> {
    let slice = |tensor: &Tensor| {
        if tensor.rows() != Some(padded) {
            return Err(RunError::BadOutput(format!(
                "a batched output has shape {:?} for a batch of {padded} rows; outputs must keep the batch \
                 along dim 0 (turn batching off for this model)",
                tensor.shape
            )));
        }
        Ok(tensor.slice_rows(start, rows))
    };
    Ok(match output {
        ModelOutput::Tensor(t) => ModelOutput::Tensor(slice(t)?),
        ModelOutput::Sequence(ts) => {
            ModelOutput::Sequence(ts.iter().map(slice).collect::<Result<_, _>>()?)
        }
        ModelOutput::Dict(entries) => ModelOutput::Dict(
            entries
                .iter()
                .map(|(name, t)| Ok((name.clone(), slice(t)?)))
                .collect::<Result<_, RunError>>()?,
        ),
    })
}

/// A forward that cannot take the worker down: a panic in the binding costs one batch.
fn guarded_forward(
    module: &CModule,
    device: tch::Device,
    method: &str,
    inputs: &[Tensor],
) -> Result<ModelOutput, RunError> {
    catch_unwind(AssertUnwindSafe(|| forward(module, device, method, inputs)))
        .unwrap_or_else(|_| Err(RunError::Torch("libtorch call panicked".into())))
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
