//! The series of one model version (batch sizes, forward and queue times, queue depth,
//! refusals), kept apart from the global recorder so that they leave `/metrics` when their
//! version is freed: the Prometheus exporter cannot delete a series, and with versions
//! coming and going the scrape would otherwise grow with every version ever served.
//!
//! A version's [`VersionMetrics`] is held by its scheduler and workers; the list of live
//! versions holds it weakly, so the series go when the last of them does. The request
//! counts ([`REQUESTS_TOTAL`]) that carry a version go with it too; those without one (a
//! request refused before a version was chosen) stay, one series per configured model,
//! API, protocol and code.

use super::{
    BATCH_SIZE, BATCH_SIZE_BUCKETS, FORWARD_DURATION_SECONDS, LATENCY_BUCKETS,
    MODEL_RESIDENT_BYTES, QUEUE_DELAY_BUCKETS, QUEUE_DELAY_SECONDS, QUEUE_DEPTH,
    REJECTED_REQUESTS_TOTAL, REQUESTS_TOTAL,
};
use metrics::SharedString;
use metrics::{Counter, Gauge, Histogram, HistogramFn};
use metrics_exporter_prometheus::formatting::{
    sanitize_label_key, sanitize_label_value, write_help_line, write_type_line,
};
use std::collections::{btree_map, BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

/// What a request count is kept by within a version: API, protocol and gRPC code labels.
pub(super) type RequestKey = (&'static str, &'static str, &'static str);

/// Request counts that no live version holds: by model, version ("" for none), and the key.
type OtherRequests = HashMap<(SharedString, SharedString, RequestKey), u64>;
static OTHER_REQUESTS: LazyLock<Mutex<OtherRequests>> = LazyLock::new(Mutex::default);

/// How each per-version metric is exposed.
enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

/// Every per-version metric: name, kind and description, in the order rendered (the names
/// carry their units).
const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        BATCH_SIZE,
        Kind::Histogram(BATCH_SIZE_BUCKETS),
        "Requests per executed batch",
    ),
    (
        QUEUE_DELAY_SECONDS,
        Kind::Histogram(QUEUE_DELAY_BUCKETS),
        "Time a request waited in the batching queue",
    ),
    (
        FORWARD_DURATION_SECONDS,
        Kind::Histogram(LATENCY_BUCKETS),
        "Time of one forward pass",
    ),
    (QUEUE_DEPTH, Kind::Gauge, "Requests waiting in the queue"),
    (
        MODEL_RESIDENT_BYTES,
        Kind::Gauge,
        "Bytes a resident model version holds on a device",
    ),
    (
        REJECTED_REQUESTS_TOTAL,
        Kind::Counter,
        "Requests refused before running, by reason",
    ),
];

/// The versions whose series are exposed.
static LIVE: LazyLock<RwLock<Vec<Weak<Series>>>> = LazyLock::new(RwLock::default);

/// One series: its metric, extra labels (beyond model and version) and value.
struct Entry {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    value: Value,
}

enum Value {
    /// A counter's count, or a gauge's f64 bits.
    Atomic(Arc<AtomicU64>),
    Histogram(Arc<FixedHistogram>),
}

struct Series {
    model: String,
    version: i64,
    entries: Mutex<Vec<Entry>>,
    requests: Mutex<HashMap<RequestKey, u64>>,
    answered: Mutex<Answered>,
    executed: Mutex<Executed>,
}

/// The batches a version ran, for V2's statistics: every phase of every batch, in all and
/// by batch size.
#[derive(Default)]
struct Executed {
    /// Requests' rows (a request without a batch dimension counts one) in batches that ran.
    inferences: u64,
    all: Compute,
    /// At most [`MAX_BATCH_SIZES`] sizes: the first ones run.
    by_size: BTreeMap<u64, Compute>,
}

/// How many batch sizes a version's statistics keep apart. With batching, sizes are bounded
/// by `max_batch_size`; without it a request's own rows are its batch's size, which the
/// client chooses, so the map needs a bound of its own. Batches of further sizes still
/// count in the version's totals.
const MAX_BATCH_SIZES: usize = 64;

/// The requests a version answered, for V2's statistics: counts and total time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answered {
    pub success: Timed,
    pub fail: Timed,
    /// When the last request was answered, in milliseconds since the Unix epoch.
    pub last_ms: u64,
}

