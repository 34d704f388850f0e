//! Observability as the on-call person uses it: metrics scraped while a job runs, the final push
//! to a real Pushgateway (success and failure), the node_exporter textfile, JSON logs with
//! Cloud Logging's fields, and the summary line.

mod common;

use std::time::{Duration, Instant};

use common::pushgateway::Pushgateway;
use common::*;

fn to(dir: &std::path::Path) -> String {
    format!("dir://{}", dir.display())
}

#[tokio::test]
async fn metrics_can_be_scraped_mid_transfer() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(bin())
        .args([
            "export",
            "--from",
            "synthetic://?rows=20000000&streams=2&flat=true",
            "--to",
            "null:",
            "--compression",
            "gzip",
            "--no-state",
        ])
        .args(["--metrics-addr", &addr])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        assert!(child.try_wait().unwrap().is_none(), "the job ended before it was scraped");
        assert!(Instant::now() < deadline, "no metrics in time");
        if let Ok(r) = reqwest::get(format!("http://{addr}/metrics")).await
            && let Ok(text) = r.text().await
            && sample(&text, "bq2sftp_uploaded_bytes_total", &[("sink", "null")]).unwrap_or(0.0) > 0.0
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(sample(&text, "bq2sftp_rows_read_total", &[]).unwrap() > 0.0);
    assert!(sample(&text, "bq2sftp_batches_read_total", &[]).unwrap() > 0.0);
    assert!(sample(&text, "bq2sftp_encoded_bytes_total", &[("format", "csv")]).unwrap() > 0.0);
    assert!(sample(&text, "bq2sftp_compressed_bytes_total", &[("codec", "gzip")]).unwrap() > 0.0);
    assert_eq!(sample(&text, "bq2sftp_read_streams_active", &[]), Some(2.0), "both streams are being read");
    for stage in ["batches", "encoding", "upload"] {
        assert!(sample(&text, "bq2sftp_queue_depth", &[("stage", stage)]).is_some(), "{stage}");
    }
}

#[tokio::test]
async fn the_final_push_reaches_a_real_pushgateway_on_success_and_failure() {
    let gw = Pushgateway::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&[
        "export",
        "--from",
        "synthetic://?rows=5000&streams=2&flat=true",
        "--to",
        &to(tmp.path()),
        "--pushgateway",
        &gw.url,
        "--pushgateway-job",
        "nightly-orders",
        "--pushgateway-instance",
        "runner-1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = gw.scrape().await;
    let group = [("job", "nightly-orders"), ("instance", "runner-1")];
    assert_eq!(sample(&text, "bq2sftp_rows_read_total", &group), Some(5000.0), "{text}");
    assert_eq!(sample(&text, "bq2sftp_job_exit_code", &group), Some(0.0));
    assert_eq!(sample(&text, "bq2sftp_jobs_total", &[("job", "nightly-orders"), ("outcome", "success")]), Some(1.0));
    assert_eq!(
        sample(&text, "bq2sftp_files_committed_total", &[("job", "nightly-orders"), ("sink", "dir")]),
        Some(2.0),
        "the data files"
    );
    assert!(sample(&text, "bq2sftp_last_success_timestamp_seconds", &group).unwrap() > 1.7e9);

    // A failed job pushes too, with its exit code; the push replaces the group.
    let missing = tmp.path().join("missing");
    let out = run(&[
        "export",
        "--from",
        "synthetic://?rows=10&flat=true",
        "--to",
        &to(&missing),
        "--pushgateway",
        &gw.url,
        "--pushgateway-job",
        "nightly-orders",
        "--pushgateway-instance",
        "runner-1",
    ]);
    assert_eq!(out.status.code(), Some(5));
    let text = gw.scrape().await;
    assert_eq!(sample(&text, "bq2sftp_job_exit_code", &group), Some(5.0), "{text}");
    assert_eq!(sample(&text, "bq2sftp_jobs_total", &[("job", "nightly-orders"), ("outcome", "failure")]), Some(1.0));
}

#[tokio::test]
async fn an_unreachable_pushgateway_does_not_fail_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port());
    let out =
        run(&["export", "--from", "synthetic://?rows=10&flat=true", "--to", &to(tmp.path()), "--pushgateway", &url]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pushgateway") && err.contains("the job itself is not affected"), "{err}");
}

#[test]
fn the_textfile_is_written_atomically_for_node_exporter() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let prom = tmp.path().join("bq2sftp.prom");
    let out = run(&[
        "export",
        "--from",
        "synthetic://?rows=700&flat=true",
        "--to",
        &to(&out_dir),
        "--metrics-textfile",
        prom.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let text = std::fs::read_to_string(&prom).unwrap();
    assert_eq!(sample(&text, "bq2sftp_rows_read_total", &[]), Some(700.0));
    assert_eq!(sample(&text, "bq2sftp_job_exit_code", &[]), Some(0.0));
    assert_eq!(files_in(tmp.path()), ["bq2sftp.prom", "out"], "no temporary file left");
}

#[test]
fn json_logs_use_cloud_logging_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "--log-format",
            "json",
            "-v",
            "export",
            "--from",
            "synthetic://?rows=100&flat=true",
            "--to",
            &to(tmp.path()),
            "--no-state",
        ])
        .env_remove("BQ2SFTP_LOG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> =
        stderr.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(lines.len() >= 3, "{stderr}");
    for l in &lines {
        assert!(l["severity"].is_string() && l["message"].is_string() && l["timestamp"].is_string(), "{l}");
    }
    let last = lines.last().unwrap();
    assert!(last["message"].as_str().unwrap().starts_with("exported 100 rows"), "{last}");
    assert_eq!(last["rows"], 100);
    assert!(lines.iter().any(|l| l["message"] == "file committed" && l["rows"] == 100), "{stderr}");
    // Errors are JSON too, with the exit code.
    let out = run(&["--log-format", "json", "export", "--from", "synthetic://?rows=1", "--to", "dir:///nonexistent/x"]);
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stderr).lines().last().unwrap()).unwrap();
    assert_eq!(last["severity"], "ERROR");
    assert_eq!(last["exit_code"], 5);
}
