//! Sources: where record batches come from.
//!
//! A [`Source`] opens into a [`ReadPlan`]: one Arrow schema and N independent streams that can
//! be read in parallel, each restartable at a row offset. That last property is what makes
//! resume possible everywhere: the BigQuery Storage Read API takes an offset on `ReadRows`, and
//! the local sources are deterministic, so "re-read stream 3 from row 120 000" means the same
//! rows every time. The plan is plain data (it serialises), so it can be made by one process and
//! read by others.
//!
//! Registry: [`SourceConfig::parse`] maps a `--from` URL to a config; `build()` makes the source.

pub mod bigquery;
pub mod parquet;
pub mod synthetic;

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use futures::stream::BoxStream;
use serde::Serialize;

use crate::error::ConfigError;

/// A stream of record batches from one source stream.
pub type BatchStream = BoxStream<'static, Result<RecordBatch, ReadError>>;

/// One independently readable stream of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StreamSpec {
    /// Position in the plan; file names carry it as `{stream}`.
    pub index: usize,
    /// Source-specific identity: a BigQuery stream name, a file and row groups, a row range.
    pub name: String,
    /// Rows in the stream when the source knows it up front.
    pub rows: Option<u64>,
}

/// What a source opened into.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    pub schema: SchemaRef,
    pub streams: Vec<StreamSpec>,
    /// Total rows when known (exact for local sources, BigQuery's estimate otherwise).
    pub estimated_rows: Option<u64>,
    pub description: SourceDescription,
}

/// How a source describes itself in the manifest and the logs.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SourceDescription {
    /// `synthetic`, `parquet`, `bigquery`.
    pub kind: String,
    /// Human-readable identity: table, path or generator settings.
    pub name: String,
    /// The snapshot the rows were read at, when the source has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<String>,
    /// When the plan's streams stop being readable (a BigQuery read session's `expire_time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// Opens the source: schema, streams, estimates. No rows are read yet.
    async fn plan(&self) -> Result<ReadPlan, ReadError>;

    /// Reads `stream` starting `offset` rows into it. Dropping the stream stops the read.
    fn read(self: Arc<Self>, plan: &ReadPlan, stream: &StreamSpec, offset: u64) -> BatchStream;

    /// Re-opens a plan made by an earlier run (`--resume`), so its streams can be read again
    /// at offsets. The default suits sources whose plans are deterministic: plan again and
    /// check that the streams and schema are the same. Sources with server-side sessions
    /// reattach to the saved session instead.
    async fn reopen(&self, saved: &ReadPlan) -> Result<ReadPlan, ReadError> {
        let plan = self.plan().await?;
        if plan.streams != saved.streams || plan.schema.fields() != saved.schema.fields() {
            return Err(ReadError::PlanChanged { source_name: saved.description.name.clone() });
        }
        Ok(plan)
    }
}

/// A `--from` URL, parsed and validated but not yet opened.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SourceConfig {
    Synthetic(synthetic::SyntheticOptions),
    Parquet(parquet::ParquetSourceOptions),
    BigQuery(Box<bigquery::BigQueryOptions>),
}

impl SourceConfig {
    /// Parses `synthetic://?rows=N&streams=K`, `parquet:///path`, `bq://PROJECT.DATASET.TABLE`.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            ConfigError::invalid(
                format!("--from {url}"),
                "not a source URL; use synthetic://?rows=N, parquet:///path or bq://PROJECT.DATASET.TABLE",
            )
        })?;
        match scheme {
            "synthetic" => Ok(SourceConfig::Synthetic(synthetic::SyntheticOptions::from_url(rest)?)),
            "parquet" => Ok(SourceConfig::Parquet(parquet::ParquetSourceOptions::from_url(rest)?)),
            "bq" | "bigquery" => Ok(SourceConfig::BigQuery(Box::new(bigquery::BigQueryOptions::from_url(rest)?))),
            other => Err(ConfigError::invalid(
                format!("--from {url}"),
                format!("unknown source scheme '{other}://'; supported: synthetic://, parquet://, bq://"),
            )),
        }
    }

    pub fn build(&self) -> Result<Arc<dyn Source>, ReadError> {
        Ok(match self {
            SourceConfig::Synthetic(o) => Arc::new(synthetic::SyntheticSource::new(o.clone())),
            SourceConfig::Parquet(o) => Arc::new(parquet::ParquetSource::new(o.clone())),
            SourceConfig::BigQuery(o) => Arc::new(bigquery::BigQuerySource::new((**o).clone())?),
        })
    }

    /// The default `{prefix}` for file names: the table or file name.
    pub fn default_prefix(&self) -> String {
        match self {
            SourceConfig::Synthetic(_) => "synthetic".to_string(),
            SourceConfig::Parquet(o) => o.default_prefix(),
            SourceConfig::BigQuery(o) => o.default_prefix(),
        }
    }
}

/// Errors from reading a source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("parquet source: cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "parquet source: {path} is not a readable Parquet file ({source}); check that the file is complete and really Parquet"
    )]
    CorruptParquet { path: String, source: ::parquet::errors::ParquetError },
    #[error(
        "parquet source: no *.parquet files in directory {path}; point --from at a file or a directory holding .parquet files"
    )]
    NoParquetFiles { path: String },
    #[error("parquet source: {path} has a different schema than {first}; all files of one source must share a schema")]
    SchemaMismatch { path: String, first: String },
    #[error("{source_name}: stream {stream}: {message}")]
    Stream { source_name: String, stream: String, message: String },
    #[error(
        "{source_name} changed since the interrupted run (other streams or schema), so it cannot be resumed row for row; run without --resume into an empty target"
    )]
    PlanChanged { source_name: String },
    #[error("permission denied reading {what}: {message}")]
    PermissionDenied { what: String, message: String },
    #[error(transparent)]
    BigQuery(#[from] bigquery::BigQueryError),
}

impl ReadError {
    pub fn is_permission(&self) -> bool {
        match self {
            ReadError::PermissionDenied { .. } => true,
            ReadError::Io { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
            ReadError::BigQuery(e) => e.is_permission(),
            _ => false,
        }
    }

    /// Running the job again can finish it (a BigQuery read session expired): exit code 6.
    pub fn is_resumable(&self) -> bool {
        matches!(self, ReadError::BigQuery(e) if e.is_resumable())
    }

    /// The request was wrong (a bad column, filter or query): exit code 2.
    pub fn is_usage(&self) -> bool {
        matches!(self, ReadError::BigQuery(e) if e.is_usage())
    }
}

/// Runs a blocking batch producer on its own thread and exposes it as a [`BatchStream`].
///
/// Local sources decode or generate on the CPU; doing that inside an async task would stall
/// the runtime. The channel holds `depth` batches, so a slow consumer stops the producer.
pub(crate) fn blocking_stream<F>(depth: usize, produce: F) -> BatchStream
where
    F: FnOnce(&tokio::sync::mpsc::Sender<Result<RecordBatch, ReadError>>) + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
    tokio::task::spawn_blocking(move || produce(&tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
