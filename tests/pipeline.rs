//! Pipeline tests through the library: exact rows across many streams and rolled files,
//! manifest hashes equal the files' bytes, compression is transparent, failures and
//! cancellation leave no partial file and no manifest, empty tables give one header-only file.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arrow_array::RecordBatch;
use bq2sftp::read::synthetic::{SyntheticOptions, SyntheticSource};
use bq2sftp::read::{BatchStream, ReadError, ReadPlan, Source, StreamSpec};
use bq2sftp::write::dir::{DirOptions, DirSink};
use bq2sftp::{Error, Progress};
use common::*;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

fn to(dir: &Path) -> String {
    format!("dir://{}", dir.display())
}

/// Every `id` in the CSV files of `dir`, checking each file's row count against the manifest.
fn csv_ids(dir: &Path) -> Vec<u64> {
    let m = assert_manifest_matches(dir);
    let mut ids = Vec::new();
    for f in &m.files {
        let records = csv_records(&decompressed(&dir.join(&f.name)));
        assert_eq!(records.len() as u64, f.rows, "{}", f.name);
        ids.extend(records.iter().map(|r| r[0].parse::<u64>().unwrap()));
    }
    ids
}

fn assert_each_id_once(mut ids: Vec<u64>, rows: u64) {
    ids.sort_unstable();
    assert_eq!(ids.len() as u64, rows, "row count");
    assert!(ids.iter().copied().eq(0..rows), "every row exactly once");
}

#[tokio::test]
async fn many_streams_and_rolled_files_keep_every_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(&[
        "--from",
        "synthetic://?rows=60000&streams=7&flat=true&batch_rows=1500",
        "--to",
        &to(tmp.path()),
        "--compression",
        "gzip",
        "--max-file-rows",
        "4000",
        "--chunk-rows",
        "1000",
    ]);
    let report = bq2sftp::run(&job).await.unwrap();
    assert_eq!(report.rows, 60_000);
    let m = manifest(tmp.path());
    assert!(m.files.iter().all(|f| f.rows <= 4000 && f.name.ends_with(".csv.gz")));
    // 60000/7 rows per stream at 4000 per file: each stream rolls into 3 files.
    assert_eq!(m.files.len(), 21);
    assert_eq!(m.files.iter().map(|f| (f.stream, f.seq)).collect::<BTreeSet<_>>().len(), 21);
    assert_each_id_once(csv_ids(tmp.path()), 60_000);
}

#[tokio::test]
async fn files_roll_by_size_and_each_starts_with_the_header() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(&[
        "--from",
        "synthetic://?rows=20000&streams=2&flat=true",
        "--to",
        &to(tmp.path()),
        "--max-file-bytes",
        "300KB",
    ]);
    bq2sftp::run(&job).await.unwrap();
    let m = manifest(tmp.path());
    assert!(m.files.len() > 10, "{} files", m.files.len());
    for f in &m.files {
        assert!(f.bytes <= 300_000, "{} is {} bytes", f.name, f.bytes);
        let text = std::fs::read(tmp.path().join(&f.name)).unwrap();
        assert!(text.starts_with(b"id,int64_col,"), "{} has a header", f.name);
    }
    assert_each_id_once(csv_ids(tmp.path()), 20_000);
}

#[tokio::test]
async fn gzip_and_zstd_decompress_to_the_uncompressed_output() {
    let outputs: Vec<_> = futures::future::join_all(["none", "gzip", "zstd"].map(|codec| async move {
        let tmp = tempfile::tempdir().unwrap();
        let job = job(&[
            "--from",
            "synthetic://?rows=30000&streams=3&flat=true",
            "--to",
            &to(tmp.path()),
            "--compression",
            codec,
            "--chunk-rows",
            "2000",
            "--name-template",
            "part-{stream}{ext}",
        ]);
        bq2sftp::run(&job).await.unwrap();
        assert_manifest_matches(tmp.path());
        (0..3)
            .map(|s| {
                let name = std::fs::read_dir(tmp.path())
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("part-{s}.")))
                    .unwrap();
                decompressed(&name)
            })
            .collect::<Vec<_>>()
    }))
    .await;
    assert_eq!(outputs[0], outputs[1], "gzip");
    assert_eq!(outputs[0], outputs[2], "zstd");
    assert_eq!(csv_records(&outputs[0][0]).len(), 10_000);
}