/// A count and the total time it took, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timed {
    pub count: u64,
    pub ns: u64,
}

impl Timed {
    fn add(&mut self, elapsed: Duration) {
        self.count += 1;
        self.ns = self
            .ns
            .saturating_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    fn of_histogram(histogram: Option<(u64, f64)>) -> Timed {
        let (count, seconds) = histogram.unwrap_or_default();
        Timed {
            count,
            ns: (seconds * 1e9) as u64,
        }
    }
}

/// What one executed batch took, phase by phase; they add up to its forward time
/// ([`FORWARD_DURATION_SECONDS`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchPhases {
    /// Staging the inputs: concatenated (and padded) in host memory, and on a GPU copied to it.
    pub input: Duration,
    /// The model's method.
    pub infer: Duration,
    /// Bringing the outputs back to the host and splitting them among the batch's requests.
    pub output: Duration,
}

/// Triton's `compute_input`, `compute_infer` and `compute_output`: the three phases of the
/// batches run, each counted once per batch, so the three counts are always equal (Triton's
/// own benchmark client, perf_analyzer, refuses a server whose counts differ).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compute {
    pub input: Timed,
    pub infer: Timed,
    pub output: Timed,
}

impl Compute {
    fn add(&mut self, phases: &BatchPhases) {
        self.input.add(phases.input);
        self.infer.add(phases.infer);
        self.output.add(phases.output);
    }
}

/// Triton's InferBatchStatistics: the phases of the batches of one size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchStatistics {
    /// Rows, padding included (as [`BATCH_SIZE`] records them).
    pub batch_size: u64,
    pub compute: Compute,
}

/// What Triton's ModelStatistics reports for a version, from the series it keeps here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionStatistics {
    pub model: String,
    pub version: i64,
    pub answered: Answered,
    /// Rows run, padding included (the executed batches' sizes summed).
    pub inference_count: u64,
    /// Batches run (forward passes).
    pub execution_count: u64,
    /// Time requests waited in the batching queue.
    pub queue: Timed,
    /// The phases of the batches run (each count is `execution_count`).
    pub compute: Compute,
    /// The same by batch size, ascending (at most [`MAX_BATCH_SIZES`] sizes).
    pub batches: Vec<BatchStatistics>,
}

/// The statistics of the live versions of `model` (every model when `None`), by model
/// and version. A version reloaded under the same number is the newest of its series (the
/// one its requests now count on).
pub fn statistics(model: Option<&str>) -> Vec<VersionStatistics> {
    let mut seen = std::collections::HashSet::new();
    let live: Vec<Arc<Series>> = LIVE
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .rev()
        .filter_map(Weak::upgrade)
        .filter(|s| model.is_none_or(|m| s.model == m))
        .filter(|s| seen.insert((s.model.clone(), s.version)))
        .collect();
    let mut stats: Vec<VersionStatistics> = live
        .iter()
        .map(|series| {
            let entries = lock(&series.entries);
            let histogram = |name: &str| {
                entries.iter().find_map(|e| match &e.value {
                    Value::Histogram(h) if e.name == name => {
                        let (_, count, sum) = h.snapshot();
                        Some((count, sum))
                    }
                    _ => None,
                })
            };
            let executed = lock(&series.executed);
            VersionStatistics {
                model: series.model.clone(),
                version: series.version,
                answered: *lock(&series.answered),
                inference_count: executed.inferences,
                execution_count: executed.all.infer.count,
                queue: Timed::of_histogram(histogram(QUEUE_DELAY_SECONDS)),
                compute: executed.all,
                batches: executed
                    .by_size
                    .iter()
                    .map(|(&batch_size, &compute)| BatchStatistics {
                        batch_size,
                        compute,
                    })
                    .collect(),
            }
        })
        .collect();
    stats.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
    stats
}

/// The series of one version; cheap to clone. See the module docs.
#[derive(Clone)]
pub struct VersionMetrics(Arc<Series>);

impl VersionMetrics {
    pub fn new(model: &str, version: i64) -> VersionMetrics {
        let series = Arc::new(Series {
            model: model.to_string(),
            version,
            entries: Mutex::default(),
            requests: Mutex::default(),
            answered: Mutex::default(),
            executed: Mutex::default(),
        });
        let mut live = LIVE.write().unwrap_or_else(PoisonError::into_inner);
        live.retain(|weak| weak.strong_count() > 0);
        live.push(Arc::downgrade(&series));
        VersionMetrics(series)
    }

