//! The batch former of a batched model version. Its workers pull from it: a free worker
//! collects the queued requests into batches and leaves with the first batch that is due
//! (full, or its oldest request has waited `batch_timeout_micros`). So a batch closes the
//! moment a worker can run it, takes everything that queued while the workers were busy,
//! and no thread stands between the queue and the device.
//!
//! Idle workers wait on the queue itself, each woken by one arrival; the lock is held only
//! to sort arrivals into batches, never while waiting, so an idle worker costs nothing until
//! there is work for it.

use super::{Arrival, BatchKey, QueueState, Queued};
use crate::runtime::{Batch, BatchFormer, Job};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

struct OpenBatch {
    key: BatchKey,
    jobs: Vec<Job>,
    rows: usize,
    /// Queue room its jobs hold (at least one row each), released when a worker takes it.
    reserved: usize,
    /// When each of its jobs was queued, oldest first (never empty).
    enqueued: Vec<Instant>,
    /// Closed early: full, or the next request of its key did not fit.
    closed: bool,
}

impl OpenBatch {
    /// When its first request was queued: the batch closes `batch_timeout` after.
    fn oldest(&self) -> Instant {
        self.enqueued[0]
    }
}

/// Batches being formed, sorted by whichever worker holds the lock.
#[derive(Default)]
struct Forming {
    open: Vec<OpenBatch>,
    /// Closed batches no worker has taken yet, oldest first.
    due: VecDeque<OpenBatch>,
    /// Every scheduler handle is gone: flush what is open, then stop.
    draining: bool,
}

pub(super) struct Former {
    queue: flume::Receiver<Arrival>,
    /// To nudge an idle worker; weak, so that the queue still closes when the last
    /// scheduler handle goes.
    nudge: flume::WeakSender<Arrival>,
    state: Arc<QueueState>,
    allowed_sizes: Arc<[usize]>,
    forming: Mutex<Forming>,
}

impl Former {
    pub(super) fn new(
        queue: flume::Receiver<Arrival>,
        nudge: flume::WeakSender<Arrival>,
        state: Arc<QueueState>,
    ) -> Former {
        let allowed_sizes = Arc::from(state.options.allowed_batch_sizes.as_slice());
        Former {
            queue,
            nudge,
            state,
            allowed_sizes,
            forming: Mutex::new(Forming::default()),
        }
    }

    /// Gives a closed batch to the calling worker and releases its room in the queue: until
    /// a worker takes it, a batch counts against max_enqueued_batches.
    fn hand_over(&self, batch: OpenBatch) -> Batch {
        let OpenBatch {
            key,
            jobs,
            reserved,
            enqueued,
            ..
        } = batch;
        let released = jobs.len();
        let now = Instant::now();
        for queued_at in enqueued {
            self.state
                .queue_delay
                .record(now.duration_since(queued_at).as_secs_f64());
        }
        self.state.queued_rows.fetch_sub(reserved, Ordering::SeqCst);
        let depth = self.state.queued_jobs.fetch_sub(released, Ordering::SeqCst) - released;
        self.state.queue_depth.set(depth as f64);
        Batch {
            jobs,
            // A request that runs alone has no batch dimension to pad.
            allowed_sizes: match key {
                BatchKey::Alone => Arc::from([]),
                BatchKey::Shape { .. } => Arc::clone(&self.allowed_sizes),
            },
            min_rows: match key {
                BatchKey::Alone => 0,
                BatchKey::Shape { .. } => self.state.options.min_batch_rows,
            },
        }
    }
}

impl BatchFormer for Former {
    fn next_batch(&self) -> Option<Batch> {
        let timeout = self.state.options.batch_timeout;
        let max_rows = self.state.options.execution_batch_size();
        let mut arrived = None;
        loop {
            let wait_until = {
                // Nothing in here panics, but a poisoned lock must not stop the version's
                // other workers.
                let mut forming = self.forming.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(Arrival::Job(queued)) = arrived.take() {
                    place(&mut forming.open, queued, max_rows);
                }
                // Take everything already waiting before deciding what is due.
                loop {
                    match self.queue.try_recv() {
                        Ok(Arrival::Job(queued)) => place(&mut forming.open, queued, max_rows),
                        Ok(Arrival::Nudge) => {}
                        Err(flume::TryRecvError::Empty) => break,
                        Err(flume::TryRecvError::Disconnected) => {
                            forming.draining = true;
                            break;
                        }
                    }
                }
                let (now, draining) = (Instant::now(), forming.draining);
                let (mut due, open): (Vec<OpenBatch>, Vec<OpenBatch>) =
                    std::mem::take(&mut forming.open)
                        .into_iter()
                        .partition(|b| draining || b.closed || b.oldest() + timeout <= now);
                forming.open = open;
                due.sort_by_key(OpenBatch::oldest);
                forming.due.extend(due);
                if let Some(batch) = forming.due.pop_front() {
                    // Idle workers wait on the queue and would not see what this one leaves
                    // behind: a due batch, or an open one whose deadline needs watching.
                    if !forming.due.is_empty() || !forming.open.is_empty() {
                        if let Some(queue) = self.nudge.upgrade() {
                            let _ = queue.send(Arrival::Nudge);
                        }
                    }
                    return Some(self.hand_over(batch));
                }
                if draining {
                    return None;
                }
                forming.open.iter().map(|b| b.oldest() + timeout).min()
            };
            // Timeouts and a closed queue are seen under the lock on the next round.
            arrived = match wait_until {
                None => self.queue.recv().ok(),
                Some(close_at) => self.queue.recv_deadline(close_at).ok(),
            };
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
                batch.enqueued.push(enqueued);
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
        enqueued: vec![enqueued],
    });
}
