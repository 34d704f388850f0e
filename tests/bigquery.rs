//! The BigQuery source end to end: the reader against the project's emulator over real gRPC on
//! 127.0.0.1, with local token and metadata servers that answer like Google's.
//!
//! Exactness is checked by comparing with the `parquet://` source reading the very file the
//! emulator serves (sorted row sets, not counts), so every BigQuery type and edge value of the
//! synthetic table must survive IPC framing, compression, stream splitting and resumes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Date32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use bq2sftp::cli::ExportArgs;
use bq2sftp::emulator::{AbortKind, AuthCheck, EmulatorHandle, Faults};
use bq2sftp::read::synthetic::{SyntheticOptions, SyntheticSource};
use bq2sftp::{Error, Report};
use clap::Parser;
use common::google::*;

const ROWS: u64 = 3000;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    export: ExportArgs,
}

fn export_args(list: &[&str]) -> ExportArgs {
    let argv = std::iter::once("bq2sftp").chain(list.iter().copied());
    Wrapper::try_parse_from(argv).expect("valid flags").export
}

/// Runs an export in-process. Without `--resume`/`--state-file` it keeps no state file (a
/// failing test run must not leave one in the working directory).
async fn export(list: &[&str]) -> Result<Report, Error> {
    let mut list = list.to_vec();
    if !list.iter().any(|a| *a == "--resume" || *a == "--state-file") {
        list.push("--no-state");
    }
    let job = export_args(&list).to_job()?;
    bq2sftp::run(&job).await
}

/// A table dir with `p.d.t` (all types) and `p.d.flat` (no ARRAY/STRUCT, for CSV).
fn tables() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), "p.d.t", SyntheticOptions { rows: ROWS, batch_rows: 700, ..Default::default() });
    write_table(
        dir.path(),
        "p.d.flat",
        SyntheticOptions { rows: ROWS, batch_rows: 700, flat: true, ..Default::default() },
    );
    dir
}

async fn emulator(dir: &Path) -> EmulatorHandle {
    start_emulator(dir, |c| c.response_rows = 500).await
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(ext) && !p.file_name().unwrap().to_string_lossy().starts_with('_'))
        .collect();
    v.sort();
    v
}

/// Header and all records of every CSV file in `dir`, records sorted.
fn csv_rows(dir: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header = Vec::new();
    let mut rows = Vec::new();
    for f in files(dir, ".csv") {
        let mut r = csv::ReaderBuilder::new().has_headers(true).from_path(&f).unwrap();
        header = r.headers().unwrap().iter().map(str::to_string).collect();
        for rec in r.records() {
            rows.push(rec.unwrap().iter().map(str::to_string).collect());
        }
    }
    rows.sort();
    (header, rows)
}

fn ndjson_lines(dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> = files(dir, ".json")
        .iter()
        .flat_map(|f| std::fs::read_to_string(f).unwrap().lines().map(str::to_string).collect::<Vec<_>>())
        .collect();
    lines.sort();
    lines
}

