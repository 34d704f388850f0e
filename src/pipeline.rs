//! The streaming core: source streams -> encoders -> sink uploads, with backpressure.
//!
//! ```text
//!  read task per stream ──batches──▶ lane ──encode jobs──▶ worker pool (rayon)
//!        (async)        bounded      (async)  ◀──chunks in order──┘
//!                                     │ file rolling, SHA-256
//!                                     └──Begin/Part/End──▶ upload task ──▶ Sink
//!                                         bounded                 (async)
//! ```
//!
//! A *lane* produces one series of files. In `per-stream` mode each source stream has its own
//! lane (files named by stream, uploaded in parallel); in `single` mode every stream feeds one
//! lane and one file series. Lanes run `--concurrency` at a time.
//!
//! Memory is bounded by configuration, never by table size: each lane holds at most
//! `queue_batches` batches from its readers, `in_flight` chunks being encoded and
//! [`UPLOAD_QUEUE`] chunks waiting for the sink. When the sink is slow, the upload queue fills,
//! the lane stops taking encoded chunks, the batch queue fills, and the readers stop reading.
//!
//! CPU work never runs on the async runtime: encoding and compression run on a rayon pool
//! (one thread per core by default), hashing on tokio's blocking pool. Splittable formats
//! (CSV, NDJSON) encode many chunks of one lane at once and reassemble them in order, as
//! DataFusion's file sinks do; Parquet encodes its file sequentially on the pool.
//!
//! Failure: the first error cancels every lane. Each lane's upload task aborts its open upload
//! (so no `.partial` remains), files already committed stay committed and are reported, and no
//! manifest is written, so a consumer never mistakes a failed export for a whole one.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{FuturesOrdered, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::encode::{Compression, Encoder, Format, FormatOptions, Part};
use crate::error::{ConfigError, Error};
use crate::manifest::{FileRecord, Manifest};
pub use crate::metrics::Progress;
use crate::metrics::events::{self, BatchRead, BytesUploaded, ChunkEncoded, FileCommitted, QueueDepth, StreamActive};
use crate::read::{ReadPlan, Source, StreamSpec};
use crate::state::{JobState, StateStore};
use crate::template::{NameContext, NameTemplate};
use crate::write::{PutMode, Sink, WriteError};

/// Files roll at this size unless `--max-file-bytes` says otherwise (BigQuery's export limit).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 30;
/// Rows per encode job for splittable formats.
pub const DEFAULT_CHUNK_ROWS: usize = 16_384;
/// Batches buffered between a lane's readers and its encoder.
pub const DEFAULT_QUEUE_BATCHES: usize = 4;
/// Encoded chunks buffered between a lane and its upload.
pub const UPLOAD_QUEUE: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMode {
    /// Each source stream writes its own series of files, in parallel.
    PerStream,
    /// All streams write one series of files (one file unless it rolls).
    Single,
}

/// Everything the pipeline needs besides the source and the sink.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub format: &'static Format,
    pub format_options: FormatOptions,
    /// Whole-file compression for row formats (`None` for Parquet, which compresses inside).
    pub compression: Compression,
    pub file_mode: FileMode,
    pub max_file_bytes: u64,
    pub max_file_rows: Option<u64>,
    pub template: NameTemplate,
    pub prefix: String,
    pub put_mode: PutMode,
    /// Written after every file, unless `None`.
    pub manifest_name: Option<String>,
    /// Empty marker written last, when set.
    pub success_marker: Option<String>,
    /// Lanes (per-stream mode) or readers (single mode) active at once.
    pub concurrency: usize,
    /// Encoder threads.
    pub threads: usize,
    pub chunk_rows: usize,
    pub queue_batches: usize,
    /// Where progress is recorded for `--resume`; `None` keeps no state.
    pub state: Option<StateOptions>,
    /// Read this plan (from `bq2sftp plan`) instead of making one.
    pub saved_plan: Option<ReadPlan>,
    /// Export only this share of the plan's streams.
    pub shard: Option<Shard>,
    /// The `{date}` of file names (default: when the job starts); a plan's shards share theirs.
    pub name_date: Option<DateTime<Utc>>,
}

/// One share of a plan's streams: shard `index` of `count` takes streams `index`,
/// `index + count`, `index + 2 * count`, …
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Parses `I/N`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::invalid(format!("--shard {text}"), "expected I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let shard = Shard { index: i.trim().parse().map_err(|_| bad())?, count: n.trim().parse().map_err(|_| bad())? };
        if shard.count == 0 || shard.index >= shard.count {
            return Err(bad());
        }
        Ok(shard)
    }

    pub fn owns(&self, stream: usize) -> bool {
        stream % self.count == self.index
    }

    /// The manifest a shard writes, beside the combined one `finalize` writes.
    pub fn manifest_name(&self, manifest: &str) -> String {
        let stem = manifest.strip_suffix(".json").unwrap_or(manifest);
        format!("{stem}.shard-{}-of-{}.json", self.index, self.count)
    }
}

