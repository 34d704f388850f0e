//! The emulator's protocol details, checked over raw gRPC and HTTP the way other clients see
//! them: the routing header is required, the schema comes with the session and the first
//! response of each call, offsets behave as BigQuery's do, SplitReadStream halves read what
//! the original reads, and the REST calls answer in BigQuery's shapes.

mod common;

use arrow_array::RecordBatch;
use bq2sftp::read::bigquery::decode::{BatchDecoder, decode_schema};
use bq2sftp::read::bigquery::proto::storage::big_query_read_client::BigQueryReadClient;
use bq2sftp::read::bigquery::proto::storage::{
    self, CreateReadSessionRequest, ReadRowsRequest, ReadSession, SplitReadStreamRequest,
};
use bq2sftp::read::bigquery::proto::{ROUTING_HEADER, routing_value};
use bq2sftp::read::synthetic::SyntheticOptions;
use common::google::{start_emulator, write_table};
use std::sync::Arc;
use tonic::transport::Channel;

async fn client(addr: std::net::SocketAddr) -> BigQueryReadClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    BigQueryReadClient::new(channel).max_decoding_message_size(129 << 20)
}

fn with_routing<T>(msg: T, key: &str, value: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(ROUTING_HEADER, routing_value(key, value).parse().unwrap());
    r
}

