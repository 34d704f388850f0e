//! A local BigQuery for tests, the demo and benchmarks: the Storage Read API (gRPC) and the REST
//! calls of query mode, on one port, serving `PROJECT.DATASET.TABLE.parquet` files as tables.
//!
//! Faithful is the point: it speaks the real `google.cloud.bigquery.storage.v1` protocol
//! (Google's own client libraries can read from it), frames Arrow exactly as BigQuery does (one
//! IPC message per bytes field, schema in the session and on each ReadRows call's first
//! response, `row_count` and progress on every response), checks the `x-goog-request-params`
//! routing header (INVALID_ARGUMENT without it, as BigQuery answers) and optionally a Bearer
//! token, and refuses what it does not understand instead of ignoring it. On top, it injects
//! the failures the reader must survive: streams aborted with UNAVAILABLE or INTERNAL
//! RST_STREAM after N responses, RESOURCE_EXHAUSTED with RetryInfo, slow responses, expired
//! sessions.
//!
//! Start it in-process with [`start`] (ephemeral port on 127.0.0.1 by default) or as
//! `bq2sftp emulator --tables DIR --port P`; point the reader at it with
//! `BIGQUERY_EMULATOR_HOST=127.0.0.1:P`.
//!
//! Files: `grpc.rs` (BigQueryRead), `rest.rs` (jobs, tables), `catalog.rs` (Parquet -> BigQuery
//! tables, selected fields), `sql.rs` (row restrictions and SELECT queries).

pub mod catalog;
pub mod grpc;
pub mod rest;
pub mod sql;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::read::bigquery::TableRef;
use crate::read::bigquery::args::parse_duration;
use crate::read::synthetic::{SyntheticOptions, SyntheticSource};

pub use catalog::{Catalog, Table};

/// Rows per ReadRows response unless configured.
pub const DEFAULT_RESPONSE_ROWS: usize = 8192;
/// When the client lets the server choose, one stream per this many rows (at most 16).
pub const ROWS_PER_DEFAULT_STREAM: u64 = 250_000;
/// BigQuery's session lifetime (storage.proto: "Read sessions automatically expire 6 hours
/// after they are created").
pub const SESSION_LIFETIME: Duration = Duration::from_secs(6 * 3600);

/// How a faulty stream ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum AbortKind {
    /// UNAVAILABLE, as when a backend goes away.
    #[default]
    Unavailable,
    /// INTERNAL "Received RST_STREAM with error code 2", as a reset HTTP/2 stream surfaces.
    Internal,
    /// UNKNOWN "No status received", as a transport failure surfaces in Python's client.
    Unknown,
}

/// Injected failures. All off by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// End every ReadRows call with `abort_with` after this many responses (≥ 1).
    pub abort_after: Option<u32>,
    pub abort_with: AbortKind,
    /// Stop injecting aborts after this many (None: every call).
    pub max_aborts: Option<u64>,
    /// The first N ReadRows calls of each stream answer RESOURCE_EXHAUSTED.
    pub resource_exhausted: u32,
    /// The RetryInfo delay those carry; `None` sends no RetryInfo (not retryable).
    pub retry_delay: Option<Duration>,
    /// Wait this long before each response.
    pub slow: Option<Duration>,
    /// A session expires once it has served this many responses.
    pub expire_after: Option<u64>,
    /// CreateReadSession answers UNAVAILABLE this many times first.
    pub create_unavailable: u32,
}

/// Which Bearer tokens the emulator accepts.
#[derive(Clone, Default)]
pub enum AuthCheck {
    /// No check (Google's emulator convention: clients send no credentials).
    #[default]
    None,
    /// Any non-empty Bearer token.
    AnyBearer,
    /// Tokens for which the function answers true.
    Accept(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl fmt::Debug for AuthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthCheck::None => "None",
            AuthCheck::AnyBearer => "AnyBearer",
            AuthCheck::Accept(_) => "Accept(..)",
        })
    }
}

#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Directory of `PROJECT.DATASET.TABLE.parquet` files (None: only in-memory tables).
    pub tables: Option<PathBuf>,
    pub listen: SocketAddr,
    pub auth: AuthCheck,
    pub faults: Faults,
    pub response_rows: usize,
    pub session_lifetime: Duration,
    /// Reported as the job and session location.
    pub location: String,
    /// getQueryResults calls that answer `jobComplete: false` before a job is done.
    pub query_pending_polls: u32,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            tables: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            auth: AuthCheck::None,
            faults: Faults::default(),
            response_rows: DEFAULT_RESPONSE_ROWS,
            session_lifetime: SESSION_LIFETIME,
            location: "US".into(),
            query_pending_polls: 1,
        }
    }
}