/// The state file of a job (see [`crate::state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateOptions {
    pub path: PathBuf,
    /// Given by the user: failing to write it fails the job (a default path only warns).
    pub explicit: bool,
    /// Continue the run recorded in the state file, if there is one.
    pub resume: bool,
    /// Identifies the job; a state file of another job is refused.
    pub fingerprint: String,
}

impl PipelineOptions {
    pub fn new(format: &'static Format, template: NameTemplate, prefix: impl Into<String>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        PipelineOptions {
            format,
            format_options: FormatOptions::default(),
            compression: Compression::None,
            file_mode: FileMode::PerStream,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_file_rows: None,
            template,
            prefix: prefix.into(),
            put_mode: PutMode::Create,
            manifest_name: Some(crate::manifest::DEFAULT_MANIFEST_NAME.to_string()),
            success_marker: None,
            concurrency: (2 * cores).max(4),
            threads: cores,
            chunk_rows: DEFAULT_CHUNK_ROWS,
            queue_batches: DEFAULT_QUEUE_BATCHES,
            state: None,
            saved_plan: None,
            shard: None,
            name_date: None,
        }
    }

    /// `.csv.gz`, `.json.zst`, `.parquet`.
    pub fn extension(&self) -> String {
        format!("{}{}", self.format.extension, self.compression.extension())
    }
}

/// What a finished job did.
#[derive(Debug, Clone)]
pub struct Report {
    pub source: String,
    pub target: String,
    /// Committed files, ordered by stream then sequence.
    pub files: Vec<FileRecord>,
    pub rows: u64,
    /// Bytes committed (after compression).
    pub bytes: u64,
    /// Bytes the encoders produced before compression.
    pub encoded_bytes: u64,
    pub duration: Duration,
    pub manifest: Option<String>,
}

struct Ctx {
    opts: PipelineOptions,
    plan: ReadPlan,
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    started: DateTime<Utc>,
    pool: rayon::ThreadPool,
    names: Mutex<HashSet<String>>,
    cancel: CancellationToken,
    progress: Arc<Progress>,
    /// Encoded bytes per row, smoothed, so chunks stay well below `max_file_bytes`.
    bytes_per_row: AtomicU64,
    /// Progress for `--resume`, when kept.
    state: Option<StateStore>,
}

impl Ctx {
    fn name(&self, stream: usize, seq: u64) -> String {
        file_name(&self.opts, stream, seq, self.opts.name_date.unwrap_or(self.started))
    }

    /// Reserves a file name, refusing one this job already used (a template without `{seq}`
    /// whose files rolled, say): two files must never share a name.
    fn claim(&self, name: &str) -> Result<(), Error> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if !names.insert(name.to_string()) {
            return Err(ConfigError::invalid(
                format!("--name-template '{}'", self.opts.template.as_str()),
                format!("renders '{name}' twice; include {{seq}} (and {{stream}} in per-stream mode) so every file gets its own name"),
            )
            .into());
        }
        Ok(())
    }

    /// Rows per encode job: the configured size, smaller when files are small.
    fn chunk_rows(&self) -> usize {
        let per_row = self.bytes_per_row.load(Ordering::Relaxed).max(1);
        let fit = self.opts.max_file_bytes / 4 / per_row;
        (fit as usize).clamp(1, self.opts.chunk_rows.max(1))
    }
}

