//! The emulator's `google.cloud.bigquery.storage.v1.BigQueryRead` service.
//!
//! CreateReadSession projects (`selected_fields`) and filters (`row_restriction`) the table
//! once and splits its rows into streams: as many as `preferred_min_stream_count` asks, else one
//! per [`ROWS_PER_DEFAULT_STREAM`] rows (at most 16), never more than `max_stream_count` or the
//! row count, and none for an empty table (BigQuery's "0 streams" case). Streams are ranges of
//! pre-filter rows, so a selective filter makes them lopsided, as storage.proto warns.
//!
//! ReadRows serves a stream from a row offset: `offset` = the stream's row count ends cleanly
//! with no rows, a larger one is FAILED_PRECONDITION "offset N has not been allocated yet"
//! (goccy/bigquery-emulator#507, measured against BigQuery). Each response carries one IPC
//! RecordBatch message, `row_count`, progress stats and a throttle state; the first also
//! carries the schema. Responses are produced on a blocking thread into a channel of two, so a
//! slow client slows the producer through HTTP/2 flow control.
//!
//! SplitReadStream cuts a stream's remaining rows at `fraction` into a primary and a remainder
//! stream (both empty when it cannot be split), which together read what the original reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use arrow_array::RecordBatch;
use bytes::Bytes;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::catalog::{CatalogError, Projection};
use super::sql::{Filter, parse_filter};
use super::{AbortKind, ROWS_PER_DEFAULT_STREAM, State};
use crate::read::bigquery::TableRef;
use crate::read::bigquery::decode::{BatchEncoder, BufferCompression, encode_schema};
use crate::read::bigquery::proto::storage::arrow_serialization_options::CompressionCodec;
use crate::read::bigquery::proto::storage::big_query_read_server::{BigQueryRead, BigQueryReadServer};
use crate::read::bigquery::proto::storage::read_session::table_read_options::OutputFormatSerializationOptions;
use crate::read::bigquery::proto::storage::{
    ArrowRecordBatch, ArrowSchema, CreateReadSessionRequest, DataFormat, ReadRowsRequest, ReadRowsResponse,
    ReadSession, ReadStream, SplitReadStreamRequest, SplitReadStreamResponse, StreamStats, ThrottleState,
    read_rows_response, read_session, stream_stats,
};
use crate::read::bigquery::proto::{ROUTING_HEADER, parse_routing};
use crate::read::bigquery::retry::status_with_retry_info;

/// Most streams the emulator makes when the client lets it choose.
const MAX_DEFAULT_STREAMS: u64 = 16;

pub(crate) struct Session {
    pub name: String,
    pub schema_ipc: Bytes,
    pub compression: BufferCompression,
    pub expire_time: SystemTime,
    pub expired: AtomicBool,
    pub responses: AtomicU64,
}

impl Session {
    fn expired_status(&self, stream: &str) -> Status {
        let at = chrono::DateTime::<chrono::Utc>::from(self.expire_time.min(SystemTime::now()));
        // BigQuery's wording (spark-bigquery-connector#1316).
        Status::failed_precondition(format!(
            "there was an error operating on '{stream}': session expired at {}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
        ))
    }

    fn is_expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed) || SystemTime::now() >= self.expire_time
    }
}

/// One stream: rows `start..end` of `data` (the stream's projected, filtered rows).
pub(crate) struct StreamEntry {
    pub session: Arc<Session>,
    pub data: Arc<Vec<RecordBatch>>,
    pub start: u64,
    pub end: u64,
}

impl StreamEntry {
    fn rows(&self) -> u64 {
        self.end - self.start
    }

