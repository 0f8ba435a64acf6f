//! Server-side batching (TF Serving's BatchingParameters): per model version, a bounded
//! queue and a batch former that closes a batch when it is full or when its oldest request
//! has waited `batch_timeout_micros`; the version's workers pull their batches from it.
//!
//! Without batching, the [`Scheduler`] hands each request to the workers on its own.

mod former;
mod options;

pub use options::{BatchingOptions, BATCHING_PARAMS_FILE};

use crate::runtime::{
    start_workers, Batch, BatchSource, Job, JobResult, LoadError, ModelOutput, RunError,
    RunnerConfig, SyntheticWarmUp, Workers,
};
use crate::telemetry::{self, VersionMetrics};
use crate::tensor::{DType, Tensor};
use former::Former;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What makes requests mixable in one batch: the same method and, per input, the same
/// dtype and the same dims after the batch dim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BatchKey {
    /// A request that cannot share a forward (its signature has an unbatched input).
    Alone,
    Shape {
        method: Arc<str>,
        inputs: Vec<(DType, Vec<i64>)>,
    },
}

impl BatchKey {
    fn of(job: &Job, batchable: bool) -> BatchKey {
        if !batchable || job.inputs.iter().any(|t| t.shape.is_empty()) {
            return BatchKey::Alone;
        }
        BatchKey::Shape {
            method: Arc::clone(&job.method),
            inputs: job
                .inputs
                .iter()
                .map(|t| (t.dtype, t.shape[1..].to_vec()))
                .collect(),
        }
    }
}

/// A job in the queue, with what the former needs to place it.
pub(crate) struct Queued {
    job: Job,
    key: BatchKey,
    rows: usize,
    enqueued: Instant,
}

/// What the queue carries: requests, and a nudge that sends an idle worker back to the
/// former (a batch is due, or an open batch's deadline needs watching).
pub(crate) enum Arrival {
    Job(Queued),
    Nudge,
}

/// State shared by the schedulers of one version and its batch former.
pub(crate) struct QueueState {
    options: BatchingOptions,
    /// Rows waiting in the queue; bounded by `max_enqueued_batches` batches of the batch
    /// size ([`BatchingOptions::queue_capacity_rows`]).
    queued_rows: AtomicUsize,
    queued_jobs: AtomicUsize,
    queue_depth: metrics::Gauge,
    queue_delay: metrics::Histogram,
    rejected_full: metrics::Counter,
}

enum Mode {
    /// Each request runs alone, queued for the workers (bounded); `depth` counts the queue
    /// (see [`BatchSource::Queue`]).
    Direct {
        batches: flume::Sender<Batch>,
        depth: metrics::Gauge,
    },
    Batching {
        jobs: flume::Sender<Arrival>,
        state: Arc<QueueState>,
    },
}

/// Runs a version's requests on its workers, alone or in batches. Dropping it lets the
/// workers finish what is queued, then stop and free the model.
pub struct Scheduler {
    mode: Mode,
    workers: Workers,
    rejected_full: metrics::Counter,
    /// The version's series stay exposed while it is loaded (see [`VersionMetrics`]).
    _series: VersionMetrics,
}

impl Scheduler {
    /// Loads the TorchScript module at `path` and starts its workers, each of which runs
    /// `warm_up` first: with `batching`, they take their batches from a batch former;
    /// without, from a queue of single requests that refuses new ones beyond
    /// `direct_capacity`. Blocking: call it from a blocking thread, never from the async
    /// executor.
    pub fn load(
        path: &Path,
        model: &str,
        version: i64,
        runner: &RunnerConfig,
        batching: Option<BatchingOptions>,
        direct_capacity: usize,
        warm_up: &[SyntheticWarmUp],
    ) -> Result<Scheduler, LoadError> {
        let series = VersionMetrics::new(model, version);
        let rejected_full = series.counter(
            telemetry::REJECTED_REQUESTS_TOTAL,
            &[("reason", "queue_full")],
        );
        let (mode, source) = match batching {
            None => {
                let (batches, queue) = flume::bounded(direct_capacity.max(1));
                let depth = series.gauge(telemetry::QUEUE_DEPTH);
                let source = BatchSource::Queue {
                    batches: queue,
                    depth: depth.clone(),
                };
                (Mode::Direct { batches, depth }, source)
            }
            Some(options) => {
                let state = Arc::new(QueueState {
                    options,
                    queued_rows: AtomicUsize::new(0),
                    queued_jobs: AtomicUsize::new(0),
                    queue_depth: series.gauge(telemetry::QUEUE_DEPTH),
                    queue_delay: series.histogram(telemetry::QUEUE_DELAY_SECONDS),
                    rejected_full: rejected_full.clone(),
                });
                let (jobs, queue) = flume::unbounded();
                let former = Former::new(queue, jobs.downgrade(), Arc::clone(&state));
                (
                    Mode::Batching { jobs, state },
                    BatchSource::Former(Arc::new(former)),
                )
            }
        };
        let workers = start_workers(path, &series, runner, &source, warm_up)?;
        for (device, bytes) in workers.resident_bytes() {
            series
                .labelled_gauge(
                    telemetry::MODEL_RESIDENT_BYTES,
                    &[("device", &device.to_string())],
                )
                .set(*bytes as f64);
        }
        Ok(Scheduler {
            mode,
            workers,
            rejected_full,
            _series: series,
        })
    }