/// Runs one export. `cancel` stops it early (a signal); that surfaces as [`Error::Interrupted`].
pub async fn run(
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    opts: PipelineOptions,
    cancel: CancellationToken,
    progress: Arc<Progress>,
) -> Result<Report, Error> {
    let clock = Instant::now();
    let started = Utc::now();
    sink.check().await?;
    let (plan, resumed) = open_plan(source.as_ref(), &opts).await?;
    // Refuse a schema the format cannot hold before anything is written.
    (opts.format.build)(&plan.schema, &opts.format_options, Part::Whole)?;
    if opts.file_mode == FileMode::PerStream && plan.streams.len() > 1 && !opts.template.has_stream() {
        return Err(ConfigError::invalid(
            format!("--name-template '{}'", opts.template.as_str()),
            format!("the source has {} streams and per-stream mode writes a file series per stream; include {{stream}} or use --file-mode single", plan.streams.len()),
        )
        .into());
    }
    progress.estimated_rows.store(plan.estimated_rows.unwrap_or(0), Ordering::Relaxed);
    let resuming = resumed.is_some();
    let state = make_state(&opts, &plan, started, resumed)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .thread_name(|i| format!("bq2sftp-encode-{i}"))
        // A panicking job drops its result sender; the lane reports that as an internal error.
        .panic_handler(|_| tracing::error!("an encoder thread panicked"))
        .build()
        .map_err(|e| Error::Internal(format!("cannot start encoder threads: {e}")))?;
    let ctx = Arc::new(Ctx {
        bytes_per_row: AtomicU64::new(100),
        state,
        opts,
        plan,
        source,
        sink,
        started,
        pool,
        names: Mutex::new(HashSet::new()),
        cancel,
        progress,
    });
    if !resuming {
        refuse_existing(&ctx).await?;
    }
    tracing::info!(
        source = %ctx.plan.description.name,
        destination = %ctx.sink.describe(),
        streams = ctx.plan.streams.len(),
        format = ctx.opts.format.name,
        "export started"
    );

    // Files committed by an interrupted run, and where each unfinished lane picks up.
    let previous = ctx.state.as_ref().map(StateStore::snapshot);
    let mut files: Vec<FileRecord> =
        previous.iter().flat_map(|s| s.lanes.values().flat_map(|l| l.files.clone())).collect();
    let lanes: Vec<Lane> = match ctx.opts.file_mode {
        FileMode::PerStream => ctx
            .plan
            .streams
            .iter()
            .filter(|s| ctx.opts.shard.is_none_or(|shard| shard.owns(s.index)))
            .filter_map(|s| {
                let done = previous.as_ref().and_then(|p| p.lanes.get(&s.index));
                match done {
                    Some(l) if l.done => None,
                    Some(l) => Some(Lane {
                        index: s.index,
                        streams: vec![s.clone()],
                        offset: l.rows,
                        next_seq: l.next_seq(),
                        resumed: true,
                    }),
                    None => Some(Lane {
                        index: s.index,
                        streams: vec![s.clone()],
                        offset: 0,
                        next_seq: 0,
                        resumed: resuming,
                    }),
                }
            })
            .collect(),
        FileMode::Single if ctx.plan.streams.is_empty() => Vec::new(),
        FileMode::Single => {
            let l = previous.as_ref().and_then(|p| p.lanes.get(&0)).cloned().unwrap_or_default();
            if l.done {
                Vec::new()
            } else {
                vec![Lane {
                    index: 0,
                    streams: ctx.plan.streams.clone(),
                    offset: l.rows,
                    next_seq: l.next_seq(),
                    resumed: resuming,
                }]
            }
        }
    };
    if resuming {
        events::Resumed {
            files: files.len() as u64,
            bytes: files.iter().map(|f| f.bytes).sum(),
            streams_left: lanes.len(),
        }
        .emit();
    }
    let mut outcomes = futures::stream::iter(lanes)
        .map(|lane| {
            let ctx = ctx.clone();
            async move {
                tokio::spawn(run_lane(ctx, lane)).await.unwrap_or_else(|e| LaneOutcome {
                    files: Vec::new(),
                    error: Some(Error::Internal(format!("lane task failed: {e}"))),
                })
            }
        })
        .buffer_unordered(ctx.opts.concurrency.max(1));

    let mut first_error: Option<Error> = None;
    while let Some(outcome) = outcomes.next().await {
        files.extend(outcome.files);
        if let Some(e) = outcome.error {
            // Keep the root cause: lanes stopped by the cancellation report `Interrupted`.
            let replace = match &first_error {
                None => true,
                Some(Error::Interrupted(_)) => !matches!(e, Error::Interrupted(_)),
                Some(_) => false,
            };
            ctx.cancel.cancel();
            if replace {
                first_error = Some(e);
            }
        }
    }
    drop(outcomes);
    files.sort_by_key(|f| (f.stream, f.seq));
    if let Some(e) = first_error {
        tracing::error!(committed_files = files.len(), "export failed: {e}");
        if let Some(state) = &ctx.state {
            tracing::warn!(state = %state.path().display(), "progress is saved: run the same command with --resume to continue");
        }
        return Err(e);
    }

    if files.is_empty() && ctx.opts.shard.is_none() {
        // No rows at all: one file with just the header (or an empty Parquet file), as a
        // BigQuery export of an empty table writes. With shards, `finalize` decides that.
        files.push(write_empty_file(&ctx).await?);
    }

    let rows = files.iter().map(|f| f.rows).sum();
    let bytes = files.iter().map(|f| f.bytes).sum();
    let manifest_name = match (ctx.opts.shard, &ctx.opts.manifest_name) {
        (Some(shard), name) => {
            Some(shard.manifest_name(name.as_deref().unwrap_or(crate::manifest::DEFAULT_MANIFEST_NAME)))
        }
        (None, name) => name.clone(),
    };
    let manifest = match &manifest_name {
        Some(name) => {
            let m = Manifest {
                manifest_version: Manifest::VERSION,
                tool: concat!("bq2sftp ", env!("CARGO_PKG_VERSION")).to_string(),
                source: ctx.plan.description.clone(),
                target: ctx.sink.describe(),
                format: ctx.opts.format.name.to_string(),
                compression: codec_label(&ctx.opts).to_string(),
                started_at: ctx.started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                finished_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                total_rows: rows,
                total_bytes: bytes,
                total_files: files.len(),
                files: files.clone(),
                shard: ctx.opts.shard,
                streams: ctx
                    .plan
                    .streams
                    .iter()
                    .map(|s| s.index)
                    .filter(|i| ctx.opts.shard.is_none_or(|shard| shard.owns(*i)))
                    .collect(),
            };
            put_small(&ctx, name, Bytes::from(m.to_json())).await?;
            Some(name.clone())
        }
        None => None,
    };
    if let Some(marker) = ctx.opts.success_marker.as_ref().filter(|_| ctx.opts.shard.is_none()) {
        put_small(&ctx, marker, Bytes::new()).await?;
    }
    if let Some(state) = &ctx.state
        && let Err(e) = state.remove()
    {
        tracing::warn!("{e}");
    }
    let report = Report {
        source: ctx.plan.description.name.clone(),
        target: ctx.sink.describe(),
        files,
        rows,
        bytes,
        encoded_bytes: ctx.progress.encoded_bytes.load(Ordering::Relaxed),
        duration: clock.elapsed(),
        manifest,
    };
    tracing::info!(rows = report.rows, files = report.files.len(), bytes = report.bytes, "export finished");
    Ok(report)
}