fn parquet_batches(dir: &Path) -> Vec<RecordBatch> {
    files(dir, ".parquet")
        .iter()
        .flat_map(|f| {
            let file = std::fs::File::open(f).unwrap();
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn concat(batches: &[RecordBatch]) -> RecordBatch {
    arrow_select::concat::concat_batches(&batches[0].schema(), batches).unwrap()
}

fn out_dir() -> (tempfile::TempDir, String) {
    let d = tempfile::tempdir().unwrap();
    let url = format!("dir://{}", d.path().display());
    (d, url)
}

/// CSV export via the emulator with `extra` flags: sorted records.
async fn bq_csv(emu: &EmulatorHandle, table: &str, extra: &[&str]) -> (Report, Vec<String>, Vec<Vec<String>>) {
    let (out, url) = out_dir();
    let from = format!("bq://{table}");
    let mut a = vec!["--from", &from, "--to", &url, "--format", "csv", "--emulator", &emu.local_addr().to_string()]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    a.extend(["--retry-initial-backoff", "1ms"].map(str::to_string));
    a.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let report = export(&refs).await.expect("the export succeeds");
    let (header, rows) = csv_rows(out.path());
    (report, header, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_like_the_parquet_source() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    let host = emu.host_port();

    // CSV (flat table; nested columns cannot be CSV), several streams.
    let (report, header, bq_rows) = bq_csv(&emu, "p.d.flat", &["--min-streams", "3"]).await;
    assert_eq!(report.files.len(), 3);
    let (pq_out, pq_url) = out_dir();
    let src = format!("parquet://{}/p.d.flat.parquet", dir.path().display());
    export(&["--from", &src, "--to", &pq_url, "--format", "csv"]).await.unwrap();
    let (pq_header, pq_rows) = csv_rows(pq_out.path());
    assert_eq!(header, pq_header);
    assert_eq!(header.len(), 14, "every flat BigQuery type");
    assert_eq!(bq_rows.len(), ROWS as usize);
    assert_eq!(bq_rows, pq_rows, "CSV rows differ from the Parquet source");
    // Spot checks of BigQuery's rendering through the whole path.
    let ts = header.iter().position(|h| h == "timestamp_col").unwrap();
    assert!(bq_rows.iter().any(|r| r[ts] == "9999-12-31 23:59:59.999999 UTC"));
    assert!(bq_rows.iter().any(|r| r[ts] == "0001-01-01 00:00:00 UTC"));

    // NDJSON with ARRAY and STRUCT, ZSTD buffer compression.
    let (bq_out, bq_url) = out_dir();
    export(&[
        "--from",
        "bq://p.d.t",
        "--to",
        &bq_url,
        "--format",
        "ndjson",
        "--emulator",
        &host,
        "--arrow-compression",
        "zstd",
        "--min-streams",
        "2",
    ])
    .await
    .unwrap();
    let (pq_out, pq_url) = out_dir();
    let src = format!("parquet://{}/p.d.t.parquet", dir.path().display());
    export(&["--from", &src, "--to", &pq_url, "--format", "ndjson"]).await.unwrap();
    let bq_lines = ndjson_lines(bq_out.path());
    assert_eq!(bq_lines.len(), ROWS as usize);
    assert_eq!(bq_lines, ndjson_lines(pq_out.path()), "NDJSON differs");

    // Parquet, one stream each so the row order is the table's; no buffer compression.
    let (bq_out, bq_url) = out_dir();
    export(&[
        "--from",
        "bq://p.d.t",
        "--to",
        &bq_url,
        "--format",
        "parquet",
        "--emulator",
        &host,
        "--max-streams",
        "1",
        "--arrow-compression",
        "none",
    ])
    .await
    .unwrap();
    let (pq_out, pq_url) = out_dir();
    let src = format!("parquet://{}/p.d.t.parquet?streams=1", dir.path().display());
    export(&["--from", &src, "--to", &pq_url, "--format", "parquet"]).await.unwrap();
    let (a, b) = (concat(&parquet_batches(bq_out.path())), concat(&parquet_batches(pq_out.path())));
    assert_eq!(a.num_rows(), ROWS as usize);
    assert_eq!(a, b, "Parquet output differs");
    assert!(EmulatorStatsExt::responses(&emu) > 6);
}

trait EmulatorStatsExt {
    fn responses(&self) -> u64;
}

impl EmulatorStatsExt for EmulatorHandle {
    fn responses(&self) -> u64 {
        self.stats().responses.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selected_columns_keep_table_order_and_nested_paths() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    let (out, url) = out_dir();
    let host = emu.host_port();
    export(&[
        "--from",
        "bq://p.d.t",
        "--to",
        &url,
        "--format",
        "ndjson",
        "--emulator",
        &host,
        "--columns",
        "record.b,id,string_col",
    ])
    .await
    .unwrap();
    let lines = ndjson_lines(out.path());
    assert_eq!(lines.len(), ROWS as usize);
    // NULL fields are left out of NDJSON (as BigQuery's JSON export does), so check subsets.
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert!(keys.iter().all(|k| ["id", "string_col", "record"].contains(&k.as_str())), "{line}");
        assert!(v["id"].is_string(), "{line}");
        let rec = v["record"].as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert!(rec.is_none() || rec == Some(vec!["b".to_string()]) || rec == Some(vec![]), "{line}");
    }
    let full =
        lines.iter().find(|l| l.contains("\"string_col\"") && l.contains("\"b\"")).expect("a row with all three");
    // Order follows the table, not the flag (storage.proto: selected_fields).
    assert!(full.find("\"id\"").unwrap() < full.find("\"string_col\"").unwrap());
    assert!(full.find("\"string_col\"").unwrap() < full.find("\"record\"").unwrap());
}

/// The filter under test, evaluated independently on the generated rows.
fn expected_filtered_ids() -> Vec<String> {
    let batch =
        SyntheticSource::new(SyntheticOptions { rows: ROWS, flat: true, ..Default::default() }).batch(0, ROWS as usize);
    let col = |n: &str| batch.column(batch.schema().index_of(n).unwrap()).clone();
    let (ints, dates, strings, ts) = (col("int64_col"), col("date_col"), col("string_col"), col("timestamp_col"));
    let (ints, dates) = (ints.as_primitive::<Int64Type>(), dates.as_primitive::<Date32Type>());
    let (strings, ts) = (strings.as_string::<i32>(), ts.as_primitive::<TimestampMicrosecondType>());
    let mut ids = Vec::new();
    for row in 0..batch.num_rows() {
        // int64_col > 0 AND (date_col >= DATE '2000-01-01' OR string_col IN ('alpha', 'NULL'))
        //   AND timestamp_col IS NOT NULL  (NULL comparisons are never TRUE)
        let a = ints.is_valid(row) && ints.value(row) > 0;
        let b = dates.is_valid(row) && dates.value(row) >= 10_957;
        let c = strings.is_valid(row) && ["alpha", "NULL"].contains(&strings.value(row));
        if a && (b || c) && ts.is_valid(row) {
            ids.push(row.to_string());
        }
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_restriction_matches_an_independent_evaluation() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    let filter = "int64_col > 0 AND (date_col >= DATE '2000-01-01' OR string_col IN ('alpha', 'NULL')) AND timestamp_col IS NOT NULL";
    let (_, _, rows) = bq_csv(&emu, "p.d.flat", &["--where", filter, "--min-streams", "4"]).await;
    let mut ids: Vec<String> = rows.iter().map(|r| r[0].clone()).collect();
    ids.sort();
    let expected = expected_filtered_ids();
    assert!(!expected.is_empty() && expected.len() < ROWS as usize / 2);
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_table_gives_a_header_only_file_and_a_filtered_out_table_too() {
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), "p.d.empty", SyntheticOptions { rows: 0, flat: true, ..Default::default() });
    write_table(dir.path(), "p.d.flat", SyntheticOptions { rows: 100, flat: true, ..Default::default() });
    let emu = emulator(dir.path()).await;
    for (table, filter) in [("p.d.empty", None), ("p.d.flat", Some("id < 0"))] {
        let mut extra = vec![];
        if let Some(f) = filter {
            extra.extend(["--where", f]);
        }
        let (report, header, rows) = bq_csv(&emu, table, &extra).await;
        assert_eq!(report.rows, 0);
        assert_eq!(report.files.len(), 1, "{table}");
        assert_eq!(header.len(), 14);
        assert!(rows.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_names_the_table_and_its_snapshot() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    let (out, url) = out_dir();
    let host = emu.host_port();
    export(&["--from", "bq://p.d.flat", "--to", &url, "--emulator", &host, "--snapshot-time", "2024-05-01T00:00:00Z"])
        .await
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("_MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["source"]["kind"], "bigquery");
    assert_eq!(manifest["source"]["name"], "p.d.flat");
    assert_eq!(manifest["source"]["snapshot_time"], "2024-05-01T00:00:00.000000Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_or_many() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    let (one, _, rows_one) = bq_csv(&emu, "p.d.flat", &["--max-streams", "1"]).await;
    let (many, _, rows_many) = bq_csv(&emu, "p.d.flat", &["--min-streams", "6", "--max-streams", "8"]).await;
    assert_eq!(one.files.len(), 1);
    assert_eq!(many.files.len(), 6);
    assert_eq!(rows_one, rows_many);
}

async fn faulty_export_matches_clean_one(faults: Faults) -> (u64, usize) {
    let dir = tables();
    // 750 rows per stream in 100-row responses: each stream is cut many times.
    let emu = start_emulator(dir.path(), |c| c.response_rows = 100).await;
    let (_, _, clean) = bq_csv(&emu, "p.d.flat", &["--min-streams", "4"]).await;
    emu.set_faults(faults);
    let (_, _, faulty) = bq_csv(&emu, "p.d.flat", &["--min-streams", "4", "--read-retries", "3"]).await;
    assert_eq!(faulty.len(), ROWS as usize, "no row lost or doubled");
    assert_eq!(faulty, clean, "same rows after resumes");
    let resumed_at = emu.stats().read_offsets.lock().unwrap().iter().filter(|(_, o)| *o > 0).count();
    (emu.stats().aborts.load(Ordering::Relaxed), resumed_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_aborted_repeatedly_resumes_exactly() {
    for kind in [AbortKind::Unavailable, AbortKind::Internal, AbortKind::Unknown] {
        // Every ReadRows call dies after one response.
        let (aborts, resumed_at) =
            faulty_export_matches_clean_one(Faults { abort_after: Some(1), abort_with: kind, ..Default::default() })
                .await;
        assert!(aborts >= 4 * 6, "{kind:?}: every stream was aborted repeatedly ({aborts})");
        assert!(resumed_at >= 4 * 6, "{kind:?}: ReadRows re-opened at offsets ({resumed_at})");
    }
    let metrics = bq2sftp::metrics::global().render();
    for reason in ["unavailable", "internal", "unknown"] {
        assert!(metrics.contains(&format!("bq2sftp_read_retries_total{{reason=\"{reason}\"}}")), "{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_response_resume_exactly() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    let (_, _, clean) = bq_csv(&emu, "p.d.flat", &["--min-streams", "4"]).await;
    // The first 3 connections die 50 kB into the server's bytes: inside a response.
    let proxy = start_cutting_proxy(emu.local_addr(), 50_000, 3).await;
    let (out, url) = out_dir();
    let report = export(&[
        "--from",
        "bq://p.d.flat",
        "--to",
        &url,
        "--format",
        "csv",
        "--min-streams",
        "4",
        "--emulator",
        &proxy.addr.to_string(),
        "--retry-initial-backoff",
        "1ms",
        "--arrow-compression",
        "none",
    ])
    .await
    .expect("the export survives cut connections");
    assert!(proxy.cut.load(Ordering::Relaxed) >= 1, "a connection was cut");
    assert_eq!(report.rows, ROWS);
    assert_eq!(csv_rows(out.path()).1, clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_session_creation_is_retried() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    emu.set_faults(Faults { create_unavailable: 2, ..Default::default() });
    let (report, _, _) = bq_csv(&emu, "p.d.flat", &[]).await;
    assert_eq!(report.rows, ROWS);
    assert_eq!(emu.stats().sessions_created.load(Ordering::Relaxed), 1);

    // Bounded: with --read-retries 2 the second UNAVAILABLE is the end.
    emu.set_faults(Faults { create_unavailable: 100, ..Default::default() });
    let (_out, url) = out_dir();
    let host = emu.host_port();
    let err = export(&[
        "--from",
        "bq://p.d.flat",
        "--to",
        &url,
        "--emulator",
        &host,
        "--read-retries",
        "2",
        "--retry-initial-backoff",
        "1ms",
    ])
    .await
    .unwrap_err();
    assert!(err.to_string().contains("gave up after 2 attempts"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_larger_than_tonics_default_limit_are_read() {
    // One ~9 MB response (tonic refuses more than 4 MiB unless told otherwise).
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), "p.d.big", SyntheticOptions { rows: 40_000, flat: true, ..Default::default() });
    let emu = start_emulator(dir.path(), |c| c.response_rows = 40_000).await;
    let (report, _, rows) = bq_csv(&emu, "p.d.big", &["--max-streams", "1", "--arrow-compression", "none"]).await;
    assert_eq!((report.rows, rows.len()), (40_000, 40_000));
    assert_eq!(emu.stats().responses.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_export_resumed_reads_the_same_session_from_the_committed_offsets() {
    let dir = tables();
    let emu = start_emulator(dir.path(), |c| c.response_rows = 100).await;
    let (_, _, clean) = bq_csv(&emu, "p.d.flat", &["--min-streams", "3"]).await;
    let sessions_before = emu.stats().sessions_created.load(Ordering::Relaxed);
    // One abort and no retries: the first run fails 600 rows into its first stream (one stream
    // at a time), after committing some of its 100-row files.
    emu.set_faults(Faults { abort_after: Some(6), max_aborts: Some(1), ..Default::default() });
    let (out, url) = out_dir();
    let state = out.path().join("job.state.json");
    let host = emu.host_port();
    let args = [
        "--from",
        "bq://p.d.flat",
        "--to",
        &url,
        "--format",
        "csv",
        "--emulator",
        &host,
        "--min-streams",
        "3",
        "--max-file-rows",
        "100",
        "--read-retries",
        "1",
        "--concurrency",
        "1",
        "--threads",
        "1",
        "--state-file",
        state.to_str().unwrap(),
    ];
    let err = export(&args).await.unwrap_err();
    assert_eq!(err.exit_code(), 4, "{err}");
    let committed = files(out.path(), ".csv").len();
    assert!(committed > 0 && committed < 30, "{committed} files committed before the failure");
    let calls_before = emu.stats().read_offsets.lock().unwrap().len();
    export(&[&args[..], &["--resume"]].concat()).await.expect("the resumed run finishes");
    assert_eq!(
        emu.stats().sessions_created.load(Ordering::Relaxed),
        sessions_before + 1,
        "the saved session was reused"
    );
    let resumed_at: Vec<u64> =
        emu.stats().read_offsets.lock().unwrap()[calls_before..].iter().map(|(_, o)| *o).collect();
    assert!(resumed_at.iter().any(|o| *o > 0), "a stream restarted at its committed offset: {resumed_at:?}");
    let (_, rows) = csv_rows(out.path());
    assert_eq!(rows, clean, "every row exactly once across both runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_exhausted_is_retried_only_with_retry_info() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    emu.set_faults(Faults {
        resource_exhausted: 2,
        retry_delay: Some(Duration::from_millis(20)),
        ..Default::default()
    });
    let (report, _, _) = bq_csv(&emu, "p.d.flat", &["--min-streams", "2"]).await;
    assert_eq!(report.rows, ROWS);
    assert_eq!(emu.stats().resource_exhausted.load(Ordering::Relaxed), 4, "2 refusals per stream, then success");

    // Without RetryInfo it is a quota error: not retried (Google's clients agree).
    let dir = tables();
    let emu = emulator(dir.path()).await;
    emu.set_faults(Faults { resource_exhausted: 1, retry_delay: None, ..Default::default() });
    let (_out, url) = out_dir();
    let host = emu.host_port();
    let err = export(&["--from", "bq://p.d.flat", "--to", &url, "--emulator", &host]).await.unwrap_err();
    assert!(err.to_string().contains("ResourceExhausted"), "{err}");
    assert_eq!(err.exit_code(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_session_is_a_clear_error_with_exit_code_6() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    emu.set_faults(Faults { expire_after: Some(2), ..Default::default() });
    let out_dir = tempfile::tempdir().unwrap();
    let to = format!("dir://{}", out_dir.path().display());
    let out = common::run_clean(
        &["export", "--from", "bq://p.d.flat", "--to", &to, "--max-streams", "1"],
        &[("BIGQUERY_EMULATOR_HOST", &emu.host_port())],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("session expired") && stderr.contains("6 hours"), "{stderr}");
    assert!(common::files_in(out_dir.path()).iter().all(|f| !f.ends_with(".partial")), "no partial file left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_invalid_token_is_exit_code_3() {
    let dir = tables();
    let emu = start_emulator(dir.path(), |c| c.auth = AuthCheck::AnyBearer).await;
    // The emulator convention sends no credentials: this emulator wants some.
    let out = common::run_clean(
        &["export", "--from", "bq://p.d.flat", "--to", "null:"],
        &[("BIGQUERY_EMULATOR_HOST", &emu.host_port())],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("missing required authentication credential"), "{stderr}");

    // A token the server does not accept.
    let tmp = tempfile::tempdir().unwrap();
    let key = test_key(tmp.path());
    let tokens = start_token_server(
        &key.public_pem,
        Expect { iss: "sa@p.iam.gserviceaccount.com".into(), scope: SCOPE_BIGQUERY.into(), sub: None },
        3600,
    )
    .await;
    let picky =
        start_emulator(dir.path(), |c| c.auth = AuthCheck::Accept(std::sync::Arc::new(|t| t == "something-else")))
            .await;
    let key_file = tmp.path().join("key.json");
    std::fs::write(&key_file, service_account_json(&key, "sa@p.iam.gserviceaccount.com", &tokens.url)).unwrap();
    let endpoint = format!("http://{}", picky.host_port());
    let out = common::run_clean(
        &[
            "export",
            "--from",
            "bq://p.d.flat",
            "--to",
            "null:",
            "--credentials",
            key_file.to_str().unwrap(),
            "--storage-endpoint",
            &endpoint,
            "--bigquery-endpoint",
            &endpoint,
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("invalid authentication credentials"), "{stderr}");
    assert!(!stderr.contains("ya29."), "no token in the output: {stderr}");
    assert_eq!(tokens.issued_count(), 2, "one token, then one fresh token after UNAUTHENTICATED");
}

async fn service_account_export(
    subject: Option<&str>,
    expires_in: u64,
    via_env: bool,
) -> (TokenServer, EmulatorHandle) {
    let dir = tables();
    let tmp = tempfile::tempdir().unwrap();
    let key = test_key(tmp.path());
    let email = "exporter@p.iam.gserviceaccount.com";
    let scope = format!("{SCOPE_BIGQUERY} https://www.googleapis.com/auth/drive.readonly");
    let tokens = start_token_server(
        &key.public_pem,
        Expect { iss: email.into(), scope, sub: subject.map(str::to_string) },
        expires_in,
    )
    .await;
    let emu = start_emulator(dir.path(), |c| {
        c.auth = tokens.acceptor();
        c.response_rows = 500;
    })
    .await;
    let json = service_account_json(&key, email, &tokens.url);
    let key_file = tmp.path().join("key.json");
    std::fs::write(&key_file, &json).unwrap();
    let endpoint = format!("http://{}", emu.host_port());
    let (out, url) = out_dir();
    let mut args = vec![
        "export",
        "--from",
        "bq://p.d.flat",
        "--to",
        &url,
        "--min-streams",
        "3",
        "--drive-scope",
        "--storage-endpoint",
        &endpoint,
        "--bigquery-endpoint",
        &endpoint,
    ];
    if let Some(s) = subject {
        args.extend(["--impersonate-subject", s]);
    }
    let b64;
    let env: Vec<(&str, &str)> = if via_env {
        use base64::Engine;
        b64 = base64::engine::general_purpose::STANDARD.encode(&json);
        args.extend(["--credentials-base64-env", "SERVICE_ACCOUNT_KEY"]);
        vec![("SERVICE_ACCOUNT_KEY", b64.as_str())]
    } else {
        args.extend(["--credentials", key_file.to_str().unwrap()]);
        vec![]
    };
    let result = common::run_clean(&args, &env).await;
    assert_eq!(result.status.code(), Some(0), "{}", String::from_utf8_lossy(&result.stderr));
    assert_eq!(csv_rows(out.path()).1.len(), ROWS as usize);
    assert_eq!(tokens.refused.load(Ordering::Relaxed), 0, "every JWT verified");
    (tokens, emu)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_jwt_is_verified_and_the_token_cached() {
    // Tokens live an hour: one token serves the session and all streams.
    let (tokens, emu) = service_account_export(None, 3600, false).await;
    assert_eq!(tokens.issued_count(), 1);
    assert_eq!(tokens_seen(&emu).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_before_they_expire_with_delegation_and_a_base64_key() {
    // 60 s of lifetime is inside the refresh margin: every call gets a fresh token, and the
    // emulator only accepts tokens the endpoint issued after verifying the JWT (with `sub`).
    let (tokens, emu) = service_account_export(Some("analyst@example.com"), 60, true).await;
    assert!(tokens.issued_count() >= 4, "session + 3 streams: {}", tokens.issued_count());
    assert!(tokens_seen(&emu).len() >= 4, "the refreshed tokens were used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_impersonation_through_iam_credentials() {
    let dir = tables();
    let tmp = tempfile::tempdir().unwrap();
    let key = test_key(tmp.path());
    let source = "deployer@p.iam.gserviceaccount.com";
    let target = "exporter@p.iam.gserviceaccount.com";
    // The source credentials get a cloud-platform token; IAM turns it into the target's token
    // with the BigQuery scope; only that token opens the emulator.
    let cloud_platform = "https://www.googleapis.com/auth/cloud-platform";
    let tokens = start_token_server(
        &key.public_pem,
        Expect { iss: source.into(), scope: cloud_platform.into(), sub: None },
        3600,
    )
    .await;
    let iam = start_iam_server(target, tokens.issued.clone(), vec![SCOPE_BIGQUERY.to_string()]).await;
    let emu = start_emulator(dir.path(), |c| c.auth = iam.acceptor()).await;
    let key_file = tmp.path().join("key.json");
    std::fs::write(&key_file, service_account_json(&key, source, &tokens.url)).unwrap();
    let endpoint = format!("http://{}", emu.host_port());
    let out = common::run_clean(
        &[
            "export",
            "--from",
            "bq://p.d.flat",
            "--to",
            "null:",
            "--credentials",
            key_file.to_str().unwrap(),
            "--impersonate-service-account",
            target,
            "--iam-endpoint",
            &iam.url,
            "--storage-endpoint",
            &endpoint,
            "--bigquery-endpoint",
            &endpoint,
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((tokens.issued_count(), iam.issued.lock().unwrap().len()), (1, 1));
    assert_eq!(iam.refused.load(Ordering::Relaxed), 0);
    assert!(tokens_seen(&emu).iter().all(|t| t.starts_with("ya29.impersonated-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_server_credentials() {
    let dir = tables();
    let meta = start_metadata_server().await;
    let emu = start_emulator(dir.path(), |c| c.auth = meta.acceptor()).await;
    let endpoint = format!("http://{}", emu.host_port());
    // Application Default Credentials: no GOOGLE_APPLICATION_CREDENTIALS, no gcloud file, so
    // the metadata server named by GCE_METADATA_HOST.
    let out = common::run_clean(
        &[
            "export",
            "--from",
            "bq://p.d.flat",
            "--to",
            "null:",
            "--storage-endpoint",
            &endpoint,
            "--bigquery-endpoint",
            &endpoint,
        ],
        &[("GCE_METADATA_HOST", &meta.host)],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(meta.refused.load(Ordering::Relaxed), 0, "Metadata-Flavor: Google was sent");
    assert_eq!(meta.issued.lock().unwrap().len(), 1);
    assert_eq!(meta.scopes.lock().unwrap()[0], SCOPE_BIGQUERY);

    // No credentials anywhere: a clear error naming what was tried, exit code 3.
    let out = common::run_clean(
        &[
            "export",
            "--from",
            "bq://p.d.flat",
            "--to",
            "null:",
            "--storage-endpoint",
            &endpoint,
            "--bigquery-endpoint",
            &endpoint,
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("no Google credentials found") && stderr.contains("GOOGLE_APPLICATION_CREDENTIALS"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_mode_end_to_end() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    let host = emu.host_port();
    let (out, url) = out_dir();
    let sql = "SELECT id, string_col FROM `p.d.flat` WHERE id < 100";
    let report = export(&["--query", sql, "--project", "p", "--to", &url, "--emulator", &host]).await.unwrap();
    assert_eq!(report.rows, 100);
    let (header, rows) = csv_rows(out.path());
    assert_eq!(header, ["id", "string_col"]);
    let mut ids: Vec<u64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
    assert!(report.source.contains("query job"), "{}", report.source);
    assert_eq!(emu.stats().jobs_inserted.load(Ordering::Relaxed), 1);

    // A failing query: BigQuery's message, exit code 2 (the SQL must change).
    let (_out, url) = out_dir();
    let err = export(&["--query", "SELECT nope FROM p.d.flat", "--project", "p", "--to", &url, "--emulator", &host])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Field nope does not exist") || err.to_string().contains("nope"), "{err}");
    assert_eq!(err.exit_code(), 2);
    let err = export(&["--query", "SELECT * FROM p.d.missing", "--project", "p", "--to", &url, "--emulator", &host])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Not found: Table p:d.missing"), "{err}");
    // A script has no destination table.
    let err = export(&["--query", "SELECT 1; SELECT 2", "--project", "p", "--to", &url, "--emulator", &host])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no destination table"), "{err}");
    assert_eq!(err.exit_code(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_only_prints_the_plan_and_reads_nothing() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    let host = emu.host_port();
    let out = common::run_clean(
        &["export", "--from", "bq://p.d.t", "--to", "null:", "--plan-only", "--min-streams", "2"],
        &[("BIGQUERY_EMULATOR_HOST", &host)],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("estimated rows: 3000"), "{stdout}");
    assert!(stdout.contains("timestamp_col TIMESTAMP NULLABLE") && stdout.contains("id INT64 REQUIRED"), "{stdout}");
    assert!(stdout.contains("streams: 2"), "{stdout}");
    assert_eq!(emu.stats().read_rows_calls.load(Ordering::Relaxed), 0, "nothing read");

    let out = common::run_clean(
        &["export", "--query", "SELECT id FROM p.d.t", "--project", "p", "--to", "null:", "--plan-only"],
        &[("BIGQUERY_EMULATOR_HOST", &host)],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("bytes processed") && stdout.contains("id INTEGER REQUIRED"), "{stdout}");
    assert_eq!(emu.stats().jobs_inserted.load(Ordering::Relaxed), 0, "a dry run creates no job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_and_columns_are_usage_errors() {
    let dir = tables();
    let emu = emulator(dir.path()).await;
    let host = emu.host_port();
    for (flag, value, needle) in [
        ("--where", "id = 'x'", "No matching signature for operator ="),
        ("--where", "LOWER(string_col) = 'a'", "Function not found"),
        ("--columns", "nope", "nope"),
    ] {
        let err =
            export(&["--from", "bq://p.d.flat", "--to", "null:", "--emulator", &host, flag, value]).await.unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
        assert_eq!(err.exit_code(), 2, "{err}");
    }
    let err = export(&["--from", "bq://p.d.nope", "--to", "null:", "--emulator", &host]).await.unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    assert_eq!(err.exit_code(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_process_serves_what_the_reader_exports_exactly_also_with_faults() {
    let dir = tables();
    for faults in [&[][..], &["--fault-abort-after", "2", "--fault-abort-with", "internal"][..]] {
        let mut cmd = tokio::process::Command::new(common::bin());
        cmd.args(["emulator", "--tables", dir.path().to_str().unwrap(), "--port", "0", "--response-rows", "300"])
            .args(faults)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
        let host = loop {
            let line = lines.next_line().await.unwrap().expect("the emulator prints where it listens");
            if let Some(rest) = line.split("BIGQUERY_EMULATOR_HOST=").nth(1) {
                break rest.trim().to_string();
            }
        };
        let out = tempfile::tempdir().unwrap();
        let to = format!("dir://{}", out.path().display());
        let run = common::run_clean(
            &["export", "--from", "bq://p.d.flat", "--to", &to, "--format", "csv", "--retry-initial-backoff", "1ms"],
            &[("BIGQUERY_EMULATOR_HOST", &host)],
        )
        .await;
        assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));
        let (pq_out, pq_url) = out_dir();
        let src = format!("parquet://{}/p.d.flat.parquet", dir.path().display());
        export(&["--from", &src, "--to", &pq_url]).await.unwrap();
        assert_eq!(csv_rows(out.path()), csv_rows(pq_out.path()), "faults {faults:?}");
        child.kill().await.unwrap();
    }
}