    pub fn model(&self) -> &str {
        &self.0.model
    }

    pub fn version(&self) -> i64 {
        self.0.version
    }

    /// A counter of this version, e.g. `REJECTED_REQUESTS_TOTAL` with `reason`.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        let value = Arc::new(AtomicU64::new(0));
        self.add(name, labels, Value::Atomic(Arc::clone(&value)));
        Counter::from_arc(value)
    }

    pub fn gauge(&self, name: &'static str) -> Gauge {
        self.labelled_gauge(name, &[])
    }

    /// A gauge of this version with labels, e.g. `MODEL_RESIDENT_BYTES` with `device`.
    pub fn labelled_gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        let value = Arc::new(AtomicU64::new(0f64.to_bits()));
        self.add(name, labels, Value::Atomic(Arc::clone(&value)));
        Gauge::from_arc(value)
    }

    /// A histogram with the buckets its family has.
    pub fn histogram(&self, name: &'static str) -> Histogram {
        let bounds = FAMILIES
            .iter()
            .find_map(|(family, kind, _)| match kind {
                Kind::Histogram(bounds) if *family == name => Some(*bounds),
                _ => None,
            })
            .unwrap_or(LATENCY_BUCKETS);
        let histogram = Arc::new(FixedHistogram::new(bounds));
        self.add(name, &[], Value::Histogram(Arc::clone(&histogram)));
        Histogram::from_arc(histogram)
    }

    /// Counts a batch this version ran successfully: `batch_size` rows (padding included),
    /// the `inferences` it answered (its requests' rows, padding left out) and what each
    /// phase took. Triton's statistics count only successful executions.
    pub fn record_batch(&self, batch_size: usize, inferences: usize, phases: BatchPhases) {
        let batch_size = u64::try_from(batch_size).unwrap_or(u64::MAX);
        let mut executed = lock(&self.0.executed);
        executed.inferences = executed
            .inferences
            .saturating_add(u64::try_from(inferences).unwrap_or(u64::MAX));
        executed.all.add(&phases);
        let kept = executed.by_size.len();
        match executed.by_size.entry(batch_size) {
            btree_map::Entry::Occupied(mut entry) => entry.get_mut().add(&phases),
            btree_map::Entry::Vacant(entry) if kept < MAX_BATCH_SIZES => {
                entry.insert(Compute::default()).add(&phases)
            }
            btree_map::Entry::Vacant(_) => {}
        }
    }

    fn add(&self, name: &'static str, labels: &[(&'static str, &str)], value: Value) {
        let labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        lock(&self.0.entries).push(Entry {
            name,
            labels,
            value,
        });
    }
}

/// Counts an answered request: on the live version that answered it, else (no version, or
/// one freed in the instant since it answered) among the counts that stay. An inference,
/// `ran`: the version it ran or failed on, its time and whether it succeeded, also adds to
/// that version's statistics (V2's `success` and `fail`, and when it was last answered).
pub(super) fn count_request(
    model: &SharedString,
    version: Option<i64>,
    key: RequestKey,
    ran: Option<(i64, Duration, bool)>,
) {
    let answered_by = version.and_then(|version| newest_live(model, version));
    if let Some((ran_on, elapsed, success)) = ran {
        // An answer's own version, looked up once; a failure's from where it ran.
        let series = match &answered_by {
            Some(series) if series.version == ran_on => Some(Arc::clone(series)),
            _ => newest_live(model, ran_on),
        };
        if let Some(series) = series {
            let mut answered = lock(&series.answered);
            if success {
                answered.success.add(elapsed);
            } else {
                answered.fail.add(elapsed);
            }
            answered.last_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| {
                    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                });
        }
    }
    if let Some(series) = answered_by {
        *lock(&series.requests).entry(key).or_default() += 1;
        return;
    }
    let version = super::interned_version(version);
    *lock(&OTHER_REQUESTS)
        .entry((model.clone(), version, key))
        .or_default() += 1;
}