/// The plan to read: a fresh one, or with `--resume` the interrupted run's, reopened.
async fn open_plan(source: &dyn Source, opts: &PipelineOptions) -> Result<(ReadPlan, Option<JobState>), Error> {
    if let Some(state) = opts.state.as_ref().filter(|s| s.resume)
        && let Some(saved) = StateStore::load(&state.path, &state.fingerprint)?
    {
        let plan = source.reopen(&saved.plan(&state.path)?).await?;
        return Ok((plan, Some(saved)));
    }
    if let Some(plan) = &opts.saved_plan {
        return Ok((source.reopen(plan).await?, None));
    }
    Ok((source.plan().await?, None))
}

/// Starts (or continues) the state file. Single-file mode interleaves streams, so its row
/// positions cannot be replayed unless there is only one stream: no state is kept then.
fn make_state(
    opts: &PipelineOptions,
    plan: &ReadPlan,
    started: DateTime<Utc>,
    resumed: Option<JobState>,
) -> Result<Option<StateStore>, Error> {
    let Some(options) = &opts.state else { return Ok(None) };
    if opts.file_mode == FileMode::Single && plan.streams.len() > 1 {
        if options.resume {
            return Err(ConfigError::invalid(
                "--resume",
                "single-file mode interleaves the source's streams, so it cannot resume row for row; use --file-mode per-stream",
            )
            .into());
        }
        return Ok(None);
    }
    let store = match resumed {
        Some(state) => StateStore::new(options.path.clone(), state),
        None => {
            let state = JobState::new(options.fingerprint.clone(), started.to_rfc3339(), plan);
            let store = StateStore::new(options.path.clone(), state);
            if let Err(e) = store.save() {
                if options.explicit {
                    return Err(e.into());
                }
                tracing::warn!("{e}; continuing without a state file, so --resume will not be possible");
                return Ok(None);
            }
            store
        }
    };
    Ok(Some(store))
}

/// The bounded `codec` label: the whole-file codec, or `parquet-<codec>` for Parquet's own.
fn codec_label(opts: &PipelineOptions) -> &'static str {
    if opts.format.internal_compression {
        match opts.format_options.parquet.codec {
            crate::encode::parquet::Codec::None => "parquet-none",
            crate::encode::parquet::Codec::Snappy => "parquet-snappy",
            crate::encode::parquet::Codec::Gzip(_) => "parquet-gzip",
            crate::encode::parquet::Codec::Zstd(_) => "parquet-zstd",
        }
    } else {
        opts.compression.name()
    }
}

/// Fails fast when the target already holds this job's output, unless overwriting. The upload
/// itself refuses atomically too; this only saves reading a table to then fail.
async fn refuse_existing(ctx: &Ctx) -> Result<(), Error> {
    if ctx.opts.put_mode == PutMode::Overwrite {
        return Ok(());
    }
    let mut names: Vec<String> = match ctx.opts.shard {
        Some(shard) => vec![
            shard.manifest_name(ctx.opts.manifest_name.as_deref().unwrap_or(crate::manifest::DEFAULT_MANIFEST_NAME)),
        ],
        None => ctx.opts.manifest_name.iter().cloned().collect(),
    };
    let first_lanes: Vec<usize> = match ctx.opts.file_mode {
        FileMode::Single => vec![0],
        FileMode::PerStream => ctx
            .plan
            .streams
            .iter()
            .map(|s| s.index)
            .filter(|i| ctx.opts.shard.is_none_or(|shard| shard.owns(*i)))
            .take(64)
            .collect(),
    };
    // Lane 0's first file is also the empty table's header-only file, which only an unsharded
    // run writes (finalize does it for shards). A shard must not look at it: with shards run
    // one after another (a Kubernetes Indexed Job with parallelism 1, Cloud Run tasks beyond
    // its parallelism) shard 0 has already committed it, and every later shard was refused.
    let empty_table_file = ctx.opts.shard.is_none().then_some(0);
    names.extend(first_lanes.into_iter().chain(empty_table_file).map(|lane| ctx.name(lane, 0)));
    names.dedup();
    for name in names {
        if ctx.sink.exists(&name).await? {
            return Err(WriteError::Exists { path: format!("{}/{name}", ctx.sink.describe()) }.into());
        }
    }
    Ok(())
}

async fn put_small(ctx: &Ctx, name: &str, data: Bytes) -> Result<(), Error> {
    let mut upload = ctx.sink.create(name, ctx.opts.put_mode).await?;
    if !data.is_empty()
        && let Err(e) = upload.put_part(data).await
    {
        return Err(e.into());
    }
    upload.complete().await?;
    Ok(())
}

