//! Collectors: a bounded queue per destination and one writer that drains it, so that a
//! slow or stuck destination costs requests nothing. A full queue drops the record and
//! counts it; the request never waits.

use super::record::Record;
use super::LogSettings;
use crate::config::{CollectorSpec, FileFormat};
use crate::http_client;
use crate::telemetry::{PREDICTION_LOGS_DROPPED_TOTAL, PREDICTION_LOGS_WRITTEN_TOTAL};
use crate::tfrecord;
use bytes::Bytes;
use http_body_util::Full;
use prost::Message;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::oneshot;

/// `reason` label values of [`PREDICTION_LOGS_DROPPED_TOTAL`].
const DROPPED_QUEUE_FULL: &str = "queue_full";
const DROPPED_WRITE_FAILED: &str = "write_failed";
/// A TFRecord file's record whose values were left out for size (see
/// `MAX_LOGGED_VALUE_BYTES`): a PredictionLog of shapes without values would not replay.
const DROPPED_TOO_LARGE: &str = "too_large";

/// A log file's name is tried this many times when other writers keep taking the next one.
const CREATE_ATTEMPTS: u32 = 8;

/// An HTTP collector's batch: at most this many records or bytes, sent after at most
/// [`HTTP_LINGER`] of waiting for more.
const HTTP_BATCH_RECORDS: usize = 512;
const HTTP_BATCH_BYTES: usize = 4 << 20;
const HTTP_LINGER: Duration = Duration::from_millis(200);
/// One POST's time limit; a batch is tried this many times before it is dropped.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_ATTEMPTS: u32 = 3;

/// One destination's queue. Dropping the last handle lets its writer drain what is queued
/// and stop.
#[derive(Debug)]
pub struct Collector {
    queue: flume::Sender<Record>,
}

/// Why a destination could not be opened: the collector it is (its type and where) and
/// what failed.
#[derive(Debug, thiserror::Error)]
#[error("{collector}: {source}")]
pub struct StartError {
    pub collector: String,
    pub source: io::Error,
}

/// Resolves once a collector's writer has written (or dropped) everything and stopped.
pub type Stopped = oneshot::Receiver<()>;

impl Collector {
    /// Opens the destination (a file collector creates its folder and first file here, so
    /// that a path it cannot write refuses the config) and starts its writer.
    pub fn start(
        spec: &CollectorSpec,
        settings: &LogSettings,
    ) -> Result<(Collector, Stopped), StartError> {
        let (queue, records) = flume::bounded(settings.queue_records.max(1));
        let (stopped_tx, stopped) = oneshot::channel();
        match spec {
            CollectorSpec::Stdout => spawn_writer("stdout", records, stopped_tx, Lines(io::stdout))
                .map_err(|source| StartError {
                    collector: "stdout collector".into(),
                    source,
                })?,
            CollectorSpec::Stderr => spawn_writer("stderr", records, stopped_tx, Lines(io::stderr))
                .map_err(|source| StartError {
                    collector: "stderr collector".into(),
                    source,
                })?,
            CollectorSpec::File { prefix, format } => {
                let failed = |source| StartError {
                    collector: format!("file collector '{prefix}'"),
                    source,
                };
                let files =
                    Files::open(prefix, *format, settings.file_rotate_bytes).map_err(failed)?;
                spawn_writer("file", records, stopped_tx, files).map_err(failed)?
            }
            CollectorSpec::Http { url } => {
                let failed = |source| StartError {
                    collector: format!("http collector '{url}'"),
                    source,
                };
                let uri: hyper::Uri = url.parse().map_err(|e| failed(io::Error::other(e)))?;
                let runtime = tokio::runtime::Handle::try_current()
                    .map_err(|e| failed(io::Error::other(e)))?;
                runtime.spawn(async move {
                    post_batches(uri, records).await;
                    let _ = stopped_tx.send(());
                });
            }
        }
        Ok((Collector { queue }, stopped))
    }

    /// Queues `record`, or drops and counts it when the queue is full.
    pub fn submit(&self, record: Record) {
        if let Err(error) = self.queue.try_send(record) {
            let record = error.into_inner();
            metrics::counter!(
                PREDICTION_LOGS_DROPPED_TOTAL,
                "model" => record.model,
                "reason" => DROPPED_QUEUE_FULL,
            )
            .increment(1);
        }
    }
}

