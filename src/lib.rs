//! bq2sftp: stream BigQuery tables to SFTP (or a local directory) as CSV, Parquet or NDJSON.
//!
//! The crate is the whole tool; `main.rs` only parses flags and maps errors to exit codes.
//! A [`Job`] is a validated configuration (source, target, pipeline options). Running it
//! opens the source into streams and drives them through [`pipeline`]: read -> encode ->
//! upload, with bounded queues between stages.
//!
//! ```no_run
//! # async fn demo() -> Result<(), bq2sftp::Error> {
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     export: bq2sftp::cli::ExportArgs,
//! }
//! let cli = Cli::parse_from(["x", "--from", "synthetic://?rows=1000", "--to", "null:"]);
//! let report = bq2sftp::run(&cli.export.to_job()?).await?;
//! println!("{} rows", report.rows);
//! # Ok(()) }
//! ```

pub mod cli;
pub mod doctor;
pub mod emulator;
pub mod encode;
pub mod error;
pub mod jobfile;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod read;
pub mod secret;
pub mod serve;
pub mod state;
pub mod template;
pub mod write;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use error::{ConfigError, Error, exit};
pub use pipeline::{PipelineOptions, Progress, Report};

/// A validated export: what to read, how to encode it, where to write it.
#[derive(Debug, Clone)]
pub struct Job {
    pub source: read::SourceConfig,
    pub target: write::SinkConfig,
    pub target_options: write::TargetOptions,
    pub pipeline: PipelineOptions,
    /// `--dry-run`: the target the job would have written to (it writes to `null:` instead).
    pub dry_run: Option<String>,
    /// Where the target's `gcp-secret:` references are fetched from.
    pub secret_manager: secret::SecretManagerOptions,
}

impl Job {
    /// Runs the job until done, failed, or `cancel`led.
    pub async fn run_with(&self, cancel: CancellationToken, progress: Arc<Progress>) -> Result<Report, Error> {
        let started = std::time::Instant::now();
        let result = async {
            let source = self.source.build()?;
            let sink = self.sink().await?;
            pipeline::run(source, sink, self.pipeline.clone(), cancel, progress).await
        }
        .await;
        let exit_code = result.as_ref().map_or_else(Error::exit_code, |_| exit::OK);
        metrics::events::JobFinished { exit_code, seconds: started.elapsed().as_secs_f64() }.emit();
        result
    }

    /// The target, its `gcp-secret:` references fetched, ready to connect.
    pub async fn sink(&self) -> Result<Arc<dyn write::Sink>, Error> {
        let target = self.target.with_secrets(&self.secret_manager).await?;
        Ok(target.build(&self.target_options)?)
    }
}

/// Runs `job` to completion.
pub async fn run(job: &Job) -> Result<Report, Error> {
    job.run_with(CancellationToken::new(), Arc::default()).await
}