    /// The devices on which every worker of this version has died (see [`Workers`]).
    pub fn lost_devices(&self) -> Vec<crate::runtime::Device> {
        self.workers.lost_devices()
    }

    /// The bytes the version's model holds on each device (see `Workers::resident_bytes`).
    pub fn resident_bytes(&self) -> &[(crate::runtime::Device, u64)] {
        self.workers.resident_bytes()
    }

    /// Closes the queue and blocks until the workers have answered what was queued and
    /// exited, freeing the module. Blocking: call it from a blocking thread.
    pub fn shut_down(self) {
        drop(self.mode);
        self.workers.join();
    }

    /// Whether requests are batched.
    pub fn batching(&self) -> Option<&BatchingOptions> {
        match &self.mode {
            Mode::Direct { .. } => None,
            Mode::Batching { state, .. } => Some(&state.options),
        }
    }

    /// Runs `method` on `inputs` (positional) and returns this request's own result.
    /// `batchable`: every input carries the batch along dim 0, so the request may share a
    /// forward with others. Refuses at once when the queue is full.
    pub async fn run(
        &self,
        method: Arc<str>,
        inputs: Vec<Tensor>,
        batchable: bool,
        deadline: Option<Instant>,
    ) -> Result<ModelOutput, RunError> {
        match &self.mode {
            Mode::Direct { batches, depth } => {
                let (job, result) = Job::new(method, inputs, deadline);
                let job = if batchable { job } else { job.unbatched() };
                // Raised before the send, so that a worker taking it at once never takes
                // the gauge below zero.
                depth.increment(1.0);
                batches.try_send(Batch::single(job)).map_err(|e| {
                    depth.decrement(1.0);
                    match e {
                        flume::TrySendError::Full(_) => {
                            self.rejected_full.increment(1);
                            RunError::QueueFull
                        }
                        flume::TrySendError::Disconnected(_) => RunError::Stopped,
                    }
                })?;
                wait(result).await
            }
            Mode::Batching { jobs, state } => {
                if !batchable {
                    // Runs alone: its first dimension is no batch, and it takes one row's
                    // room in the queue whatever its shape.
                    let (job, result) = Job::new(method, inputs, deadline);
                    reserve(state, 1)?;
                    send(jobs, state, job.unbatched(), BatchKey::Alone, 1)?;
                    return wait(result).await;
                }
                let rows = inputs.first().and_then(Tensor::rows).unwrap_or(0);
                let limit = state.options.execution_batch_size();
                if rows <= limit {
                    let (job, result) = Job::new(method, inputs, deadline);
                    let key = BatchKey::of(&job, true);
                    reserve(state, rows.max(1))?;
                    send(jobs, state, job, key, rows)?;
                    return wait(result).await;
                }
                // As in TF Serving: max_batch_size bounds a request, split or not.
                if !state.options.enable_large_batch_splitting
                    || rows > state.options.max_batch_size
                {
                    return Err(RunError::BatchTooLarge {
                        rows,
                        limit: state.options.max_batch_size,
                        splitting: state.options.enable_large_batch_splitting,
                    });
                }
                // Split into chunks of at most `limit` rows, queue them all, reassemble.
                reserve(state, rows)?; // chunks have at least one row each: they give back exactly `rows`
                let chunks: Option<Vec<Vec<Tensor>>> = (0..rows)
                    .step_by(limit)
                    .map(|start| {
                        let len = limit.min(rows - start);
                        inputs.iter().map(|t| t.slice_rows(start, len)).collect()
                    })
                    .collect();
                let Some(chunks) = chunks else {
                    state.queued_rows.fetch_sub(rows, Ordering::SeqCst);
                    return Err(RunError::BadOutput(
                        "the inputs of a split request differ in rows".into(),
                    ));
                };
                let mut results = Vec::with_capacity(chunks.len());
                for chunk in chunks {
                    let len = chunk.first().and_then(Tensor::rows).unwrap_or(0);
                    let (job, result) = Job::new(Arc::clone(&method), chunk, deadline);
                    let key = BatchKey::of(&job, true);
                    send(jobs, state, job, key, len)?;
                    results.push(result);
                }
                let mut parts = Vec::with_capacity(results.len());
                for result in results {
                    parts.push(wait(result).await?);
                }
                concat_outputs(parts)
            }
        }
    }
}