/// The series of `version` of `model`: the one registered last when a version reloaded
/// under the same number still overlaps its predecessor.
fn newest_live(model: &str, version: i64) -> Option<Arc<Series>> {
    let live = LIVE.read().unwrap_or_else(PoisonError::into_inner);
    live.iter()
        .rev()
        .filter_map(Weak::upgrade)
        .find(|s| s.version == version && s.model == model)
}

fn write_requests(out: &mut String, live: &[Arc<Series>]) {
    // Summed by labels: a version reloaded under the same number overlaps its predecessor
    // for a moment, and a scrape must not hold the same series twice.
    let mut counts: BTreeMap<(String, String, RequestKey), u64> = BTreeMap::new();
    for ((model, version, key), n) in lock(&OTHER_REQUESTS).iter() {
        *counts
            .entry((model.to_string(), version.to_string(), *key))
            .or_default() += n;
    }
    for series in live {
        let version = series.version.to_string();
        for (key, n) in lock(&series.requests).iter() {
            *counts
                .entry((series.model.clone(), version.clone(), *key))
                .or_default() += n;
        }
    }
    if counts.is_empty() {
        return;
    }
    let mut samples = String::new();
    for ((model, version, (api, protocol, code)), n) in counts {
        let _ = writeln!(
            samples,
            "{REQUESTS_TOTAL}{{model=\"{}\",version=\"{version}\",api=\"{api}\",protocol=\"{protocol}\",code=\"{code}\"}} {n}",
            sanitize_label_value(&model)
        );
    }
    write_help_line(
        out,
        REQUESTS_TOTAL,
        None,
        None,
        "Requests answered, by model, version, API, protocol and gRPC code",
    );
    write_type_line(out, REQUESTS_TOTAL, None, None, "counter");
    out.push_str(&samples);
    out.push('\n');
}

/// Appends the series of every live version, and the request counts, to a Prometheus
/// text payload.
pub fn render_versions(out: &mut String) {
    let live: Vec<Arc<Series>> = LIVE
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    write_requests(out, &live);
    for (name, kind, help) in FAMILIES {
        // Summed by labels, as the request counts are (see `write_requests`).
        let mut merged: BTreeMap<String, Sample> = BTreeMap::new();
        for series in &live {
            for entry in lock(&series.entries).iter().filter(|e| e.name == *name) {
                let mut labels = format!(
                    "model=\"{}\",version=\"{}\"",
                    sanitize_label_value(&series.model),
                    series.version
                );
                for (key, value) in &entry.labels {
                    let _ = write!(
                        labels,
                        ",{}=\"{}\"",
                        sanitize_label_key(key),
                        sanitize_label_value(value)
                    );
                }
                let sample = Sample::of(&entry.value, kind);
                match merged.entry(labels) {
                    btree_map::Entry::Vacant(slot) => {
                        slot.insert(sample);
                    }
                    btree_map::Entry::Occupied(mut slot) => slot.get_mut().add(sample),
                }
            }
        }
        if merged.is_empty() {
            continue;
        }
        let mut samples = String::new();
        for (labels, sample) in &merged {
            write_samples(&mut samples, name, labels, sample);
        }
        write_help_line(out, name, None, None, help);
        let kind_name = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        };
        write_type_line(out, name, None, None, kind_name);
        out.push_str(&samples);
        out.push('\n');
    }
}

/// One series' value as read for a scrape.
enum Sample {
    Count(u64),
    Gauge(f64),
    /// Per bucket (not cumulative), the total count and the sum.
    Histogram {
        bounds: &'static [f64],
        counts: Vec<u64>,
        count: u64,
        sum: f64,
    },
}

impl Sample {
    fn of(value: &Value, kind: &Kind) -> Sample {
        match (value, kind) {
            (Value::Atomic(v), Kind::Gauge) => {
                Sample::Gauge(f64::from_bits(v.load(Ordering::Relaxed)))
            }
            (Value::Atomic(v), _) => Sample::Count(v.load(Ordering::Relaxed)),
            (Value::Histogram(h), _) => {
                let (counts, count, sum) = h.snapshot();
                Sample::Histogram {
                    bounds: h.bounds,
                    counts,
                    count,
                    sum,
                }
            }
        }
    }