#[tokio::test]
async fn single_file_mode_writes_one_file_with_every_row() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(&[
        "--from",
        "synthetic://?rows=30000&streams=4&flat=true",
        "--to",
        &to(tmp.path()),
        "--file-mode",
        "single",
        "--compression",
        "zstd",
    ]);
    bq2sftp::run(&job).await.unwrap();
    let m = manifest(tmp.path());
    assert_eq!(m.files.len(), 1);
    assert_eq!(m.files[0].name, "synthetic-000-00000.csv.zst");
    assert_each_id_once(csv_ids(tmp.path()), 30_000);
}

#[tokio::test]
async fn an_empty_table_gives_one_header_only_file() {
    for (format, check) in [("csv", "header"), ("ndjson", "empty"), ("parquet", "parquet")] {
        let tmp = tempfile::tempdir().unwrap();
        let job = job(&["--from", "synthetic://?rows=0&flat=true", "--to", &to(tmp.path()), "--format", format]);
        let report = bq2sftp::run(&job).await.unwrap();
        assert_eq!(report.rows, 0);
        let m = assert_manifest_matches(tmp.path());
        assert_eq!(m.files.len(), 1, "{format}");
        let bytes = std::fs::read(tmp.path().join(&m.files[0].name)).unwrap();
        match check {
            "header" => assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1),
            "empty" => assert!(bytes.is_empty()),
            _ => {
                let r =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
                        .unwrap();
                assert_eq!(r.metadata().file_metadata().num_rows(), 0);
                assert_eq!(r.schema().fields().len(), 14);
            }
        }
    }
}

#[tokio::test]
async fn parquet_files_roll_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job(&[
        "--from",
        "synthetic://?rows=25000&streams=2&batch_rows=3000",
        "--to",
        &to(tmp.path()),
        "--format",
        "parquet",
        "--max-file-rows",
        "5000",
    ]);
    bq2sftp::run(&job).await.unwrap();
    let m = assert_manifest_matches(tmp.path());
    let mut ids = Vec::new();
    for f in &m.files {
        assert!(f.name.ends_with(".parquet"));
        let bytes = bytes::Bytes::from(std::fs::read(tmp.path().join(&f.name)).unwrap());
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
        let mut rows = 0;
        for b in reader {
            let b = b.unwrap();
            rows += b.num_rows() as u64;
            let col = b.column(0).as_any().downcast_ref::<arrow_array::Int64Array>().unwrap();
            ids.extend(col.values().iter().map(|v| *v as u64));
        }
        assert_eq!(rows, f.rows);
        assert!(rows <= 5000);
    }
    assert_each_id_once(ids, 25_000);
}

#[tokio::test]
async fn parquet_source_exports_the_same_rows_as_its_origin() {
    let tmp = tempfile::tempdir().unwrap();
    // A Parquet table in two files of several row groups each.
    let src = SyntheticSource::new(SyntheticOptions { flat: true, ..Default::default() });
    let table = tmp.path().join("table");
    std::fs::create_dir(&table).unwrap();
    for (i, range) in [(0u64, 7000usize), (7000, 5000)].iter().enumerate() {
        let file = std::fs::File::create(table.join(format!("part{i}.parquet"))).unwrap();
        let props =
            parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(2000)).build();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, src.batch(0, 1).schema(), Some(props)).unwrap();
        w.write(&src.batch(range.0, range.1)).unwrap();
        w.close().unwrap();
    }
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let single = ["--file-mode", "single", "--concurrency", "1"];
    let from_parquet = format!("parquet://{}", table.display());
    bq2sftp::run(&job(&[
        &["--from", from_parquet.as_str(), "--to", &to(&a), "--name-template", "out{ext}"][..],
        &single[..],
    ]
    .concat()))
    .await
    .unwrap();
    bq2sftp::run(&job(&[
        &["--from", "synthetic://?rows=12000&flat=true", "--to", &to(&b), "--name-template", "out{ext}"][..],
        &single[..],
    ]
    .concat()))
    .await
    .unwrap();
    let (x, y) = (std::fs::read(a.join("out.csv")).unwrap(), std::fs::read(b.join("out.csv")).unwrap());
    assert_eq!(csv_records(&x).len(), 12_000);
    assert!(x == y, "CSV from the Parquet copy equals CSV from the generator");
}

