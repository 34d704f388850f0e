//! The gRPC side of the Storage Read API: channels, per-call headers, and the unary calls with
//! their retries. The resumable ReadRows loop lives in `mod.rs`; this file only opens calls.
//!
//! Every call carries two headers (research notes §1, "Routing header"):
//! `x-goog-request-params` (`read_session.table=…`, `read_stream=…` or `name=…`, percent-encoded
//! like google-api-core) without which BigQuery answers INVALID_ARGUMENT, and
//! `authorization: Bearer …` from the [`TokenProvider`] (absent only for an emulator).
//!
//! Responses can reach 128 MB; tonic refuses anything over 4 MiB by default, so the decode limit
//! is raised to 129 MiB as Google's Go client does (`storage_client.go`,
//! `grpc.MaxCallRecvMsgSize`). Streams are spread over a few HTTP/2 connections so that one
//! connection's flow-control window does not cap the whole read.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status, Streaming};

use super::BigQueryError;
use super::auth::{AuthError, TokenProvider};
use super::proto::storage::big_query_read_client::BigQueryReadClient;
use super::proto::storage::{CreateReadSessionRequest, ReadRowsRequest, ReadRowsResponse, ReadSession};
use super::proto::{ROUTING_HEADER, routing_value};
use super::retry::{Disposition, RetryPolicy, classify_unary};

/// 129 MiB: one response holds up to 128 MB (storage.proto, ReadRows).
pub const MAX_RESPONSE_BYTES: usize = 129 << 20;
pub const DEFAULT_STORAGE_ENDPOINT: &str = "https://bigquerystorage.googleapis.com";

/// Why a call could not even be made or failed.
#[derive(Debug)]
pub enum CallError {
    Auth(AuthError),
    Status(Status),
}

pub struct StorageClient {
    endpoint: String,
    channels: Vec<Channel>,
    next: AtomicUsize,
    pub(crate) auth: Arc<TokenProvider>,
    retry: RetryPolicy,
}

impl StorageClient {
    /// Prepares `connections` lazily connected channels: no I/O happens until the first call.
    pub fn new(
        endpoint: &str,
        connections: usize,
        auth: Arc<TokenProvider>,
        retry: RetryPolicy,
    ) -> Result<Self, BigQueryError> {
        let bad = |message: String| BigQueryError::Config { what: format!("storage endpoint {endpoint}"), message };
        let mut ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| bad(e.to_string()))?
            .user_agent(concat!("bq2sftp/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| bad(e.to_string()))?
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .connect_timeout(Duration::from_secs(30))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if endpoint.starts_with("https://") {
            ep = ep.tls_config(ClientTlsConfig::new().with_native_roots()).map_err(|e| bad(e.to_string()))?;
        }
        let channels = (0..connections.max(1)).map(|_| ep.connect_lazy()).collect();
        Ok(StorageClient { endpoint: endpoint.to_string(), channels, next: AtomicUsize::new(0), auth, retry })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn connections(&self) -> usize {
        self.channels.len()
    }

    fn grpc(&self, connection: usize) -> BigQueryReadClient<Channel> {
        let channel = self.channels[connection % self.channels.len()].clone();
        BigQueryReadClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// Wraps `message` with the routing header and the bearer token.
    async fn request<T>(&self, message: T, routing_key: &str, routing: &str) -> Result<Request<T>, CallError> {
        let mut request = Request::new(message);
        let params = routing_value(routing_key, routing);
        let value = MetadataValue::try_from(params.as_str())
            .map_err(|_| CallError::Status(Status::invalid_argument(format!("unusable resource name {routing}"))))?;
        request.metadata_mut().insert(ROUTING_HEADER, value);
        if let Some(token) = self.auth.token().await.map_err(CallError::Auth)? {
            let mut value = MetadataValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
                CallError::Auth(AuthError::TokenEndpoint {
                    url: "token".into(),
                    message: "the access token contains characters not allowed in a header".into(),
                    hint: String::new(),
                })
            })?;
            value.set_sensitive(true);
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    /// CreateReadSession, retried on UNAVAILABLE / DEADLINE_EXCEEDED (and RetryInfo) with
    /// backoff, at most `max_attempts` times.
    pub async fn create_read_session(&self, req: CreateReadSessionRequest) -> Result<ReadSession, BigQueryError> {
        let table = req.read_session.as_ref().map(|s| s.table.clone()).unwrap_or_default();
        let mut attempt = 0;
        let mut reauthenticated = false;
        loop {
            attempt += 1;
            let conn = self.next.fetch_add(1, Ordering::Relaxed);
            let status = match self.request(req.clone(), "read_session.table", &table).await {
                Err(CallError::Auth(e)) => return Err(e.into()),
                Err(CallError::Status(s)) => s,
                Ok(request) => match self.grpc(conn).create_read_session(request).await {
                    Ok(resp) => return Ok(resp.into_inner()),
                    Err(s) => s,
                },
            };
            let delay = match classify_unary(&status) {
                Disposition::Retry { server_delay } if attempt < self.retry.max_attempts => {
                    server_delay.unwrap_or_else(|| self.retry.backoff(attempt))
                }
                Disposition::Reauthenticate if !reauthenticated => {
                    reauthenticated = true;
                    self.auth.invalidate().await;
                    Duration::ZERO
                }
                _ => {
                    let mut e = BigQueryError::from_status("CreateReadSession", &table, &status);
                    if attempt > 1 {
                        e = e.after_attempts(attempt);
                    }
                    return Err(e);
                }
            };
            tracing::warn!(table, attempt, "CreateReadSession failed, retrying in {delay:?}: {}", status.message());
            tokio::time::sleep(delay).await;
        }
    }

    /// Opens one ReadRows call at `offset`; the caller owns retries (it knows the offset).
    pub async fn read_rows(
        &self,
        stream: &str,
        offset: u64,
        connection: usize,
    ) -> Result<Streaming<ReadRowsResponse>, CallError> {
        let msg = ReadRowsRequest { read_stream: stream.to_string(), offset: offset as i64 };
        let request = self.request(msg, "read_stream", stream).await?;
        self.grpc(connection).read_rows(request).await.map(|r| r.into_inner()).map_err(CallError::Status)
    }
}