    fn add(&mut self, other: Sample) {
        match (self, other) {
            (Sample::Count(a), Sample::Count(b)) => *a = a.saturating_add(b),
            (Sample::Gauge(a), Sample::Gauge(b)) => *a += b,
            (
                Sample::Histogram {
                    counts, count, sum, ..
                },
                Sample::Histogram {
                    counts: more,
                    count: n,
                    sum: s,
                    ..
                },
            ) => {
                for (bucket, m) in counts.iter_mut().zip(more) {
                    *bucket += m;
                }
                *count += n;
                *sum += s;
            }
            // One family has one kind.
            _ => {}
        }
    }
}

fn write_samples(out: &mut String, name: &str, labels: &str, sample: &Sample) {
    match sample {
        Sample::Gauge(value) => {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
        Sample::Count(count) => {
            let _ = writeln!(out, "{name}{{{labels}}} {count}");
        }
        Sample::Histogram {
            bounds,
            counts,
            count,
            sum,
        } => {
            let mut cumulative = 0;
            for (bound, n) in bounds.iter().zip(counts) {
                cumulative += n;
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        }
    }
}

/// A histogram over fixed bucket bounds, as Prometheus exposes it.
struct FixedHistogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), then the total count and sum.
    state: Mutex<(Vec<u64>, u64, f64)>,
}

impl FixedHistogram {
    fn new(bounds: &'static [f64]) -> FixedHistogram {
        FixedHistogram {
            bounds,
            state: Mutex::new((vec![0; bounds.len()], 0, 0.0)),
        }
    }

    fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        lock(&self.state).clone()
    }
}

impl HistogramFn for FixedHistogram {
    fn record(&self, value: f64) {
        let mut state = lock(&self.state);
        if let Some(bucket) = self.bounds.iter().position(|&bound| value <= bound) {
            state.0[bucket] += 1;
        }
        state.1 += 1;
        state.2 += value;
    }
}