/// A source whose stream `bad` fails after `good_batches` batches; other streams are fine.
struct FlakySource {
    inner: Arc<SyntheticSource>,
    bad: usize,
    good_batches: usize,
    delay: Duration,
}

#[async_trait::async_trait]
impl Source for FlakySource {
    async fn plan(&self) -> Result<ReadPlan, ReadError> {
        self.inner.plan().await
    }
    fn read(self: Arc<Self>, plan: &ReadPlan, stream: &StreamSpec, offset: u64) -> BatchStream {
        let fail = stream.index == self.bad;
        let good = self.good_batches;
        let delay = self.delay;
        let seen = Arc::new(AtomicUsize::new(0));
        let name = stream.name.clone();
        self.inner
            .clone()
            .read(plan, stream, offset)
            .then(move |item: Result<RecordBatch, ReadError>| {
                let seen = seen.clone();
                let name = name.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    if fail && seen.fetch_add(1, Ordering::SeqCst) >= good {
                        return Err(ReadError::Stream {
                            source_name: "flaky".into(),
                            stream: name,
                            message: "connection reset".into(),
                        });
                    }
                    item
                }
            })
            .boxed()
    }
}

fn dir_sink(path: &Path) -> Arc<dyn bq2sftp::write::Sink> {
    Arc::new(DirSink::new(DirOptions { path: path.to_path_buf() }, Default::default()))
}

#[tokio::test]
async fn a_failing_stream_leaves_no_partial_and_no_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = Arc::new(SyntheticSource::new(SyntheticOptions {
        rows: 40_000,
        streams: 4,
        flat: true,
        batch_rows: 1000,
        ..Default::default()
    }));
    let source = Arc::new(FlakySource { inner, bad: 2, good_batches: 3, delay: Duration::ZERO });
    let mut opts = job(&["--from", "synthetic://", "--to", "null:", "--max-file-rows", "2000"]).pipeline;
    opts.chunk_rows = 500;
    let err = bq2sftp::pipeline::run(
        source,
        dir_sink(tmp.path()),
        opts,
        CancellationToken::new(),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(&err, Error::Read(_)), "{err:?}");
    assert_eq!(err.exit_code(), bq2sftp::exit::SOURCE);
    assert!(err.to_string().contains("connection reset"), "{err}");
    let names = files_in(tmp.path());
    assert!(!names.iter().any(|n| n.ends_with(".partial")), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with('_')), "no manifest after a failure: {names:?}");
    // Whatever was committed is whole: every file parses and holds complete rolls.
    for n in &names {
        let records = csv_records(&std::fs::read(tmp.path().join(n)).unwrap());
        assert_eq!(records.len(), 2000, "{n}");
    }
}

#[tokio::test]
async fn cancellation_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = Arc::new(SyntheticSource::new(SyntheticOptions {
        rows: 1_000_000,
        streams: 2,
        flat: true,
        batch_rows: 500,
        ..Default::default()
    }));
    let source = Arc::new(FlakySource { inner, bad: usize::MAX, good_batches: 0, delay: Duration::from_millis(5) });
    let opts = job(&["--from", "synthetic://", "--to", "null:"]).pipeline;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        trigger.cancel();
    });
    let err = bq2sftp::pipeline::run(source, dir_sink(tmp.path()), opts, cancel, Arc::new(Progress::default()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Interrupted(_)), "{err:?}");
    assert_eq!(err.exit_code(), bq2sftp::exit::RESUMABLE);
    assert_eq!(files_in(tmp.path()), Vec::<String>::new(), "the open files were removed");
}

