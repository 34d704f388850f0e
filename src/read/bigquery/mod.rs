//! `bq://PROJECT.DATASET.TABLE` and `--query`: reading BigQuery through the Storage Read API.
//!
//! `plan()` creates one read session (CreateReadSession with ARROW, selected fields, row
//! restriction, snapshot time, stream counts and Arrow buffer compression) and turns its
//! streams into the plan's streams; in query mode it first runs the query as a job and reads
//! the job's destination table. `read(stream, offset)` opens ReadRows at `offset` and keeps it
//! going: on a transient failure it re-opens the call at `offset += row_count` of everything
//! already delivered, so no row is lost or doubled (research notes §1, "Resume logic").
//!
//! Each stream is read by its own task into a channel of two batches: when the pipeline is
//! slow the task stops asking, HTTP/2 flow control stops the server, and memory stays bounded.
//! Arrow decoding runs on the blocking pool, never on the runtime.
//!
//! Files: `client.rs` (gRPC calls and headers), `retry.rs` (what to retry), `decode.rs` (Arrow
//! IPC), `auth.rs` (Google credentials), `query.rs` (REST jobs), `args.rs` (flags), `proto.rs`.

pub mod args;
pub mod auth;
pub mod client;
pub mod decode;
pub mod proto;
pub mod query;
pub mod retry;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arrow_array::RecordBatch;
use tonic::{Code, Status};

use self::auth::{AuthError, AuthOptions, CredentialsSource, TokenProvider};
use self::client::{CallError, StorageClient};
use self::decode::{BatchDecoder, BufferCompression};
use self::proto::storage;
use self::retry::{Disposition, RetryPolicy, classify_read};
use super::{BatchStream, ReadError, ReadPlan, Source, SourceDescription, StreamSpec};
use crate::error::ConfigError;

pub const DEFAULT_BIGQUERY_ENDPOINT: &str = "https://bigquery.googleapis.com";
/// gRPC connections the streams are spread over.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// A ReadRows call that sends nothing for this long is treated as broken and resumed
/// (java-bigquerystorage#531: streams that hang).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const IAM_HINT: &str = "the caller needs roles/bigquery.readSessionUser on the billing project and \
                        roles/bigquery.dataViewer on the table (roles/bigquery.jobUser for --query)";

/// A table, as `project.dataset.table`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableRef {
    pub project: String,
    pub dataset: String,
    pub table: String,
}

impl TableRef {
    /// Parses `project.dataset.table`; the legacy `project:dataset.table` is accepted too, and a
    /// domain-scoped project (`example.com:proj`) keeps its dot.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || {
            ConfigError::invalid(
                format!("bq://{s}"),
                "expected bq://PROJECT.DATASET.TABLE (e.g. bq://my-project.sales.orders)",
            )
        };
        let s = s.trim_end_matches('/');
        let (project, rest) = match s.rsplit_once(':') {
            // `example.com:proj.dataset.table` or legacy `proj:dataset.table`
            Some((domain, rest)) if rest.matches('.').count() == 2 => {
                let (p, rest) = rest.split_once('.').ok_or_else(bad)?;
                (format!("{domain}:{p}"), rest)
            }
            Some((p, rest)) if rest.matches('.').count() == 1 => (p.to_string(), rest),
            Some(_) => return Err(bad()),
            None => {
                let (p, rest) = s.split_once('.').ok_or_else(bad)?;
                (p.to_string(), rest)
            }
        };
        let (dataset, table) = rest.split_once('.').ok_or_else(bad)?;
        let ok = |x: &str| !x.is_empty() && !x.contains(['/', '.', ' ', '`']);
        if !ok(&project.replace(['.', ':'], "")) || !ok(dataset) || table.is_empty() || table.contains(['/', '`', '.'])
        {
            return Err(bad());
        }
        Ok(TableRef { project, dataset: dataset.to_string(), table: table.to_string() })
    }

    /// The resource name: `projects/{p}/datasets/{d}/tables/{t}`.
    pub fn path(&self) -> String {
        format!("projects/{}/datasets/{}/tables/{}", self.project, self.dataset, self.table)
    }

    /// Parses a resource name back.
    pub fn from_path(path: &str) -> Option<Self> {
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["projects", p, "datasets", d, "tables", t] if !p.is_empty() && !d.is_empty() && !t.is_empty() => {
                Some(TableRef { project: p.to_string(), dataset: d.to_string(), table: t.to_string() })
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for TableRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.project, self.dataset, self.table)
    }
}