/// Metrics must never take the server down: a panic while a lock was held leaves data
/// that is still fine to count with.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered() -> String {
        let mut out = String::new();
        render_versions(&mut out);
        out
    }

    #[test]
    fn a_versions_series_leave_with_it() {
        let metrics = VersionMetrics::new("m\"x", 7);
        let batch = metrics.histogram(BATCH_SIZE);
        batch.record(3.0);
        batch.record(100.0);
        metrics
            .counter(REJECTED_REQUESTS_TOTAL, &[("reason", "queue_full")])
            .increment(2);
        metrics.gauge(QUEUE_DEPTH).set(4.0);
        let model = SharedString::from(String::from("m\"x"));
        let elapsed = std::time::Duration::from_millis(2);
        count_request(
            &model,
            Some(7),
            ("predict", "grpc", "ok"),
            Some((7, elapsed, true)),
        );
        count_request(&model, None, ("predict", "grpc", "not_found"), None);
        // A failure once version 7 was chosen: no version label, but its statistics.
        count_request(
            &model,
            None,
            ("predict", "grpc", "internal"),
            Some((7, elapsed, false)),
        );
        let text = rendered();
        let labels = r#"model="m\"x",version="7""#;
        for line in [
            "# TYPE modelgate_batch_size histogram".to_string(),
            format!("modelgate_batch_size_bucket{{{labels},le=\"2\"}} 0"),
            format!("modelgate_batch_size_bucket{{{labels},le=\"4\"}} 1"),
            format!("modelgate_batch_size_bucket{{{labels},le=\"+Inf\"}} 2"),
            format!("modelgate_batch_size_sum{{{labels}}} 103"),
            format!("modelgate_batch_size_count{{{labels}}} 2"),
            format!("modelgate_rejected_requests_total{{{labels},reason=\"queue_full\"}} 2"),
            format!("modelgate_queue_depth{{{labels}}} 4"),
            format!(
                "modelgate_requests_total{{{labels},api=\"predict\",protocol=\"grpc\",code=\"ok\"}} 1"
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "no '{line}' in:\n{text}");
        }
        let stats = statistics(Some("m\"x"));
        assert_eq!(stats.len(), 1);
        assert_eq!((stats[0].version, stats[0].inference_count), (7, 0));
        assert_eq!(
            stats[0].answered.success,
            Timed {
                count: 1,
                ns: 2_000_000
            }
        );
        assert_eq!(stats[0].answered.fail.count, 1);
        assert!(stats[0].answered.last_ms > 0);
        drop(metrics);
        let text = rendered();
        assert!(!text.contains(r#"version="7""#), "{text}");
        assert!(statistics(Some("m\"x")).is_empty());
        // A count without a version stays.
        assert!(text.contains(r#"modelgate_requests_total{model="m\"x",version="",api="predict",protocol="grpc",code="not_found"} 1"#), "{text}");
    }

    /// A version reloaded under its own number overlaps its predecessor for a moment: a
    /// scrape still holds each series once (summed), and the statistics one entry (the
    /// newest, where the requests now count).
    #[test]
    fn a_version_reloaded_under_its_number_is_scraped_once() {
        let old = VersionMetrics::new("reloaded", 3);
        let new = VersionMetrics::new("reloaded", 3);
        old.gauge(QUEUE_DEPTH).set(1.0);
        new.gauge(QUEUE_DEPTH).set(2.0);
        old.histogram(BATCH_SIZE).record(4.0);
        new.histogram(BATCH_SIZE).record(1.0);
        old.record_batch(4, 4, BatchPhases::default());
        new.record_batch(1, 1, BatchPhases::default());
        let model = SharedString::from(String::from("reloaded"));
        let ms = Duration::from_millis(1);
        count_request(
            &model,
            Some(3),
            ("predict", "grpc", "ok"),
            Some((3, ms, true)),
        );
        count_request(
            &model,
            None,
            ("predict", "grpc", "internal"),
            Some((3, ms, false)),
        );
        let text = rendered();
        let labels = r#"model="reloaded",version="3""#;
        let lines = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(
            lines(&format!("modelgate_queue_depth{{{labels}}}")),
            1,
            "{text}"
        );
        assert!(
            text.contains(&format!("modelgate_queue_depth{{{labels}}} 3")),
            "{text}"
        );
        assert!(
            text.contains(&format!("modelgate_batch_size_count{{{labels}}} 2")),
            "{text}"
        );
        assert_eq!(
            lines(&format!("modelgate_requests_total{{{labels}")),
            1,
            "{text}"
        );
        let stats = statistics(Some("reloaded"));
        assert_eq!(stats.len(), 1);
        assert_eq!(
            (
                stats[0].answered.success.count,
                stats[0].answered.fail.count
            ),
            (1, 1)
        );
        assert_eq!(stats[0].inference_count, 1, "the newest series' batches");
        drop((old, new));
    }

    /// Each phase is counted once per batch, in all and by size, and the sizes kept apart
    /// are bounded whatever sizes the clients send.
    #[test]
    fn every_batch_counts_once_in_each_phase() {
        let metrics = VersionMetrics::new("phases", 1);
        let phases = |input, infer, output| BatchPhases {
            input: Duration::from_nanos(input),
            infer: Duration::from_nanos(infer),
            output: Duration::from_nanos(output),
        };
        metrics.record_batch(8, 5, phases(1, 10, 100));
        metrics.record_batch(1, 1, phases(2, 20, 200));
        metrics.record_batch(8, 8, phases(3, 30, 300));
        let stats = statistics(Some("phases"));
        let timed = |count, ns| Timed { count, ns };
        let expected = Compute {
            input: timed(3, 6),
            infer: timed(3, 60),
            output: timed(3, 600),
        };
        assert_eq!((stats[0].execution_count, stats[0].compute), (3, expected));
        assert_eq!(stats[0].inference_count, 14, "padding is no inference");
        let sizes: Vec<(u64, Compute)> = stats[0]
            .batches
            .iter()
            .map(|b| (b.batch_size, b.compute))
            .collect();
        let one = Compute {
            input: timed(1, 2),
            infer: timed(1, 20),
            output: timed(1, 200),
        };
        let eight = Compute {
            input: timed(2, 4),
            infer: timed(2, 40),
            output: timed(2, 400),
        };
        assert_eq!(sizes, vec![(1, one), (8, eight)]);

        for size in 100..1000 {
            metrics.record_batch(size, size, phases(1, 1, 1));
        }
        let stats = statistics(Some("phases"));
        assert_eq!(stats[0].batches.len(), MAX_BATCH_SIZES);
        assert_eq!(stats[0].compute.output.count, 903);
        let by_size: u64 = stats[0].batches.iter().map(|b| b.compute.infer.count).sum();
        assert_eq!(by_size, 3 + (MAX_BATCH_SIZES as u64 - 2));
    }
}