/// Counters for tests and logs.
#[derive(Debug, Default)]
pub struct EmulatorStats {
    pub sessions_created: AtomicU64,
    pub read_rows_calls: AtomicU64,
    pub responses: AtomicU64,
    pub rows_sent: AtomicU64,
    pub aborts: AtomicU64,
    pub resource_exhausted: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub missing_routing_header: AtomicU64,
    pub jobs_inserted: AtomicU64,
    /// Distinct Bearer tokens that were accepted.
    pub tokens_seen: Mutex<HashSet<String>>,
    /// Every ReadRows call as (stream, offset), in arrival order.
    pub read_offsets: Mutex<Vec<(String, u64)>>,
}

impl EmulatorStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Shared state of one emulator.
pub(crate) struct State {
    pub config: EmulatorConfig,
    pub faults: RwLock<Faults>,
    pub catalog: Catalog,
    pub sessions: Mutex<HashMap<String, Arc<grpc::Session>>>,
    pub streams: Mutex<HashMap<String, Arc<grpc::StreamEntry>>>,
    pub jobs: Mutex<HashMap<String, rest::Job>>,
    pub stats: EmulatorStats,
    /// ReadRows calls per stream, for the RESOURCE_EXHAUSTED fault.
    pub calls_per_stream: Mutex<HashMap<String, u32>>,
    pub create_failures: AtomicU64,
    next_id: AtomicU64,
}

impl State {
    fn new(config: EmulatorConfig) -> Self {
        State {
            faults: RwLock::new(config.faults.clone()),
            catalog: Catalog::new(config.tables.clone()),
            config,
            sessions: Mutex::default(),
            streams: Mutex::default(),
            jobs: Mutex::default(),
            stats: EmulatorStats::default(),
            calls_per_stream: Mutex::default(),
            create_failures: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    /// A short unique id, like BigQuery's opaque session and stream ids.
    pub fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let salt = uuid::Uuid::new_v4().simple().to_string();
        format!("{prefix}{n}{}", &salt[..8])
    }

    pub fn faults(&self) -> Faults {
        self.faults.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks the Bearer token per the configured policy. `Err` carries BigQuery's messages.
    pub fn check_token(&self, authorization: Option<&str>) -> Result<(), &'static str> {
        let token = authorization.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).filter(|t| !t.is_empty());
        let ok = match (&self.config.auth, token) {
            (AuthCheck::None, _) => return Ok(()),
            (_, None) => false,
            (AuthCheck::AnyBearer, Some(_)) => true,
            (AuthCheck::Accept(f), Some(t)) => f(t),
        };
        if ok {
            if let Some(t) = token {
                self.stats.tokens_seen.lock().unwrap_or_else(|p| p.into_inner()).insert(t.to_string());
            }
            return Ok(());
        }
        self.stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
        Err(if token.is_none() {
            "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential."
        } else {
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential."
        })
    }
}

/// A running emulator. Dropping it stops the server.
pub struct EmulatorHandle {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EmulatorHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `HOST:PORT`, the value for `BIGQUERY_EMULATOR_HOST`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    pub fn stats(&self) -> &EmulatorStats {
        &self.state.stats
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.write().unwrap_or_else(|p| p.into_inner()) = faults;
    }

    /// Registers an in-memory table (batches already in BigQuery's Arrow form).
    pub fn put_table(&self, name: &TableRef, table: Table) {
        self.state.catalog.put(name, table);
    }

    /// Stops accepting calls and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            // Open client connections may keep a graceful shutdown waiting; bound it.
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts an emulator on `config.listen` and returns once it accepts connections.
pub async fn start(config: EmulatorConfig) -> std::io::Result<EmulatorHandle> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State::new(config));
    let grpc = grpc::service(state.clone());
    let routes = tonic::service::Routes::from(rest::router(state.clone())).add_service(grpc);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            // REST calls arrive as HTTP/1.1, gRPC as HTTP/2 (h2c) on the same port.
            .accept_http1(true)
            .tcp_nodelay(true)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!("emulator server stopped: {e}");
        }
    });
    tracing::info!(%addr, "BigQuery emulator listening");
    Ok(EmulatorHandle { addr, state, shutdown: Some(tx), task: Some(task) })
}