/// The bytes of a file with no rows: the CSV header, an empty Parquet file with the schema,
/// nothing for NDJSON.
pub fn empty_file(opts: &PipelineOptions, schema: &arrow_schema::SchemaRef) -> Result<Vec<u8>, Error> {
    let mut encoder = (opts.format.build)(schema, &opts.format_options, Part::Whole)?;
    encoder.finish()?;
    let mut raw = Vec::new();
    encoder.drain_into(&mut raw);
    if raw.is_empty() || opts.format.internal_compression {
        return Ok(raw);
    }
    let mut out = Vec::new();
    opts.compression.compress_block(&raw, &mut out)?;
    Ok(out)
}

/// The name of file `seq` of stream `stream` for a job started at `date`.
pub fn file_name(opts: &PipelineOptions, stream: usize, seq: u64, date: DateTime<Utc>) -> String {
    opts.template.render(&NameContext { prefix: &opts.prefix, stream, seq, date, ext: &opts.extension() })
}

async fn write_empty_file(ctx: &Ctx) -> Result<FileRecord, Error> {
    let data = empty_file(&ctx.opts, &ctx.plan.schema)?;
    let name = ctx.name(0, 0);
    ctx.claim(&name)?;
    let record = FileRecord {
        name: name.clone(),
        stream: 0,
        seq: 0,
        rows: 0,
        bytes: data.len() as u64,
        sha256: hex::encode(Sha256::digest(&data)),
    };
    put_small(ctx, &name, Bytes::from(data)).await?;
    Ok(record)
}

/// What a lane left behind: the files it committed, and why it stopped early if it did.
struct LaneOutcome {
    files: Vec<FileRecord>,
    error: Option<Error>,
}

/// One file series to produce: its streams, and where an interrupted run left it.
struct Lane {
    index: usize,
    streams: Vec<StreamSpec>,
    /// Rows of the lane already committed (its single stream's read offset).
    offset: u64,
    next_seq: u64,
    /// Continues an interrupted run: the first file replaces whatever that run left.
    resumed: bool,
}

async fn run_lane(ctx: Arc<Ctx>, lane: Lane) -> LaneOutcome {
    let (batch_tx, batch_rx) = mpsc::channel(ctx.opts.queue_batches.max(1));
    let readers = tokio::spawn(read_streams(ctx.clone(), lane.streams, lane.offset, batch_tx));
    let (upload_tx, upload_rx) = mpsc::channel(UPLOAD_QUEUE);
    // A resumed lane re-produces the file the interrupted run was writing, possibly already
    // renamed into place before the state caught up: it replaces its own output.
    let mode = if lane.resumed { PutMode::Overwrite } else { ctx.opts.put_mode };
    let uploader = tokio::spawn(upload_files(ctx.clone(), lane.index, mode, upload_rx));

    let series =
        FileSeries { ctx: ctx.clone(), lane: lane.index, seq: lane.next_seq, open: None, header: None, tx: upload_tx };
    let encoded = if ctx.opts.format.splittable {
        encode_rows(ctx.clone(), series, batch_rx, lane.offset).await
    } else {
        encode_files(ctx.clone(), series, batch_rx).await
    };
    // The lane's senders are gone now: the readers stop at their next send, the uploader
    // finishes the last file (or aborts it, if the lane failed mid-file).
    readers.abort();
    let (files, upload_error) = match uploader.await {
        Ok(UploadOutcome { files, error }) => (files, error),
        Err(e) => (Vec::new(), Some(Error::Internal(format!("upload task failed: {e}")))),
    };
    // When the upload failed, the lane only saw its queue close: the upload error is the cause.
    let error = match (upload_error, encoded) {
        (Some(e), _) => Some(e),
        (None, Err(e)) => Some(e),
        (None, Ok(())) => None,
    };
    if error.is_none()
        && let Some(state) = &ctx.state
        && let Err(e) = state.finish_lane(lane.index)
    {
        tracing::warn!("{e}");
    }
    LaneOutcome { files, error }
}

/// Reads the lane's streams into its batch queue, `concurrency` streams at a time.
async fn read_streams(
    ctx: Arc<Ctx>,
    streams: Vec<StreamSpec>,
    offset: u64,
    tx: mpsc::Sender<Result<RecordBatch, crate::read::ReadError>>,
) {
    let concurrency = ctx.opts.concurrency.max(1);
    futures::stream::iter(streams)
        .for_each_concurrent(concurrency, |spec| {
            let (ctx, tx) = (ctx.clone(), tx.clone());
            async move {
                let mut batches = ctx.source.clone().read(&ctx.plan, &spec, offset);
                StreamActive { stream: &spec.name, started: true }.emit();
                loop {
                    let item = tokio::select! {
                        _ = ctx.cancel.cancelled() => break,
                        item = batches.next() => item,
                    };
                    let Some(item) = item else { break };
                    if let Ok(b) = &item {
                        BatchRead { rows: b.num_rows() as u64, arrow_bytes: b.get_array_memory_size() as u64 }
                            .emit(&ctx.progress);
                    }
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        break;
                    }
                    QueueDepth { stage: "batches", delta: 1 }.emit();
                }
                StreamActive { stream: &spec.name, started: false }.emit();
            }
        })
        .await;
}