fn session_request(table: &str, max: i32, compression: i32) -> CreateReadSessionRequest {
    CreateReadSessionRequest {
        parent: "projects/billing".into(),
        read_session: Some(ReadSession {
            table: table.into(),
            data_format: storage::DataFormat::Arrow as i32,
            read_options: Some(storage::read_session::TableReadOptions {
                output_format_serialization_options: Some(
                    storage::read_session::table_read_options::OutputFormatSerializationOptions::ArrowSerializationOptions(
                        storage::ArrowSerializationOptions { buffer_compression: compression },
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }),
        max_stream_count: max,
        preferred_min_stream_count: 0,
    }
}

const TABLE: &str = "projects/p/datasets/d/tables/t";

/// Reads a whole stream from `offset`: (rows, batches, responses carrying a schema).
async fn read_all(
    c: &mut BigQueryReadClient<Channel>,
    schema: &[u8],
    stream: &str,
    offset: i64,
) -> (u64, Vec<RecordBatch>, usize) {
    let decoder = BatchDecoder::new(Arc::new(decode_schema(schema).unwrap()));
    let req = with_routing(ReadRowsRequest { read_stream: stream.into(), offset }, "read_stream", stream);
    let mut responses = c.read_rows(req).await.unwrap().into_inner();
    let (mut rows, mut batches, mut schemas) = (0, Vec::new(), 0);
    while let Some(r) = responses.message().await.unwrap() {
        schemas += usize::from(r.schema.is_some());
        let Some(storage::read_rows_response::Rows::ArrowRecordBatch(b)) = r.rows else { panic!("no rows") };
        assert_eq!(b.row_count, r.row_count);
        let batch = decoder.decode(b.serialized_record_batch).unwrap();
        assert_eq!(batch.num_rows() as i64, r.row_count);
        let progress = r.stats.unwrap().progress.unwrap();
        assert!(progress.at_response_start < progress.at_response_end && progress.at_response_end <= 1.0);
        rows += batch.num_rows() as u64;
        batches.push(batch);
    }
    (rows, batches, schemas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_details() {
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), "p.d.t", SyntheticOptions { rows: 1000, ..Default::default() });
    let emu = start_emulator(dir.path(), |c| c.response_rows = 128).await;
    let mut c = client(emu.local_addr()).await;

    // No routing header: INVALID_ARGUMENT, as BigQuery answers raw gRPC calls without it.
    let err = c.create_read_session(tonic::Request::new(session_request(TABLE, 1, 0))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains(ROUTING_HEADER), "{}", err.message());

    for codec in [0, 1, 2] {
        let session = c
            .create_read_session(with_routing(session_request(TABLE, 1, codec), "read_session.table", TABLE))
            .await
            .unwrap()
            .into_inner();
        let Some(storage::read_session::Schema::ArrowSchema(schema)) = &session.schema else { panic!("no schema") };
        assert_eq!(&schema.serialized_schema[..4], &[0xFF; 4], "one encapsulated IPC message");
        assert_eq!(session.estimated_row_count, 1000);
        assert!(session.name.starts_with("projects/billing/locations/us/sessions/"));
        assert!(session.expire_time.unwrap().seconds > chrono::Utc::now().timestamp() + 5 * 3600);
        let stream = session.streams[0].name.clone();
        let (rows, _, schemas) = read_all(&mut c, &schema.serialized_schema, &stream, 0).await;
        assert_eq!((rows, schemas), (1000, 1), "codec {codec}: the schema only on the first response");

        // Offsets: the tail, the end (nothing, cleanly), past the end (FAILED_PRECONDITION).
        let (tail, tail_batches, _) = read_all(&mut c, &schema.serialized_schema, &stream, 990).await;
        assert_eq!(tail, 10);
        assert_eq!(
            arrow_array::cast::AsArray::as_primitive::<arrow_array::types::Int64Type>(tail_batches[0].column(0))
                .value(0),
            990
        );
        assert_eq!(read_all(&mut c, &schema.serialized_schema, &stream, 1000).await.0, 0);
        let req = with_routing(ReadRowsRequest { read_stream: stream.clone(), offset: 1001 }, "read_stream", &stream);
        let err = c.read_rows(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("offset 1001 has not been allocated yet"));

        // SplitReadStream: primary + remainder read exactly what the original reads.
        let split = c
            .split_read_stream(with_routing(
                SplitReadStreamRequest { name: stream.clone(), fraction: 0.3 },
                "name",
                &stream,
            ))
            .await
            .unwrap()
            .into_inner();
        let (p, r) = (split.primary_stream.unwrap().name, split.remainder_stream.unwrap().name);
        let (prows, pb, _) = read_all(&mut c, &schema.serialized_schema, &p, 0).await;
        let (rrows, rb, _) = read_all(&mut c, &schema.serialized_schema, &r, 0).await;
        assert_eq!((prows, rrows), (300, 700));
        let (_, whole, _) = read_all(&mut c, &schema.serialized_schema, &stream, 0).await;
        let cat = |b: &[RecordBatch]| arrow_select::concat::concat_batches(&b[0].schema(), b).unwrap();
        assert_eq!(cat(&[pb, rb].concat()), cat(&whole));
    }

    // A table that does not exist, a filter the emulator cannot evaluate.
    let missing = "projects/p/datasets/d/tables/nope";
    let err = c
        .create_read_session(with_routing(session_request(missing, 1, 0), "read_session.table", missing))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let mut req = session_request(TABLE, 1, 0);
    req.read_session.as_mut().unwrap().read_options.as_mut().unwrap().row_restriction = "id LIKE '1%'".into();
    let err = c.create_read_session(with_routing(req, "read_session.table", TABLE)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_calls_answer_like_bigquery() {
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), "p.d.t", SyntheticOptions { rows: 50, ..Default::default() });
    let emu = start_emulator(dir.path(), |_| {}).await;
    let base = format!("http://{}/bigquery/v2/projects/p", emu.local_addr());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let table: serde_json::Value =
        http.get(format!("{base}/datasets/d/tables/t")).send().await.unwrap().json().await.unwrap();
    assert_eq!(table["numRows"], "50");
    assert_eq!(table["schema"]["fields"][0]["name"], "id");
    let missing = http.get(format!("{base}/datasets/d/tables/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    let body = serde_json::json!({
        "jobReference": {"projectId": "p", "jobId": "job1"},
        "configuration": {"query": {"query": "SELECT id FROM d.t WHERE id >= 40", "useLegacySql": false}}
    });
    let job: serde_json::Value =
        http.post(format!("{base}/jobs")).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(job["jobReference"]["jobId"], "job1");
    // The same client-made id again: 409, so a retried insert never runs a query twice.
    let again = http.post(format!("{base}/jobs")).json(&body).send().await.unwrap();
    assert_eq!(again.status(), 409);
    let first: serde_json::Value =
        http.get(format!("{base}/queries/job1?maxResults=0")).send().await.unwrap().json().await.unwrap();
    assert_eq!(first["jobComplete"], false, "the first poll finds the job running");
    let done: serde_json::Value =
        http.get(format!("{base}/queries/job1?maxResults=0")).send().await.unwrap().json().await.unwrap();
    assert_eq!((done["jobComplete"].as_bool(), done["totalRows"].as_str()), (Some(true), Some("10")));
    let job: serde_json::Value = http.get(format!("{base}/jobs/job1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(job["status"]["state"], "DONE");
    let dest = &job["configuration"]["query"]["destinationTable"];
    let result: serde_json::Value = http
        .get(format!(
            "{base}/datasets/{}/tables/{}",
            dest["datasetId"].as_str().unwrap(),
            dest["tableId"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(result["numRows"], "10");
}