    /// Rows `from..to` (absolute in `data`) as responses of at most `max` rows; a response
    /// may span stored batches, as BigQuery's responses are not tied to storage blocks.
    fn slices(&self, from: u64, to: u64, max: usize) -> Vec<RecordBatch> {
        let mut out = Vec::new();
        let mut pending: Vec<RecordBatch> = Vec::new();
        let mut pending_rows = 0usize;
        let flush = |pending: &mut Vec<RecordBatch>, out: &mut Vec<RecordBatch>| match pending.len() {
            0 => {}
            1 => out.append(pending),
            _ => {
                let schema = pending[0].schema();
                match arrow_select::concat::concat_batches(&schema, pending.iter()) {
                    Ok(b) => out.push(b),
                    Err(_) => out.append(pending),
                }
                pending.clear();
            }
        };
        let mut base = 0u64;
        for b in self.data.iter() {
            let n = b.num_rows() as u64;
            let (lo, hi) = (from.max(base), to.min(base + n));
            let mut at = lo;
            while at < hi {
                let len = (hi - at).min((max - pending_rows) as u64);
                pending.push(b.slice((at - base) as usize, len as usize));
                pending_rows += len as usize;
                at += len;
                if pending_rows == max {
                    flush(&mut pending, &mut out);
                    pending_rows = 0;
                }
            }
            base += n;
            if base >= to {
                break;
            }
        }
        flush(&mut pending, &mut out);
        out
    }
}

pub(crate) fn service(state: Arc<State>) -> BigQueryReadServer<Service> {
    BigQueryReadServer::new(Service { state }).max_decoding_message_size(16 << 20)
}

pub(crate) struct Service {
    state: Arc<State>,
}

/// Reads `key` from the routing header. BigQuery refuses calls without it.
fn routing(meta: &MetadataMap, key: &str, expected: &str, state: &State) -> Result<(), Status> {
    let header = meta.get(ROUTING_HEADER).and_then(|v| v.to_str().ok());
    let value = header.and_then(|h| parse_routing(h).into_iter().find(|(k, _)| k == key).map(|(_, v)| v));
    match value {
        Some(v) if v == expected => Ok(()),
        Some(v) => Err(Status::invalid_argument(format!(
            "the {ROUTING_HEADER} header says {key}={v} but the request names {expected}"
        ))),
        None => {
            state.stats.missing_routing_header.fetch_add(1, Ordering::Relaxed);
            Err(Status::invalid_argument(format!(
                "Missing request routing header: {ROUTING_HEADER} must contain {key}=<resource name>"
            )))
        }
    }
}

fn auth(meta: &MetadataMap, state: &State) -> Result<(), Status> {
    let header = meta.get("authorization").and_then(|v| v.to_str().ok());
    state.check_token(header).map_err(Status::unauthenticated)
}

fn blocking_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("emulator task failed: {e}"))
}

/// Splits the table's rows into `streams` ranges and filters and projects each.
fn split_rows(
    table: &super::Table,
    projection: &Projection,
    filter: Option<&Filter>,
    streams: u64,
) -> Result<Vec<Arc<Vec<RecordBatch>>>, String> {
    let total = table.rows;
    let mut out = Vec::with_capacity(streams as usize);
    for i in 0..streams {
        let (lo, hi) = (
            (total as u128 * i as u128 / streams as u128) as u64,
            (total as u128 * (i as u128 + 1) / streams as u128) as u64,
        );
        let mut rows = Vec::new();
        let mut base = 0u64;
        for b in &table.batches {
            let n = b.num_rows() as u64;
            let (a, z) = (lo.max(base), hi.min(base + n));
            if a < z {
                let mut part = b.slice((a - base) as usize, (z - a) as usize);
                if let Some(f) = filter {
                    part = f.apply(&part)?;
                }
                if part.num_rows() > 0 {
                    rows.push(projection.apply(&part));
                }
            }
            base += n;
        }
        out.push(Arc::new(rows));
    }
    Ok(out)
}

impl Service {
    fn stream_entry(&self, name: &str) -> Result<Arc<StreamEntry>, Status> {
        self.state
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("Stream {name} not found (was it created by this emulator?)")))
    }
}

