//! Prometheus metrics: one registry for the process, and the three ways batch jobs hand metrics
//! out: a `/metrics` endpoint while the job runs (`--metrics-addr`), one push to a Pushgateway
//! when it ends, success or failure (`--pushgateway`), and a node_exporter textfile written
//! atomically (`--metrics-textfile`).
//!
//! Metrics are only touched through the events in [`events`]: each event logs and counts in
//! one place (Vector's `internal_events` pattern), so a log line and its counter never drift
//! apart. Label sets are small and bounded (format, codec, sink kind, retry reason, stage):
//! never a file name, a stream index or anything else that grows with the data.
//!
//! The `prometheus` crate is used without its `push` feature, which would bring a second,
//! blocking HTTP client: the text exposition is pushed with reqwest instead.

pub mod events;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus::{Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// One job's counters, for its summary line and progress display. The process-wide
/// Prometheus metrics add up every job; these start at zero for each.
#[derive(Debug, Default)]
pub struct Progress {
    /// The source's row estimate, once the plan is made (0 when unknown).
    pub estimated_rows: AtomicU64,
    pub rows_read: AtomicU64,
    pub encoded_bytes: AtomicU64,
    pub committed_bytes: AtomicU64,
    pub committed_files: AtomicU64,
}

/// Every metric bq2sftp exports.
pub struct Metrics {
    pub registry: Registry,
    pub rows_read: IntCounter,
    pub read_bytes: IntCounter,
    pub batches_read: IntCounter,
    pub read_streams_active: IntGauge,
    pub read_retries: IntCounterVec,
    pub read_throttle_percent: Gauge,
    pub encoder_input_bytes: IntCounterVec,
    pub encoded_bytes: IntCounterVec,
    pub compressed_bytes: IntCounterVec,
    pub uploaded_bytes: IntCounterVec,
    pub upload_retries: IntCounterVec,
    pub reconnects: IntCounterVec,
    pub files_committed: IntCounterVec,
    pub resumed_files: IntCounter,
    pub resumed_bytes: IntCounter,
    pub queue_depth: IntGaugeVec,
    pub job_duration_seconds: Gauge,
    pub job_exit_code: IntGauge,
    pub jobs: IntCounterVec,
    pub last_success_timestamp_seconds: Gauge,
}

fn name(n: &str, help: &str) -> Opts {
    Opts::new(format!("bq2sftp_{n}"), help)
}

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        Ok(Metrics {
            rows_read: reg!(IntCounter::with_opts(name("rows_read_total", "Rows read from the source"))?),
            read_bytes: reg!(IntCounter::with_opts(name(
                "read_bytes_total",
                "Arrow bytes read from the source (in memory)"
            ))?),
            batches_read: reg!(IntCounter::with_opts(name(
                "batches_read_total",
                "Record batches read from the source"
            ))?),
            read_streams_active: reg!(IntGauge::with_opts(name(
                "read_streams_active",
                "Source streams being read now"
            ))?),
            read_retries: reg!(IntCounterVec::new(
                name("read_retries_total", "Source stream reads retried, by reason"),
                &["reason"]
            )?),
            read_throttle_percent: reg!(Gauge::with_opts(name(
                "read_throttle_percent",
                "Server-side read throttling reported by BigQuery (0-100)"
            ))?),
            encoder_input_bytes: reg!(IntCounterVec::new(
                name("encoder_input_bytes_total", "Arrow bytes handed to the encoder"),
                &["format"]
            )?),
            encoded_bytes: reg!(IntCounterVec::new(
                name("encoded_bytes_total", "Bytes the encoder produced (compressor input)"),
                &["format"]
            )?),
            compressed_bytes: reg!(IntCounterVec::new(
                name("compressed_bytes_total", "Bytes the compressor produced"),
                &["codec"]
            )?),
            uploaded_bytes: reg!(IntCounterVec::new(
                name("uploaded_bytes_total", "Bytes handed to the target"),
                &["sink"]
            )?),
            upload_retries: reg!(IntCounterVec::new(
                name("upload_retries_total", "Upload operations retried"),
                &["sink"]
            )?),
            reconnects: reg!(IntCounterVec::new(
                name("reconnects_total", "Connections to the target re-established"),
                &["sink"]
            )?),
            files_committed: reg!(IntCounterVec::new(
                name("files_committed_total", "Files published under their final name"),
                &["sink"]
            )?),
            resumed_files: reg!(IntCounter::with_opts(name(
                "resumed_files_total",
                "Files kept from an interrupted run"
            ))?),
            resumed_bytes: reg!(IntCounter::with_opts(name(
                "resumed_bytes_total",
                "Bytes kept from an interrupted run (files or partial uploads)"
            ))?),
            queue_depth: reg!(IntGaugeVec::new(
                name(
                    "queue_depth",
                    "Items waiting between pipeline stages; the fullest queue sits before the bottleneck"
                ),
                &["stage"]
            )?),
            job_duration_seconds: reg!(Gauge::with_opts(name("job_duration_seconds", "Duration of the last job"))?),
            job_exit_code: reg!(IntGauge::with_opts(name(
                "job_exit_code",
                "Exit code of the last job (0 success; see the README)"
            ))?),
            jobs: reg!(IntCounterVec::new(name("jobs_total", "Jobs finished, by outcome"), &["outcome"])?),
            last_success_timestamp_seconds: reg!(Gauge::with_opts(name(
                "last_success_timestamp_seconds",
                "Unix time of the last successful job"
            ))?),
            registry,
        })
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O, and our metric names are valid.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().expect("metric definitions are valid and registered once"))
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    #[error("--metrics-addr {addr}: cannot listen: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("pushgateway {url}: {message}; the job itself is not affected")]
    Push { url: String, message: String },
    #[error("--metrics-textfile {path}: {source}")]
    Textfile { path: String, source: std::io::Error },
}

