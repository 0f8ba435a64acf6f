//! Worker threads: each runs batches of jobs on one device, from a bounded queue shared by
//! every worker of a model version, so a busy device pushes back instead of piling work up
//! in memory.

use super::convert::model_output;
use super::model::Model;
use super::staging::Staging;
use super::{cuda, Device, LoadError, ModelOutput, RunError};
use crate::telemetry::{self, BatchPhases, VersionMetrics};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

/// How a model runs: where, and on how many threads.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Every device gets its own copy of the model and its own workers.
    pub devices: Vec<Device>,
    /// Worker threads per device sharing that device's model (TorchScript modules run
    /// concurrent calls; an AOTInductor package gets one runner per worker).
    pub instances_per_device: usize,
    /// Freeze a TorchScript module at load, keeping these methods, and optimize it for
    /// inference (`--freeze_models`); `None` runs it as saved.
    pub freeze: Option<Vec<String>>,
}

impl RunnerConfig {
    /// TF Serving's `num_batch_threads`: threads that run the model's batches in all,
    /// spread over the devices (rounded up to the same number on each, at least one).
    pub fn with_batch_threads(mut self, threads: usize) -> RunnerConfig {
        self.instances_per_device = threads.div_ceil(self.devices.len().max(1)).max(1);
        self
    }
}

/// A call every worker runs on its own module before it serves, so that no request pays
/// for libtorch's lazy set-up (allocations, kernels chosen per shape, the staging buffers)
/// and a model that cannot run its own signature is refused before it serves.
#[derive(Clone, Debug)]
pub struct SyntheticWarmUp {
    /// What the call is, for errors and logs ("signature 'x' at batch size 8").
    pub label: String,
    pub method: Arc<str>,
    pub inputs: Vec<Tensor>,
    /// Whether a failure fails the load; otherwise it is only logged (the inputs were a
    /// guess, e.g. free dimensions set to 1).
    pub required: bool,
}

/// One call of a method, waiting to run alone or as part of a batch.
pub struct Job {
    pub method: Arc<str>,
    /// In the method's positional order.
    pub inputs: Vec<Tensor>,
    /// Past this instant the job is answered DEADLINE_EXCEEDED instead of run.
    pub deadline: Option<Instant>,
    /// When the job was made, to time its wait for a worker.
    queued_at: Instant,
    /// Whether dim 0 of its inputs is a batch (see [`Job::inferences`]).
    batched: bool,
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
            queued_at: Instant::now(),
            batched: true,
            reply,
        };
        (job, result)
    }

    /// The job runs inputs without a batch dimension: it is one inference, whatever its
    /// first dimension.
    pub fn unbatched(mut self) -> Job {
        self.batched = false;
        self
    }

    /// How many inferences the job is, for V2's statistics: its rows, or one.
    pub fn inferences(&self) -> usize {
        if self.batched {
            self.rows()
        } else {
            1
        }
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
    /// The fewest rows the model takes (an AOTInductor package's export range): a smaller
    /// batch, such as the tail of a split request, is padded up to it. 0 or 1: no floor.
    pub min_rows: usize,
}

impl Batch {
    pub fn single(job: Job) -> Batch {
        Batch {
            jobs: vec![job],
            allowed_sizes: Arc::from([]),
            min_rows: 0,
        }
    }
}

/// Per-version metric handles, created once so the hot path does not build labels. They
/// keep the version's series exposed while a worker runs.
#[derive(Clone)]
struct WorkerMetrics {
    /// The wait of a job in the worker's own queue, without server-side batching (the
    /// batch former times its queue itself); `None` with batching.
    queue_delay: Option<metrics::Histogram>,
    batch_size: metrics::Histogram,
    forward_seconds: metrics::Histogram,
    deadline_dropped: metrics::Counter,
    cancelled_dropped: metrics::Counter,
    series: VersionMetrics,
}

