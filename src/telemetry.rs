//! Metric names, shared by every module that records them.

/// Rows per executed batch, padding included (histogram; labels model, version).
pub const BATCH_SIZE: &str = "modelgate_batch_size";
/// Time from enqueue until a batch is handed to a worker (histogram, seconds).
pub const QUEUE_DELAY: &str = "modelgate_queue_delay_seconds";
/// libtorch forward time of one batch (histogram, seconds).
pub const FORWARD_DURATION: &str = "modelgate_forward_duration_seconds";
/// Requests waiting in a version's batching queue (gauge).
pub const QUEUE_DEPTH: &str = "modelgate_queue_depth";
/// Requests refused or dropped before running (counter; labels model, version, reason:
/// queue_full, deadline, cancelled).
pub const REJECTED_REQUESTS: &str = "modelgate_rejected_requests_total";