fn interrupted() -> Error {
    Error::Interrupted("the job was cancelled".into())
}

/// Runs `f` on the encoder pool and waits for it without blocking the runtime.
async fn on_pool<T: Send + 'static>(ctx: &Ctx, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    let (tx, rx) = oneshot::channel();
    ctx.pool.spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.map_err(|_| Error::Internal("an encoder thread panicked".into()))
}

/// One encoded piece of a file.
struct Chunk {
    rows: u64,
    /// In-memory Arrow bytes of the rows (a share of the batch's buffers).
    arrow_bytes: u64,
    raw_bytes: u64,
    data: Bytes,
}

fn encode_chunk(ctx: &Ctx, batch: &RecordBatch, arrow_bytes: u64) -> Result<Chunk, Error> {
    let opts = &ctx.opts;
    let mut encoder = (opts.format.build)(&ctx.plan.schema, &opts.format_options, Part::Body)?;
    encoder.write(batch)?;
    let mut raw = Vec::new();
    encoder.drain_into(&mut raw);
    let raw_bytes = raw.len() as u64;
    let data = match opts.compression {
        Compression::None => raw,
        c => {
            let mut out = Vec::with_capacity(raw.len() / 3);
            c.compress_block(&raw, &mut out)?;
            out
        }
    };
    Ok(Chunk { rows: batch.num_rows() as u64, arrow_bytes, raw_bytes, data: Bytes::from(data) })
}

/// Splits `batch` into encode jobs: at most `chunk_rows` rows each, never straddling a
/// multiple of `max_file_rows` in the lane's row count, so files hold exactly that many rows.
fn split(batch: RecordBatch, chunk_rows: usize, max_file_rows: Option<u64>, position: &mut u64) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < batch.num_rows() {
        let mut len = chunk_rows.min(batch.num_rows() - offset);
        if let Some(max) = max_file_rows.filter(|m| *m > 0) {
            let to_boundary = max - *position % max;
            len = len.min(to_boundary as usize);
        }
        out.push(batch.slice(offset, len));
        offset += len;
        *position += len as u64;
    }
    out
}

/// The lane loop for splittable formats: chunks are encoded in parallel on the pool and
/// appended in order.
async fn encode_rows(
    ctx: Arc<Ctx>,
    mut series: FileSeries,
    mut input: mpsc::Receiver<Result<RecordBatch, crate::read::ReadError>>,
    offset: u64,
) -> Result<(), Error> {
    let in_flight = ctx.opts.threads.max(1) + 1;
    let mut pending = FuturesOrdered::new();
    let mut input_done = false;
    let mut position = offset;
    // The cancellation branch is always enabled, so the loop ends by this check, not `else`.
    while !(input_done && pending.is_empty()) {
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => return Err(interrupted()),
            Some(chunk) = pending.next(), if !pending.is_empty() => {
                QueueDepth { stage: "encoding", delta: -1 }.emit();
                let chunk: Chunk = chunk?;
                if let Some(per_row) = chunk.raw_bytes.checked_div(chunk.rows) {
                    let per_row = per_row + 1;
                    let old = ctx.bytes_per_row.load(Ordering::Relaxed);
                    ctx.bytes_per_row.store((old * 3 + per_row) / 4, Ordering::Relaxed);
                }
                series.append_chunk(chunk).await?;
            }
            item = input.recv(), if !input_done && pending.len() < in_flight => match item {
                Some(Ok(batch)) => {
                    QueueDepth { stage: "batches", delta: -1 }.emit();
                    let arrow_bytes = batch.get_array_memory_size() as u64;
                    let rows = batch.num_rows().max(1) as u64;
                    for slice in split(batch, ctx.chunk_rows(), ctx.opts.max_file_rows, &mut position) {
                        let job_ctx = ctx.clone();
                        let share = arrow_bytes * slice.num_rows() as u64 / rows;
                        let job = on_pool(&ctx, move || encode_chunk(&job_ctx, &slice, share));
                        pending.push_back(async move { job.await? });
                        QueueDepth { stage: "encoding", delta: 1 }.emit();
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => input_done = true,
            },
        }
    }
    series.close().await
}

/// The lane loop for formats that need one encoder per file (Parquet).
async fn encode_files(
    ctx: Arc<Ctx>,
    mut series: FileSeries,
    mut input: mpsc::Receiver<Result<RecordBatch, crate::read::ReadError>>,
) -> Result<(), Error> {
    let max_rows = ctx.opts.max_file_rows.filter(|m| *m > 0).unwrap_or(u64::MAX);
    let mut encoder: Option<Box<dyn Encoder>> = None;
    let mut rows_in_file = 0u64;
    loop {
        let item = tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => return Err(interrupted()),
            item = input.recv() => item,
        };
        let batch = match item {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Err(e.into()),
            None => break,
        };
        QueueDepth { stage: "batches", delta: -1 }.emit();
        let arrow_bytes = batch.get_array_memory_size() as u64;
        let batch_rows = batch.num_rows().max(1) as u64;
        let mut offset = 0;
        while offset < batch.num_rows() {
            let len = ((max_rows - rows_in_file) as usize).min(batch.num_rows() - offset);
            let slice = batch.slice(offset, len);
            offset += len;
            let mut enc = match encoder.take() {
                Some(e) => e,
                None => {
                    rows_in_file = 0;
                    series.open().await?;
                    (ctx.opts.format.build)(&ctx.plan.schema, &ctx.opts.format_options, Part::Whole)?
                }
            };
            let (enc, out, buffered) = on_pool(&ctx, move || -> Result<_, Error> {
                enc.write(&slice)?;
                let mut out = Vec::new();
                enc.drain_into(&mut out);
                let buffered = enc.buffered_bytes() as u64;
                Ok((enc, out, buffered))
            })
            .await??;
            rows_in_file += len as u64;
            let encoded = out.len() as u64;
            series.append(Bytes::from(out), len as u64, encoded, arrow_bytes * len as u64 / batch_rows).await?;
            let full = rows_in_file >= max_rows || series.bytes() + buffered >= ctx.opts.max_file_bytes;
            if full {
                finish_file(&ctx, &mut series, enc).await?;
            } else {
                encoder = Some(enc);
            }
        }
    }
    if let Some(enc) = encoder {
        finish_file(&ctx, &mut series, enc).await?;
    }
    Ok(())
}