async fn wait(result: JobResult) -> Result<ModelOutput, RunError> {
    result.await.map_err(|_| RunError::Stopped)?
}

/// Takes room for `rows` in the queue, or refuses: memory stays bounded under any load.
/// A request larger than the whole queue could ever hold is the request's fault, not load.
fn reserve(state: &QueueState, rows: usize) -> Result<(), RunError> {
    let limit = state.options.queue_capacity_rows();
    if rows > limit {
        return Err(RunError::TooManyRows {
            rows,
            capacity: limit,
        });
    }
    // Only a reservation that fits is ever counted, so two requests near the limit cannot
    // each see the other's rows and both be refused.
    let reserved = state
        .queued_rows
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |queued| {
            queued.checked_add(rows).filter(|&total| total <= limit)
        });
    if reserved.is_err() {
        state.rejected_full.increment(1);
        return Err(RunError::QueueFull);
    }
    Ok(())
}

fn send(
    jobs: &flume::Sender<Arrival>,
    state: &QueueState,
    job: Job,
    key: BatchKey,
    rows: usize,
) -> Result<(), RunError> {
    let depth = state.queued_jobs.fetch_add(1, Ordering::SeqCst) + 1;
    state.queue_depth.set(depth as f64);
    jobs.send(Arrival::Job(Queued {
        job,
        key,
        rows,
        enqueued: Instant::now(),
    }))
    .map_err(|_| RunError::Stopped)
}