/// Writes a synthetic table (see `synthetic://`) as `DIR/PROJECT.DATASET.TABLE.parquet`, for the
/// demo, tests and benchmarks. The Arrow schema is stored in the file, so BigQuery's field tags
/// (DATETIME, GEOGRAPHY, JSON) survive.
pub fn write_synthetic_table(dir: &Path, table: &TableRef, options: SyntheticOptions) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("{table}.parquet"));
    let tmp = dir.join(format!(".{table}.parquet.tmp"));
    let source = SyntheticSource::new(options.clone());
    let schema = crate::read::synthetic::schema(options.flat);
    let props =
        parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(128 * 1024)).build();
    let file = std::fs::File::create(&tmp)?;
    let io = |e: parquet::errors::ParquetError| std::io::Error::other(e.to_string());
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, Some(props)).map_err(io)?;
    let mut at = 0;
    while at < options.rows {
        let len = (options.rows - at).min(options.batch_rows as u64) as usize;
        writer.write(&source.batch(at, len)).map_err(io)?;
        at += len as u64;
    }
    writer.close().map_err(io)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// `bq2sftp emulator` flags.
#[derive(Debug, Clone, Args)]
pub struct EmulatorArgs {
    /// Directory of PROJECT.DATASET.TABLE.parquet files to serve as tables.
    #[arg(long, value_name = "DIR")]
    pub tables: PathBuf,
    /// Port for gRPC and REST (0: any free port).
    #[arg(long, default_value_t = 9050)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Refuse calls without a Bearer token (UNAUTHENTICATED / HTTP 401).
    #[arg(long)]
    pub require_auth: bool,
    /// Accept only this Bearer token (repeatable; implies --require-auth).
    #[arg(long, value_name = "TOKEN")]
    pub accept_token: Vec<String>,
    /// Rows per ReadRows response.
    #[arg(long, default_value_t = DEFAULT_RESPONSE_ROWS)]
    pub response_rows: usize,
    /// Fault: end every ReadRows call after N responses.
    #[arg(long, value_name = "N")]
    pub fault_abort_after: Option<u32>,
    /// Fault: how aborted calls end.
    #[arg(long, value_enum, default_value = "unavailable")]
    pub fault_abort_with: AbortKind,
    /// Fault: stop aborting after N aborts.
    #[arg(long, value_name = "N")]
    pub fault_max_aborts: Option<u64>,
    /// Fault: the first N ReadRows calls of each stream answer RESOURCE_EXHAUSTED with RetryInfo.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fault_resource_exhausted: u32,
    /// Fault: the RetryInfo delay.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub fault_retry_delay: String,
    /// Fault: wait this long before each response.
    #[arg(long, value_name = "DURATION")]
    pub fault_slow: Option<String>,
    /// Fault: sessions expire after serving N responses.
    #[arg(long, value_name = "N")]
    pub fault_expire_after: Option<u64>,
}

impl EmulatorArgs {
    pub fn to_config(&self) -> Result<EmulatorConfig, crate::ConfigError> {
        let auth = if !self.accept_token.is_empty() {
            let tokens: HashSet<String> = self.accept_token.iter().cloned().collect();
            AuthCheck::Accept(Arc::new(move |t| tokens.contains(t)))
        } else if self.require_auth {
            AuthCheck::AnyBearer
        } else {
            AuthCheck::None
        };
        if self.fault_abort_after == Some(0) {
            return Err(crate::ConfigError::invalid("--fault-abort-after", "must be at least 1"));
        }
        if self.response_rows == 0 {
            return Err(crate::ConfigError::invalid("--response-rows", "must be at least 1"));
        }
        if !self.tables.is_dir() {
            return Err(crate::ConfigError::invalid(format!("--tables {}", self.tables.display()), "not a directory"));
        }
        Ok(EmulatorConfig {
            tables: Some(self.tables.clone()),
            listen: SocketAddr::new(self.host, self.port),
            auth,
            faults: Faults {
                abort_after: self.fault_abort_after,
                abort_with: self.fault_abort_with,
                max_aborts: self.fault_max_aborts,
                resource_exhausted: self.fault_resource_exhausted,
                retry_delay: Some(parse_duration("fault-retry-delay", &self.fault_retry_delay)?),
                slow: self.fault_slow.as_deref().map(|s| parse_duration("fault-slow", s)).transpose()?,
                expire_after: self.fault_expire_after,
                create_unavailable: 0,
            },
            response_rows: self.response_rows,
            ..EmulatorConfig::default()
        })
    }
}
