//! Worker threads: each runs batches of jobs on one device, from a bounded queue shared by
//! every worker of a model version, so a busy device pushes back instead of piling work up
//! in memory.

use super::convert::{model_output, to_torch, torch_error};
use super::{Device, LoadError, ModelOutput, RunError};
use crate::telemetry::{self, VersionMetrics};
use crate::tensor::Tensor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Per-version metric handles, created once so the hot path does not build labels. They
/// keep the version's series exposed while a worker runs.
#[derive(Clone)]
struct WorkerMetrics {
    batch_size: metrics::Histogram,
    forward_seconds: metrics::Histogram,
    deadline_dropped: metrics::Counter,
    cancelled_dropped: metrics::Counter,
    _series: VersionMetrics,
}

impl WorkerMetrics {
    fn new(series: &VersionMetrics) -> WorkerMetrics {
        let rejected =
            |reason| series.counter(telemetry::REJECTED_REQUESTS_TOTAL, &[("reason", reason)]);
        WorkerMetrics {
            batch_size: series.histogram(telemetry::BATCH_SIZE),
            forward_seconds: series.histogram(telemetry::FORWARD_DURATION_SECONDS),
            deadline_dropped: rejected("deadline"),
            cancelled_dropped: rejected("cancelled"),
            _series: series.clone(),
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

/// The worker threads of one version: unloading waits for them to finish (so that "unloaded"
/// means the module is freed), and liveness asks whether a device still has any.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    health: Arc<WorkerHealth>,
}

/// Per device, how many of its workers died: a worker only ever exits on its own when its
/// source closes (the version unloads); anything else is a panic outside a batch's work.
struct WorkerHealth {
    instances: usize,
    died: Vec<(Device, AtomicUsize)>,
}

impl Workers {
    /// The devices every one of whose workers has died: nothing runs this version there any
    /// more, and only a restart brings them back (liveness fails on it).
    pub fn lost_devices(&self) -> Vec<Device> {
        self.health
            .died
            .iter()
            .filter(|(_, died)| died.load(Ordering::SeqCst) >= self.health.instances)
            .map(|(device, _)| *device)
            .collect()
    }

    /// Blocks until every worker has exited: call it once their source is closed.
    pub fn join(self) {
        for thread in self.threads {
            // A worker that died has been logged and counted already.
            let _ = thread.join();
        }
    }
}

/// Counts a worker's death if its thread unwinds (drops this while panicking).
struct DeathWatch {
    health: Arc<WorkerHealth>,
    device: usize,
    name: String,
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let died = self.health.died[self.device]
                .1
                .fetch_add(1, Ordering::SeqCst)
                + 1;
            tracing::error!(
                worker = %self.name,
                died,
                instances = self.health.instances,
                "a worker thread died; its device runs this model on the workers left"
            );
        }
    }
}

/// Loads the TorchScript module at `path` onto every device (one copy per device) and
/// starts its workers, which run what `source` gives them until it closes, then free the
/// module. `series` is the version's (it names the threads too). Blocking: call it from a
/// blocking thread, never from the async executor.
pub fn start_workers(
    path: &Path,
    series: &VersionMetrics,
    config: &RunnerConfig,
    source: &BatchSource,
) -> Result<Workers, LoadError> {
    let metrics = WorkerMetrics::new(series);
    let (model, version) = (series.model(), series.version());
    let instances = config.instances_per_device.max(1);
    let health = Arc::new(WorkerHealth {
        instances,
        died: config
            .devices
            .iter()
            .map(|&device| (device, AtomicUsize::new(0)))
            .collect(),
    });
    let mut threads = Vec::with_capacity(config.devices.len() * instances);
    for (index, &device) in config.devices.iter().enumerate() {
        let module = Arc::new(load_module(path, device)?);
        for instance in 0..instances {
            let (module, source, metrics) = (Arc::clone(&module), source.clone(), metrics.clone());
            let name = format!("{model}/{version}@{device}#{instance}");
            let watch = DeathWatch {
                health: Arc::clone(&health),
                device: index,
                name: name.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let _watch = watch;
                    while let Some(batch) = source.next() {
                        execute(&module, device.to_tch(), batch, &metrics);
                    }
                })
                .map_err(|e| LoadError::Thread(e.to_string()))?;
            threads.push(thread);
        }
    }
    Ok(Workers { threads, health })
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
/// one forward, and answers each job with its own rows. Everything between taking the jobs
/// and answering them is caught: a panic anywhere in a batch's work (concatenating,
/// libtorch, splitting) answers that batch INTERNAL and the worker goes on.
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
    let work = || run_jobs(module, device, &jobs, &batch.allowed_sizes, metrics);
    let results = catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic_message(panic.as_ref());
        tracing::error!(
            jobs = jobs.len(),
            "running a batch panicked ({message}); its requests are answered INTERNAL"
        );
        vec![Err(RunError::Crashed(message)); jobs.len()]
    });
    for (job, result) in jobs.into_iter().zip(results) {
        job.answer(result);
    }
}