impl WorkerMetrics {
    fn new(series: &VersionMetrics, source: &BatchSource) -> WorkerMetrics {
        let rejected =
            |reason| series.counter(telemetry::REJECTED_REQUESTS_TOTAL, &[("reason", reason)]);
        WorkerMetrics {
            queue_delay: matches!(source, BatchSource::Queue { .. })
                .then(|| series.histogram(telemetry::QUEUE_DELAY_SECONDS)),
            batch_size: series.histogram(telemetry::BATCH_SIZE),
            forward_seconds: series.histogram(telemetry::FORWARD_DURATION_SECONDS),
            deadline_dropped: rejected("deadline"),
            cancelled_dropped: rejected("cancelled"),
            series: series.clone(),
        }
    }
}

impl WorkerMetrics {
    /// Records how long the batch's jobs waited for this worker (without batching: the
    /// former records its own queue). The queue time of V2's statistics, for every request.
    fn record_queue_wait(&self, batch: &Batch) {
        if let Some(queue_delay) = &self.queue_delay {
            let now = Instant::now();
            for job in &batch.jobs {
                queue_delay.record(now.duration_since(job.queued_at).as_secs_f64());
            }
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
    /// back on the senders. `depth` counts what waits in it: the senders raise it, the
    /// workers lower it as they take a batch.
    Queue {
        batches: flume::Receiver<Batch>,
        depth: metrics::Gauge,
    },
    Former(Arc<dyn BatchFormer>),
}

impl BatchSource {
    fn next(&self) -> Option<Batch> {
        match self {
            BatchSource::Queue { batches, depth } => {
                let batch = batches.recv().ok();
                if batch.is_some() {
                    depth.decrement(1.0);
                }
                batch
            }
            BatchSource::Former(former) => former.next_batch(),
        }
    }
}

/// The worker threads of one version: unloading waits for them to finish (so that "unloaded"
/// means the module is freed), and liveness asks whether a device still has any.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    health: Arc<WorkerHealth>,
    /// The bytes the model holds on each device (see [`Workers::resident_bytes`]).
    resident: Vec<(Device, u64)>,
}

/// Per device, how many of its workers died: a worker only ever exits on its own when its
/// source closes (the version unloads); anything else is a panic outside a batch's work.
/// And whether the device failed under this model (a CUDA error that leaves its context
/// unusable: nothing runs there again until the process restarts).
struct WorkerHealth {
    instances: usize,
    died: Vec<(Device, AtomicUsize)>,
    failed: Vec<AtomicBool>,
}

impl Workers {
    /// The bytes the version's model holds on each of its devices, measured at load: its
    /// parameters, buffers and tensor attributes (a TorchScript module) or its constants
    /// (a package). Activations come and go with each batch on top of these.
    pub fn resident_bytes(&self) -> &[(Device, u64)] {
        &self.resident
    }