/// Reassembles the results of a split request, in order.
fn concat_outputs(parts: Vec<ModelOutput>) -> Result<ModelOutput, RunError> {
    let concat = |tensors: Vec<&Tensor>| Tensor::concat_rows(&tensors).map_err(RunError::BadOutput);
    let mut parts = parts.into_iter();
    let first = parts.next().ok_or(RunError::Stopped)?;
    let rest: Vec<ModelOutput> = parts.collect();
    let mismatch =
        || RunError::BadOutput("the parts of a split request returned different outputs".into());
    Ok(match &first {
        ModelOutput::Tensor(t) => {
            let mut all = vec![t];
            for part in &rest {
                match part {
                    ModelOutput::Tensor(t) => all.push(t),
                    _ => return Err(mismatch()),
                }
            }
            ModelOutput::Tensor(concat(all)?)
        }
        ModelOutput::Sequence(first_items) => {
            let mut joined = Vec::with_capacity(first_items.len());
            for (i, item) in first_items.iter().enumerate() {
                let mut all = vec![item];
                for part in &rest {
                    match part {
                        ModelOutput::Sequence(items) if items.len() == first_items.len() => {
                            all.push(&items[i])
                        }
                        _ => return Err(mismatch()),
                    }
                }
                joined.push(concat(all)?);
            }
            ModelOutput::Sequence(joined)
        }
        ModelOutput::Dict(first_entries) => {
            let mut joined = Vec::with_capacity(first_entries.len());
            for (name, tensor) in first_entries {
                let mut all = vec![tensor];
                for part in &rest {
                    let ModelOutput::Dict(entries) = part else {
                        return Err(mismatch());
                    };
                    let (_, t) = entries
                        .iter()
                        .find(|(n, _)| n == name)
                        .ok_or_else(mismatch)?;
                    all.push(t);
                }
                joined.push((name.clone(), concat(all)?));
            }
            ModelOutput::Dict(joined)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[f32]) -> Tensor {
        Tensor::from_values(vec![rows.len() as i64, 1], rows).unwrap()
    }

    #[test]
    fn split_results_reassemble_in_order() {
        let parts = vec![
            ModelOutput::Dict(vec![
                ("y".into(), t(&[1.0, 2.0])),
                ("z".into(), t(&[0.0, 0.0])),
            ]),
            ModelOutput::Dict(vec![("z".into(), t(&[1.0])), ("y".into(), t(&[3.0]))]),
        ];
        let ModelOutput::Dict(joined) = concat_outputs(parts).unwrap() else {
            panic!("dict expected")
        };
        assert_eq!(joined[0], ("y".to_string(), t(&[1.0, 2.0, 3.0])));
        assert_eq!(joined[1], ("z".to_string(), t(&[0.0, 0.0, 1.0])));
        let mixed = vec![
            ModelOutput::Tensor(t(&[1.0])),
            ModelOutput::Sequence(vec![t(&[2.0])]),
        ];
        assert!(concat_outputs(mixed).is_err());
    }

    #[test]
    fn batch_keys_separate_shapes_and_methods() {
        let job = |method: &str, cols: i64| {
            let tensor = Tensor::zeros(DType::F32, vec![2, cols]).unwrap();
            Job::new(Arc::from(method), vec![tensor], None).0
        };
        assert_eq!(
            BatchKey::of(&job("forward", 3), true),
            BatchKey::of(&job("forward", 3), true)
        );
        assert_ne!(
            BatchKey::of(&job("forward", 3), true),
            BatchKey::of(&job("forward", 4), true)
        );
        assert_ne!(
            BatchKey::of(&job("forward", 3), true),
            BatchKey::of(&job("classify", 3), true)
        );
        assert_eq!(BatchKey::of(&job("forward", 3), false), BatchKey::Alone);
    }

    /// Two workers idle on an empty queue; three 1-row requests land at once with batches
    /// of two. The full batch leaves at once; the request left open must still close on its
    /// timeout while the first worker is busy, without waiting for another arrival.
    #[test]
    fn a_batch_left_open_closes_on_time_while_its_former_is_busy() {
        use crate::runtime::BatchFormer;
        use std::time::Duration;
        let options = BatchingOptions::parse(
            "test",
            "max_batch_size { value: 2 } batch_timeout_micros { value: 100000 }",
        )
        .unwrap();
        let state = Arc::new(QueueState {
            options,
            queued_rows: AtomicUsize::new(0),
            queued_jobs: AtomicUsize::new(0),
            queue_depth: metrics::gauge!("test_queue_depth"),
            queue_delay: metrics::histogram!("test_queue_delay"),
            rejected_full: metrics::counter!("test_rejected"),
        });
        let (jobs, queue) = flume::unbounded();
        let former = Arc::new(Former::new(queue, jobs.downgrade(), Arc::clone(&state)));
        let (batches, taken) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let (former, batches) = (Arc::clone(&former), batches.clone());
            // A worker that takes one batch and then stays busy with it.
            std::thread::spawn(move || {
                let batch = former.next_batch().expect("a batch");
                batches.send(batch.jobs.len()).unwrap();
                std::thread::sleep(Duration::from_secs(5));
            });
        }
        std::thread::sleep(Duration::from_millis(100)); // both workers wait on the queue
        let started = Instant::now();
        let mut results = Vec::new();
        for _ in 0..3 {
            let tensor = Tensor::zeros(DType::F32, vec![1, 1]).unwrap();
            let (job, result) = Job::new(Arc::from("forward"), vec![tensor], None);
            let key = BatchKey::of(&job, true);
            reserve(&state, 1).unwrap();
            send(&jobs, &state, job, key, 1).unwrap();
            results.push(result);
        }
        let mut sizes = vec![
            taken
                .recv_timeout(Duration::from_secs(2))
                .expect("first batch"),
            taken
                .recv_timeout(Duration::from_secs(2))
                .expect("second batch"),
        ];
        let elapsed = started.elapsed();
        sizes.sort_unstable();
        assert_eq!(sizes, [1, 2]);
        assert!(
            elapsed >= Duration::from_millis(100),
            "the open batch closed before its timeout: {elapsed:?}"
        );
        assert_eq!(state.queued_rows.load(Ordering::SeqCst), 0);
        drop(results);
    }
}