async fn finish_file(ctx: &Ctx, series: &mut FileSeries, mut enc: Box<dyn Encoder>) -> Result<(), Error> {
    let out = on_pool(ctx, move || -> Result<_, Error> {
        enc.finish()?;
        let mut out = Vec::new();
        enc.drain_into(&mut out);
        Ok(out)
    })
    .await??;
    let encoded = out.len() as u64;
    series.append(Bytes::from(out), 0, encoded, 0).await?;
    series.close().await
}

/// Messages from a lane to its upload task.
enum UploadMsg {
    Begin { name: String },
    Part(Bytes),
    End(FileRecord),
}

struct OpenFile {
    name: String,
    rows: u64,
    bytes: u64,
    raw_bytes: u64,
    hasher: Sha256,
}

/// A lane's series of files: opens, rolls, hashes and closes them.
struct FileSeries {
    ctx: Arc<Ctx>,
    lane: usize,
    seq: u64,
    open: Option<OpenFile>,
    /// The compressed CSV header, made once per lane.
    header: Option<Bytes>,
    tx: mpsc::Sender<UploadMsg>,
}

impl FileSeries {
    fn bytes(&self) -> u64 {
        self.open.as_ref().map_or(0, |f| f.bytes)
    }

    async fn send(&self, msg: UploadMsg) -> Result<(), Error> {
        // A closed queue means the upload task stopped on an error it will report itself.
        self.tx.send(msg).await.map_err(|_| interrupted())
    }

    async fn open(&mut self) -> Result<(), Error> {
        let name = self.ctx.name(self.lane, self.seq);
        self.ctx.claim(&name)?;
        self.seq += 1;
        self.send(UploadMsg::Begin { name: name.clone() }).await?;
        self.open = Some(OpenFile { name, rows: 0, bytes: 0, raw_bytes: 0, hasher: Sha256::new() });
        Ok(())
    }

    /// Opens a file for a splittable format, starting with the header.
    async fn open_with_header(&mut self) -> Result<(), Error> {
        self.open().await?;
        if self.header.is_none() {
            let ctx = self.ctx.clone();
            let header = on_pool(&self.ctx, move || -> Result<_, Error> {
                let opts = &ctx.opts;
                let mut enc = (opts.format.build)(&ctx.plan.schema, &opts.format_options, Part::Whole)?;
                enc.finish()?;
                let mut raw = Vec::new();
                enc.drain_into(&mut raw);
                let mut out = Vec::new();
                if !raw.is_empty() {
                    opts.compression.compress_block(&raw, &mut out)?;
                }
                Ok((Bytes::from(out), raw.len() as u64))
            })
            .await??;
            self.header = Some(header.0);
            if let Some(f) = &mut self.open {
                f.raw_bytes += header.1;
            }
        }
        let header = self.header.clone().unwrap_or_default();
        if !header.is_empty() {
            self.append(header, 0, 0, 0).await?;
        }
        Ok(())
    }

    async fn append_chunk(&mut self, chunk: Chunk) -> Result<(), Error> {
        let max_rows = self.ctx.opts.max_file_rows.filter(|m| *m > 0).unwrap_or(u64::MAX);
        if let Some(f) = &self.open {
            let too_many_rows = f.rows + chunk.rows > max_rows;
            let too_big = f.rows > 0 && f.bytes + chunk.data.len() as u64 > self.ctx.opts.max_file_bytes;
            if too_many_rows || too_big {
                self.close().await?;
            }
        }
        if self.open.is_none() {
            self.open_with_header().await?;
        }
        self.append(chunk.data, chunk.rows, chunk.raw_bytes, chunk.arrow_bytes).await
    }