/// What to read: a table, or the result of a query.
#[derive(Debug, Clone)]
pub enum ReadTarget {
    Table(TableRef),
    Query(query::QueryOptions),
}

/// Where the APIs are. Real Google by default; an emulator or test server otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Storage Read API (gRPC), e.g. `https://bigquerystorage.googleapis.com`.
    pub storage: String,
    /// BigQuery REST root (paths start with `/bigquery/v2/`).
    pub bigquery: String,
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints {
            storage: client::DEFAULT_STORAGE_ENDPOINT.to_string(),
            bigquery: DEFAULT_BIGQUERY_ENDPOINT.to_string(),
        }
    }
}

/// Everything `bq://` and the BigQuery flags configure. Plain data, validated, no I/O.
#[derive(Debug, Clone)]
pub struct BigQueryOptions {
    pub target: ReadTarget,
    /// `projects/{this}` is the session's parent (billed); default: the table's project.
    pub billing_project: Option<String>,
    pub columns: Vec<String>,
    pub row_restriction: Option<String>,
    pub snapshot_time: Option<chrono::DateTime<chrono::Utc>>,
    /// 0 lets BigQuery choose.
    pub max_streams: u32,
    pub min_streams: Option<u32>,
    pub compression: BufferCompression,
    pub endpoints: Endpoints,
    pub auth: AuthOptions,
    pub retry: RetryPolicy,
    pub idle_timeout: Duration,
    pub connections: usize,
}

impl BigQueryOptions {
    pub fn table(table: TableRef) -> Self {
        BigQueryOptions {
            target: ReadTarget::Table(table),
            billing_project: None,
            columns: Vec::new(),
            row_restriction: None,
            snapshot_time: None,
            max_streams: 0,
            min_streams: None,
            compression: BufferCompression::Lz4Frame,
            endpoints: Endpoints::default(),
            auth: AuthOptions::default(),
            retry: RetryPolicy::default(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connections: DEFAULT_CONNECTIONS,
        }
    }

    /// Parses what follows `bq://`.
    pub fn from_url(rest: &str) -> Result<Self, ConfigError> {
        Ok(Self::table(TableRef::parse(rest)?))
    }

    /// Points both APIs at an emulator over plain HTTP and sends no credentials, like Google's
    /// `*_EMULATOR_HOST` convention.
    pub fn use_emulator(&mut self, host_port: &str) {
        let base = if host_port.contains("://") { host_port.to_string() } else { format!("http://{host_port}") };
        self.endpoints = Endpoints { storage: base.clone(), bigquery: base };
        self.auth.source = CredentialsSource::None;
    }

    pub fn default_prefix(&self) -> String {
        match &self.target {
            ReadTarget::Table(t) => t.table.clone(),
            ReadTarget::Query(_) => "query".to_string(),
        }
    }
}

/// Errors from BigQuery, with what was being done to what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BigQueryError {
    #[error("bigquery: authentication failed: {0}")]
    Auth(#[from] AuthError),
    #[error(
        "bigquery: {operation} on {target}: the server refused the credentials ({message}); check the credentials and their scopes"
    )]
    Unauthenticated { operation: String, target: String, message: String },
    #[error("bigquery: {operation} on {target}: permission denied ({message}); {IAM_HINT}")]
    PermissionDenied { operation: String, target: String, message: String },
    #[error("bigquery: {operation}: {target} not found ({message}); check the project, dataset and table names")]
    NotFound { operation: String, target: String, message: String },
    #[error(
        "bigquery: {operation} on {target}: invalid request: {message}; check --columns, --where and --snapshot-time"
    )]
    InvalidRequest { operation: String, target: String, message: String },
    #[error(
        "bigquery: the read session of {table} expired while reading stream {stream} ({message}); read sessions last \
         6 hours: run the export again (committed files are intact; a --resume of a run older than 6 hours cannot \
         reuse its session, start afresh)"
    )]
    SessionExpired { table: String, stream: String, message: String },
    #[error("bigquery: {operation} on {target} failed: {code:?}: {message}")]
    Api { operation: String, target: String, code: Code, message: String },
    #[error("bigquery: {table}: stream {stream} at row offset {offset}: {message}")]
    Decode { table: String, stream: String, offset: u64, message: String },
    #[error("bigquery: query job {job} failed: {message}{}", reason.as_ref().map(|r| format!(" (reason: {r})")).unwrap_or_default())]
    QueryFailed { job: String, message: String, reason: Option<String> },
    #[error(
        "bigquery: query job {job} has no destination table (a script, statement type {statement_type}); \
         export a single SELECT, or write the script's result into a table and export that table"
    )]
    NoDestination { job: String, statement_type: String },
    #[error("bigquery: {operation} ({url}) failed: {message}")]
    Rest { operation: String, url: String, status: u16, message: String },
    #[error("bigquery: {what}: {message}")]
    Config { what: String, message: String },
}