/// The results of `jobs` run as one batch, one per job, in order.
fn run_jobs(
    module: &CModule,
    device: tch::Device,
    jobs: &[Job],
    allowed_sizes: &[usize],
    metrics: &WorkerMetrics,
) -> Vec<Result<ModelOutput, RunError>> {
    let rows = jobs
        .iter()
        .try_fold(0usize, |sum, job| sum.checked_add(job.rows()));
    let Some(rows) = rows else {
        let error = RunError::BadOutput("a batch has more rows than can be counted".into());
        return vec![Err(error); jobs.len()];
    };
    let padded = padded_size(allowed_sizes, rows);
    metrics.batch_size.record(padded as f64);
    let started = Instant::now();
    let record = |started: Instant| {
        metrics
            .forward_seconds
            .record(started.elapsed().as_secs_f64())
    };

    if let ([job], true) = (jobs, padded == rows) {
        let result = forward(module, device, &job.method, &job.inputs);
        record(started);
        return vec![result];
    }
    let result = concat_inputs(jobs, padded)
        .and_then(|inputs| forward(module, device, &jobs[0].method, &inputs));
    record(started);
    match result {
        Ok(output) => {
            let mut start = 0;
            jobs.iter()
                .map(|job| {
                    let own = split_output(&output, start, job.rows(), padded);
                    start += job.rows();
                    own
                })
                .collect()
        }
        Err(e) => vec![Err(e); jobs.len()],
    }
}

/// The rows a batch of `rows` rows runs with: the smallest allowed size that holds them
/// (none allowed, or none large enough: as they are). A batch without rows is not padded.
pub fn padded_size(allowed_sizes: &[usize], rows: usize) -> usize {
    if rows == 0 {
        return 0;
    }
    allowed_sizes
        .iter()
        .copied()
        .find(|&size| size >= rows)
        .unwrap_or(rows)
}

/// What a panic carried, for the log and the client's message.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_string(),
        (_, Some(message)) => message.clone(),
        _ => "a panic without a message".to_string(),
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
        tensor.slice_rows(start, rows).ok_or_else(|| {
            RunError::BadOutput(format!(
                "rows {start}..{start}+{rows} of a batched output of shape {:?}",
                tensor.shape
            ))
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A TorchScript module computing `2 * x`, saved where `start_workers` can load it.
    fn doubling_module(tag: &str) -> std::path::PathBuf {
        let example = tch::Tensor::zeros([2, 1], (tch::Kind::Float, tch::Device::Cpu));
        let module =
            CModule::create_by_tracing("double", "forward", &[example], &mut |xs| vec![&xs[0] * 2])
                .unwrap();
        let path = std::env::temp_dir().join(format!("modelgate-{tag}-{}.pt", std::process::id()));
        module.save(&path).unwrap();
        path
    }

    fn cpu(instances: usize) -> RunnerConfig {
        RunnerConfig {
            devices: vec![Device::Cpu],
            instances_per_device: instances,
        }
    }

    fn job(values: &[f32]) -> (Job, JobResult) {
        let rows = values.len() as i64;
        let input = Tensor::from_values(vec![rows, 1], values).unwrap();
        Job::new(Arc::from("forward"), vec![input], None)
    }

    /// Waits a bounded time for a job's answer.
    fn answer(mut result: JobResult) -> Result<ModelOutput, RunError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match result.try_recv() {
                Ok(answer) => return answer,
                Err(oneshot::error::TryRecvError::Empty) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("no answer: {e}"),
            }
        }
    }

    /// Before, only the forward was guarded: a panic while concatenating a batch killed the
    /// worker thread, and with one worker nothing was answered again (issue 10, bug 4).
    #[test]
    fn a_panic_in_a_batch_answers_it_internal_and_the_worker_goes_on() {
        let path = doubling_module("panic");
        let (batches, queue) = flume::bounded(4);
        let workers = start_workers(
            &path,
            &VersionMetrics::new("m", 1),
            &cpu(1),
            &BatchSource::Queue(queue),
        )
        .unwrap();

        // Jobs whose inputs do not line up (a batch key would never group them): indexing
        // the second job's missing input panics in the middle of the batch's work.
        let (first, first_result) = job(&[1.0]);
        let (mut second, second_result) = job(&[2.0]);
        second.inputs.clear();
        let allowed_sizes = Arc::from([]);
        batches
            .send(Batch {
                jobs: vec![first, second],
                allowed_sizes,
            })
            .unwrap();
        for result in [first_result, second_result] {
            let error = answer(result).unwrap_err();
            assert!(
                matches!(&error, RunError::Crashed(m) if m.contains("index")),
                "{error:?}"
            );
        }

        let (good, good_result) = job(&[1.5, -3.0]);
        batches.send(Batch::single(good)).unwrap();
        let Ok(ModelOutput::Tensor(doubled)) = answer(good_result) else {
            panic!("the worker did not answer after the panic");
        };
        assert_eq!(doubled.to_values::<f32>().unwrap(), vec![3.0, -6.0]);
        assert!(workers.lost_devices().is_empty());

        drop(batches);
        workers.join();
        let _ = std::fs::remove_file(path);
    }

    struct PanickingFormer;

    impl BatchFormer for PanickingFormer {
        fn next_batch(&self) -> Option<Batch> {
            panic!("the former broke");
        }
    }

    /// A worker that dies outside a batch is counted; once a device has none left it is
    /// reported lost (liveness fails on it), and joining still returns.
    #[test]
    fn a_device_whose_workers_all_died_is_lost() {
        let path = doubling_module("lost");
        let source = BatchSource::Former(Arc::new(PanickingFormer));
        let workers = start_workers(&path, &VersionMetrics::new("m", 1), &cpu(2), &source).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while workers.lost_devices().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(workers.lost_devices(), vec![Device::Cpu]);
        workers.join();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn padding_takes_the_smallest_allowed_size_and_never_pads_nothing() {
        assert_eq!(padded_size(&[4, 8], 0), 0);
        assert_eq!(padded_size(&[4, 8], 3), 4);
        assert_eq!(padded_size(&[4, 8], 5), 8);
        assert_eq!(padded_size(&[4, 8], 9), 9);
        assert_eq!(padded_size(&[], 3), 3);
    }
}