    /// Appends encoded bytes holding `rows` rows (`raw_bytes` before compression, from
    /// `arrow_bytes` of Arrow data) to the open file.
    async fn append(&mut self, data: Bytes, rows: u64, raw_bytes: u64, arrow_bytes: u64) -> Result<(), Error> {
        let Some(mut file) = self.open.take() else {
            return Err(Error::Internal("append without an open file".into()));
        };
        if !data.is_empty() {
            // SHA-256 runs at ~2 GB/s: a few ms per chunk, too long to hold a runtime thread.
            let (hasher, data) = tokio::task::spawn_blocking(move || {
                let mut hasher = file.hasher;
                hasher.update(&data);
                (hasher, data)
            })
            .await
            .map_err(|e| Error::Internal(format!("hash task failed: {e}")))?;
            file.hasher = hasher;
            file.bytes += data.len() as u64;
            ChunkEncoded {
                format: self.ctx.opts.format.name,
                codec: codec_label(&self.ctx.opts),
                arrow_bytes,
                encoded_bytes: raw_bytes,
                compressed_bytes: data.len() as u64,
            }
            .emit(&self.ctx.progress);
            self.send(UploadMsg::Part(data)).await?;
            QueueDepth { stage: "upload", delta: 1 }.emit();
        }
        file.rows += rows;
        file.raw_bytes += raw_bytes;
        self.open = Some(file);
        Ok(())
    }

    async fn close(&mut self) -> Result<(), Error> {
        let Some(file) = self.open.take() else { return Ok(()) };
        let record = FileRecord {
            name: file.name,
            stream: self.lane,
            seq: self.seq - 1,
            rows: file.rows,
            bytes: file.bytes,
            sha256: hex::encode(file.hasher.finalize()),
        };
        self.send(UploadMsg::End(record)).await
    }
}

struct UploadOutcome {
    files: Vec<FileRecord>,
    error: Option<Error>,
}

/// Streams a lane's files to the sink, one at a time, in order.
async fn upload_files(ctx: Arc<Ctx>, lane: usize, mode: PutMode, mut rx: mpsc::Receiver<UploadMsg>) -> UploadOutcome {
    let sink = ctx.sink.clone();
    let target = sink.describe();
    let mut files = Vec::new();
    let mut current = None;
    let error = loop {
        let Some(msg) = rx.recv().await else { break None };
        let step: Result<(), WriteError> = async {
            match msg {
                UploadMsg::Begin { name } => current = Some(sink.create(&name, mode).await?),
                UploadMsg::Part(data) => match current.as_mut() {
                    Some(upload) => {
                        QueueDepth { stage: "upload", delta: -1 }.emit();
                        let bytes = data.len() as u64;
                        upload.put_part(data).await?;
                        BytesUploaded { sink: &target, bytes }.emit();
                    }
                    None => {
                        return Err(WriteError::Other {
                            target: sink.describe(),
                            message: "chunk outside a file".into(),
                        });
                    }
                },
                UploadMsg::End(record) => {
                    let Some(upload) = current.take() else {
                        return Err(WriteError::Other {
                            target: sink.describe(),
                            message: "end outside a file".into(),
                        });
                    };
                    let committed = upload.complete().await?;
                    if committed != record.bytes {
                        return Err(WriteError::SizeMismatch {
                            path: record.name,
                            expected: record.bytes,
                            actual: committed,
                        });
                    }
                    FileCommitted { sink: &target, name: &record.name, rows: record.rows, bytes: committed }
                        .emit(&ctx.progress);
                    if let Some(state) = &ctx.state {
                        let ctx = ctx.clone();
                        let r = record.clone();
                        let saved =
                            tokio::task::spawn_blocking(move || ctx.state.as_ref().map(|s| s.commit_file(lane, &r)))
                                .await;
                        if let Ok(Some(Err(e))) = saved {
                            tracing::warn!(state = %state.path().display(), "{e}");
                        }
                    }
                    files.push(record);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = step {
            break Some(Error::from(e));
        }
    };
    // Ended without `End` (the lane failed, or this upload did): remove the partial.
    if let Some(upload) = current.take()
        && let Err(e) = upload.abort().await
    {
        tracing::warn!("could not remove a partial upload: {e}");
    }
    UploadOutcome { files, error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::synthetic::{SyntheticOptions, SyntheticSource};

    #[test]
    fn split_respects_chunk_size_and_file_row_boundaries() {
        let src = SyntheticSource::new(SyntheticOptions { flat: true, ..Default::default() });
        let batch = src.batch(0, 1000);
        let mut pos = 0;
        let sizes: Vec<usize> = split(batch.clone(), 300, None, &mut pos).iter().map(|b| b.num_rows()).collect();
        assert_eq!(sizes, [300, 300, 300, 100]);
        let mut pos = 950;
        let sizes: Vec<usize> = split(batch, 300, Some(400), &mut pos).iter().map(|b| b.num_rows()).collect();
        // 950 -> 1200 is 250 rows to the boundary, then chunks restart under the limit.
        assert_eq!(sizes, [250, 300, 100, 300, 50]);
        assert_eq!(pos, 1950);
    }
}