impl BigQueryError {
    /// Maps a gRPC status from `operation` on `target` to an error a person can act on.
    pub fn from_status(operation: &str, target: &str, status: &Status) -> Self {
        let (operation, target, message) = (operation.to_string(), target.to_string(), status.message().to_string());
        match status.code() {
            Code::Unauthenticated => BigQueryError::Unauthenticated { operation, target, message },
            Code::PermissionDenied => BigQueryError::PermissionDenied { operation, target, message },
            Code::NotFound => BigQueryError::NotFound { operation, target, message },
            Code::InvalidArgument => BigQueryError::InvalidRequest { operation, target, message },
            code => BigQueryError::Api { operation, target, code, message },
        }
    }

    fn after_attempts(self, attempts: u32) -> Self {
        match self {
            BigQueryError::Api { operation, target, code, message } => BigQueryError::Api {
                operation,
                target,
                code,
                message: format!("{message} (gave up after {attempts} attempts; see --read-retries)"),
            },
            other => other,
        }
    }

    /// Authentication or authorization: exit code 3.
    pub fn is_permission(&self) -> bool {
        match self {
            BigQueryError::Auth(_) | BigQueryError::Unauthenticated { .. } | BigQueryError::PermissionDenied { .. } => {
                true
            }
            BigQueryError::Rest { status, .. } => matches!(status, 401 | 403),
            BigQueryError::QueryFailed { reason, .. } => reason.as_deref() == Some("accessDenied"),
            _ => false,
        }
    }

    /// Re-running the export can finish it: exit code 6.
    pub fn is_resumable(&self) -> bool {
        matches!(self, BigQueryError::SessionExpired { .. })
    }

    /// The request itself was wrong (a bad column, filter or query): exit code 2.
    pub fn is_usage(&self) -> bool {
        match self {
            BigQueryError::InvalidRequest { .. }
            | BigQueryError::NoDestination { .. }
            | BigQueryError::Config { .. } => true,
            BigQueryError::QueryFailed { reason, .. } => reason.as_deref() == Some("invalidQuery"),
            _ => false,
        }
    }
}

/// Counters over all streams of one source; logged when the source is dropped.
#[derive(Debug, Default)]
pub struct ReadStats {
    pub rows: AtomicU64,
    pub responses: AtomicU64,
    /// Arrow IPC bytes received (after buffer compression).
    pub ipc_bytes: AtomicU64,
    /// ReadRows calls re-opened at an offset after a failure.
    pub resumes: AtomicU64,
    /// Nanoseconds spent decoding Arrow IPC.
    pub decode_nanos: AtomicU64,
}

/// What `plan()` learned about the session, for `read()` and `--plan-only`.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub table: TableRef,
    pub session: String,
    pub estimated_rows: i64,
    pub estimated_bytes: i64,
    pub streams: Vec<String>,
    pub job: Option<String>,
}

pub struct BigQuerySource {
    options: BigQueryOptions,
    http: reqwest::Client,
    auth: Arc<TokenProvider>,
    client: OnceLock<Arc<StorageClient>>,
    session: Mutex<Option<SessionInfo>>,
    stats: Arc<ReadStats>,
}

impl BigQuerySource {
    pub fn new(options: BigQueryOptions) -> Result<Self, BigQueryError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("bq2sftp/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30));
        if options.auth.source == CredentialsSource::None {
            // Emulator: loopback or a container next door, never through a proxy.
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|e| BigQueryError::Config { what: "HTTP client".into(), message: e.to_string() })?;
        let auth = Arc::new(TokenProvider::new(options.auth.clone(), http.clone()));
        Ok(Self::with_parts(options, http, auth))
    }