    /// The devices every one of whose workers has died, or that failed under this version:
    /// nothing runs it there any more, and only a restart brings them back (liveness fails
    /// on it).
    pub fn lost_devices(&self) -> Vec<Device> {
        self.health
            .died
            .iter()
            .zip(&self.health.failed)
            .filter(|((_, died), failed)| {
                died.load(Ordering::SeqCst) >= self.health.instances
                    || failed.load(Ordering::SeqCst)
            })
            .map(|((device, _), _)| *device)
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

/// Loads the model file at `path` (TorchScript or an AOTInductor package) onto every
/// device (one copy per device) and starts its workers. Each binds its thread to its
/// device, runs every `warm_up` call, then runs what `source` gives it until it closes, and
/// frees the model. Returns once every
/// worker has warmed up. `series` is the version's (it names the threads too). Blocking:
/// call it from a blocking thread, never from the async executor.
pub fn start_workers(
    path: &Path,
    series: &VersionMetrics,
    config: &RunnerConfig,
    source: &BatchSource,
    warm_up: &[SyntheticWarmUp],
) -> Result<Workers, LoadError> {
    let metrics = WorkerMetrics::new(series, source);
    let (model, version) = (series.model(), series.version());
    let instances = config.instances_per_device.max(1);
    let health = Arc::new(WorkerHealth {
        instances,
        died: config
            .devices
            .iter()
            .map(|&device| (device, AtomicUsize::new(0)))
            .collect(),
        failed: config
            .devices
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect(),
    });
    let warm_up: Arc<[SyntheticWarmUp]> = Arc::from(warm_up);
    // On a GPU, what the version holds is what the caching allocator grew by over its load
    // and warm-up (at its largest batch, the peak): measured with this process's other
    // loads on that GPU kept out.
    let cuda_loads = CudaLoads::begin(&config.devices);
    let (warmed, warm_ups) = std::sync::mpsc::channel();
    // Workers that warmed up serve only once every one of them has: should any fail, the
    // others stop too, and the load returns only once they have freed the model (the
    // caller then gives its bytes back to the budget).
    let verdict = Arc::new(Verdict::default());
    let mut threads = Vec::with_capacity(config.devices.len() * instances);
    let mut resident = Vec::with_capacity(config.devices.len());
    let started = (|| {
        for (index, &device) in config.devices.iter().enumerate() {
            let loaded = Arc::new(Model::load(
                path,
                device,
                instances,
                config.freeze.as_deref(),
            )?);
            resident.push((device, loaded.resident_bytes()));
            for instance in 0..instances {
                let name = format!("{model}/{version}@{device}#{instance}");
                let mut worker = Worker {
                    model: Arc::clone(&loaded),
                    device,
                    staging: Staging::new(device.to_tch()),
                    marks: PhaseMarks::default(),
                    metrics: metrics.clone(),
                    health: Arc::clone(&health),
                    device_index: index,
                    name: name.clone(),
                };
                let watch = DeathWatch {
                    health: Arc::clone(&health),
                    device: index,
                    name: name.clone(),
                };
                let (source, warm_up, warmed) =
                    (source.clone(), Arc::clone(&warm_up), warmed.clone());
                let verdict = Arc::clone(&verdict);
                let thread = std::thread::Builder::new()
                    .name(name)
                    .spawn(move || {
                        let _watch = watch;
                        super::adopt_intra_op_threads();
                        let ready = worker.prepare(&warm_up);
                        let warmed_up = ready.is_ok();
                        let _ = warmed.send(ready);
                        // Let go of the sender now: the loader counts a worker that dies
                        // before answering by every sender being gone, and this one waits
                        // below for the verdict.
                        drop(warmed);
                        if warmed_up && verdict.serve() {
                            while let Some(batch) = source.next() {
                                worker.metrics.record_queue_wait(&batch);
                                worker.execute(batch);
                            }
                        }
                    })
                    .map_err(|e| LoadError::Thread(e.to_string()))?;
                threads.push(thread);
            }
        }
        Ok(())
    })();
    drop(warmed);
    let ready = started.and_then(|()| {
        for _ in 0..threads.len() {
            // A worker that panicked while warming up dropped its sender unanswered.
            warm_ups.recv().unwrap_or_else(|_| {
                Err(LoadError::Thread("a worker died while warming up".into()))
            })?;
        }
        Ok(())
    });
    verdict.decide(ready.is_ok());
    if let Err(e) = ready {
        for thread in threads {
            let _ = thread.join();
        }
        return Err(e);
    }
    let resident = cuda_loads.finish(resident);
    Ok(Workers {
        threads,
        health,
        resident,
    })
}

/// Whether a version's warmed-up workers go on to serve, decided once all have warmed up.
#[derive(Default)]
struct Verdict {
    serve: Mutex<Option<bool>>,
    decided: std::sync::Condvar,
}

impl Verdict {
    fn decide(&self, serve: bool) {
        *self.serve.lock().unwrap_or_else(|e| e.into_inner()) = Some(serve);
        self.decided.notify_all();
    }

    /// Blocks until decided.
    fn serve(&self) -> bool {
        let mut serve = self.serve.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match *serve {
                Some(decided) => return decided,
                None => serve = self.decided.wait(serve).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// Serializes loads per GPU, so that the caching allocator's growth over one load is that
/// load's. Inference on other versions may still allocate meanwhile; their blocks are
/// freed after each batch and move only the peak.
/// One lock per GPU index ever used, made once and kept for the process's life.
static CUDA_LOAD_LOCKS: LazyLock<Mutex<HashMap<usize, &'static Mutex<()>>>> =
    LazyLock::new(Default::default);

/// The GPUs one load holds the load locks of, and their allocated bytes when it began.
struct CudaLoads {
    /// (gpu, allocated bytes before, its lock held)
    held: Vec<(usize, u64, std::sync::MutexGuard<'static, ()>)>,
}

impl CudaLoads {
    fn begin(devices: &[Device]) -> CudaLoads {
        let mut gpus: Vec<usize> = devices
            .iter()
            .filter_map(|device| match device {
                Device::Cuda(gpu) => Some(*gpu),
                Device::Cpu => None,
            })
            .collect();
        // Always in the same order, so that two loads cannot wait for each other.
        gpus.sort_unstable();
        gpus.dedup();
        let held = gpus
            .into_iter()
            .map(|gpu| {
                let lock: &'static Mutex<()> = CUDA_LOAD_LOCKS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(gpu)
                    .or_insert_with(|| Box::leak(Box::default()));
                let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                let before = super::cuda::allocated_bytes(gpu, true).map_or(0, |(now, _)| now);
                (gpu, before, guard)
            })
            .collect();
        CudaLoads { held }
    }

    /// The bytes each device holds: on a GPU the allocator's peak growth since `begin`, or
    /// the model's own tensors if those are more (all the tensors outlive the load).
    fn finish(self, tensors: Vec<(Device, u64)>) -> Vec<(Device, u64)> {
        tensors
            .into_iter()
            .map(|(device, bytes)| {
                let Device::Cuda(gpu) = device else {
                    return (device, bytes);
                };
                let grown = self
                    .held
                    .iter()
                    .find(|(held, _, _)| *held == gpu)
                    .and_then(|(_, before, _)| {
                        let (_, peak) = super::cuda::allocated_bytes(gpu, false).ok()?;
                        Some(peak.saturating_sub(*before))
                    })
                    .unwrap_or(0);
                (device, bytes.max(grown))
            })
            .collect()
    }
}

/// One worker thread's state: its device's model, and the host memory it stages batches
/// in.
struct Worker {
    model: Arc<Model>,
    device: Device,
    staging: Staging,
    /// Where the batch running now is: set by [`Worker::forward`] as each phase ends.
    marks: PhaseMarks,
    metrics: WorkerMetrics,
    health: Arc<WorkerHealth>,
    device_index: usize,
    name: String,
}

impl Worker {
    /// Binds the thread to its GPU (current device, own stream) and runs the warm-up calls.
    fn prepare(&mut self, warm_up: &[SyntheticWarmUp]) -> Result<(), LoadError> {
        if let Device::Cuda(gpu) = self.device {
            cuda::bind_thread(gpu).map_err(|message| LoadError::Device {
                device: self.device.to_string(),
                message,
            })?;
        }
        for call in warm_up {
            let (job, _answer) = Job::new(Arc::clone(&call.method), call.inputs.clone(), None);
            let rows = job.rows();
            let started = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| self.run_jobs(&[job], rows)));
            let error = match result {
                Ok(mut results) => match results.pop() {
                    Some(Err(e)) => Some(e),
                    _ => None,
                },
                Err(panic) => Some(RunError::Crashed(panic_message(panic.as_ref()))),
            };
            match error {
                None => tracing::debug!(
                    worker = %self.name,
                    call = %call.label,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "warmed up"
                ),
                Some(e) if call.required => {
                    return Err(LoadError::WarmUp {
                        call: call.label.clone(),
                        message: e.to_string(),
                    })
                }
                Some(e) => tracing::warn!(
                    worker = %self.name,
                    call = %call.label,
                    "warm-up with guessed inputs failed: {e}"
                ),
            }
        }
        Ok(())
    }

    /// Runs one batch: drops jobs whose caller left or whose deadline passed, runs the rest
    /// in one forward, and answers each job with its own rows. Everything between taking
    /// the jobs and answering them is caught: a panic anywhere in a batch's work
    /// (staging, libtorch, splitting) answers that batch INTERNAL and the worker goes on.
    fn execute(&mut self, batch: Batch) {
        let now = Instant::now();
        let mut jobs = Vec::with_capacity(batch.jobs.len());
        for job in batch.jobs {
            if job.is_abandoned() {
                self.metrics.cancelled_dropped.increment(1);
            } else if job.is_expired(now) {
                self.metrics.deadline_dropped.increment(1);
                job.answer(Err(RunError::DeadlineExceeded));
            } else {
                jobs.push(job);
            }
        }
        if jobs.is_empty() {
            return;
        }
        let rows = jobs
            .iter()
            .try_fold(0usize, |sum, job| sum.checked_add(job.rows()));
        let results = match rows {
            None => {
                let error = RunError::BadOutput("a batch has more rows than can be counted".into());
                vec![Err(error); jobs.len()]
            }
            Some(rows) => {
                let floor = if rows == 0 {
                    0
                } else {
                    rows.max(batch.min_rows)
                };
                let padded = padded_size(&batch.allowed_sizes, floor);
                self.metrics.batch_size.record(padded as f64);
                self.marks = PhaseMarks::default();
                let started = Instant::now();
                let work = || self.run_jobs(&jobs, padded);
                let results = catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
                    let message = panic_message(panic.as_ref());
                    tracing::error!(
                        jobs = jobs.len(),
                        "running a batch panicked ({message}); its requests are answered INTERNAL"
                    );
                    vec![Err(RunError::Crashed(message)); jobs.len()]
                });
                let ended = Instant::now();
                self.metrics
                    .forward_seconds
                    .record(ended.duration_since(started).as_secs_f64());
                let phases = self.marks.phases(started, ended);
                let inferences: usize = jobs
                    .iter()
                    .zip(&results)
                    .filter(|(_, result)| result.is_ok())
                    .map(|(job, _)| job.inferences())
                    .sum();
                if results.iter().any(Result::is_ok) {
                    self.metrics.series.record_batch(padded, inferences, phases);
                }
                results
            }
        };
        if let Some(Err(RunError::DeviceFailed(message))) = results
            .iter()
            .find(|r| matches!(r, Err(RunError::DeviceFailed(_))))
        {
            self.device_failed(message);
        }
        for (job, result) in jobs.into_iter().zip(results) {
            job.answer(result);
        }
    }

    /// Marks this worker's device failed under this version (liveness then fails) and logs
    /// it once, naming the model.
    fn device_failed(&self, message: &str) {
        let failed = &self.health.failed[self.device_index];
        if !failed.swap(true, Ordering::SeqCst) {
            tracing::error!(
                worker = %self.name,
                device = %self.device,
                "the device failed while running this model and cannot run anything until \
                 the process restarts (liveness now fails): {message}"
            );
        }
    }

    /// The results of `jobs` run as one batch of `padded` rows, one per job, in order.
    fn run_jobs(&mut self, jobs: &[Job], padded: usize) -> Vec<Result<ModelOutput, RunError>> {
        let output = self.forward(jobs, padded);
        match output {
            Ok(output) if jobs.len() == 1 && padded == jobs[0].rows() => vec![Ok(output)],
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

    /// Stages the jobs' inputs (concatenated, padded) and runs their method once.
    fn forward(&mut self, jobs: &[Job], padded: usize) -> Result<ModelOutput, RunError> {
        let _no_grad = tch::no_grad_guard();
        self.staging.begin_batch()?;
        // A job alone at its own size runs on its inputs as they are (they may differ in
        // rows, or be scalars, when its signature is not batched).
        let rows = match jobs {
            [job] if job.rows() == padded => 0,
            _ => padded,
        };
        let args = (0..jobs[0].inputs.len())
            .map(|position| {
                let parts: Vec<&Tensor> = jobs.iter().map(|job| &job.inputs[position]).collect();
                self.staging.input(position, &parts, rows)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.marks.staged = Some(Instant::now());
        let result = self.model.run(&jobs[0].method, args)?;
        self.marks.ran = Some(Instant::now());
        model_output(result, &self.staging)
    }
}

/// When a batch's inputs were staged and when its method returned. What follows, to the
/// end of the batch's work, is its output phase: bringing the outputs to the host and
/// splitting them among its requests.
#[derive(Clone, Copy, Debug, Default)]
struct PhaseMarks {
    staged: Option<Instant>,
    ran: Option<Instant>,
}

impl PhaseMarks {
    /// A batch's work from `started` to `ended`, split at the marks. A batch that failed
    /// (or panicked) part-way has its time in the phase it failed in and none in those it
    /// never reached: each batch still counts once in every phase, which keeps Triton's
    /// three compute counts equal.
    fn phases(&self, started: Instant, ended: Instant) -> BatchPhases {
        let staged = self.staged.unwrap_or(ended).clamp(started, ended);
        let ran = self.ran.unwrap_or(ended).clamp(staged, ended);
        BatchPhases {
            input: staged.duration_since(started),
            infer: ran.duration_since(staged),
            output: ended.duration_since(ran),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tch::CModule;

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
            freeze: None,
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
            &BatchSource::Queue {
                batches: queue,
                depth: metrics::Gauge::noop(),
            },
            &[],
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
                min_rows: 0,
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
        let workers =
            start_workers(&path, &VersionMetrics::new("m", 1), &cpu(2), &source, &[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while workers.lost_devices().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(workers.lost_devices(), vec![Device::Cpu]);
        workers.join();
        let _ = std::fs::remove_file(path);
    }

    /// A module that runs only on an even number of elements (it views its input as pairs).
    fn pairing_module(tag: &str) -> std::path::PathBuf {
        let example = tch::Tensor::zeros([2, 1], (tch::Kind::Float, tch::Device::Cpu));
        let module = CModule::create_by_tracing("pairs", "forward", &[example], &mut |xs| {
            vec![xs[0].view([-1, 2]) * 2]
        })
        .unwrap();
        let path = std::env::temp_dir().join(format!("modelgate-{tag}-{}.pt", std::process::id()));
        module.save(&path).unwrap();
        path
    }

    fn warm_up_at(rows: i64, required: bool) -> SyntheticWarmUp {
        SyntheticWarmUp {
            label: format!("batch size {rows}"),
            method: Arc::from("forward"),
            inputs: vec![Tensor::zeros(crate::tensor::DType::F32, vec![rows, 1]).unwrap()],
            required,
        }
    }

    /// Every worker runs every warm-up call before the version serves; one that fails
    /// fails the load, naming the call, unless its inputs were only a guess.
    #[test]
    fn warm_up_runs_on_every_worker_and_a_required_failure_fails_the_load() {
        let path = pairing_module("warm");
        let series = VersionMetrics::new("m", 1);
        let (batches, queue) = flume::bounded::<Batch>(4);
        let source = BatchSource::Queue {
            batches: queue,
            depth: metrics::Gauge::noop(),
        };
        let fine = [
            warm_up_at(2, true),
            warm_up_at(4, true),
            warm_up_at(3, false),
        ];
        let workers = start_workers(&path, &series, &cpu(2), &source, &fine).unwrap();

        let (good, result) = job(&[1.0, 2.0]);
        batches.send(Batch::single(good)).unwrap();
        let Ok(ModelOutput::Tensor(doubled)) = answer(result) else {
            panic!("no answer after warm-up");
        };
        assert_eq!(doubled.to_values::<f32>().unwrap(), vec![2.0, 4.0]);
        drop(batches);
        workers.join();

        let failing = [warm_up_at(2, true), warm_up_at(3, true)];
        let (_batches, queue) = flume::bounded::<Batch>(4);
        let error = start_workers(
            &path,
            &series,
            &cpu(2),
            &BatchSource::Queue {
                batches: queue,
                depth: metrics::Gauge::noop(),
            },
            &failing,
        )
        .err()
        .expect("a warm-up that cannot run fails the load");
        assert!(
            matches!(&error, LoadError::WarmUp { call, .. } if call == "batch size 3"),
            "{error}"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn batch_threads_are_spread_over_the_devices() {
        let two_gpus = RunnerConfig {
            devices: vec![Device::Cuda(0), Device::Cuda(1)],
            instances_per_device: 2,
            freeze: None,
        };
        assert_eq!(
            two_gpus.clone().with_batch_threads(4).instances_per_device,
            2
        );
        assert_eq!(
            two_gpus.clone().with_batch_threads(3).instances_per_device,
            2
        );
        assert_eq!(two_gpus.with_batch_threads(1).instances_per_device, 1);
        assert_eq!(cpu(2).with_batch_threads(3).instances_per_device, 3);
    }

    #[test]
    fn a_batch_that_stops_part_way_has_no_time_in_the_phases_it_never_reached() {
        let started = Instant::now();
        let at = |ms| started + Duration::from_millis(ms);
        let ms = Duration::from_millis;
        let whole = PhaseMarks {
            staged: Some(at(1)),
            ran: Some(at(3)),
        };
        let phases = whole.phases(started, at(7));
        assert_eq!(
            (phases.input, phases.infer, phases.output),
            (ms(1), ms(2), ms(4))
        );
        let failed_in_forward = PhaseMarks {
            staged: Some(at(1)),
            ran: None,
        };
        let phases = failed_in_forward.phases(started, at(7));
        assert_eq!(
            (phases.input, phases.infer, phases.output),
            (ms(1), ms(6), ms(0))
        );
        let phases = PhaseMarks::default().phases(started, at(7));
        assert_eq!(
            (phases.input, phases.infer, phases.output),
            (ms(7), ms(0), ms(0))
        );
    }

    /// Every batch a worker runs counts once in each phase, by its (padded) size; warm-up
    /// calls do not count.
    #[test]
    fn a_worker_times_each_phase_of_each_batch() {
        let path = doubling_module("phases");
        let series = VersionMetrics::new("phases-worker", 1);
        let (batches, queue) = flume::bounded(4);
        let warm_up = [SyntheticWarmUp {
            label: "batch size 2".into(),
            method: Arc::from("forward"),
            inputs: vec![Tensor::zeros(crate::tensor::DType::F32, vec![2, 1]).unwrap()],
            required: true,
        }];
        let workers = start_workers(
            &path,
            &series,
            &cpu(1),
            &BatchSource::Queue {
                batches: queue,
                depth: metrics::Gauge::noop(),
            },
            &warm_up,
        )
        .unwrap();
        let (one, one_result) = job(&[1.0]);
        batches.send(Batch::single(one)).unwrap();
        answer(one_result).unwrap();
        let (first, first_result) = job(&[1.0]);
        let (second, second_result) = job(&[2.0, 3.0]);
        batches
            .send(Batch {
                jobs: vec![first, second],
                allowed_sizes: Arc::from([4]),
                min_rows: 0,
            })
            .unwrap();
        answer(first_result).unwrap();
        answer(second_result).unwrap();
        drop(batches);
        workers.join();

        let stats = telemetry::statistics(Some("phases-worker"));
        let compute = stats[0].compute;
        assert_eq!(stats[0].execution_count, 2);
        assert_eq!(
            (
                compute.input.count,
                compute.infer.count,
                compute.output.count
            ),
            (2, 2, 2)
        );
        let sizes: Vec<(u64, u64)> = stats[0]
            .batches
            .iter()
            .map(|b| (b.batch_size, b.compute.output.count))
            .collect();
        assert_eq!(sizes, vec![(1, 1), (4, 1)]);
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