/// What a sink made of a record it did not fail to write.
enum Written {
    Yes,
    /// The format has no place for it (a failure in a PredictionLog): neither written nor
    /// dropped.
    NotApplicable,
    /// Left out, counted as dropped with this `reason`.
    Dropped(&'static str),
}

/// Where a blocking writer puts records.
trait Sink: Send + 'static {
    fn write(&mut self, record: &Record) -> io::Result<Written>;
    /// Called once the queue is empty, so that what was written becomes visible.
    fn flush(&mut self) -> io::Result<()>;
}

/// Runs `sink` on a thread of its own until every handle to the queue is gone and the
/// queue is drained.
fn spawn_writer(
    name: &str,
    records: flume::Receiver<Record>,
    stopped: oneshot::Sender<()>,
    mut sink: impl Sink,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("request-log-{name}"))
        .spawn(move || {
            let mut failing = false;
            while let Ok(first) = records.recv() {
                for record in std::iter::once(first).chain(records.try_iter()) {
                    let written = sink.write(&record);
                    account(&record.model, &written, &mut failing);
                }
                let flushed = sink.flush();
                if let Err(e) = flushed {
                    warn_once(&mut failing, &e.to_string());
                }
            }
            let _ = stopped.send(());
        })
        .map(drop)
}

/// Counts a record written, dropped or failed; a failure is logged once until writing
/// works again.
fn account(model: &str, written: &io::Result<Written>, failing: &mut bool) {
    let reason = match written {
        Ok(Written::Yes) => {
            *failing = false;
            metrics::counter!(PREDICTION_LOGS_WRITTEN_TOTAL, "model" => model.to_string())
                .increment(1);
            return;
        }
        Ok(Written::NotApplicable) => return,
        Ok(Written::Dropped(reason)) => reason,
        Err(e) => {
            warn_once(failing, &e.to_string());
            DROPPED_WRITE_FAILED
        }
    };
    metrics::counter!(
        PREDICTION_LOGS_DROPPED_TOTAL,
        "model" => model.to_string(),
        "reason" => reason,
    )
    .increment(1);
}

fn warn_once(failing: &mut bool, error: &str) {
    if !*failing {
        tracing::warn!(%error, "request log records cannot be written; dropping them");
        *failing = true;
    }
}

/// JSON lines on a standard stream.
struct Lines<S>(fn() -> S);

impl<S: Write + 'static> Sink for Lines<S> {
    fn write(&mut self, record: &Record) -> io::Result<Written> {
        let mut line = record.to_json();
        line.push('\n');
        (self.0)().write_all(line.as_bytes())?;
        Ok(Written::Yes)
    }

    fn flush(&mut self) -> io::Result<()> {
        (self.0)().flush()
    }
}

/// Files `<prefix>-NNNNN.jsonl` (or `<stem>-NNNNN.tfrecord` for a `<stem>.tfrecord` prefix),
/// a new one once the current one reaches the rotation size. Numbering continues after the
/// highest file already there, so a restarted server never overwrites what it wrote before;
/// a name taken meanwhile (another server on the same prefix) is skipped.
struct Files {
    stem: PathBuf,
    format: FileFormat,
    rotate_bytes: u64,
    current: BufWriter<File>,
    written: u64,
    next: u64,
    /// A write or flush failed part-way (a full disk): the current file may end in half a
    /// record, which would corrupt every record after it (a TFRecord reader stops at a torn
    /// frame, a torn JSON line swallows the next), so the next record starts a new file.
    damaged: bool,
}