/// Serves `GET /metrics` on `addr` until the returned task is aborted. Returns the bound address.
pub async fn serve(addr: SocketAddr) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Listen { addr, source })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Listen { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], global().render())
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    });
    Ok((bound, task))
}

/// Pushes every metric to a Pushgateway, replacing the group `job`/`instance` (an HTTP PUT, as
/// the Pushgateway API defines: `/metrics/job/<job>/instance/<instance>`).
pub async fn push(url: &str, job: &str, instance: &str) -> Result<(), MetricsError> {
    let err = |message: String| MetricsError::Push { url: url.to_string(), message };
    let target =
        format!("{}/metrics/job/{}/instance/{}", url.trim_end_matches('/'), url_segment(job), url_segment(instance));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let response = client
        .put(target)
        .header("content-type", "text/plain; version=0.0.4")
        .body(global().render())
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(err(format!("HTTP {status}: {}", body.trim())));
    }
    Ok(())
}

/// A path segment for the Pushgateway URL: empty values and anything but `[A-Za-z0-9_.-]` are
/// base64url-encoded with the `@base64` suffix, as the Pushgateway README specifies.
fn url_segment(value: &str) -> String {
    use base64::Engine;
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        return value.to_string();
    }
    let encoded = base64::engine::general_purpose::URL_SAFE.encode(value);
    format!("{}@base64", if encoded.is_empty() { "=".to_string() } else { encoded })
}

/// Writes the metrics for node_exporter's textfile collector: to a temporary file in the same
/// directory, then renamed, so the collector never reads half a file.
pub fn write_textfile(path: &Path) -> Result<(), MetricsError> {
    let err = |source| MetricsError::Textfile { path: path.display().to_string(), source };
    let tmp = path.with_extension(format!("prom.tmp.{}", std::process::id()));
    std::fs::write(&tmp, global().render()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The end-of-job push and textfile a job's flags ask for. Their failures are logged and never
/// change the job's outcome.
pub async fn publish(args: &crate::cli::MetricsArgs) {
    if let Some(url) = &args.pushgateway {
        let instance = args.pushgateway_instance.clone().unwrap_or_else(hostname);
        match push(url, &args.pushgateway_job, &instance).await {
            Ok(()) => tracing::info!(url, "metrics pushed"),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    if let Some(path) = &args.metrics_textfile
        && let Err(e) = write_textfile(path)
    {
        tracing::warn!("{e}");
    }
}

/// This machine's name, for the Pushgateway's `instance` label.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_escaped_like_the_pushgateway_wants() {
        assert_eq!(url_segment("nightly-orders_1.0"), "nightly-orders_1.0");
        assert_eq!(url_segment("a/b c"), "YS9iIGM=@base64");
        assert_eq!(url_segment(""), "=@base64");
    }

    #[test]
    fn render_names_every_metric() {
        global().rows_read.inc_by(0);
        let text = global().render();
        for n in ["bq2sftp_rows_read_total", "bq2sftp_read_streams_active", "bq2sftp_last_success_timestamp_seconds"] {
            assert!(text.contains(n), "{n}");
        }
    }
}