    /// For tests: a source whose token provider sees a chosen environment.
    pub fn with_parts(options: BigQueryOptions, http: reqwest::Client, auth: Arc<TokenProvider>) -> Self {
        BigQuerySource {
            options,
            http,
            auth,
            client: OnceLock::new(),
            session: Mutex::new(None),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> &Arc<ReadStats> {
        &self.stats
    }

    pub fn token_provider(&self) -> &Arc<TokenProvider> {
        &self.auth
    }

    /// The session made by the last `plan()`.
    pub fn session_info(&self) -> Option<SessionInfo> {
        self.session.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn storage(&self) -> Result<Arc<StorageClient>, BigQueryError> {
        if let Some(c) = self.client.get() {
            return Ok(c.clone());
        }
        let c = Arc::new(StorageClient::new(
            &self.options.endpoints.storage,
            self.options.connections,
            self.auth.clone(),
            self.options.retry.clone(),
        )?);
        Ok(self.client.get_or_init(|| c).clone())
    }

    fn rest(&self) -> query::RestClient<'_> {
        query::RestClient {
            http: &self.http,
            auth: &self.auth,
            base: self.options.endpoints.bigquery.trim_end_matches('/'),
            retry: &self.options.retry,
        }
    }

    /// Resolves the table to read: the named one, or the destination of a query job.
    async fn resolve_table(&self) -> Result<(TableRef, Option<String>, String), BigQueryError> {
        match &self.options.target {
            ReadTarget::Table(t) => {
                let billing = self.options.billing_project.clone().unwrap_or_else(|| t.project.clone());
                Ok((t.clone(), None, billing))
            }
            ReadTarget::Query(q) => {
                let project = self.query_project(q).await?;
                let done = self.rest().run_query(q, &project).await?;
                let billing = self.options.billing_project.clone().unwrap_or(project);
                Ok((done.destination, Some(done.job), billing))
            }
        }
    }

    async fn query_project(&self, q: &query::QueryOptions) -> Result<String, BigQueryError> {
        if let Some(p) = q.project.clone().or_else(|| self.options.billing_project.clone()) {
            return Ok(p);
        }
        self.auth.project_id().await.ok_or_else(|| BigQueryError::Config {
            what: "--query".into(),
            message: "no project to run the query job in; pass --project (or set GOOGLE_CLOUD_PROJECT)".into(),
        })
    }

    /// `--plan-only`: what an export would read, without reading a row. Table mode creates a
    /// session (free: nothing is scanned until ReadRows); query mode asks BigQuery for a
    /// dry-run job (free, no result table), so there are no streams to show.
    pub async fn dry_run(&self) -> Result<String, BigQueryError> {
        use std::fmt::Write;
        let mut out = String::new();
        if let ReadTarget::Query(q) = &self.options.target {
            let project = self.query_project(q).await?;
            let dry = self.rest().dry_run(q, &project).await?;
            let _ = writeln!(out, "query (dry run in project {project}): {}", q.sql.trim());
            let _ = writeln!(out, "bytes processed: {}", dry.total_bytes_processed);
            let _ = writeln!(out, "schema:");
            for f in &dry.schema {
                let _ = writeln!(out, "  {f}");
            }
            let _ = writeln!(out, "streams: decided when the query runs; nothing was read");
            return Ok(out);
        }
        let plan = self.plan_inner().await?;
        let info = self.session_info();
        let _ = writeln!(out, "table: {}", plan.description.name);
        if let Some(info) = &info {
            let _ = writeln!(out, "session: {}", info.session);
            let _ = writeln!(out, "estimated rows: {}", info.estimated_rows);
            let _ = writeln!(out, "estimated bytes scanned: {}", info.estimated_bytes);
        }
        let _ = writeln!(out, "schema:");
        for f in plan.schema.fields() {
            let _ = writeln!(out, "  {}", describe_field(f));
        }
        let _ = writeln!(out, "streams: {}", plan.streams.len());
        for s in &plan.streams {
            let _ = writeln!(out, "  {:>4} {}", s.index, s.name);
        }
        let _ = writeln!(out, "nothing was read (dry run)");
        Ok(out)
    }

    async fn plan_inner(&self) -> Result<ReadPlan, BigQueryError> {
        let (table, job, billing) = self.resolve_table().await?;
        let o = &self.options;
        let codec = match o.compression {
            BufferCompression::None => storage::arrow_serialization_options::CompressionCodec::CompressionUnspecified,
            BufferCompression::Lz4Frame => storage::arrow_serialization_options::CompressionCodec::Lz4Frame,
            BufferCompression::Zstd => storage::arrow_serialization_options::CompressionCodec::Zstd,
        };
        let read_options = storage::read_session::TableReadOptions {
            selected_fields: o.columns.clone(),
            row_restriction: o.row_restriction.clone().unwrap_or_default(),
            output_format_serialization_options: Some(
                storage::read_session::table_read_options::OutputFormatSerializationOptions::ArrowSerializationOptions(
                    storage::ArrowSerializationOptions { buffer_compression: codec as i32 },
                ),
            ),
        };
        let request = storage::CreateReadSessionRequest {
            parent: format!("projects/{billing}"),
            read_session: Some(storage::ReadSession {
                table: table.path(),
                data_format: storage::DataFormat::Arrow as i32,
                read_options: Some(read_options),
                table_modifiers: o.snapshot_time.map(|t| storage::read_session::TableModifiers {
                    snapshot_time: Some(prost_types::Timestamp {
                        seconds: t.timestamp(),
                        nanos: t.timestamp_subsec_nanos() as i32,
                    }),
                }),
                ..Default::default()
            }),
            max_stream_count: o.max_streams as i32,
            preferred_min_stream_count: o.min_streams.unwrap_or(0) as i32,
        };
        let requested_at = chrono::Utc::now();
        let session = self.storage()?.create_read_session(request).await?;
        // The rows are those of the table as of the session's snapshot: the one asked for, the
        // one BigQuery reports, or else (no snapshot asked) the moment the session was created.
        let snapshot = session
            .table_modifiers
            .and_then(|m| m.snapshot_time)
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .or(o.snapshot_time)
            .unwrap_or(requested_at);
        let schema_bytes = match &session.schema {
            Some(storage::read_session::Schema::ArrowSchema(s)) => &s.serialized_schema,
            None => {
                return Err(BigQueryError::Decode {
                    table: table.to_string(),
                    stream: "session".into(),
                    offset: 0,
                    message: "the read session has no Arrow schema".into(),
                });
            }
        };
        let schema = decode::decode_schema(schema_bytes).map_err(|e| BigQueryError::Decode {
            table: table.to_string(),
            stream: "session".into(),
            offset: 0,
            message: format!("cannot decode the session's Arrow schema: {e}"),
        })?;
        let streams: Vec<StreamSpec> = session
            .streams
            .iter()
            .enumerate()
            .map(|(index, s)| StreamSpec { index, name: s.name.clone(), rows: None })
            .collect();
        tracing::info!(
            table = %table,
            session = %session.name,
            streams = streams.len(),
            estimated_rows = session.estimated_row_count,
            "read session created"
        );
        let estimated_rows = (session.estimated_row_count > 0 || streams.is_empty())
            .then_some(session.estimated_row_count.max(0) as u64);
        let name = match &job {
            Some(job) => format!("{table} (result of query job {job})"),
            None => table.to_string(),
        };
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(SessionInfo {
            table: table.clone(),
            session: session.name.clone(),
            estimated_rows: session.estimated_row_count,
            estimated_bytes: session.estimated_total_bytes_scanned,
            streams: streams.iter().map(|s| s.name.clone()).collect(),
            job,
        });
        Ok(ReadPlan {
            schema: Arc::new(schema),
            streams,
            estimated_rows,
            description: SourceDescription {
                kind: "bigquery".into(),
                name,
                snapshot_time: Some(snapshot.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
                expires_at: session
                    .expire_time
                    .as_ref()
                    .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            },
        })
    }
}

/// The metric label for a retried status: a small fixed set.
fn retry_reason(status: &Status) -> &'static str {
    match status.code() {
        Code::Unavailable => "unavailable",
        Code::Internal => "internal",
        Code::DeadlineExceeded => "deadline",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unauthenticated => "unauthenticated",
        Code::Unknown => "unknown",
        _ => "other",
    }
}

/// `name TYPE MODE` in BigQuery's words, for `--plan-only`.
fn describe_field(f: &arrow_schema::Field) -> String {
    use arrow_schema::DataType as D;
    let tag = f.metadata().get("ARROW:extension:name").map(String::as_str).unwrap_or_default();
    let ty = match f.data_type() {
        D::Boolean => "BOOL".to_string(),
        D::Int64 => "INT64".into(),
        D::Float64 => "FLOAT64".into(),
        D::Utf8 if tag.ends_with("geography") => "GEOGRAPHY".into(),
        D::Utf8 if tag.ends_with("json") => "JSON".into(),
        D::Utf8 => "STRING".into(),
        D::Binary => "BYTES".into(),
        D::Date32 => "DATE".into(),
        D::Time64(_) => "TIME".into(),
        D::Timestamp(_, None) => "DATETIME".into(),
        D::Timestamp(_, Some(_)) => "TIMESTAMP".into(),
        D::Decimal128(..) => "NUMERIC".into(),
        D::Decimal256(..) => "BIGNUMERIC".into(),
        D::List(item) => {
            return format!("{} {} REPEATED", f.name(), describe_field(item).split(' ').nth(1).unwrap_or("?"));
        }
        D::Struct(fields) => {
            let inner: Vec<String> = fields.iter().map(|c| describe_field(c)).collect();
            format!("STRUCT<{}>", inner.join(", "))
        }
        other => format!("{other}"),
    };
    let mode = if f.is_nullable() { "NULLABLE" } else { "REQUIRED" };
    format!("{} {ty} {mode}", f.name())
}

#[async_trait::async_trait]
impl Source for BigQuerySource {
    async fn plan(&self) -> Result<ReadPlan, ReadError> {
        Ok(self.plan_inner().await?)
    }

    /// `--resume` reattaches to the interrupted run's read session: its streams and offsets only
    /// mean something within that session (a new one splits the table differently). Sessions
    /// live 6 hours; an expired one fails at its first ReadRows with the session-expired error.
    async fn reopen(&self, saved: &ReadPlan) -> Result<ReadPlan, ReadError> {
        if saved.description.kind != "bigquery" {
            return Err(ReadError::PlanChanged { source_name: saved.description.name.clone() });
        }
        Ok(saved.clone())
    }

    fn read(self: Arc<Self>, plan: &ReadPlan, stream: &StreamSpec, offset: u64) -> BatchStream {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let reader = StreamReader {
            source: self.clone(),
            table: plan.description.name.clone(),
            stream: stream.name.clone(),
            connection: stream.index,
            decoder: BatchDecoder::new(plan.schema.clone()),
        };
        tokio::spawn(async move {
            if let Err(e) = reader.run(offset, &tx).await {
                let _ = tx.send(Err(ReadError::from(e))).await;
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

impl Drop for BigQuerySource {
    fn drop(&mut self) {
        let s = &self.stats;
        let rows = s.rows.load(Ordering::Relaxed);
        if rows > 0 || s.responses.load(Ordering::Relaxed) > 0 {
            tracing::info!(
                rows,
                responses = s.responses.load(Ordering::Relaxed),
                ipc_bytes = s.ipc_bytes.load(Ordering::Relaxed),
                resumes = s.resumes.load(Ordering::Relaxed),
                decode_ms = s.decode_nanos.load(Ordering::Relaxed) / 1_000_000,
                tokens_fetched = self.auth.tokens_fetched(),
                "bigquery read totals"
            );
        }
    }
}

/// One stream's resumable read.
struct StreamReader {
    source: Arc<BigQuerySource>,
    table: String,
    stream: String,
    connection: usize,
    decoder: BatchDecoder,
}

type Tx = tokio::sync::mpsc::Sender<Result<RecordBatch, ReadError>>;

impl StreamReader {
    async fn run(&self, mut offset: u64, tx: &Tx) -> Result<(), BigQueryError> {
        let client = self.source.storage()?;
        let policy = &self.source.options.retry;
        let idle = self.source.options.idle_timeout;
        let stats = &self.source.stats;
        let mut failures = 0u32;
        let mut reauthenticated = false;
        loop {
            let status = match client.read_rows(&self.stream, offset, self.connection).await {
                Err(CallError::Auth(e)) => return Err(e.into()),
                Err(CallError::Status(s)) => s,
                Ok(mut responses) => loop {
                    // Stop as soon as the pipeline drops the stream (a failure elsewhere, a
                    // signal), not only when the next response arrives.
                    let next = tokio::select! {
                        _ = tx.closed() => return Ok(()),
                        r = tokio::time::timeout(idle, responses.message()) => match r {
                            Ok(r) => r,
                            Err(_) => Err(Status::deadline_exceeded(format!("no response for {idle:?}"))),
                        },
                    };
                    let resp = match next {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return Ok(()),
                        Err(s) => break s,
                    };
                    let Some(batch) = self.decode(resp, offset).await? else { continue };
                    let rows = batch.num_rows() as u64;
                    failures = 0;
                    reauthenticated = false;
                    offset += rows;
                    stats.rows.fetch_add(rows, Ordering::Relaxed);
                    if tx.send(Ok(batch)).await.is_err() {
                        return Ok(()); // the pipeline stopped reading
                    }
                },
            };
            let delay = match classify_read(&status) {
                Disposition::Retry { server_delay } => {
                    failures += 1;
                    if failures >= policy.max_attempts {
                        return Err(
                            BigQueryError::from_status("ReadRows", &self.stream, &status).after_attempts(failures)
                        );
                    }
                    server_delay.unwrap_or_else(|| policy.backoff(failures))
                }
                Disposition::Reauthenticate if !reauthenticated => {
                    reauthenticated = true;
                    client.auth.invalidate().await;
                    Duration::ZERO
                }
                Disposition::SessionExpired => {
                    return Err(BigQueryError::SessionExpired {
                        table: self.table.clone(),
                        stream: self.stream.clone(),
                        message: status.message().to_string(),
                    });
                }
                _ => return Err(BigQueryError::from_status("ReadRows", &self.stream, &status)),
            };
            stats.resumes.fetch_add(1, Ordering::Relaxed);
            crate::metrics::events::ReadRetry {
                stream: &self.stream,
                reason: retry_reason(&status),
                attempt: failures,
                delay,
                error: &format!("ReadRows at row offset {offset}: {:?}: {}", status.code(), status.message()),
            }
            .emit();
            tokio::time::sleep(delay).await;
        }
    }

    /// Decodes one response on the blocking pool; `None` for a response without rows.
    async fn decode(&self, resp: storage::ReadRowsResponse, offset: u64) -> Result<Option<RecordBatch>, BigQueryError> {
        if let Some(t) = &resp.throttle_state {
            crate::metrics::events::ReadThrottled { percent: t.throttle_percent as f64 }.emit();
        }
        let Some(storage::read_rows_response::Rows::ArrowRecordBatch(arrow)) = resp.rows else {
            return Ok(None);
        };
        let stats = self.source.stats.clone();
        stats.responses.fetch_add(1, Ordering::Relaxed);
        stats.ipc_bytes.fetch_add(arrow.serialized_record_batch.len() as u64, Ordering::Relaxed);
        let decoder = self.decoder.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            let r = decoder.decode(arrow.serialized_record_batch);
            stats.decode_nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            r
        })
        .await;
        let bad = |message: String| BigQueryError::Decode {
            table: self.table.clone(),
            stream: self.stream.clone(),
            offset,
            message,
        };
        let batch = decoded.map_err(|e| bad(format!("decoder task failed: {e}")))?.map_err(|e| bad(e.to_string()))?;
        // `row_count` is what the offset counts (storage.proto); it must match the batch.
        if resp.row_count != 0 && resp.row_count as u64 != batch.num_rows() as u64 {
            return Err(bad(format!(
                "the response says {} rows but its record batch holds {}",
                resp.row_count,
                batch.num_rows()
            )));
        }
        Ok(Some(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        let t = TableRef::parse("my-project.sales.orders").unwrap();
        assert_eq!(t.path(), "projects/my-project/datasets/sales/tables/orders");
        assert_eq!(TableRef::from_path(&t.path()), Some(t.clone()));
        assert_eq!(TableRef::parse("my-project:sales.orders").unwrap(), t);
        let d = TableRef::parse("example.com:proj.ds.t").unwrap();
        assert_eq!(d.project, "example.com:proj");
        for bad in ["", "p", "p.d", "p..t", ".d.t", "p/x.d.t", "p.d.t.u"] {
            assert!(TableRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_code_classes() {
        let s = |code| BigQueryError::from_status("ReadRows", "s", &Status::new(code, "m"));
        assert!(s(Code::PermissionDenied).is_permission());
        assert!(s(Code::Unauthenticated).is_permission());
        assert!(s(Code::InvalidArgument).is_usage());
        assert!(!s(Code::Internal).is_usage() && !s(Code::Internal).is_permission());
        let e = BigQueryError::SessionExpired { table: "t".into(), stream: "s".into(), message: "m".into() };
        assert!(e.is_resumable());
        assert!(e.to_string().contains("6 hours"));
    }
}