impl Files {
    fn open(prefix: &str, format: FileFormat, rotate_bytes: u64) -> io::Result<Files> {
        let stem = match format {
            FileFormat::TfRecord => prefix.strip_suffix(".tfrecord").unwrap_or(prefix),
            FileFormat::JsonLines => prefix.strip_suffix(".jsonl").unwrap_or(prefix),
        };
        let stem = PathBuf::from(stem);
        if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let first = highest_existing(&stem, extension(format))?.map_or(0, |n| n + 1);
        let (current, first) = create_free(&stem, format, first)?;
        Ok(Files {
            stem,
            format,
            rotate_bytes: rotate_bytes.max(1),
            current,
            written: 0,
            next: first.saturating_add(1),
            damaged: false,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        // A damaged file's unwritten tail is given up: it is what failed.
        if let Err(e) = self.current.flush() {
            if !self.damaged {
                self.damaged = true;
                return Err(e);
            }
        }
        let (current, number) = create_free(&self.stem, self.format, self.next)?;
        self.current = current;
        self.next = number.saturating_add(1);
        self.written = 0;
        self.damaged = false;
        Ok(())
    }
}

impl Sink for Files {
    fn write(&mut self, record: &Record) -> io::Result<Written> {
        let bytes = match self.format {
            FileFormat::JsonLines => {
                let mut line = record.to_json().into_bytes();
                line.push(b'\n');
                line
            }
            // PredictionLog holds answered requests only: a failure is in the JSON
            // collectors and in /metrics.
            FileFormat::TfRecord => match record.to_prediction_log() {
                Some(log) => tfrecord::frame(&log.encode_to_vec()),
                // Its values were left out for size; written without them, it would not
                // replay as warm-up (shapes that disagree with their content).
                None if !record.is_error() && record.values_omitted() => {
                    return Ok(Written::Dropped(DROPPED_TOO_LARGE))
                }
                None => return Ok(Written::NotApplicable),
            },
        };
        if self.damaged
            || (self.written > 0 && self.written + bytes.len() as u64 > self.rotate_bytes)
        {
            self.rotate()?;
        }
        if let Err(e) = self.current.write_all(&bytes) {
            self.damaged = true;
            return Err(e);
        }
        self.written += bytes.len() as u64;
        Ok(Written::Yes)
    }

    fn flush(&mut self) -> io::Result<()> {
        let flushed = self.current.flush();
        self.damaged |= flushed.is_err();
        flushed
    }
}

fn extension(format: FileFormat) -> &'static str {
    match format {
        FileFormat::JsonLines => "jsonl",
        FileFormat::TfRecord => "tfrecord",
    }
}

fn file_name(stem: &Path, format: FileFormat, number: u64) -> PathBuf {
    let mut name = stem.as_os_str().to_owned();
    name.push(format!("-{number:05}.{}", extension(format)));
    PathBuf::from(name)
}

/// The highest N of the `<stem>-N.<extension>` files already there.
fn highest_existing(stem: &Path, extension: &str) -> io::Result<Option<u64>> {
    let dir = match stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_path_buf(),
        None => PathBuf::from("."),
    };
    let base = stem
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let suffix = format!(".{extension}");
    let mut highest = None;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let number = name
            .to_str()
            .and_then(|n| n.strip_prefix(base.as_str()))
            .and_then(|n| n.strip_prefix('-'))
            .and_then(|n| n.strip_suffix(suffix.as_str()))
            .and_then(|n| n.parse::<u64>().ok());
        highest = highest.max(number);
    }
    Ok(highest)
}

/// Creates `<stem>-N` for the first N from `number` on that is free. A name already taken
/// means another writer shares the prefix: numbering continues after the highest file there
/// rather than retrying the same name forever.
fn create_free(
    stem: &Path,
    format: FileFormat,
    mut number: u64,
) -> io::Result<(BufWriter<File>, u64)> {
    for _ in 0..CREATE_ATTEMPTS {
        match create(&file_name(stem, format, number)) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let highest = highest_existing(stem, extension(format))?.unwrap_or(number);
                number = highest.max(number).checked_add(1).ok_or(e)?;
            }
            created => return created.map(|file| (file, number)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{}: no free file name in {CREATE_ATTEMPTS} tries",
            file_name(stem, format, number).display()
        ),
    ))
}

fn create(path: &Path) -> io::Result<BufWriter<File>> {
    let file = File::options().create_new(true).write(true).open(path)?;
    Ok(BufWriter::with_capacity(256 << 10, file))
}

