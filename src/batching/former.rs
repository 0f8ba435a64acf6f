//! The batch former: one task per batched model version that owns the open batches.

use super::{BatchKey, QueueState, Queued};
use crate::runtime::{Batch, Job, ModelRunner};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

struct OpenBatch {
    key: BatchKey,
    jobs: Vec<Job>,
    rows: usize,
    /// Queue room its jobs hold (at least one row each), released when handed over.
    reserved: usize,
    /// When its first request was queued: the batch closes `batch_timeout` after.
    oldest: Instant,
    /// Closed early: full, or the next request of its key did not fit.
    closed: bool,
}

/// Collects queued requests into batches and hands each closed batch to the workers,
/// waiting while they are all busy (so a busy device makes batches grow rather than
/// queues lengthen). Runs on its own thread; ends, after flushing, when every scheduler
/// handle is gone.
pub(super) fn form_batches(
    queue: &flume::Receiver<Queued>,
    runner: &ModelRunner,
    state: &QueueState,
) {
    let max_rows = state.options.execution_batch_size();
    let timeout = state.options.batch_timeout;
    let allowed_sizes: Arc<[usize]> = Arc::from(state.options.allowed_batch_sizes.as_slice());
    let mut open: Vec<OpenBatch> = Vec::new();
    let mut draining = false;
    loop {
        if !draining {
            let received = match open.iter().map(|b| b.oldest + timeout).min() {
                None => queue
                    .recv()
                    .map_err(|_| flume::RecvTimeoutError::Disconnected),
                Some(close_at) => queue.recv_deadline(close_at),
            };
            match received {
                Ok(queued) => {
                    place(&mut open, queued, max_rows);
                    // Take everything already waiting before deciding what is due.
                    while let Ok(queued) = queue.try_recv() {
                        place(&mut open, queued, max_rows);
                    }
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => draining = true,
            }
        }
        let now = Instant::now();
        let (mut due, waiting): (Vec<OpenBatch>, Vec<OpenBatch>) = open
            .into_iter()
            .partition(|b| draining || b.closed || b.oldest + timeout <= now);
        open = waiting;
        due.sort_by_key(|b| b.oldest);
        for batch in due {
            hand_over(runner, state, batch, &allowed_sizes);
        }
        if draining && open.is_empty() {
            return;
        }
    }
}

/// Adds a request to the open batch of its key, starting a new batch when there is none or
/// it would overflow (the old one then closes).
fn place(open: &mut Vec<OpenBatch>, queued: Queued, max_rows: usize) {
    let Queued {
        job,
        key,
        rows,
        enqueued,
    } = queued;
    if key != BatchKey::Alone {
        if let Some(batch) = open.iter_mut().find(|b| b.key == key && !b.closed) {
            if batch.rows + rows <= max_rows {
                batch.jobs.push(job);
                batch.rows += rows;
                batch.reserved += rows.max(1);
                batch.closed = batch.rows >= max_rows;
                return;
            }
            batch.closed = true;
        }
    }
    open.push(OpenBatch {
        closed: key == BatchKey::Alone || rows >= max_rows,
        key,
        jobs: vec![job],
        rows,
        reserved: rows.max(1),
        oldest: enqueued,
    });
}

/// Gives a closed batch to the workers, waiting for one to be free, then releases its room
/// in the queue: a batch waiting for a worker still counts against max_enqueued_batches.
fn hand_over(
    runner: &ModelRunner,
    state: &QueueState,
    batch: OpenBatch,
    allowed_sizes: &Arc<[usize]>,
) {
    let OpenBatch {
        key,
        jobs,
        reserved,
        oldest,
        ..
    } = batch;
    let released = jobs.len();
    let batch = match key {
        // Its inputs have no batch dimension to pad.
        BatchKey::Alone => Batch {
            jobs,
            allowed_sizes: Arc::from([]),
        },
        BatchKey::Shape { .. } => Batch {
            jobs,
            allowed_sizes: Arc::clone(allowed_sizes),
        },
    };
    // An error means the workers are gone (unloading): the jobs' callers see their
    // channels close and answer UNAVAILABLE.
    let _ = runner.submit_blocking(batch);
    let delay = oldest.elapsed().as_secs_f64();
    for _ in 0..released {
        state.queue_delay.record(delay);
    }
    state.queued_rows.fetch_sub(reserved, Ordering::SeqCst);
    let depth = state.queued_jobs.fetch_sub(released, Ordering::SeqCst) - released;
    state.queue_depth.set(depth as f64);
}
