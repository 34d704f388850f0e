//! Internal events: each one writes its log line and bumps its metrics in one place.
//!
//! Emit an event where the thing happens (`FileCommitted { .. }.emit()`); never touch a metric
//! or log the same fact elsewhere. Hot-path events (per batch, per chunk) log at `trace` only.

use std::sync::atomic::Ordering;

use super::{Progress, global};

/// The bounded label for a target: its URL scheme (`sftp`, `dir`, `null`), never its path.
pub fn sink_label(describe: &str) -> &str {
    describe.split(':').next().unwrap_or("unknown")
}

pub struct BatchRead {
    pub rows: u64,
    pub arrow_bytes: u64,
}

impl BatchRead {
    pub fn emit(self, progress: &Progress) {
        progress.rows_read.fetch_add(self.rows, Ordering::Relaxed);
        let m = global();
        m.rows_read.inc_by(self.rows);
        m.read_bytes.inc_by(self.arrow_bytes);
        m.batches_read.inc();
        tracing::trace!(rows = self.rows, bytes = self.arrow_bytes, "batch read");
    }
}

/// A source stream began (`started: true`) or stopped being read.
pub struct StreamActive<'a> {
    pub stream: &'a str,
    pub started: bool,
}

impl StreamActive<'_> {
    pub fn emit(self) {
        if self.started {
            global().read_streams_active.inc();
            tracing::debug!(stream = self.stream, "stream read started");
        } else {
            global().read_streams_active.dec();
            tracing::debug!(stream = self.stream, "stream read ended");
        }
    }
}

/// A source read is retried. `reason` must come from a small fixed set (`unavailable`,
/// `internal`, `deadline`, `resource_exhausted`, `unknown`…).
pub struct ReadRetry<'a> {
    pub stream: &'a str,
    pub reason: &'static str,
    pub attempt: u32,
    pub delay: std::time::Duration,
    pub error: &'a str,
}

impl ReadRetry<'_> {
    pub fn emit(self) {
        global().read_retries.with_label_values(&[self.reason]).inc();
        tracing::warn!(
            stream = self.stream,
            reason = self.reason,
            attempt = self.attempt,
            delay_ms = self.delay.as_millis() as u64,
            "read interrupted, resuming at the last row received: {}",
            self.error
        );
    }
}

/// BigQuery's `throttle_state.throttle_percent` on a ReadRows response.
pub struct ReadThrottled {
    pub percent: f64,
}

impl ReadThrottled {
    pub fn emit(self) {
        global().read_throttle_percent.set(self.percent);
        if self.percent > 0.0 {
            tracing::debug!(percent = self.percent, "read throttled by the server");
        }
    }
}

/// One chunk through the encoder and compressor.
pub struct ChunkEncoded {
    pub format: &'static str,
    pub codec: &'static str,
    pub arrow_bytes: u64,
    pub encoded_bytes: u64,
    pub compressed_bytes: u64,
}

impl ChunkEncoded {
    pub fn emit(self, progress: &Progress) {
        progress.encoded_bytes.fetch_add(self.encoded_bytes, Ordering::Relaxed);
        let m = global();
        m.encoder_input_bytes.with_label_values(&[self.format]).inc_by(self.arrow_bytes);
        m.encoded_bytes.with_label_values(&[self.format]).inc_by(self.encoded_bytes);
        m.compressed_bytes.with_label_values(&[self.codec]).inc_by(self.compressed_bytes);
        tracing::trace!(
            format = self.format,
            encoded = self.encoded_bytes,
            compressed = self.compressed_bytes,
            "chunk encoded"
        );
    }
}

pub struct BytesUploaded<'a> {
    pub sink: &'a str,
    pub bytes: u64,
}

impl BytesUploaded<'_> {
    pub fn emit(self) {
        global().uploaded_bytes.with_label_values(&[sink_label(self.sink)]).inc_by(self.bytes);
    }
}

/// An upload operation was retried (after a reconnect, or a transient server answer).
pub struct UploadRetry<'a> {
    pub sink: &'a str,
    pub file: &'a str,
    pub error: &'a str,
}

impl UploadRetry<'_> {
    pub fn emit(self) {
        global().upload_retries.with_label_values(&[sink_label(self.sink)]).inc();
        tracing::warn!(file = self.file, "upload retried: {}", self.error);
    }
}

pub struct Reconnected<'a> {
    pub sink: &'a str,
    pub attempt: u32,
}

impl Reconnected<'_> {
    pub fn emit(self) {
        global().reconnects.with_label_values(&[sink_label(self.sink)]).inc();
        tracing::warn!(destination = self.sink, attempt = self.attempt, "reconnected to the target");
    }
}

pub struct FileCommitted<'a> {
    pub sink: &'a str,
    pub name: &'a str,
    pub rows: u64,
    pub bytes: u64,
}

impl FileCommitted<'_> {
    pub fn emit(self, progress: &Progress) {
        progress.committed_bytes.fetch_add(self.bytes, Ordering::Relaxed);
        progress.committed_files.fetch_add(1, Ordering::Relaxed);
        global().files_committed.with_label_values(&[sink_label(self.sink)]).inc();
        tracing::info!(file = self.name, rows = self.rows, bytes = self.bytes, "file committed");
    }
}

/// A resumed run keeps what the interrupted one committed.
pub struct Resumed {
    pub files: u64,
    pub bytes: u64,
    pub streams_left: usize,
}

impl Resumed {
    pub fn emit(self) {
        let m = global();
        m.resumed_files.inc_by(self.files);
        m.resumed_bytes.inc_by(self.bytes);
        tracing::warn!(
            committed_files = self.files,
            committed_bytes = self.bytes,
            streams_left = self.streams_left,
            "resuming an interrupted run; committed files are kept"
        );
    }
}

/// Items entering (`delta > 0`) or leaving a queue between stages: `batches` (read ->
/// encode), `encoding` (on the encoder threads), `upload` (encoded, waiting for the target).
pub struct QueueDepth {
    pub stage: &'static str,
    pub delta: i64,
}

impl QueueDepth {
    pub fn emit(self) {
        global().queue_depth.with_label_values(&[self.stage]).add(self.delta);
    }
}

/// The job ended with `exit_code` after `seconds`.
pub struct JobFinished {
    pub exit_code: u8,
    pub seconds: f64,
}

impl JobFinished {
    pub fn emit(self) {
        let m = global();
        m.job_duration_seconds.set(self.seconds);
        m.job_exit_code.set(i64::from(self.exit_code));
        // Items dropped on a failure never left their queues; the next job starts from empty.
        for stage in ["batches", "encoding", "upload"] {
            m.queue_depth.with_label_values(&[stage]).set(0);
        }
        let outcome = if self.exit_code == 0 { "success" } else { "failure" };
        m.jobs.with_label_values(&[outcome]).inc();
        if self.exit_code == 0 {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            m.last_success_timestamp_seconds.set(now);
        }
    }
}