/// Sends queued records to `uri` as `application/x-ndjson` POSTs of up to
/// [`HTTP_BATCH_RECORDS`], until every handle to the queue is gone and it is drained.
async fn post_batches(uri: hyper::Uri, records: flume::Receiver<Record>) {
    let client = http_client::client();
    let mut failing = false;
    while let Ok(first) = records.recv_async().await {
        // Serializing a batch (up to 4 MiB of JSON) is CPU work: off the async workers. The
        // next batch is gathered only once this one is sent, as the queue's bound expects.
        let queue = records.clone();
        let Ok((body, models)) = tokio::task::spawn_blocking(move || batch(first, &queue)).await
        else {
            tracing::warn!("a request log batch could not be serialized; dropping it");
            continue;
        };
        let sent = post(&client, &uri, Bytes::from(body))
            .await
            .map(|()| Written::Yes);
        for model in &models {
            account(model, &sent, &mut failing);
        }
    }
}

/// One POST's body from `first` and what follows it on the queue within [`HTTP_LINGER`],
/// up to [`HTTP_BATCH_RECORDS`] or [`HTTP_BATCH_BYTES`]; with each record's model, to count
/// it. Blocks while it lingers.
fn batch(first: Record, records: &flume::Receiver<Record>) -> (String, Vec<String>) {
    let mut body = String::new();
    let mut models = Vec::new();
    let deadline = std::time::Instant::now() + HTTP_LINGER;
    let mut next = Some(first);
    while let Some(record) = next.take() {
        body.push_str(&record.to_json());
        body.push('\n');
        models.push(record.model);
        if models.len() < HTTP_BATCH_RECORDS && body.len() < HTTP_BATCH_BYTES {
            // None once it lingered long enough, or every handle is gone and the queue is
            // drained.
            next = records.recv_deadline(deadline).ok();
        }
    }
    (body, models)
}

/// POSTs one batch, trying [`HTTP_ATTEMPTS`] times with a growing pause.
async fn post(client: &http_client::HttpClient, uri: &hyper::Uri, body: Bytes) -> io::Result<()> {
    let mut last_error = String::new();
    for attempt in 0..HTTP_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250) * 2u32.pow(attempt)).await;
        }
        let request = hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/x-ndjson")
            .body(Full::new(body.clone()))
            .map_err(io::Error::other)?;
        // The answer's body is not used: a collector's acknowledgement is small.
        match http_client::send(client, request, HTTP_TIMEOUT, 64 << 10).await {
            Ok((status, _)) if (200..300).contains(&status) => return Ok(()),
            Ok((status, _)) => last_error = format!("{uri} answered {status}"),
            Err(e) => last_error = format!("{uri}: {e}"),
        }
    }
    Err(io::Error::other(last_error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_numbering_continues_after_existing_files() {
        let dir = std::env::temp_dir().join(format!("modelgate-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m-00007.tfrecord"), b"").unwrap();
        std::fs::write(dir.join("m-00009.jsonl"), b"").unwrap();
        std::fs::write(dir.join("other-00042.tfrecord"), b"").unwrap();
        let prefix = dir.join("m.tfrecord");
        let files = Files::open(prefix.to_str().unwrap(), FileFormat::TfRecord, 10).unwrap();
        assert_eq!(files.next, 9);
        assert!(dir.join("m-00008.tfrecord").is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// After a write fails part-way (as on a full disk), the next record starts a new file
    /// instead of following half a record.
    #[test]
    fn a_failed_write_moves_on_to_a_new_file() {
        let dir = std::env::temp_dir().join(format!("modelgate-torn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let prefix = dir.join("m");
        let mut files =
            Files::open(prefix.to_str().unwrap(), FileFormat::JsonLines, 1 << 20).unwrap();
        // A handle that refuses writes stands in for the disk that filled up.
        let first = dir.join("m-00000.jsonl");
        files.current = BufWriter::with_capacity(4, File::open(&first).unwrap());
        let record = Record {
            timestamp: std::time::UNIX_EPOCH,
            model: "m".into(),
            version: Some(1),
            signature: "serving_default".into(),
            method: "predict",
            protocol: "grpc",
            latency: std::time::Duration::ZERO,
            code: "ok",
            message: String::new(),
            sampling_rate: 1.0,
            payload: super::super::record::Payload::None,
        };
        assert!(files.write(&record).is_err());
        assert!(matches!(files.write(&record), Ok(Written::Yes)));
        files.flush().unwrap();
        let second = std::fs::read_to_string(dir.join("m-00001.jsonl")).unwrap();
        assert_eq!(second.lines().count(), 1, "{second}");
        assert!(second.starts_with('{'), "{second}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