#[tokio::test]
async fn existing_output_is_refused_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--from", "synthetic://?rows=1000&flat=true", "--to", &to(tmp.path())];
    bq2sftp::run(&job(&args)).await.unwrap();
    let before = std::fs::read(tmp.path().join("_MANIFEST.json")).unwrap();
    let err = bq2sftp::run(&job(&args)).await.unwrap_err();
    assert!(err.to_string().contains("already exists") && err.to_string().contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(tmp.path().join("_MANIFEST.json")).unwrap(), before, "nothing was touched");
    bq2sftp::run(&job(&[&args[..], &["--overwrite"]].concat())).await.unwrap();
    assert_manifest_matches(tmp.path());
}

#[tokio::test]
async fn resume_after_a_failure_keeps_committed_files_and_writes_every_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let state = tmp.path().join("state.json");
    let args = [
        "--from",
        "synthetic://?rows=40000&streams=4&flat=true&batch_rows=1000",
        "--to",
        &to(&out),
        "--max-file-rows",
        "2000",
        "--chunk-rows",
        "500",
        "--compression",
        "gzip",
        "--state-file",
        state.to_str().unwrap(),
    ];
    // First run: stream 2 breaks after 5 of its 10 batches.
    let first = job(&args);
    let inner = Arc::new(SyntheticSource::new(SyntheticOptions {
        rows: 40_000,
        streams: 4,
        flat: true,
        batch_rows: 1000,
        ..Default::default()
    }));
    let flaky = Arc::new(FlakySource { inner, bad: 2, good_batches: 5, delay: Duration::ZERO });
    let sink = dir_sink(&out);
    let err = bq2sftp::pipeline::run(
        flaky,
        sink,
        first.pipeline.clone(),
        CancellationToken::new(),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Read(_)), "{err:?}");
    let saved: bq2sftp::state::JobState = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let committed_before: Vec<(String, String)> =
        saved.lanes.values().flat_map(|l| l.files.iter().map(|f| (f.name.clone(), f.sha256.clone()))).collect();
    // Stream 2 stopped part way: what it committed is whole files of 2000 rows.
    let broken = saved.lanes.get(&2).cloned().unwrap_or_default();
    assert!(!broken.done && broken.rows % 2000 == 0 && broken.rows < 10_000, "{broken:?}");
    assert!(!committed_before.is_empty());

    // Without --resume the leftovers are refused rather than mixed up with a new run.
    let err = bq2sftp::run(&job(&args)).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // With --resume: the healthy source finishes the job.
    let report = bq2sftp::run(&job(&[&args[..], &["--resume"]].concat())).await.unwrap();
    assert_eq!(report.rows, 40_000);
    assert!(!state.exists(), "the state file is removed once the job is done");
    for (name, sha) in committed_before {
        let f = report.files.iter().find(|f| f.name == name).unwrap();
        assert_eq!(f.sha256, sha, "{name} was kept as committed");
    }
    assert_each_id_once(csv_ids(&out), 40_000);
    assert!(files_in(&out).iter().all(|n| !n.ends_with(".partial")));
}

#[tokio::test]
async fn resume_refuses_a_state_file_of_another_job() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state.json");
    let a = ["--from", "synthetic://?rows=100&flat=true", "--to", "null:", "--state-file", state.to_str().unwrap()];
    // Leave a state file behind as an interrupted run would.
    let plan = SyntheticSource::new(SyntheticOptions::default()).plan().await.unwrap();
    let job_a = job(&a);
    let fp = job_a.pipeline.state.as_ref().unwrap().fingerprint.clone();
    bq2sftp::state::StateStore::new(state.clone(), bq2sftp::state::JobState::new(fp, "then".into(), &plan))
        .save()
        .unwrap();
    let b = [
        "--from",
        "synthetic://?rows=999&flat=true",
        "--to",
        "null:",
        "--state-file",
        state.to_str().unwrap(),
        "--resume",
    ];
    let err = bq2sftp::run(&job(&b)).await.unwrap_err();
    assert!(err.to_string().contains("belongs to a different job"), "{err}");
    assert_eq!(err.exit_code(), bq2sftp::exit::USAGE);
}