#[tonic::async_trait]
impl BigQueryRead for Service {
    async fn create_read_session(
        &self,
        request: Request<CreateReadSessionRequest>,
    ) -> Result<Response<ReadSession>, Status> {
        let state = self.state.clone();
        auth(request.metadata(), &state)?;
        let req = request.get_ref();
        let session_in =
            req.read_session.clone().ok_or_else(|| Status::invalid_argument("read_session is required"))?;
        routing(request.metadata(), "read_session.table", &session_in.table, &state)?;
        if (state.create_failures.load(Ordering::Relaxed) as u32) < state.faults().create_unavailable {
            state.create_failures.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unavailable("The service is currently unavailable (injected)"));
        }
        let parent =
            req.parent.strip_prefix("projects/").filter(|p| !p.is_empty() && !p.contains('/')).ok_or_else(|| {
                Status::invalid_argument(format!("parent must be projects/{{project}}, got {:?}", req.parent))
            })?;
        match DataFormat::try_from(session_in.data_format) {
            Ok(DataFormat::Arrow) => {}
            Ok(DataFormat::Unspecified) => {
                return Err(Status::invalid_argument("data_format must be specified (ARROW or AVRO)"));
            }
            _ => return Err(Status::invalid_argument("the emulator serves data_format ARROW only")),
        }
        let table_ref = TableRef::from_path(&session_in.table).ok_or_else(|| {
            Status::invalid_argument(format!(
                "table must be projects/{{project}}/datasets/{{dataset}}/tables/{{table}}, got {:?}",
                session_in.table
            ))
        })?;
        if let Some(t) = session_in.table_modifiers.as_ref().and_then(|m| m.snapshot_time.as_ref())
            && t.seconds > chrono::Utc::now().timestamp() + 60
        {
            return Err(Status::invalid_argument("Invalid snapshot time: it is in the future"));
        }
        if req.max_stream_count < 0 || req.preferred_min_stream_count < 0 {
            return Err(Status::invalid_argument("stream counts must not be negative"));
        }
        if req.max_stream_count > 0 && req.preferred_min_stream_count > req.max_stream_count {
            return Err(Status::invalid_argument("preferred_min_stream_count must not exceed max_stream_count"));
        }
        let options = session_in.read_options.clone().unwrap_or_default();
        let compression = match &options.output_format_serialization_options {
            Some(OutputFormatSerializationOptions::ArrowSerializationOptions(a)) => {
                match CompressionCodec::try_from(a.buffer_compression) {
                    Ok(CompressionCodec::Lz4Frame) => BufferCompression::Lz4Frame,
                    Ok(CompressionCodec::Zstd) => BufferCompression::Zstd,
                    _ => BufferCompression::None,
                }
            }
            None => BufferCompression::None,
        };
        let (max, min) = (req.max_stream_count as u64, req.preferred_min_stream_count as u64);
        let parent = parent.to_string();
        let session_in2 = session_in.clone();
        let state2 = state.clone();
        // Loading, projecting and filtering a table is CPU and file work.
        let built = tokio::task::spawn_blocking(move || -> Result<ReadSession, Status> {
            let state = state2;
            let table = state.catalog.get(&table_ref).map_err(|e| match e {
                CatalogError::NotFound(_) => Status::not_found(e.to_string()),
                CatalogError::Load { .. } => Status::internal(e.to_string()),
            })?;
            let projection =
                Projection::new(&table.schema, &options.selected_fields).map_err(Status::invalid_argument)?;
            let filter = if options.row_restriction.trim().is_empty() {
                None
            } else {
                let expr = parse_filter(&options.row_restriction).map_err(Status::invalid_argument)?;
                // The filter sees the whole row: it may name columns that are not selected.
                Some(Filter::bind(&expr, &table.schema).map_err(Status::invalid_argument)?)
            };
            let streams = if table.rows == 0 {
                0
            } else {
                let wanted =
                    if min > 0 { min } else { table.rows.div_ceil(ROWS_PER_DEFAULT_STREAM).min(MAX_DEFAULT_STREAMS) };
                let capped = if max > 0 { wanted.min(max) } else { wanted };
                capped.clamp(1, 1000).min(table.rows)
            };
            let data = split_rows(&table, &projection, filter.as_ref(), streams).map_err(Status::internal)?;
            let location = state.config.location.to_ascii_lowercase();
            let session_name = format!("projects/{parent}/locations/{location}/sessions/{}", state.id("s"));
            let now = SystemTime::now();
            let session = Arc::new(Session {
                name: session_name.clone(),
                schema_ipc: Bytes::from(encode_schema(projection.schema())),
                compression,
                expire_time: now + state.config.session_lifetime,
                expired: AtomicBool::new(false),
                responses: AtomicU64::new(0),
            });
            let mut names = Vec::with_capacity(data.len());
            {
                let mut streams = state.streams.lock().unwrap_or_else(|p| p.into_inner());
                for rows in data {
                    let name = format!("{session_name}/streams/{}", state.id("st"));
                    let end = rows.iter().map(|b| b.num_rows() as u64).sum();
                    streams.insert(
                        name.clone(),
                        Arc::new(StreamEntry { session: session.clone(), data: rows, start: 0, end }),
                    );
                    names.push(ReadStream { name });
                }
            }
            state.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(session_name.clone(), session.clone());
            let expire = chrono::DateTime::<chrono::Utc>::from(session.expire_time);
            Ok(ReadSession {
                name: session_name,
                expire_time: Some(prost_types::Timestamp { seconds: expire.timestamp(), nanos: 0 }),
                data_format: DataFormat::Arrow as i32,
                schema: Some(read_session::Schema::ArrowSchema(ArrowSchema {
                    serialized_schema: session.schema_ipc.clone(),
                })),
                table: session_in2.table.clone(),
                table_modifiers: session_in2.table_modifiers,
                read_options: session_in2.read_options.clone(),
                streams: names,
                estimated_total_bytes_scanned: table.bytes(projection.schema()) as i64,
                trace_id: session_in2.trace_id.clone(),
                estimated_row_count: table.rows as i64,
            })
        })
        .await
        .map_err(blocking_error)??;
        state.stats.sessions_created.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(session = %built.name, streams = built.streams.len(), "emulator: session created");
        Ok(Response::new(built))
    }

    type ReadRowsStream = tokio_stream::wrappers::ReceiverStream<Result<ReadRowsResponse, Status>>;

    async fn read_rows(&self, request: Request<ReadRowsRequest>) -> Result<Response<Self::ReadRowsStream>, Status> {
        let state = self.state.clone();
        auth(request.metadata(), &state)?;
        routing(request.metadata(), "read_stream", &request.get_ref().read_stream, &state)?;
        let req = request.into_inner();
        state.stats.read_rows_calls.fetch_add(1, Ordering::Relaxed);
        let entry = self.stream_entry(&req.read_stream)?;
        state
            .stats
            .read_offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((req.read_stream.clone(), req.offset.max(0) as u64));
        let session = entry.session.clone();
        if session.is_expired() {
            return Err(session.expired_status(&req.read_stream));
        }
        if req.offset < 0 {
            return Err(Status::invalid_argument(format!("offset must not be negative, got {}", req.offset)));
        }
        let offset = req.offset as u64;
        if offset > entry.rows() {
            return Err(Status::failed_precondition(format!("offset {offset} has not been allocated yet")));
        }
        let faults = state.faults();
        if faults.resource_exhausted > 0 {
            let mut calls = state.calls_per_stream.lock().unwrap_or_else(|p| p.into_inner());
            let n = calls.entry(req.read_stream.clone()).or_insert(0);
            if *n < faults.resource_exhausted {
                *n += 1;
                state.stats.resource_exhausted.fetch_add(1, Ordering::Relaxed);
                let message = "Exceeded rate limits: too many concurrent ReadRows calls for this project (injected)";
                return Err(match faults.retry_delay {
                    Some(delay) => status_with_retry_info(Code::ResourceExhausted, message, delay),
                    None => Status::resource_exhausted(message),
                });
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let response_rows = state.config.response_rows.max(1);
        let stream_name = req.read_stream;
        tokio::task::spawn_blocking(move || {
            produce(&state, &entry, &stream_name, offset, response_rows, &faults, &tx);
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn split_read_stream(
        &self,
        request: Request<SplitReadStreamRequest>,
    ) -> Result<Response<SplitReadStreamResponse>, Status> {
        auth(request.metadata(), &self.state)?;
        let req = request.get_ref();
        routing(request.metadata(), "name", &req.name, &self.state)?;
        if !(req.fraction > 0.0 && req.fraction < 1.0) {
            return Err(Status::invalid_argument(format!("fraction must be in (0, 1), got {}", req.fraction)));
        }
        let entry = self.stream_entry(&req.name)?;
        let rows = entry.rows();
        let cut = (rows as f64 * req.fraction).floor() as u64;
        if cut == 0 || cut >= rows {
            return Ok(Response::new(SplitReadStreamResponse::default()));
        }
        let mut streams = self.state.streams.lock().unwrap_or_else(|p| p.into_inner());
        let mut child = |start: u64, end: u64| {
            let name = format!("{}/streams/{}", entry.session.name, self.state.id("st"));
            let e = StreamEntry { session: entry.session.clone(), data: entry.data.clone(), start, end };
            streams.insert(name.clone(), Arc::new(e));
            ReadStream { name }
        };
        let primary = child(entry.start, entry.start + cut);
        let remainder = child(entry.start + cut, entry.end);
        Ok(Response::new(SplitReadStreamResponse { primary_stream: Some(primary), remainder_stream: Some(remainder) }))
    }
}

/// Sends one ReadRows call's responses (runs on a blocking thread).
fn produce(
    state: &State,
    entry: &StreamEntry,
    stream: &str,
    offset: u64,
    response_rows: usize,
    faults: &super::Faults,
    tx: &tokio::sync::mpsc::Sender<Result<ReadRowsResponse, Status>>,
) {
    let session = &entry.session;
    let mut encoder = match BatchEncoder::new(session.compression) {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
            return;
        }
    };
    let total = entry.rows().max(1) as f64;
    let mut done = offset;
    for (i, slice) in entry.slices(entry.start + offset, entry.end, response_rows).into_iter().enumerate() {
        if let Some(delay) = faults.slow {
            std::thread::sleep(delay);
        }
        if let Some(n) = faults.abort_after
            && i as u32 >= n.max(1)
            && faults.max_aborts.is_none_or(|max| state.stats.aborts.load(Ordering::Relaxed) < max)
        {
            state.stats.aborts.fetch_add(1, Ordering::Relaxed);
            let status = match faults.abort_with {
                AbortKind::Unavailable => Status::unavailable("The service is currently unavailable (injected)"),
                AbortKind::Internal => Status::internal("Received RST_STREAM with error code 2 (injected)"),
                AbortKind::Unknown => Status::unknown("No status received (injected)"),
            };
            let _ = tx.blocking_send(Err(status));
            return;
        }
        if let Some(n) = faults.expire_after
            && session.responses.load(Ordering::Relaxed) >= n
        {
            session.expired.store(true, Ordering::Relaxed);
        }
        if session.is_expired() {
            let _ = tx.blocking_send(Err(session.expired_status(stream)));
            return;
        }
        let rows = slice.num_rows() as u64;
        let bytes = match encoder.encode(&slice) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(format!("cannot encode a record batch: {e}"))));
                return;
            }
        };
        let response = ReadRowsResponse {
            rows: Some(read_rows_response::Rows::ArrowRecordBatch(ArrowRecordBatch {
                serialized_record_batch: Bytes::from(bytes),
                row_count: rows as i64,
            })),
            row_count: rows as i64,
            stats: Some(StreamStats {
                progress: Some(stream_stats::Progress {
                    at_response_start: done as f64 / total,
                    at_response_end: (done + rows) as f64 / total,
                }),
            }),
            throttle_state: Some(ThrottleState { throttle_percent: 0 }),
            schema: (i == 0).then(|| {
                read_rows_response::Schema::ArrowSchema(ArrowSchema { serialized_schema: session.schema_ipc.clone() })
            }),
        };
        session.responses.fetch_add(1, Ordering::Relaxed);
        state.stats.responses.fetch_add(1, Ordering::Relaxed);
        state.stats.rows_sent.fetch_add(rows, Ordering::Relaxed);
        done += rows;
        if tx.blocking_send(Ok(response)).is_err() {
            return; // the client went away
        }
    }
}
